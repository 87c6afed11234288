//! `shoal-runtime` (the `runtime-agent` crate) will own running workloads on this host: the
//! `ContainerRuntime` trait and its Docker (bollard), local-process and fake implementations.
//! It is the only crate that knows bollard.

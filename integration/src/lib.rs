//! `shoal-integration` owns the multi-node tests: the deterministic simulation of many nodes in
//! one process, real agents on loopback, and workloads on the real Docker Engine. It is
//! development-only and never shipped.

pub mod agents;
pub mod lease_sim;
pub mod sim;

//! `shoal-runtime` (the `runtime-agent` crate) owns running workloads on this host: the
//! [`ContainerRuntime`] trait and its three implementations — [`DockerRuntime`] (the Docker
//! Engine through bollard), [`ProcessRuntime`] (plain local processes) and [`FakeRuntime`]
//! (in memory, with scripted failures, for the tests of the layers above). It is the only crate
//! that knows bollard.
//!
//! # Identity and ownership
//!
//! Every instance carries five labels: `shoal.node`, `shoal.service`, `shoal.slot`,
//! `shoal.version` and `shoal.instance`. A runtime only lists, watches and touches instances
//! whose `shoal.node` is its own node, so several nodes (or test runs) can share one engine.
//!
//! # Idempotence and adoption
//!
//! [`ContainerRuntime::ensure_started`] returns a running instance untouched, so an agent that
//! restarts calls `list` and then `ensure_started` for its assignments and restarts nothing.
//! Stopping or removing what is already stopped or gone succeeds.
//!
//! # Docker
//!
//! [`DockerRuntime::connect`] negotiates the API version (the engine may speak 1.41 only). It
//! never pulls: an image missing from the engine is [`RuntimeError::ImageNotFound`], remembered
//! for a doubling window (2 s up to 60 s) so a supervisor's retries do not hammer the engine.
//! Containers get restart policy `no` (shoal restarts, not Docker) and, by default, Docker's
//! init as PID 1 so SIGTERM reaches workloads such as busybox that ignore it as PID 1.
//!
//! # Processes, and what happens when the agent restarts
//!
//! [`ProcessRuntime`] runs each instance's command in its own process group, with its ports in
//! `PORT` / `SHOAL_PORT_<NAME>` (and `${VAR}` expanded in the command), its output appended to
//! `<data dir>/instances/<id>/output.log`, and a small state file (`state.json`: pid, process
//! group, the process's start time from `/proc/<pid>/stat`, the spec, the bound ports) beside it.
//! Stopping signals the whole group with SIGTERM and SIGKILLs it after the grace period.
//!
//! The processes do **not** depend on the agent: they are in their own process groups, so an
//! agent that exits or crashes leaves them running (unless a service manager kills the agent's
//! whole cgroup, e.g. systemd's default `KillMode=control-group`: use `KillMode=process` to keep
//! them). A restarted agent reads the state files and, for each instance, checks that the pid
//! is alive, not a zombie, and has the recorded start time (so a recycled pid is not mistaken
//! for it). Such instances are adopted as running: they are listed, `ensure_started` leaves them
//! alone, stop/exec/stats/logs work as before, and their exit is detected by polling. Because an
//! adopted process is no longer the agent's child, its exit code cannot be known: its `Exited`
//! event and state carry `code: None`. Instances whose process is gone are listed as exited
//! with an unknown code. The process runtime enforces no CPU or memory limits (it has no
//! cgroups); the limits are reported back in stats only.

mod docker;
mod error;
mod fake;
pub mod negative_cache;
mod process;
mod runtime;
mod spec;
mod types;

pub use docker::{DEFAULT_SOCKET as DOCKER_DEFAULT_SOCKET, DockerOptions, DockerRuntime};
pub use error::{Result, RuntimeError};
pub use fake::{FAKE_FIRST_HOST_PORT, FakeFailure, FakeRuntime};
pub use negative_cache::NegativeCache;
pub use process::ProcessRuntime;
pub use runtime::ContainerRuntime;
pub use spec::{
    InstanceSpec, LABEL_INSTANCE, LABEL_NODE, LABEL_PORT_PREFIX, LABEL_SERVICE, LABEL_SLOT,
    LABEL_VERSION, MAX_NAME_LEN, PortSpec, Protocol, RESERVED_LABELS, Resources, Workload,
    check_instance_id, port_env_name,
};
pub use types::{
    BoundPort, DEFAULT_EXEC_TIMEOUT, EVENT_CHANNEL_CAPACITY, EXEC_OUTPUT_CAP, EventKind,
    ExecOutput, HealthStatus, InstanceInfo, InstanceState, LogLine, LogOptions, LogSource,
    LogStream, ResourceStats, RuntimeEvent,
};

//! The crate's one error type.

use std::time::Duration;

/// Everything that can go wrong while running workloads on this host.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The instance spec is malformed (bad id, reserved label, image and command both set, ...).
    #[error("invalid instance spec: {0}")]
    InvalidSpec(String),

    /// The image is not present on the engine. shoal never pulls: images must be loaded on the
    /// host beforehand. `retry_in` is set when the answer came from the negative cache, without
    /// asking the engine again.
    #[error(
        "image `{image}` is not present on the Docker engine (shoal does not pull: load or build it on this host first){}",
        match retry_in { Some(d) => format!("; remembered as missing, the engine is asked again in {:.1}s", d.as_secs_f64()), None => String::new() }
    )]
    ImageNotFound {
        /// The image reference as given in the spec.
        image: String,
        /// Time until the runtime asks the engine again, when the answer was cached.
        retry_in: Option<Duration>,
    },

    /// A host port asked for in the spec is already taken by something else.
    #[error("host port {port} (port `{name}`) is already in use on this host: {detail}")]
    PortInUse {
        /// Port name from the spec.
        name: String,
        /// The host port that could not be bound.
        port: u16,
        /// What the engine or the OS said.
        detail: String,
    },

    /// The container engine cannot be reached at all.
    #[error("the Docker engine at {endpoint} is unreachable: {detail}")]
    EngineUnreachable {
        /// Socket path or URL that was tried.
        endpoint: String,
        /// The underlying error.
        detail: String,
    },

    /// The engine answered with an error.
    #[error("Docker engine error during {op}: {detail}")]
    Engine {
        /// What shoal was doing (`create`, `start`, `stop`, ...).
        op: &'static str,
        /// The engine's message.
        detail: String,
    },

    /// No instance with this id is owned by this node.
    #[error("instance `{0}` not found on this node")]
    NotFound(String),

    /// The operation needs a running instance.
    #[error("instance `{0}` is not running")]
    NotRunning(String),

    /// The process runtime could not start the command.
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        /// The program (first word of the command).
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// An exec or another bounded operation took too long.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        op: &'static str,
        /// The limit that was hit.
        after: Duration,
    },

    /// Reading or writing the runtime's state in the data dir failed.
    #[error("state in {path}: {detail}")]
    State {
        /// The file or directory concerned.
        path: String,
        /// What went wrong.
        detail: String,
    },

    /// A failure injected by the fake runtime's script.
    #[error("scripted failure: {0}")]
    Scripted(String),

    /// Any other I/O error.
    #[error("I/O error during {op}: {source}")]
    Io {
        /// What shoal was doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand used across the crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

//! What the runtime reports back: instance state, events, stats, exec output and logs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::spec::Protocol;

/// Lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Created but never started (or being started).
    Created,
    /// Running.
    Running,
    /// Paused or otherwise frozen.
    Paused,
    /// Ended. `code` is unknown when the process was adopted after an agent restart or was
    /// killed by a signal the runtime could not attribute.
    Exited {
        /// Exit code, when known.
        code: Option<i64>,
        /// The kernel's OOM killer ended it.
        oom_killed: bool,
    },
}

impl InstanceState {
    /// True while running.
    pub fn is_running(&self) -> bool {
        matches!(self, InstanceState::Running)
    }
}

/// Health as reported by the engine's own health check (Docker `HEALTHCHECK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthStatus {
    /// In the start period.
    Starting,
    /// Passing.
    Healthy,
    /// Failing.
    Unhealthy,
}

/// A port as actually bound on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundPort {
    /// Port name from the spec.
    pub name: String,
    /// Port inside the container (equal to `host_port` for the process runtime).
    pub container_port: u16,
    /// Host address it is bound to (unspecified = all interfaces).
    pub host_ip: IpAddr,
    /// Host port, as chosen by the spec, the engine or the OS.
    pub host_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

impl BoundPort {
    /// The address to connect to from this host (loopback when bound to all interfaces).
    pub fn local_addr(&self) -> SocketAddr {
        let ip = if self.host_ip.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.host_ip
        };
        SocketAddr::new(ip, self.host_port)
    }
}

/// An instance as the runtime sees it now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Instance id (label `shoal.instance`).
    pub instance_id: String,
    /// Service (label `shoal.service`).
    pub service: String,
    /// Slot (label `shoal.slot`).
    pub slot: u32,
    /// Version (label `shoal.version`).
    pub version: u64,
    /// Owning node (label `shoal.node`).
    pub node: String,
    /// The runtime's own handle: a container id, or `pid:<pid>` for processes.
    pub runtime_id: String,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Engine health, when the image defines a health check.
    pub health: Option<HealthStatus>,
    /// When it last started.
    pub started_at: Option<SystemTime>,
    /// Ports as bound on the host.
    pub ports: Vec<BoundPort>,
    /// All labels, identity labels included.
    pub labels: BTreeMap<String, String>,
}

impl InstanceInfo {
    /// The host address of a named port.
    pub fn port(&self, name: &str) -> Option<SocketAddr> {
        self.ports
            .iter()
            .find(|p| p.name == name)
            .map(BoundPort::local_addr)
    }
}

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// It started (or was restarted by someone).
    Started,
    /// It ended.
    Exited {
        /// Exit code, when known.
        code: Option<i64>,
    },
    /// The kernel's OOM killer hit it (an `Exited` follows).
    OomKilled,
    /// Engine health changed.
    Health(HealthStatus),
    /// It was removed.
    Removed,
}

/// One runtime event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEvent {
    /// Instance id.
    pub instance_id: String,
    /// Service of the instance, when known.
    pub service: Option<String>,
    /// What happened.
    pub kind: EventKind,
    /// When the runtime observed it.
    pub at: SystemTime,
}

/// Capacity of every runtime's event channel. A receiver that falls further behind gets
/// `RecvError::Lagged(n)` (counted, never awaited) and should reconcile with `list`.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// Resource use of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResourceStats {
    /// CPU time used since start, in nanoseconds.
    pub cpu_total_ns: u64,
    /// CPU use over the sampling window, in cores (1.0 = one core fully busy).
    pub cpu_cores: f64,
    /// Memory in use, in bytes (working set: page cache that can be dropped is excluded).
    pub memory_bytes: u64,
    /// Memory limit in bytes, when there is one.
    pub memory_limit: Option<u64>,
    /// When the sample was taken.
    pub at: SystemTime,
}

/// Result of running a command inside (or, for processes, beside) an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code.
    pub exit_code: i64,
    /// Combined stdout and stderr, truncated to [`EXEC_OUTPUT_CAP`] bytes.
    pub output: Vec<u8>,
}

/// Most output kept from one exec (probes only need a little).
pub const EXEC_OUTPUT_CAP: usize = 64 * 1024;

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogSource {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Both interleaved in one file (the process runtime).
    Output,
}

/// One line of an instance's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Which stream.
    pub source: LogSource,
    /// The line without its trailing newline (invalid UTF-8 replaced).
    pub line: String,
}

/// What logs to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogOptions {
    /// Only the last N lines (`None` = everything kept).
    pub tail: Option<usize>,
    /// Keep streaming new lines until the instance stops or the stream is dropped.
    pub follow: bool,
}

/// A stream of log lines.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<LogLine, RuntimeError>> + Send>>;

/// Default time an exec may run when the caller has no better idea.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(10);

/// Splits a byte buffer into complete lines, keeping the unfinished tail in `buf`.
pub(crate) fn drain_lines(buf: &mut Vec<u8>, source: LogSource, out: &mut Vec<LogLine>) {
    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
        let mut line: Vec<u8> = buf.drain(..=pos).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        out.push(LogLine {
            source,
            line: String::from_utf8_lossy(&line).into_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_on_newlines_and_the_partial_tail_is_kept() {
        let mut buf = b"one\r\ntwo\nthr".to_vec();
        let mut out = vec![];
        drain_lines(&mut buf, LogSource::Stdout, &mut out);
        assert_eq!(
            out.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(buf, b"thr");
    }

    #[test]
    fn a_port_bound_to_all_interfaces_is_reached_on_loopback() {
        let p = BoundPort {
            name: "http".into(),
            container_port: 8080,
            host_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            host_port: 31000,
            protocol: Protocol::Tcp,
        };
        assert_eq!(p.local_addr(), "127.0.0.1:31000".parse().unwrap());
    }
}

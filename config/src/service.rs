//! The service spec: one service per TOML file, the operator's desired state for it.
//!
//! Every field has a documented default so a minimal spec is `name` plus `image` (or `command`).
//! The types are plain data; [`crate::load_service_str`] parses them with locations and
//! [`crate::validate`] checks the rules.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::constraint::Constraint;
use crate::units::{ByteSize, duration_serde};

/// A service: what to run, how many, where, how to check it and how to change it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service name: lowercase letters, digits and `-`, starting with a letter, at most 63 chars.
    pub name: String,
    /// Container image (docker runtime). Exactly one of `image` and `command` is set.
    #[serde(default)]
    pub image: Option<String>,
    /// Command line (process runtime); `${PORT}` expands to the first port's host port.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Desired number of instances. Default 1.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Time between SIGTERM and SIGKILL when an instance is stopped. Default `10s`.
    #[serde(default = "default_stop_grace", with = "duration_serde")]
    pub stop_grace: Duration,
    /// Names of secrets handed to the instances. Default none.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// CPU and memory reserved (and limited) per instance.
    #[serde(default)]
    pub resources: Resources,
    /// Ports the instances listen on, and where the routing mesh publishes them.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where instances may run and how they spread.
    #[serde(default)]
    pub placement: Placement,
    /// Startup, liveness and readiness probes.
    #[serde(default)]
    pub health: Health,
    /// What to do when an instance exits.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How a new version replaces the old one.
    #[serde(default)]
    pub update: UpdatePolicy,
    /// Automatic scaling between bounds. Default: off.
    #[serde(default)]
    pub autoscale: Option<Autoscale>,
}

pub(crate) fn default_replicas() -> u32 {
    1
}
pub(crate) fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}

impl ServiceSpec {
    /// A spec with this name and image and every other field at its default.
    pub fn with_image(name: &str, image: &str) -> Self {
        ServiceSpec {
            name: name.to_string(),
            image: Some(image.to_string()),
            command: None,
            replicas: default_replicas(),
            stop_grace: default_stop_grace(),
            secrets: Vec::new(),
            resources: Resources::default(),
            ports: Vec::new(),
            env: BTreeMap::new(),
            placement: Placement::default(),
            health: Health::default(),
            restart: RestartPolicy::default(),
            update: UpdatePolicy::default(),
            autoscale: None,
        }
    }

    /// The spec in the operator's TOML format; [`crate::load_service_str`] reads it back equal.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render this spec: {e}\n"))
    }
}

/// Resources reserved per instance; also enforced as limits by the runtime.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (fractions allowed). Default 0: no reservation, no limit.
    #[serde(default)]
    pub cpu: f64,
    /// Memory. Default: no reservation, no limit. At least 6MiB when set.
    #[serde(default)]
    pub memory: Option<ByteSize>,
}

/// How a port's traffic is handled by the routing mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Bytes are forwarded; balanced per connection. The default.
    #[default]
    Tcp,
    /// HTTP/1.1 reverse proxy; balanced per request.
    Http,
}

/// A port an instance listens on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Port name, referred to by probes (`port = "http"`).
    pub name: String,
    /// The port inside the container (docker) or handed to the process as `PORT`.
    pub container: u16,
    /// The port every node publishes through the routing mesh. Default: not published.
    #[serde(default)]
    pub published: Option<u16>,
    /// `tcp` (default) or `http`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Send a PROXY protocol v2 header to the instance so it sees the client address. Default false.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// Placement rules.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Every constraint must hold on a node for an instance to be placed there.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Label keys of the topology hierarchy, outermost first, e.g. `["datacenter", "zone", "rack"]`:
    /// instances spread evenly over each level.
    #[serde(default)]
    pub spread: Vec<String>,
    /// At most this many instances of the service per node. Default 0: no limit.
    #[serde(default)]
    pub max_per_node: u32,
}

/// The probes of a service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Holds the other probes back until it first succeeds.
    #[serde(default)]
    pub startup: Option<Probe>,
    /// Failing `failure_threshold` times in a row restarts the instance.
    #[serde(default)]
    pub liveness: Option<Probe>,
    /// Decides whether the instance receives traffic; failing never restarts it.
    #[serde(default)]
    pub readiness: Option<Probe>,
}

/// An HTTP GET check: success is a 2xx or 3xx status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// Request path, starting with `/`.
    pub path: String,
    /// Name of a declared port.
    pub port: String,
}

/// A TCP connect check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    /// Name of a declared port.
    pub port: String,
}

/// A command run inside the instance: success is exit code 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecCheck {
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// One probe: exactly one of `http`, `tcp`, `exec`, and its timing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// HTTP GET check.
    #[serde(default)]
    pub http: Option<HttpCheck>,
    /// TCP connect check.
    #[serde(default)]
    pub tcp: Option<TcpCheck>,
    /// Exec check.
    #[serde(default)]
    pub exec: Option<ExecCheck>,
    /// Time between checks. Default `2s`.
    #[serde(default = "default_probe_interval", with = "duration_serde")]
    pub interval: Duration,
    /// A check taking longer fails. Default `1s`; at most `interval`.
    #[serde(default = "default_probe_timeout", with = "duration_serde")]
    pub timeout: Duration,
    /// Consecutive failures that make the probe fail. Default 3.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Consecutive successes that make it pass again. Default 1 (must be 1 for liveness).
    #[serde(default = "default_success_threshold")]
    pub success_threshold: u32,
    /// Wait after start before the first check. Default `0s`.
    #[serde(default, with = "duration_serde")]
    pub initial_delay: Duration,
}

pub(crate) fn default_probe_interval() -> Duration {
    Duration::from_secs(2)
}
pub(crate) fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}
pub(crate) fn default_failure_threshold() -> u32 {
    3
}
pub(crate) fn default_success_threshold() -> u32 {
    1
}

/// The check a probe runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Check<'a> {
    /// HTTP GET.
    Http(&'a HttpCheck),
    /// TCP connect.
    Tcp(&'a TcpCheck),
    /// Exec.
    Exec(&'a ExecCheck),
}

impl Probe {
    /// A probe with this check and default timing.
    pub fn new(http: Option<HttpCheck>, tcp: Option<TcpCheck>, exec: Option<ExecCheck>) -> Self {
        Probe {
            http,
            tcp,
            exec,
            interval: default_probe_interval(),
            timeout: default_probe_timeout(),
            failure_threshold: default_failure_threshold(),
            success_threshold: default_success_threshold(),
            initial_delay: Duration::ZERO,
        }
    }

    /// The probe's check; `None` only for a probe that failed validation.
    pub fn check(&self) -> Option<Check<'_>> {
        match (&self.http, &self.tcp, &self.exec) {
            (Some(h), None, None) => Some(Check::Http(h)),
            (None, Some(t), None) => Some(Check::Tcp(t)),
            (None, None, Some(e)) => Some(Check::Exec(e)),
            _ => None,
        }
    }

    /// The port name the check uses, if any.
    pub fn port(&self) -> Option<&str> {
        match self.check()? {
            Check::Http(h) => Some(&h.port),
            Check::Tcp(t) => Some(&t.port),
            Check::Exec(_) => None,
        }
    }
}

/// When an exited instance is restarted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Whatever the exit code. The default.
    #[default]
    Always,
    /// Only after a non-zero exit or a kill.
    OnFailure,
    /// Never; the instance stays exited.
    Never,
}

/// Exponential restart backoff.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the second restart (the first is immediate); doubles each time. Default `200ms`.
    #[serde(default = "default_backoff_base", with = "duration_serde")]
    pub base: Duration,
    /// Largest delay. Default `30s`.
    #[serde(default = "default_backoff_cap", with = "duration_serde")]
    pub cap: Duration,
    /// Running this long resets the backoff. Default `60s`.
    #[serde(default = "default_backoff_reset", with = "duration_serde")]
    pub reset_after: Duration,
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_cap() -> Duration {
    Duration::from_secs(30)
}
fn default_backoff_reset() -> Duration {
    Duration::from_secs(60)
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: default_backoff_base(),
            cap: default_backoff_cap(),
            reset_after: default_backoff_reset(),
        }
    }
}

/// Restart policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// `always` (default), `on-failure` or `never`.
    #[serde(default)]
    pub policy: RestartCondition,
    /// Backoff between restarts.
    #[serde(default)]
    pub backoff: Backoff,
    /// Give up after this many restarts in a row. Default 0: unlimited.
    #[serde(default)]
    pub max_attempts: u32,
}

/// How a new version is rolled out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Replace instances in batches. The default.
    #[default]
    Rolling,
    /// Run the new version at full size beside the old, then switch all traffic.
    BlueGreen,
    /// Shift traffic to the new version in weighted steps, judged against the old.
    Canary,
}

/// What a failed rollout does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureAction {
    /// Return to the previous version. The default.
    #[default]
    Rollback,
    /// Stop and wait for the operator.
    Pause,
    /// Carry on regardless.
    Continue,
}

/// Whether a replacement starts before or after the instance it replaces stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Start the new instance, wait for it to be ready, then drain the old. The default.
    #[default]
    StartFirst,
    /// Drain and stop the old instance first (needs no spare capacity).
    StopFirst,
}

/// Canary knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// Traffic percentages for the new version, strictly increasing, ending at 100.
    /// Default `[10, 25, 50, 100]`.
    #[serde(default = "default_canary_steps")]
    pub steps: Vec<u32>,
    /// How long each step is held and analysed. Default `30s`.
    #[serde(default = "default_step_interval", with = "duration_serde")]
    pub step_interval: Duration,
    /// Abort when the canary's error rate exceeds this (0..1). Default 0.01.
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// Requests needed in a step before it is judged. Default 50.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
}

fn default_canary_steps() -> Vec<u32> {
    vec![10, 25, 50, 100]
}
fn default_step_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_max_error_rate() -> f64 {
    0.01
}
fn default_min_requests() -> u32 {
    50
}

impl Default for Canary {
    fn default() -> Self {
        Canary {
            steps: default_canary_steps(),
            step_interval: default_step_interval(),
            max_error_rate: default_max_error_rate(),
            min_requests: default_min_requests(),
        }
    }
}

/// Blue-green knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlueGreen {
    /// How long the old version is kept after the switch, for an instant rollback. Default `10m`.
    #[serde(default = "default_rollback_window", with = "duration_serde")]
    pub rollback_window: Duration,
}

fn default_rollback_window() -> Duration {
    Duration::from_secs(600)
}

impl Default for BlueGreen {
    fn default() -> Self {
        BlueGreen {
            rollback_window: default_rollback_window(),
        }
    }
}

/// Update (rollout) policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatePolicy {
    /// `rolling` (default), `blue-green` or `canary`.
    #[serde(default)]
    pub strategy: Strategy,
    /// Instances replaced at once. Default 1.
    #[serde(default = "default_parallelism")]
    pub parallelism: u32,
    /// Pause between batches. Default `0s`.
    #[serde(default, with = "duration_serde")]
    pub delay: Duration,
    /// How long a new instance is watched before it counts as healthy. Default `5s`.
    #[serde(default = "default_monitor", with = "duration_serde")]
    pub monitor: Duration,
    /// Fraction of failed instances tolerated (0..1). Default 0.
    #[serde(default)]
    pub max_failure_ratio: f64,
    /// `rollback` (default), `pause` or `continue`.
    #[serde(default)]
    pub failure_action: FailureAction,
    /// `start-first` (default) or `stop-first`.
    #[serde(default)]
    pub order: UpdateOrder,
    /// Canary knobs (strategy = "canary").
    #[serde(default)]
    pub canary: Canary,
    /// Blue-green knobs (strategy = "blue-green").
    #[serde(default)]
    pub blue_green: BlueGreen,
}

fn default_parallelism() -> u32 {
    1
}
fn default_monitor() -> Duration {
    Duration::from_secs(5)
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            strategy: Strategy::default(),
            parallelism: default_parallelism(),
            delay: Duration::ZERO,
            monitor: default_monitor(),
            max_failure_ratio: 0.0,
            failure_action: FailureAction::default(),
            order: UpdateOrder::default(),
            canary: Canary::default(),
            blue_green: BlueGreen::default(),
        }
    }
}

/// Autoscaling bounds and target: exactly one of `target_rps_per_instance` and `target_cpu`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    /// Fewest instances.
    pub min: u32,
    /// Most instances.
    pub max: u32,
    /// Target requests per second per instance (HTTP ports).
    #[serde(default)]
    pub target_rps_per_instance: Option<f64>,
    /// Target CPU use as a fraction of the reserved `resources.cpu` (0..1].
    #[serde(default)]
    pub target_cpu: Option<f64>,
    /// A lower recommendation must hold this long before scaling down. Default `5m`.
    #[serde(default = "default_scale_down", with = "duration_serde")]
    pub scale_down_stabilization: Duration,
    /// A higher recommendation must hold this long before scaling up. Default `0s`.
    #[serde(default, with = "duration_serde")]
    pub scale_up_stabilization: Duration,
}

pub(crate) fn default_scale_down() -> Duration {
    Duration::from_secs(300)
}

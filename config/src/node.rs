//! The node config: what one host's agent is called, where it listens, whom it joins, what it
//! offers. Every flag of `shoal agent` overrides the matching key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, duration_serde, opt_duration_serde};

/// Which container runtime runs this node's instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    /// The Docker Engine on this host. The default.
    #[default]
    Docker,
    /// Plain local processes.
    Process,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines. The default.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Resources this node offers to instances.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeResources {
    /// CPU cores offered. Default: the host's core count.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Memory offered. Default: the host's memory.
    #[serde(default)]
    pub memory: Option<ByteSize>,
}

/// SWIM failure-detector timing. Defaults are foca's LAN preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipConfig {
    /// Starting point for the values below: `lan` (foca's LAN preset, the default) or `fast`
    /// (probe every 500ms, suspicion 1.5s: failures are noticed in about 2–3 s on a quiet LAN).
    #[serde(default)]
    pub preset: MembershipPreset,
    /// Time between probes of a random member. Default: the preset's (`1s` for lan).
    #[serde(default, with = "opt_duration_serde")]
    pub probe_period: Option<Duration>,
    /// A probe unanswered this long triggers indirect probes. Default: the preset's (`500ms`).
    #[serde(default, with = "opt_duration_serde")]
    pub probe_timeout: Option<Duration>,
    /// How long a member stays suspect before it is declared down. Default: the preset's
    /// (lan: `4s × max(1, log10(cluster size))`).
    #[serde(default, with = "opt_duration_serde")]
    pub suspicion: Option<Duration>,
    /// Time between gossip rounds. Default: the preset's (`200ms`).
    #[serde(default, with = "opt_duration_serde")]
    pub gossip_interval: Option<Duration>,
}

/// Membership timing presets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MembershipPreset {
    /// foca's `Config::new_lan`: probe 1s, probe timeout 500ms, suspicion 4s×max(1, log10 N).
    #[default]
    Lan,
    /// Probe 500ms, probe timeout 250ms, suspicion 1.5s.
    Fast,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            preset: MembershipPreset::Lan,
            probe_period: None,
            probe_timeout: None,
            suspicion: None,
            gossip_interval: None,
        }
    }
}

/// Membership timing with the preset applied: what the failure detector runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipTiming {
    /// Time between probes.
    pub probe_period: Duration,
    /// Probe round-trip timeout.
    pub probe_timeout: Duration,
    /// Suspect → down; `None` means the LAN formula for the current cluster size.
    pub suspicion: Option<Duration>,
    /// Time between gossip rounds.
    pub gossip_interval: Duration,
}

impl MembershipConfig {
    /// The effective timing: explicit keys over the preset's values.
    pub fn timing(&self) -> MembershipTiming {
        let base = match self.preset {
            MembershipPreset::Lan => MembershipTiming {
                probe_period: Duration::from_secs(1),
                probe_timeout: Duration::from_millis(500),
                suspicion: None,
                gossip_interval: Duration::from_millis(200),
            },
            MembershipPreset::Fast => MembershipTiming {
                probe_period: Duration::from_millis(500),
                probe_timeout: Duration::from_millis(250),
                suspicion: Some(Duration::from_millis(1500)),
                gossip_interval: Duration::from_millis(100),
            },
        };
        MembershipTiming {
            probe_period: self.probe_period.unwrap_or(base.probe_period),
            probe_timeout: self.probe_timeout.unwrap_or(base.probe_timeout),
            suspicion: self.suspicion.or(base.suspicion),
            gossip_interval: self.gossip_interval.unwrap_or(base.gossip_interval),
        }
    }
}

/// One node's agent configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name, unique in the cluster. Default: the name in the node's certificate.
    #[serde(default)]
    pub name: Option<String>,
    /// UDP (gossip) and TCP (control and data streams) address. Default `127.0.0.1:7946`.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Address other nodes use to reach this one. Default: `bind` (required when `bind` is
    /// `0.0.0.0`).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// HTTP API and `/metrics`. Default `127.0.0.1:7070`.
    #[serde(default = "default_api")]
    pub api: SocketAddr,
    /// `host:port` of nodes to join through. Default none (a new cluster).
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Where the node keeps its state. Default `./shoal-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Directory with `node.key`, `node.crt` and `ca.crt`. Default `DATA_DIR/certs`.
    #[serde(default)]
    pub cert_dir: Option<PathBuf>,
    /// `docker` (default) or `process`.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// Labels used by placement constraints and spread (e.g. `datacenter`, `zone`, `rack`). They
    /// add to the labels in the node's certificate.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Resources offered to instances.
    #[serde(default)]
    pub resources: NodeResources,
    /// Failure-detector timing.
    #[serde(default)]
    pub membership: MembershipConfig,
    /// How long the instances of a node declared down wait before they are placed elsewhere.
    /// Default `1s` (on top of the failure detector's suspicion time).
    #[serde(default = "default_reschedule_grace", with = "duration_serde")]
    pub reschedule_grace: Duration,
    /// `text` (default) or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
}

pub(crate) fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7946))
}
pub(crate) fn default_api() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}
pub(crate) fn default_data_dir() -> PathBuf {
    PathBuf::from("shoal-data")
}
pub(crate) fn default_reschedule_grace() -> Duration {
    Duration::from_secs(1)
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: None,
            bind: default_bind(),
            advertise: None,
            api: default_api(),
            seeds: Vec::new(),
            data_dir: default_data_dir(),
            cert_dir: None,
            runtime: RuntimeKind::default(),
            labels: BTreeMap::new(),
            resources: NodeResources::default(),
            membership: MembershipConfig::default(),
            reschedule_grace: default_reschedule_grace(),
            log_format: LogFormat::default(),
        }
    }
}

impl NodeConfig {
    /// The certificate directory: `cert_dir`, or `DATA_DIR/certs`.
    pub fn cert_dir(&self) -> PathBuf {
        self.cert_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("certs"))
    }

    /// The address other nodes reach this one at.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.bind)
    }

    /// The config in TOML; [`crate::load_node_str`] reads it back equal.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render this config: {e}\n"))
    }
}

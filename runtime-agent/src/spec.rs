//! What to run: the runtime's own instance spec, independent of the service spec format.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// Label naming the node that owns an instance.
pub const LABEL_NODE: &str = "shoal.node";
/// Label naming the service an instance belongs to.
pub const LABEL_SERVICE: &str = "shoal.service";
/// Label carrying the slot number within the service.
pub const LABEL_SLOT: &str = "shoal.slot";
/// Label carrying the service version the instance runs.
pub const LABEL_VERSION: &str = "shoal.version";
/// Label carrying the instance id.
pub const LABEL_INSTANCE: &str = "shoal.instance";
/// Prefix reserved for shoal's own labels; extra labels may not use the five above.
pub const RESERVED_LABELS: [&str; 5] = [
    LABEL_NODE,
    LABEL_SERVICE,
    LABEL_SLOT,
    LABEL_VERSION,
    LABEL_INSTANCE,
];

/// Prefix of the labels the Docker runtime uses to remember port names
/// (`shoal.port.<name>` = `8080/tcp`); reserved too.
pub const LABEL_PORT_PREFIX: &str = "shoal.port.";

/// Longest instance id, service or node name accepted (they end up in container names).
pub const MAX_NAME_LEN: usize = 128;

/// One instance (a replica of a service in one slot) as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Unique id of the instance on this node (letters, digits, `_`, `.`, `-`).
    pub instance_id: String,
    /// Service name.
    pub service: String,
    /// Slot number within the service.
    pub slot: u32,
    /// Version of the service spec the instance runs.
    pub version: u64,
    /// Name of the node that owns the instance (must equal the runtime's node).
    pub node: String,
    /// What to run: a container image or a local command.
    pub workload: Workload,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Ports the workload listens on.
    pub ports: Vec<PortSpec>,
    /// CPU and memory limits.
    pub resources: Resources,
    /// Time between the polite stop signal and the kill, used when the caller gives none.
    pub stop_grace: Duration,
    /// Docker network to attach to (`None` = the engine's default bridge). Ignored by the
    /// process runtime.
    pub network: Option<String>,
    /// Extra labels (may not use the reserved `shoal.*` identity labels).
    pub labels: BTreeMap<String, String>,
}

/// What an instance runs: exactly one of an image or a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Workload {
    /// A container image already present on the engine.
    Image {
        /// Image reference, e.g. `shoal-test/web:1`.
        image: String,
        /// Arguments replacing the image's `CMD` (empty = keep the image's).
        args: Vec<String>,
    },
    /// A local command (process runtime): argv, with `${VAR}` expanded from the instance's
    /// environment, including `PORT` and `SHOAL_PORT_<NAME>`.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
    },
}

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP (default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The Docker spelling (`tcp` / `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A port the workload listens on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Name, used in `SHOAL_PORT_<NAME>` and in errors.
    pub name: String,
    /// Port inside the container (Docker). The process runtime has no container: its process
    /// listens directly on the host port and this field is not used.
    pub container_port: u16,
    /// Host port; `None` or `Some(0)` lets the engine or the OS choose one, which is reported
    /// back in [`crate::InstanceInfo::ports`].
    pub host_port: Option<u16>,
    /// Host address to bind (`None` = all interfaces).
    pub host_ip: Option<IpAddr>,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// CPU and memory limits (`None` = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// CPU limit in cores (0.5 = half a core).
    pub cpus: Option<f64>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
}

fn check_name(what: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(RuntimeError::InvalidSpec(format!(
            "{what} must be 1..={MAX_NAME_LEN} characters, got {} characters",
            value.len()
        )));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(RuntimeError::InvalidSpec(format!(
            "{what} `{value}` contains `{bad}`; only letters, digits, `_`, `.` and `-` are allowed"
        )));
    }
    if value.starts_with(['.', '-']) {
        return Err(RuntimeError::InvalidSpec(format!(
            "{what} `{value}` must start with a letter, digit or `_`"
        )));
    }
    Ok(())
}

/// Checks an instance id (also used by the runtimes before touching the data dir).
pub fn check_instance_id(id: &str) -> Result<()> {
    check_name("instance id", id)
}

/// Turns a port name into the suffix of its environment variable: upper case, and every
/// character that is not a letter or digit becomes `_`.
pub fn port_env_name(name: &str) -> String {
    let mut s = String::from("SHOAL_PORT_");
    s.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    s
}

impl InstanceSpec {
    /// Checks the spec; every runtime calls this before acting on it.
    pub fn validate(&self) -> Result<()> {
        check_instance_id(&self.instance_id)?;
        check_name("service", &self.service)?;
        check_name("node", &self.node)?;
        match &self.workload {
            Workload::Image { image, .. } => {
                if image.trim().is_empty() {
                    return Err(RuntimeError::InvalidSpec("image is empty".into()));
                }
            }
            Workload::Command { argv } => {
                if argv.first().is_none_or(|p| p.trim().is_empty()) {
                    return Err(RuntimeError::InvalidSpec("command is empty".into()));
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.ports {
            if p.name.is_empty() {
                return Err(RuntimeError::InvalidSpec("a port has an empty name".into()));
            }
            if !names.insert(port_env_name(&p.name)) {
                return Err(RuntimeError::InvalidSpec(format!(
                    "port name `{}` is used twice (names are compared as {})",
                    p.name,
                    port_env_name(&p.name)
                )));
            }
        }
        for k in self.labels.keys() {
            if RESERVED_LABELS.contains(&k.as_str()) || k.starts_with(LABEL_PORT_PREFIX) {
                return Err(RuntimeError::InvalidSpec(format!(
                    "label `{k}` is reserved for shoal's own use"
                )));
            }
        }
        if let Some(c) = self.resources.cpus
            && !(c.is_finite() && c > 0.0)
        {
            return Err(RuntimeError::InvalidSpec(format!(
                "cpu limit must be a positive number of cores, got {c}"
            )));
        }
        if self.resources.memory_bytes == Some(0) {
            return Err(RuntimeError::InvalidSpec(
                "memory limit must be positive".into(),
            ));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(RuntimeError::InvalidSpec(format!(
                    "environment variable name `{k}` is invalid"
                )));
            }
        }
        Ok(())
    }

    /// The identity labels plus the extra labels, as set on the container / state file.
    pub fn all_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.insert(LABEL_NODE.into(), self.node.clone());
        l.insert(LABEL_SERVICE.into(), self.service.clone());
        l.insert(LABEL_SLOT.into(), self.slot.to_string());
        l.insert(LABEL_VERSION.into(), self.version.to_string());
        l.insert(LABEL_INSTANCE.into(), self.instance_id.clone());
        l
    }

    /// A spec for an image, with no ports, env or limits: a starting point for tests and callers.
    pub fn image(node: &str, service: &str, slot: u32, version: u64, image: &str) -> Self {
        Self::base(
            node,
            service,
            slot,
            version,
            Workload::Image {
                image: image.into(),
                args: vec![],
            },
        )
    }

    /// A spec for a local command.
    pub fn command(node: &str, service: &str, slot: u32, version: u64, argv: &[&str]) -> Self {
        Self::base(
            node,
            service,
            slot,
            version,
            Workload::Command {
                argv: argv.iter().map(|s| s.to_string()).collect(),
            },
        )
    }

    fn base(node: &str, service: &str, slot: u32, version: u64, workload: Workload) -> Self {
        InstanceSpec {
            instance_id: format!("{service}-{slot}-v{version}"),
            service: service.into(),
            slot,
            version,
            node: node.into(),
            workload,
            env: BTreeMap::new(),
            ports: vec![],
            resources: Resources::default(),
            stop_grace: Duration::from_secs(10),
            network: None,
            labels: BTreeMap::new(),
        }
    }

    /// Adds a TCP port (builder style).
    pub fn with_port(mut self, name: &str, container_port: u16, host_port: Option<u16>) -> Self {
        self.ports.push(PortSpec {
            name: name.into(),
            container_port,
            host_port,
            host_ip: None,
            protocol: Protocol::Tcp,
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec::image("n1", "web", 0, 1, "shoal-test/web:1")
    }

    #[test]
    fn a_well_formed_spec_is_accepted_and_carries_the_five_identity_labels() {
        let s = spec();
        s.validate().unwrap();
        let l = s.all_labels();
        assert_eq!(l[LABEL_NODE], "n1");
        assert_eq!(l[LABEL_SERVICE], "web");
        assert_eq!(l[LABEL_SLOT], "0");
        assert_eq!(l[LABEL_VERSION], "1");
        assert_eq!(l[LABEL_INSTANCE], "web-0-v1");
    }

    #[test]
    fn an_instance_id_with_a_slash_or_space_is_refused() {
        for bad in ["a/b", "a b", "", "-x", "../etc"] {
            let mut s = spec();
            s.instance_id = bad.into();
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains("instance id"), "{bad}: {e}");
        }
        let mut s = spec();
        s.instance_id = "x".repeat(MAX_NAME_LEN + 1);
        assert!(s.validate().is_err());
    }

    #[test]
    fn extra_labels_may_not_override_identity_labels() {
        let mut s = spec();
        s.labels.insert(LABEL_NODE.into(), "other".into());
        assert!(s.validate().unwrap_err().to_string().contains("reserved"));
        let mut s = spec();
        s.labels.insert("shoal.port.http".into(), "1/tcp".into());
        assert!(s.validate().unwrap_err().to_string().contains("reserved"));
    }

    #[test]
    fn two_ports_whose_env_names_collide_are_refused() {
        let s = spec()
            .with_port("http-a", 80, None)
            .with_port("HTTP_A", 81, None);
        assert!(s.validate().unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn empty_commands_images_and_bad_limits_are_refused() {
        let mut s = spec();
        s.workload = Workload::Command { argv: vec![] };
        assert!(s.validate().is_err());
        let mut s = spec();
        s.workload = Workload::Image {
            image: " ".into(),
            args: vec![],
        };
        assert!(s.validate().is_err());
        let mut s = spec();
        s.resources.cpus = Some(f64::NAN);
        assert!(s.validate().is_err());
        let mut s = spec();
        s.resources.memory_bytes = Some(0);
        assert!(s.validate().is_err());
    }

    #[test]
    fn port_env_names_are_upper_case_with_underscores() {
        assert_eq!(port_env_name("http-admin.1"), "SHOAL_PORT_HTTP_ADMIN_1");
    }
}

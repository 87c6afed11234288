//! The rules a spec or node config must satisfy beyond its shape: ranges, names, and rules that
//! tie fields together. Pure functions over the typed values; each violation names the key path
//! it is about, and the loader turns that into a file location.

use std::collections::BTreeSet;

use crate::node::NodeConfig;
use crate::service::{Probe, ServiceSpec};

/// A rule broken by a value: the key path (`update.parallelism`) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Dotted key path, with `[i]` for array elements.
    pub path: String,
    /// What is wrong, as a sentence an operator can act on.
    pub message: String,
}

struct Rules(Vec<Violation>);

impl Rules {
    fn check(&mut self, ok: bool, path: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.0.push(Violation {
                path: path.into(),
                message: message.into(),
            });
        }
    }
}

/// Most levels a `placement.spread` hierarchy may have.
pub const MAX_SPREAD_LEVELS: usize = 6;

/// Largest replica count and autoscale bound accepted.
pub const MAX_REPLICAS: u32 = 100_000;

/// `web`, `api-v2`: lowercase letters, digits and `-`, starting with a letter, at most 63.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_label_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// Checks every rule of a service spec and returns all violations (empty when valid).
pub fn validate_service(spec: &ServiceSpec) -> Vec<Violation> {
    let mut r = Rules(Vec::new());
    r.check(
        is_valid_name(&spec.name),
        "name",
        format!(
            "`{}` is not a valid service name: use lowercase letters, digits and `-`, \
             starting with a letter, at most 63 characters",
            spec.name
        ),
    );
    match (&spec.image, &spec.command) {
        (Some(_), Some(_)) => r.check(
            false,
            "command",
            "set either `image` (docker runtime) or `command` (process runtime), not both",
        ),
        (None, None) => r.check(
            false,
            "",
            "missing `image` (docker runtime) or `command` (process runtime)",
        ),
        (Some(image), None) => r.check(
            !image.trim().is_empty() && !image.chars().any(char::is_whitespace),
            "image",
            format!("`{image}` is not an image reference (e.g. `shoal-test/web:1`)"),
        ),
        (None, Some(cmd)) => r.check(
            cmd.first().is_some_and(|c| !c.trim().is_empty()),
            "command",
            "must name a program to run (the first element may not be empty)",
        ),
    }
    r.check(
        spec.replicas <= MAX_REPLICAS,
        "replicas",
        format!("must be at most {MAX_REPLICAS}"),
    );
    r.check(
        spec.stop_grace.as_secs() <= 3600,
        "stop_grace",
        "must be at most 1h",
    );
    for (i, s) in spec.secrets.iter().enumerate() {
        r.check(
            is_valid_name(s),
            format!("secrets[{i}]"),
            format!("`{s}` is not a valid secret name (lowercase letters, digits, `-`)"),
        );
    }
    let res = &spec.resources;
    r.check(
        res.cpu >= 0.0 && res.cpu <= 1024.0,
        "resources.cpu",
        "must be between 0 and 1024 cores",
    );
    if let Some(m) = res.memory {
        r.check(
            m.bytes() >= 6 << 20,
            "resources.memory",
            "must be at least 6MiB (the smallest limit the Docker Engine accepts)",
        );
    }
    let mut port_names = BTreeSet::new();
    let mut published = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        r.check(
            is_valid_name(&p.name),
            format!("ports[{i}].name"),
            format!(
                "`{}` is not a valid port name (lowercase letters, digits, `-`)",
                p.name
            ),
        );
        r.check(
            port_names.insert(p.name.as_str()),
            format!("ports[{i}].name"),
            format!("port `{}` is declared twice", p.name),
        );
        r.check(
            p.container != 0,
            format!("ports[{i}].container"),
            "must be between 1 and 65535",
        );
        if let Some(pp) = p.published {
            r.check(
                pp != 0,
                format!("ports[{i}].published"),
                "must be between 1 and 65535",
            );
            r.check(
                published.insert(pp),
                format!("ports[{i}].published"),
                format!("port {pp} is published twice"),
            );
        }
    }
    for key in spec.env.keys() {
        r.check(
            is_env_name(key),
            format!("env.{key}"),
            format!("`{key}` is not a valid environment variable name (letters, digits, `_`)"),
        );
    }
    let pl = &spec.placement;
    r.check(
        pl.spread.len() <= MAX_SPREAD_LEVELS,
        "placement.spread",
        format!("at most {MAX_SPREAD_LEVELS} levels"),
    );
    let mut levels = BTreeSet::new();
    for (i, level) in pl.spread.iter().enumerate() {
        r.check(
            is_label_key(level),
            format!("placement.spread[{i}]"),
            format!("`{level}` is not a label key"),
        );
        r.check(
            levels.insert(level.as_str()),
            format!("placement.spread[{i}]"),
            format!("`{level}` appears twice in the spread hierarchy"),
        );
    }
    for (kind, probe) in [
        ("startup", &spec.health.startup),
        ("liveness", &spec.health.liveness),
        ("readiness", &spec.health.readiness),
    ] {
        if let Some(p) = probe {
            check_probe(&mut r, &format!("health.{kind}"), kind, p, &port_names);
        }
    }
    let b = &spec.restart.backoff;
    r.check(
        !b.base.is_zero(),
        "restart.backoff.base",
        "must be more than 0s",
    );
    r.check(
        b.base <= b.cap,
        "restart.backoff.cap",
        "must be at least `restart.backoff.base`",
    );
    let u = &spec.update;
    r.check(
        u.parallelism >= 1,
        "update.parallelism",
        "must be at least 1",
    );
    r.check(
        (0.0..=1.0).contains(&u.max_failure_ratio),
        "update.max_failure_ratio",
        "must be between 0 and 1",
    );
    let steps = &u.canary.steps;
    r.check(
        !steps.is_empty(),
        "update.canary.steps",
        "must list at least one step",
    );
    r.check(
        steps.iter().all(|s| (1..=100).contains(s)),
        "update.canary.steps",
        "each step is a traffic percentage from 1 to 100",
    );
    r.check(
        steps.windows(2).all(|w| w[0] < w[1]),
        "update.canary.steps",
        "steps must be strictly increasing",
    );
    r.check(
        steps.last().is_none_or(|s| *s == 100),
        "update.canary.steps",
        "the last step must be 100 (full traffic on the new version)",
    );
    r.check(
        (0.0..=1.0).contains(&u.canary.max_error_rate),
        "update.canary.max_error_rate",
        "must be between 0 and 1",
    );
    r.check(
        !u.canary.step_interval.is_zero(),
        "update.canary.step_interval",
        "must be more than 0s",
    );
    if let Some(a) = &spec.autoscale {
        r.check(a.max >= 1, "autoscale.max", "must be at least 1");
        r.check(
            a.max <= MAX_REPLICAS,
            "autoscale.max",
            format!("must be at most {MAX_REPLICAS}"),
        );
        r.check(
            a.min <= a.max,
            "autoscale.min",
            format!("must be at most `max` ({})", a.max),
        );
        match (a.target_rps_per_instance, a.target_cpu) {
            (Some(_), Some(_)) => r.check(
                false,
                "autoscale.target_cpu",
                "set one target: `target_rps_per_instance` or `target_cpu`, not both",
            ),
            (None, None) => r.check(
                false,
                "autoscale",
                "missing a target: `target_rps_per_instance` or `target_cpu`",
            ),
            (Some(rps), None) => r.check(
                rps > 0.0,
                "autoscale.target_rps_per_instance",
                "must be more than 0",
            ),
            (None, Some(cpu)) => {
                r.check(
                    cpu > 0.0 && cpu <= 1.0,
                    "autoscale.target_cpu",
                    "must be a fraction of the reserved CPU, more than 0 and at most 1",
                );
                r.check(
                    res.cpu > 0.0,
                    "autoscale.target_cpu",
                    "needs `resources.cpu`: CPU use is measured against the reservation",
                );
            }
        }
        r.check(
            a.min > a.max || (a.min..=a.max).contains(&spec.replicas),
            "replicas",
            format!("must be within the autoscale bounds {}..={}", a.min, a.max),
        );
    }
    r.0
}

fn check_probe(r: &mut Rules, path: &str, kind: &str, p: &Probe, ports: &BTreeSet<&str>) {
    let set = [p.http.is_some(), p.tcp.is_some(), p.exec.is_some()];
    let n = set.iter().filter(|x| **x).count();
    r.check(
        n == 1,
        path,
        "set exactly one check: `http`, `tcp` or `exec`",
    );
    if let Some(h) = &p.http {
        r.check(
            h.path.starts_with('/'),
            format!("{path}.http.path"),
            format!("`{}` must start with `/`", h.path),
        );
    }
    if let Some(port) = p.port() {
        r.check(
            ports.contains(port),
            format!(
                "{path}.{}.port",
                if p.http.is_some() { "http" } else { "tcp" }
            ),
            if ports.is_empty() {
                format!("`{port}` names no declared port (this service declares no [[ports]])")
            } else {
                format!(
                    "`{port}` names no declared port; declared: {}",
                    ports.iter().copied().collect::<Vec<_>>().join(", ")
                )
            },
        );
    }
    if let Some(e) = &p.exec {
        r.check(
            e.command.first().is_some_and(|c| !c.is_empty()),
            format!("{path}.exec.command"),
            "must name a program to run",
        );
    }
    r.check(
        !p.interval.is_zero(),
        format!("{path}.interval"),
        "must be more than 0s",
    );
    r.check(
        !p.timeout.is_zero(),
        format!("{path}.timeout"),
        "must be more than 0s",
    );
    r.check(
        p.timeout <= p.interval,
        format!("{path}.timeout"),
        "must be at most the probe's `interval`",
    );
    r.check(
        p.failure_threshold >= 1,
        format!("{path}.failure_threshold"),
        "must be at least 1",
    );
    r.check(
        p.success_threshold >= 1,
        format!("{path}.success_threshold"),
        "must be at least 1",
    );
    if kind == "liveness" || kind == "startup" {
        r.check(
            p.success_threshold == 1,
            format!("{path}.success_threshold"),
            format!("must be 1 for a {kind} probe"),
        );
    }
}

/// Checks every rule of a node config and returns all violations (empty when valid).
pub fn validate_node(c: &NodeConfig) -> Vec<Violation> {
    let mut r = Rules(Vec::new());
    if let Some(name) = &c.name {
        r.check(
            is_valid_name(name),
            "name",
            format!("`{name}` is not a valid node name: lowercase letters, digits and `-`"),
        );
    }
    r.check(
        !(c.bind.ip().is_unspecified() && c.advertise.is_none()),
        "advertise",
        "required when `bind` is an unspecified address such as 0.0.0.0",
    );
    if let Some(a) = c.advertise {
        r.check(
            !a.ip().is_unspecified() && a.port() != 0,
            "advertise",
            "must be an address other nodes can reach (not 0.0.0.0, not port 0)",
        );
    }
    for (i, s) in c.seeds.iter().enumerate() {
        let ok = s.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        r.check(
            ok,
            format!("seeds[{i}]"),
            format!("`{s}` is not a HOST:PORT address (e.g. `10.0.0.1:7946`)"),
        );
    }
    r.check(
        !c.data_dir.as_os_str().is_empty(),
        "data_dir",
        "must not be empty",
    );
    for key in c.labels.keys() {
        r.check(
            is_label_key(key),
            format!("labels.{key}"),
            format!("`{key}` is not a label key (letters, digits, `-`, `_`, `.`, `/`)"),
        );
    }
    if let Some(cpu) = c.resources.cpu {
        r.check(cpu > 0.0, "resources.cpu", "must be more than 0");
    }
    let m = &c.membership;
    let t = m.timing();
    for (key, d) in [
        ("probe_period", m.probe_period),
        ("probe_timeout", m.probe_timeout),
        ("suspicion", m.suspicion),
        ("gossip_interval", m.gossip_interval),
    ] {
        r.check(
            d.is_none_or(|d| !d.is_zero()),
            format!("membership.{key}"),
            "must be more than 0s",
        );
    }
    r.check(
        t.probe_timeout < t.probe_period,
        "membership.probe_timeout",
        format!(
            "must be shorter than `probe_period` ({})",
            crate::units::format_duration(t.probe_period)
        ),
    );
    r.0
}

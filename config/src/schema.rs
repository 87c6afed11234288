//! The schema: which keys each table has and how each value is read. Unset keys keep the defaults
//! documented on the types in `service` and `node`.

use crate::constraint::Constraint;
use crate::node::{
    LogFormat, MembershipConfig, MembershipPreset, NodeConfig, NodeResources, RuntimeKind,
};
use crate::reader::{Reader, Tbl};
use crate::service::*;
use crate::units::parse_duration;

pub(crate) fn read_service(r: &mut Reader, mut t: Tbl<'_, '_>) -> ServiceSpec {
    let name = r.string(&mut t, "name");
    if name.is_none() && !r.spans.contains_key("name") {
        r.problem(0..0, "name", "missing: every service needs a `name`");
    }
    let mut spec = ServiceSpec::with_image(&name.unwrap_or_default(), "");
    spec.image = r.string(&mut t, "image");
    spec.command = r.strings(&mut t, "command");
    if let Some(n) = r.u32(&mut t, "replicas") {
        spec.replicas = n;
    }
    if let Some(d) = r.duration(&mut t, "stop_grace") {
        spec.stop_grace = d;
    }
    if let Some(s) = r.strings(&mut t, "secrets") {
        spec.secrets = s;
    }
    if let Some(mut res) = r.table(&mut t, "resources") {
        if let Some(cpu) = r.f64(&mut res, "cpu") {
            spec.resources.cpu = cpu;
        }
        spec.resources.memory = r.size(&mut res, "memory");
        r.finish(res);
    }
    for mut p in r.tables(&mut t, "ports") {
        let name = r.string(&mut p, "name");
        let container = r.u16(&mut p, "container");
        if name.is_none() && !r.spans.contains_key(&format!("{}.name", p.path)) {
            r.problem(0..0, &p.path, "missing `name`");
        }
        if container.is_none() && !r.spans.contains_key(&format!("{}.container", p.path)) {
            r.problem(
                0..0,
                &p.path,
                "missing `container` (the port the instance listens on)",
            );
        }
        let port = PortSpec {
            name: name.unwrap_or_default(),
            container: container.unwrap_or_default(),
            published: r.u16(&mut p, "published"),
            protocol: r
                .choice(
                    &mut p,
                    "protocol",
                    &[("tcp", Protocol::Tcp), ("http", Protocol::Http)],
                )
                .unwrap_or_default(),
            proxy_protocol: r.bool(&mut p, "proxy_protocol").unwrap_or(false),
        };
        r.finish(p);
        spec.ports.push(port);
    }
    if let Some(env) = r.string_map(&mut t, "env") {
        spec.env = env;
    }
    if let Some(mut pl) = r.table(&mut t, "placement") {
        if let Some(c) = r.list(&mut pl, "constraints", |s| s.parse::<Constraint>()) {
            spec.placement.constraints = c;
        }
        if let Some(s) = r.strings(&mut pl, "spread") {
            spec.placement.spread = s;
        }
        if let Some(n) = r.u32(&mut pl, "max_per_node") {
            spec.placement.max_per_node = n;
        }
        r.finish(pl);
    }
    if let Some(mut h) = r.table(&mut t, "health") {
        spec.health.startup = r.table(&mut h, "startup").map(|p| read_probe(r, p));
        spec.health.liveness = r.table(&mut h, "liveness").map(|p| read_probe(r, p));
        spec.health.readiness = r.table(&mut h, "readiness").map(|p| read_probe(r, p));
        r.finish(h);
    }
    if let Some(mut rs) = r.table(&mut t, "restart") {
        spec.restart.policy = r
            .choice(
                &mut rs,
                "policy",
                &[
                    ("always", RestartCondition::Always),
                    ("on-failure", RestartCondition::OnFailure),
                    ("never", RestartCondition::Never),
                ],
            )
            .unwrap_or_default();
        if let Some(mut b) = r.table(&mut rs, "backoff") {
            let def = Backoff::default();
            spec.restart.backoff = Backoff {
                base: r.duration(&mut b, "base").unwrap_or(def.base),
                cap: r.duration(&mut b, "cap").unwrap_or(def.cap),
                reset_after: r.duration(&mut b, "reset_after").unwrap_or(def.reset_after),
            };
            r.finish(b);
        }
        spec.restart.max_attempts = r.u32(&mut rs, "max_attempts").unwrap_or(0);
        r.finish(rs);
    }
    if let Some(u) = r.table(&mut t, "update") {
        spec.update = read_update(r, u);
    }
    if let Some(mut a) = r.table(&mut t, "autoscale") {
        let min = r.u32(&mut a, "min");
        let max = r.u32(&mut a, "max");
        for (key, v) in [("min", min), ("max", max)] {
            if v.is_none() && !r.spans.contains_key(&format!("autoscale.{key}")) {
                r.problem(0..0, "autoscale", format!("missing `{key}`"));
            }
        }
        spec.autoscale = Some(Autoscale {
            min: min.unwrap_or(0),
            max: max.unwrap_or(0),
            target_rps_per_instance: r.f64(&mut a, "target_rps_per_instance"),
            target_cpu: r.f64(&mut a, "target_cpu"),
            scale_down_stabilization: r
                .duration(&mut a, "scale_down_stabilization")
                .unwrap_or_else(default_scale_down),
            scale_up_stabilization: r
                .duration(&mut a, "scale_up_stabilization")
                .unwrap_or_default(),
        });
        r.finish(a);
    }
    r.finish(t);
    spec
}

fn read_probe(r: &mut Reader, mut p: Tbl<'_, '_>) -> Probe {
    let http = r.table(&mut p, "http").map(|mut h| {
        let c = HttpCheck {
            path: r.string(&mut h, "path").unwrap_or_else(|| "/".to_string()),
            port: r.string(&mut h, "port").unwrap_or_default(),
        };
        r.finish(h);
        c
    });
    let tcp = r.table(&mut p, "tcp").map(|mut h| {
        let c = TcpCheck {
            port: r.string(&mut h, "port").unwrap_or_default(),
        };
        r.finish(h);
        c
    });
    let exec = r.table(&mut p, "exec").map(|mut h| {
        let c = ExecCheck {
            command: r.strings(&mut h, "command").unwrap_or_default(),
        };
        r.finish(h);
        c
    });
    let mut probe = Probe::new(http, tcp, exec);
    if let Some(d) = r.duration(&mut p, "interval") {
        probe.interval = d;
    }
    if let Some(d) = r.duration(&mut p, "timeout") {
        probe.timeout = d;
    }
    if let Some(n) = r.u32(&mut p, "failure_threshold") {
        probe.failure_threshold = n;
    }
    if let Some(n) = r.u32(&mut p, "success_threshold") {
        probe.success_threshold = n;
    }
    if let Some(d) = r.duration(&mut p, "initial_delay") {
        probe.initial_delay = d;
    }
    r.finish(p);
    probe
}

fn read_update(r: &mut Reader, mut u: Tbl<'_, '_>) -> UpdatePolicy {
    let mut up = UpdatePolicy::default();
    if let Some(s) = r.choice(
        &mut u,
        "strategy",
        &[
            ("rolling", Strategy::Rolling),
            ("blue-green", Strategy::BlueGreen),
            ("canary", Strategy::Canary),
        ],
    ) {
        up.strategy = s;
    }
    if let Some(n) = r.u32(&mut u, "parallelism") {
        up.parallelism = n;
    }
    if let Some(d) = r.duration(&mut u, "delay") {
        up.delay = d;
    }
    if let Some(d) = r.duration(&mut u, "monitor") {
        up.monitor = d;
    }
    if let Some(x) = r.f64(&mut u, "max_failure_ratio") {
        up.max_failure_ratio = x;
    }
    if let Some(a) = r.choice(
        &mut u,
        "failure_action",
        &[
            ("rollback", FailureAction::Rollback),
            ("pause", FailureAction::Pause),
            ("continue", FailureAction::Continue),
        ],
    ) {
        up.failure_action = a;
    }
    if let Some(o) = r.choice(
        &mut u,
        "order",
        &[
            ("start-first", UpdateOrder::StartFirst),
            ("stop-first", UpdateOrder::StopFirst),
        ],
    ) {
        up.order = o;
    }
    if let Some(mut c) = r.table(&mut u, "canary") {
        if let Some(s) = r.u32s(&mut c, "steps") {
            up.canary.steps = s;
        }
        if let Some(d) = r.duration(&mut c, "step_interval") {
            up.canary.step_interval = d;
        }
        if let Some(x) = r.f64(&mut c, "max_error_rate") {
            up.canary.max_error_rate = x;
        }
        if let Some(n) = r.u32(&mut c, "min_requests") {
            up.canary.min_requests = n;
        }
        r.finish(c);
    }
    if let Some(mut b) = r.table(&mut u, "blue_green") {
        if let Some(d) = r.duration(&mut b, "rollback_window") {
            up.blue_green.rollback_window = d;
        }
        r.finish(b);
    }
    r.finish(u);
    up
}

pub(crate) fn read_node(r: &mut Reader, mut t: Tbl<'_, '_>) -> NodeConfig {
    let mut c = NodeConfig {
        name: r.string(&mut t, "name"),
        ..NodeConfig::default()
    };
    let addr = |s: &str| {
        s.parse::<std::net::SocketAddr>()
            .map_err(|_| format!("`{s}` is not an IP:PORT address (e.g. `127.0.0.1:7946`)"))
    };
    if let Some(a) = r.parsed(&mut t, "bind", addr) {
        c.bind = a;
    }
    c.advertise = r.parsed(&mut t, "advertise", addr);
    if let Some(a) = r.parsed(&mut t, "api", addr) {
        c.api = a;
    }
    if let Some(s) = r.strings(&mut t, "seeds") {
        c.seeds = s;
    }
    if let Some(d) = r.string(&mut t, "data_dir") {
        c.data_dir = d.into();
    }
    c.cert_dir = r.string(&mut t, "cert_dir").map(Into::into);
    if let Some(k) = r.choice(
        &mut t,
        "runtime",
        &[
            ("docker", RuntimeKind::Docker),
            ("process", RuntimeKind::Process),
        ],
    ) {
        c.runtime = k;
    }
    if let Some(l) = r.string_map(&mut t, "labels") {
        c.labels = l;
    }
    if let Some(mut res) = r.table(&mut t, "resources") {
        c.resources = NodeResources {
            cpu: r.f64(&mut res, "cpu"),
            memory: r.size(&mut res, "memory"),
        };
        r.finish(res);
    }
    if let Some(mut m) = r.table(&mut t, "membership") {
        c.membership = MembershipConfig {
            preset: r
                .choice(
                    &mut m,
                    "preset",
                    &[
                        ("lan", MembershipPreset::Lan),
                        ("fast", MembershipPreset::Fast),
                    ],
                )
                .unwrap_or_default(),
            probe_period: r.duration(&mut m, "probe_period"),
            probe_timeout: r.duration(&mut m, "probe_timeout"),
            suspicion: r.duration(&mut m, "suspicion"),
            gossip_interval: r.duration(&mut m, "gossip_interval"),
        };
        r.finish(m);
    }
    if let Some(d) = r.parsed(&mut t, "reschedule_grace", parse_duration) {
        c.reschedule_grace = d;
    }
    if let Some(f) = r.choice(
        &mut t,
        "log_format",
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
    ) {
        c.log_format = f;
    }
    r.finish(t);
    c
}

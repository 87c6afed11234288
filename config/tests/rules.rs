//! One test per validation rule: a valid spec (or node config) is broken in exactly one way, and
//! the rule must report exactly that, at the right key. Removing a rule fails its test.

use std::time::Duration;

use shoal_config::*;

fn base() -> ServiceSpec {
    let mut s = ServiceSpec::with_image("web", "shoal-test/web:1");
    s.replicas = 4;
    s.ports.push(PortSpec {
        name: "http".into(),
        container: 8080,
        published: Some(18080),
        protocol: Protocol::Http,
        proxy_protocol: false,
    });
    s.ports.push(PortSpec {
        name: "admin".into(),
        container: 9090,
        published: None,
        protocol: Protocol::Tcp,
        proxy_protocol: false,
    });
    s.resources.cpu = 0.5;
    s.health.liveness = Some(Probe::new(
        Some(HttpCheck {
            path: "/healthz".into(),
            port: "http".into(),
        }),
        None,
        None,
    ));
    s.health.readiness = Some(Probe::new(
        None,
        Some(TcpCheck {
            port: "http".into(),
        }),
        None,
    ));
    s.health.startup = Some(Probe::new(
        None,
        None,
        Some(ExecCheck {
            command: vec!["true".into()],
        }),
    ));
    s.autoscale = Some(Autoscale {
        min: 2,
        max: 10,
        target_rps_per_instance: Some(100.0),
        target_cpu: None,
        scale_down_stabilization: Duration::from_secs(300),
        scale_up_stabilization: Duration::ZERO,
    });
    s
}

#[test]
fn the_base_spec_is_valid() {
    assert_eq!(validate_service(&base()), vec![]);
}

fn expect_one(mutate: impl FnOnce(&mut ServiceSpec), path: &str, needle: &str) {
    let mut s = base();
    mutate(&mut s);
    let v = validate_service(&s);
    assert_eq!(v.len(), 1, "expected exactly one violation, got {v:#?}");
    assert_eq!(v[0].path, path, "{v:#?}");
    assert!(
        v[0].message.contains(needle),
        "`{}` lacks `{needle}`",
        v[0].message
    );
}

macro_rules! rule {
    ($name:ident, $path:expr, $needle:expr, |$s:ident| $body:expr) => {
        #[test]
        fn $name() {
            expect_one(
                |$s: &mut ServiceSpec| {
                    $body;
                },
                $path,
                $needle,
            );
        }
    };
}

fn liveness(s: &mut ServiceSpec) -> &mut Probe {
    s.health.liveness.as_mut().unwrap()
}
fn readiness(s: &mut ServiceSpec) -> &mut Probe {
    s.health.readiness.as_mut().unwrap()
}
fn autoscale(s: &mut ServiceSpec) -> &mut Autoscale {
    s.autoscale.as_mut().unwrap()
}

rule!(
    a_service_name_must_be_a_lowercase_label,
    "name",
    "not a valid service name",
    |s| s.name = "Web_1".into()
);
rule!(
    image_and_command_are_mutually_exclusive,
    "command",
    "not both",
    |s| s.command = Some(vec!["httpd".into()])
);
rule!(
    a_service_needs_an_image_or_a_command,
    "",
    "missing `image`",
    |s| s.image = None
);
rule!(
    an_image_reference_has_no_spaces,
    "image",
    "not an image reference",
    |s| s.image = Some("shoal test".into())
);
rule!(
    a_command_names_a_program,
    "command",
    "must name a program",
    |s| {
        s.image = None;
        s.command = Some(vec![])
    }
);
rule!(replicas_are_capped, "replicas", "at most", |s| {
    s.autoscale = None;
    s.replicas = MAX_REPLICAS + 1
});
rule!(
    stop_grace_is_at_most_an_hour,
    "stop_grace",
    "at most 1h",
    |s| s.stop_grace = Duration::from_secs(7200)
);
rule!(
    secret_names_are_labels,
    "secrets[0]",
    "not a valid secret name",
    |s| s.secrets = vec!["DB PASSWORD".into()]
);
rule!(
    cpu_is_between_0_and_1024,
    "resources.cpu",
    "between 0 and 1024",
    |s| s.resources.cpu = -1.0
);
rule!(
    memory_is_at_least_6mib,
    "resources.memory",
    "at least 6MiB",
    |s| s.resources.memory = Some(ByteSize(1 << 20))
);
rule!(
    port_names_are_labels,
    "ports[1].name",
    "not a valid port name",
    |s| { s.ports[1].name = "Admin Port".into() }
);
rule!(
    port_names_are_unique,
    "ports[1].name",
    "declared twice",
    |s| s.ports[1].name = "http".into()
);
rule!(
    a_container_port_is_not_zero,
    "ports[0].container",
    "between 1 and 65535",
    |s| s.ports[0].container = 0
);
rule!(
    a_published_port_is_not_zero,
    "ports[1].published",
    "between 1 and 65535",
    |s| s.ports[1].published = Some(0)
);
rule!(
    a_port_is_published_once,
    "ports[1].published",
    "published twice",
    |s| s.ports[1].published = Some(18080)
);
rule!(
    env_names_are_identifiers,
    "env.MY-VAR",
    "not a valid environment variable name",
    |s| {
        s.env.insert("MY-VAR".into(), "x".into());
    }
);
rule!(
    spread_levels_are_label_keys,
    "placement.spread[0]",
    "not a label key",
    |s| s.placement.spread = vec!["data center".into()]
);
rule!(
    spread_has_at_most_six_levels,
    "placement.spread",
    "at most 6 levels",
    |s| s.placement.spread = (0..7).map(|i| format!("l{i}")).collect()
);
rule!(
    spread_levels_are_unique,
    "placement.spread[1]",
    "appears twice",
    |s| s.placement.spread = vec!["rack".into(), "rack".into()]
);
rule!(
    a_probe_has_exactly_one_check,
    "health.readiness",
    "exactly one check",
    |s| readiness(s).exec = Some(ExecCheck {
        command: vec!["true".into()]
    })
);
rule!(
    a_probe_without_a_check_is_refused,
    "health.readiness",
    "exactly one check",
    |s| readiness(s).tcp = None
);
rule!(
    an_http_probe_path_starts_with_a_slash,
    "health.liveness.http.path",
    "must start with `/`",
    |s| liveness(s).http.as_mut().unwrap().path = "healthz".into()
);
rule!(
    a_probe_port_must_name_a_declared_port,
    "health.readiness.tcp.port",
    "names no declared port",
    |s| readiness(s).tcp.as_mut().unwrap().port = "metrics".into()
);
rule!(
    an_exec_probe_names_a_program,
    "health.startup.exec.command",
    "must name a program",
    |s| s
        .health
        .startup
        .as_mut()
        .unwrap()
        .exec
        .as_mut()
        .unwrap()
        .command
        .clear()
);
#[test]
fn a_probe_interval_is_positive() {
    let mut s = base();
    readiness(&mut s).interval = Duration::ZERO;
    let v = validate_service(&s);
    assert!(
        v.iter()
            .any(|v| v.path == "health.readiness.interval" && v.message.contains("more than 0s")),
        "{v:#?}"
    );
}
rule!(
    a_probe_timeout_is_positive,
    "health.readiness.timeout",
    "more than 0s",
    |s| readiness(s).timeout = Duration::ZERO
);
rule!(
    a_probe_timeout_is_at_most_its_interval,
    "health.readiness.timeout",
    "at most the probe's `interval`",
    |s| readiness(s).timeout = Duration::from_secs(5)
);
rule!(
    a_failure_threshold_is_at_least_one,
    "health.readiness.failure_threshold",
    "at least 1",
    |s| readiness(s).failure_threshold = 0
);
rule!(
    a_success_threshold_is_at_least_one,
    "health.readiness.success_threshold",
    "at least 1",
    |s| readiness(s).success_threshold = 0
);
rule!(
    a_liveness_probe_succeeds_once,
    "health.liveness.success_threshold",
    "must be 1 for a liveness probe",
    |s| liveness(s).success_threshold = 2
);
rule!(
    restart_backoff_base_is_positive,
    "restart.backoff.base",
    "more than 0s",
    |s| s.restart.backoff.base = Duration::ZERO
);
rule!(
    restart_backoff_cap_is_at_least_the_base,
    "restart.backoff.cap",
    "at least",
    |s| s.restart.backoff.cap = Duration::from_millis(100)
);
rule!(
    update_parallelism_is_at_least_one,
    "update.parallelism",
    "at least 1",
    |s| s.update.parallelism = 0
);
rule!(
    max_failure_ratio_is_a_fraction,
    "update.max_failure_ratio",
    "between 0 and 1",
    |s| s.update.max_failure_ratio = 1.5
);
rule!(
    canary_steps_are_not_empty,
    "update.canary.steps",
    "at least one step",
    |s| s.update.canary.steps.clear()
);
rule!(
    canary_steps_are_percentages,
    "update.canary.steps",
    "from 1 to 100",
    |s| s.update.canary.steps = vec![0, 50, 100]
);
rule!(
    canary_steps_increase,
    "update.canary.steps",
    "strictly increasing",
    |s| s.update.canary.steps = vec![10, 10, 100]
);
rule!(
    canary_steps_end_at_100,
    "update.canary.steps",
    "last step must be 100",
    |s| s.update.canary.steps = vec![10, 50]
);
rule!(
    canary_max_error_rate_is_a_fraction,
    "update.canary.max_error_rate",
    "between 0 and 1",
    |s| s.update.canary.max_error_rate = -0.1
);
rule!(
    canary_step_interval_is_positive,
    "update.canary.step_interval",
    "more than 0s",
    |s| s.update.canary.step_interval = Duration::ZERO
);
#[test]
fn autoscale_max_is_at_least_one() {
    let mut s = base();
    s.replicas = 0;
    let a = autoscale(&mut s);
    a.min = 0;
    a.max = 0;
    let v = validate_service(&s);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].path, "autoscale.max");
    assert!(v[0].message.contains("at least 1"));
}
rule!(autoscale_max_is_capped, "autoscale.max", "at most", |s| {
    autoscale(s).max = MAX_REPLICAS + 1
});
rule!(
    autoscale_min_is_at_most_max,
    "autoscale.min",
    "at most `max`",
    |s| {
        s.replicas = 10;
        let a = autoscale(s);
        a.min = 11;
        a.max = 10;
        s.replicas = 10;
    }
);
rule!(
    autoscale_has_one_target_not_two,
    "autoscale.target_cpu",
    "not both",
    |s| autoscale(s).target_cpu = Some(0.5)
);
rule!(
    autoscale_needs_a_target,
    "autoscale",
    "missing a target",
    |s| autoscale(s).target_rps_per_instance = None
);
rule!(
    autoscale_rps_target_is_positive,
    "autoscale.target_rps_per_instance",
    "more than 0",
    |s| autoscale(s).target_rps_per_instance = Some(0.0)
);
rule!(
    autoscale_cpu_target_is_a_fraction,
    "autoscale.target_cpu",
    "at most 1",
    |s| {
        let a = autoscale(s);
        a.target_rps_per_instance = None;
        a.target_cpu = Some(1.5)
    }
);
rule!(
    autoscale_cpu_target_needs_a_cpu_reservation,
    "autoscale.target_cpu",
    "needs `resources.cpu`",
    |s| {
        s.resources.cpu = 0.0;
        let a = autoscale(s);
        a.target_rps_per_instance = None;
        a.target_cpu = Some(0.6)
    }
);
rule!(
    replicas_lie_within_the_autoscale_bounds,
    "replicas",
    "within the autoscale bounds",
    |s| s.replicas = 1
);

// --- node config rules ---

fn expect_node(mutate: impl FnOnce(&mut NodeConfig), path: &str, needle: &str) {
    let mut c = NodeConfig::default();
    assert_eq!(validate_node(&c), vec![]);
    mutate(&mut c);
    let v = validate_node(&c);
    assert_eq!(v.len(), 1, "expected exactly one violation, got {v:#?}");
    assert_eq!(v[0].path, path, "{v:#?}");
    assert!(
        v[0].message.contains(needle),
        "`{}` lacks `{needle}`",
        v[0].message
    );
}

macro_rules! node_rule {
    ($name:ident, $path:expr, $needle:expr, |$c:ident| $body:expr) => {
        #[test]
        fn $name() {
            expect_node(
                |$c: &mut NodeConfig| {
                    $body;
                },
                $path,
                $needle,
            );
        }
    };
}

node_rule!(
    a_node_name_is_a_label,
    "name",
    "not a valid node name",
    |c| c.name = Some("Node 1".into())
);
node_rule!(
    an_unspecified_bind_needs_an_advertise_address,
    "advertise",
    "required",
    |c| c.bind = "0.0.0.0:7946".parse().unwrap()
);
node_rule!(
    an_advertise_address_is_reachable,
    "advertise",
    "other nodes can reach",
    |c| c.advertise = Some("0.0.0.0:7946".parse().unwrap())
);
node_rule!(seeds_are_host_port, "seeds[1]", "not a HOST:PORT", |c| c
    .seeds =
    vec!["10.0.0.1:7946".into(), "10.0.0.2".into()]);
node_rule!(
    a_data_dir_is_not_empty,
    "data_dir",
    "must not be empty",
    |c| c.data_dir = "".into()
);
node_rule!(
    node_label_keys_are_keys,
    "labels.data center",
    "not a label key",
    |c| {
        c.labels.insert("data center".into(), "x".into());
    }
);
node_rule!(
    offered_cpu_is_positive,
    "resources.cpu",
    "more than 0",
    |c| c.resources.cpu = Some(0.0)
);
node_rule!(
    membership_durations_are_positive,
    "membership.gossip_interval",
    "more than 0s",
    |c| c.membership.gossip_interval = Some(Duration::ZERO)
);
node_rule!(
    the_probe_timeout_is_shorter_than_the_probe_period,
    "membership.probe_timeout",
    "shorter than `probe_period`",
    |c| c.membership.probe_timeout = Some(Duration::from_secs(2))
);

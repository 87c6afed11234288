//! Reading files: every mistake located at `line:column` with its key path, the shipped examples
//! stay valid, and any valid spec serialises and parses back equal.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::Strategy;
use shoal_config::*;

fn errors(src: &str) -> Vec<String> {
    match load_service_str("web.toml", src) {
        Ok(_) => vec![],
        Err(d) => d.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn a_spec_with_five_mistakes_reports_all_five_with_line_and_column() {
    let src = r#"name = "web"
image = "shoal-test/web:1"
replica = 3
stop_grace = "soon"

[[ports]]
name = "http"
container = 8080

[health.liveness]
http = { path = "/healthz", port = "metrics" }

[update]
parallelism = 0

[update.canary]
steps = [10, 5, 100]
"#;
    let e = errors(src);
    assert_eq!(
        e,
        vec![
            "web.toml:3:1: replica: unknown key `replica`; did you mean `replicas`?",
            "web.toml:4:14: stop_grace: `soon` is not a duration (expected number at 0); write e.g. `500ms`, `2s`, `5m`, `1h`",
            "web.toml:11:36: health.liveness.http.port: `metrics` names no declared port; declared: http",
            "web.toml:14:15: update.parallelism: must be at least 1",
            "web.toml:17:9: update.canary.steps: steps must be strictly increasing",
        ]
    );
}

#[test]
fn a_value_of_the_wrong_type_is_located_and_the_rest_still_checked() {
    let e =
        errors("name = \"web\"\nimage = \"x:1\"\nreplicas = \"six\"\n[update]\nparallelism = 0\n");
    assert_eq!(
        e,
        vec![
            "web.toml:3:12: replicas: expected an integer, found a string",
            "web.toml:5:15: update.parallelism: must be at least 1",
        ]
    );
}

#[test]
fn unknown_keys_in_nested_tables_are_errors_with_a_suggestion() {
    let e = errors(
        "name = \"web\"\nimage = \"x:1\"\n[restart]\npolcy = \"always\"\n[update]\nzzz = 1\n",
    );
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(
        e[0],
        "web.toml:4:1: restart.polcy: unknown key `polcy`; did you mean `policy`?"
    );
    assert!(e[1].starts_with("web.toml:6:1: update.zzz: unknown key `zzz`; known keys: strategy"));
}

#[test]
fn bad_sizes_constraints_and_choices_are_explained() {
    let src = r#"name = "web"
image = "x:1"
[resources]
memory = "64 parsecs"
[placement]
constraints = ["node.labels.disk == ssd", "disk = ssd"]
[restart]
policy = "sometimes"
"#;
    let e = errors(src);
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[0].starts_with("web.toml:4:10: resources.memory: `64 parsecs` is not a size"));
    assert!(e[1].starts_with("web.toml:6:43: placement.constraints[1]: unknown attribute `disk`"));
    assert_eq!(
        e[2],
        "web.toml:8:10: restart.policy: `sometimes` is not one of `always`, `on-failure`, `never`"
    );
}

#[test]
fn a_spec_without_a_name_or_image_says_so() {
    let e = errors("replicas = 2\n");
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e.iter().any(|l| l.contains("name: missing")));
    assert!(e.iter().any(|l| l.contains("missing `image`")));
}

#[test]
fn a_toml_syntax_error_is_located() {
    let e = errors("name = \"web\"\nimage = \n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("web.toml:2:"), "{e:?}");
    assert!(e[0].contains("TOML syntax error"), "{e:?}");
}

#[test]
fn node_config_mistakes_are_located_too() {
    let src = "name = \"n1\"\nbind = \"localhost\"\n[membership]\nprobe_period = \"1s\"\nprobe_timeout = \"2s\"\n";
    let e: Vec<String> = load_node_str("node.toml", src)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        e,
        vec![
            "node.toml:2:8: bind: `localhost` is not an IP:PORT address (e.g. `127.0.0.1:7946`)",
            "node.toml:5:17: membership.probe_timeout: must be shorter than `probe_period` (1s)",
        ]
    );
}

#[test]
fn files_are_told_apart_by_their_keys() {
    assert_eq!(
        detect_kind("name = \"n1\"\nbind = \"127.0.0.1:1\"\n"),
        Kind::Node
    );
    assert_eq!(
        detect_kind("name = \"web\"\nimage = \"x\"\n"),
        Kind::Service
    );
}

#[test]
fn the_fast_preset_sets_the_documented_timing() {
    let c = load_node_str("n.toml", "[membership]\npreset = \"fast\"\n").unwrap();
    let t = c.membership.timing();
    assert_eq!(t.probe_period, Duration::from_millis(500));
    assert_eq!(t.suspicion, Some(Duration::from_millis(1500)));
    let c = load_node_str(
        "n.toml",
        "[membership]\npreset = \"fast\"\nprobe_period = \"2s\"\n",
    )
    .unwrap();
    assert_eq!(c.membership.timing().probe_period, Duration::from_secs(2));
}

#[test]
fn every_shipped_example_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = vec![dir.join("node.toml")];
    for e in std::fs::read_dir(dir.join("services")).unwrap() {
        files.push(e.unwrap().path());
    }
    assert!(files.len() >= 4, "examples are missing: {files:?}");
    for f in files {
        if let Err(e) = load_file(&f, None) {
            panic!("{} is invalid:\n{e}", f.display());
        }
    }
    let web = load_service_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/services/web.toml"),
    )
    .unwrap();
    assert_eq!(web.replicas, 6);
    assert_eq!(web.health.liveness.unwrap().failure_threshold, 3);
}

// --- round trip ---

fn dur() -> impl Strategy<Value = Duration> {
    (1u64..100_000).prop_map(Duration::from_millis)
}

fn probe(ports: Vec<String>) -> impl Strategy<Value = Probe> {
    let check = if ports.is_empty() {
        Just(0u8).boxed()
    } else {
        (0u8..3).boxed()
    };
    (
        check,
        any::<prop::sample::Index>(),
        "/[a-z]{0,8}",
        dur(),
        1u32..5,
        0u64..10_000,
    )
        .prop_map(move |(c, i, path, interval, ft, delay)| {
            let port = if ports.is_empty() {
                String::new()
            } else {
                i.get(&ports).clone()
            };
            let mut p = match c {
                1 => Probe::new(Some(HttpCheck { path, port }), None, None),
                2 => Probe::new(None, Some(TcpCheck { port }), None),
                _ => Probe::new(
                    None,
                    None,
                    Some(ExecCheck {
                        command: vec!["true".into(), path],
                    }),
                ),
            };
            p.interval = interval;
            p.timeout = interval / 2 + Duration::from_millis(1);
            p.failure_threshold = ft;
            p.initial_delay = Duration::from_millis(delay);
            p
        })
}

fn constraint() -> impl Strategy<Value = Constraint> {
    ("[a-z]{1,6}", "[a-z0-9]{1,6}", 0u8..6).prop_map(|(k, v, op)| {
        let text = match op {
            0 => format!("node.labels.{k} == {v}"),
            1 => format!("node.name != {v}"),
            2 => format!("node.labels.{k} in [{v}, x{v}]"),
            3 => format!("node.labels.{k} not in [{v}]"),
            4 => format!("node.labels.{k} exists"),
            _ => format!("node.labels.{k} not exists"),
        };
        text.parse().unwrap()
    })
}

fn spec() -> impl Strategy<Value = ServiceSpec> {
    let ports = prop::collection::btree_map(
        "[a-z]{1,5}",
        (
            1u16..=65535,
            prop::option::of(1u16..=65535),
            any::<bool>(),
            any::<bool>(),
        ),
        0..4,
    );
    (
        "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        any::<bool>(),
        0u32..50,
        dur(),
        ports,
        prop::collection::btree_map("[A-Z_][A-Z0-9_]{0,6}", "[ -~]{0,12}", 0..4),
        prop::collection::vec(constraint(), 0..3),
        prop::sample::subsequence(vec!["datacenter", "zone", "rack"], 0..=3),
        (0u32..4, 0u32..4, prop::option::of(1u64 << 23..1u64 << 33)),
        prop::sample::select(vec![
            shoal_config::Strategy::Rolling,
            shoal_config::Strategy::BlueGreen,
            shoal_config::Strategy::Canary,
        ]),
        prop::collection::btree_set(1u32..100, 0..4),
        prop::option::of((1u32..5, 5u32..40, any::<bool>())),
    )
        .prop_flat_map(
            |(
                name,
                docker,
                replicas,
                grace,
                ports,
                env,
                cons,
                spread,
                (cpu4, mpn, mem),
                strategy,
                steps,
                auto,
            )| {
                let mut s = ServiceSpec::with_image(&name, "shoal-test/web:1");
                if !docker {
                    s.image = None;
                    s.command = Some(vec!["busybox".into(), "httpd".into(), "${PORT}".into()]);
                }
                s.replicas = replicas;
                s.stop_grace = grace;
                let mut published = std::collections::BTreeSet::new();
                for (pname, (container, publ, http, pp)) in ports {
                    let publ = publ.filter(|p| published.insert(*p));
                    s.ports.push(PortSpec {
                        name: pname,
                        container,
                        published: publ,
                        protocol: if http { Protocol::Http } else { Protocol::Tcp },
                        proxy_protocol: pp,
                    });
                }
                s.env = env;
                s.placement.constraints = cons;
                s.placement.spread = spread.into_iter().map(String::from).collect();
                s.placement.max_per_node = mpn;
                s.resources.cpu = f64::from(cpu4) * 0.25;
                s.resources.memory = mem.map(ByteSize);
                s.update.strategy = strategy;
                let mut st: Vec<u32> = steps.into_iter().collect();
                st.push(100);
                s.update.canary.steps = st;
                if let Some((min, max, cpu)) = auto {
                    s.replicas = min;
                    s.autoscale = Some(Autoscale {
                        min,
                        max,
                        target_rps_per_instance: if cpu && s.resources.cpu > 0.0 {
                            None
                        } else {
                            Some(f64::from(max) * 12.5)
                        },
                        target_cpu: if cpu && s.resources.cpu > 0.0 {
                            Some(0.6)
                        } else {
                            None
                        },
                        scale_down_stabilization: Duration::from_secs(u64::from(max)),
                        scale_up_stabilization: Duration::ZERO,
                    });
                }
                let names: Vec<String> = s.ports.iter().map(|p| p.name.clone()).collect();
                (
                    Just(s),
                    prop::option::of(probe(names.clone())),
                    prop::option::of(probe(names)),
                )
            },
        )
        .prop_map(|(mut s, live, ready)| {
            s.health.liveness = live;
            s.health.readiness = ready;
            s
        })
}

proptest! {
    #[test]
    fn any_valid_spec_serialises_and_parses_back_equal(s in spec()) {
        prop_assert_eq!(validate_service(&s), vec![]);
        let text = s.to_toml();
        let back = load_service_str("gen.toml", &text);
        prop_assert!(back.is_ok(), "{}\n---\n{}", text, back.unwrap_err());
        prop_assert_eq!(back.unwrap(), s);
    }

    #[test]
    fn random_text_never_panics_the_loader(src in "[ -~\n\\[\\]=\"]{0,200}") {
        let _ = load_str("x.toml", &src, None);
    }
}

#[test]
fn a_node_config_round_trips() {
    let mut c = NodeConfig {
        name: Some("n1".into()),
        ..NodeConfig::default()
    };
    c.seeds = vec!["127.0.0.1:7946".into()];
    c.labels = BTreeMap::from([("rack".to_string(), "r1".to_string())]);
    c.membership.preset = MembershipPreset::Fast;
    c.membership.suspicion = Some(Duration::from_millis(1500));
    c.resources.memory = Some(ByteSize(8 << 30));
    assert_eq!(load_node_str("n.toml", &c.to_toml()).unwrap(), c);
}

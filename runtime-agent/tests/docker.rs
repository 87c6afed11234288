//! The Docker runtime against the real Docker Engine. These tests need a running engine and
//! fail (they do not skip) without one. They build the test images with
//! scripts/build-test-images.sh when missing. Every container carries `shoal.test=1` and a node
//! name unique to the test, and is removed by a guard even when the test fails. Tests serialize
//! on a static lock: the machine has two cores.

mod common;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use shoal_runtime::*;

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static IMAGES_READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
static NEXT_NODE: AtomicU32 = AtomicU32::new(0);
const LONG: Duration = Duration::from_secs(60);
const WEB1: &str = "shoal-test/web:1";
const WEB2: &str = "shoal-test/web:2";
const CRASHY: &str = "shoal-test/crashy";

/// Removes every container of the test's node when dropped (also on panic).
struct Cleanup {
    node: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let out = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=shoal.node={}", self.node),
            ])
            .output();
        if let Ok(out) = out {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(String::from)
                .collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", "-v"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

fn engine_missing_message(e: &RuntimeError) -> String {
    format!(
        "these tests need the Docker Engine at {DOCKER_DEFAULT_SOCKET} (install docker.io and \
         start dockerd): {e}"
    )
}

async fn ensure_images() {
    IMAGES_READY
        .get_or_init(|| async {
            let probe = DockerRuntime::connect("probe")
                .await
                .unwrap_or_else(|e| panic!("{}", engine_missing_message(&e)));
            let mut missing = false;
            for img in [WEB1, WEB2, CRASHY] {
                if probe.client().inspect_image(img).await.is_err() {
                    missing = true;
                }
            }
            if missing {
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-images.sh");
                let status = tokio::process::Command::new("bash")
                    .arg(&script)
                    .status()
                    .await
                    .expect("run build-test-images.sh");
                assert!(status.success(), "{} failed", script.display());
            }
        })
        .await;
}

/// A runtime for a fresh node name, the guard that cleans it up, and the lock.
async fn setup() -> (DockerRuntime, Cleanup, tokio::sync::MutexGuard<'static, ()>) {
    let guard = LOCK.lock().await;
    ensure_images().await;
    let node = format!(
        "dt{}-{}",
        std::process::id(),
        NEXT_NODE.fetch_add(1, Ordering::SeqCst)
    );
    let rt = DockerRuntime::connect(&node)
        .await
        .unwrap_or_else(|e| panic!("{}", engine_missing_message(&e)));
    (rt, Cleanup { node }, guard)
}

fn labelled(mut s: InstanceSpec) -> InstanceSpec {
    s.labels.insert("shoal.test".into(), "1".into());
    s.stop_grace = Duration::from_secs(5);
    s
}

fn web(node: &str, slot: u32, image: &str) -> InstanceSpec {
    let mut s =
        labelled(InstanceSpec::image(node, "web", slot, 1, image).with_port("http", 8080, None));
    s.ports[0].host_ip = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    s
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_container_starts_with_its_labels_and_its_mapped_port_answers_http() {
    let (rt, c, _g) = setup().await;
    let mut ev = rt.events();
    let spec = web(&c.node, 0, WEB1);
    let info = rt.ensure_started(&spec).await.unwrap();
    assert_eq!(info.state, InstanceState::Running);
    assert_eq!(info.instance_id, "web-0-v1");
    let addr = info.port("http").expect("the host port is reported back");
    assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(addr.port(), 0);
    let body = wait_for_http(addr, "/", LONG)
        .await
        .expect("the mapped port answers");
    assert!(body.contains("shoal-test web v1"), "{body}");
    assert!(wait_for_http(addr, "/healthz", LONG).await.is_some());

    // Labels and policy as the engine sees them.
    let raw = rt
        .client()
        .inspect_container(&format!("shoal-{}-web-0-v1", c.node), None)
        .await
        .unwrap();
    let labels = raw.config.unwrap().labels.unwrap();
    for (k, v) in [
        (LABEL_NODE, c.node.as_str()),
        (LABEL_SERVICE, "web"),
        (LABEL_SLOT, "0"),
        (LABEL_VERSION, "1"),
        (LABEL_INSTANCE, "web-0-v1"),
        ("shoal.test", "1"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    let hc = raw.host_config.unwrap();
    assert_eq!(
        hc.restart_policy.unwrap().name.map(|n| n.to_string()),
        Some("no".to_string())
    );
    assert_eq!(hc.init, Some(true));

    assert!(
        wait_event(&mut ev, LONG, |e| e.kind == EventKind::Started
            && e.instance_id == "web-0-v1")
        .await
        .is_some()
    );
    let listed = rt.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].runtime_id, info.runtime_id);
    assert_eq!(listed[0].ports, info.ports);

    let again = rt.ensure_started(&spec).await.unwrap();
    assert_eq!(
        again.runtime_id, info.runtime_id,
        "idempotent: same container"
    );
    assert_eq!(again.started_at, info.started_at, "not restarted");
}

#[tokio::test]
async fn stop_and_remove_report_events_and_are_idempotent() {
    let (rt, c, _g) = setup().await;
    let mut ev = rt.events();
    let info = rt.ensure_started(&web(&c.node, 0, WEB2)).await.unwrap();
    let addr = info.port("http").unwrap();
    assert!(wait_for_http(addr, "/", LONG).await.unwrap().contains("v2"));
    let t0 = std::time::Instant::now();
    rt.stop("web-0-v1", Duration::from_secs(10)).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(9),
        "SIGTERM reached httpd through the init, no need to wait for the kill"
    );
    let ex = wait_event(&mut ev, LONG, |e| {
        matches!(e.kind, EventKind::Exited { .. })
    })
    .await
    .expect("exit event");
    assert_eq!(ex.instance_id, "web-0-v1");
    assert_eq!(ex.service.as_deref(), Some("web"));
    let st = rt.inspect("web-0-v1").await.unwrap().unwrap().state;
    assert!(matches!(st, InstanceState::Exited { .. }), "{st:?}");
    assert!(http_get(addr, "/").is_none());
    rt.stop("web-0-v1", Duration::from_secs(1)).await.unwrap();
    rt.stop("never-existed", Duration::from_secs(1))
        .await
        .unwrap();

    rt.remove("web-0-v1").await.unwrap();
    assert!(
        wait_event(&mut ev, LONG, |e| e.kind == EventKind::Removed)
            .await
            .is_some()
    );
    rt.remove("web-0-v1").await.unwrap();
    assert!(rt.inspect("web-0-v1").await.unwrap().is_none());
    assert!(rt.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_crashing_container_reports_its_exit_code_and_logs_and_is_replaced_on_start() {
    let (rt, c, _g) = setup().await;
    let mut ev = rt.events();
    let spec = labelled(InstanceSpec::image(&c.node, "crashy", 0, 1, CRASHY));
    let first = rt.ensure_started(&spec).await.unwrap();
    let follow = rt
        .logs(
            "crashy-0-v1",
            LogOptions {
                tail: None,
                follow: true,
            },
        )
        .await
        .unwrap();
    let followed: Vec<LogLine> = tokio::time::timeout(LONG, follow.map(|l| l.unwrap()).collect())
        .await
        .expect("following ends when the container exits");
    let lines: Vec<&str> = followed.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(lines, ["crashy starting", "crashy exiting"]);
    assert_eq!(followed[0].source, LogSource::Stdout);

    let ex = wait_event(&mut ev, LONG, |e| {
        matches!(e.kind, EventKind::Exited { .. })
    })
    .await
    .unwrap();
    assert_eq!(ex.kind, EventKind::Exited { code: Some(3) });
    assert_eq!(
        rt.inspect("crashy-0-v1").await.unwrap().unwrap().state,
        InstanceState::Exited {
            code: Some(3),
            oom_killed: false
        }
    );
    assert_eq!(
        log_lines(&rt, "crashy-0-v1", Some(1)).await,
        ["crashy exiting"]
    );

    let second = rt.ensure_started(&spec).await.unwrap();
    assert_ne!(second.runtime_id, first.runtime_id, "a fresh container");
    rt.remove("crashy-0-v1").await.unwrap();
}

#[tokio::test]
async fn the_image_health_check_is_reported_as_events_and_in_inspect() {
    let (rt, c, _g) = setup().await;
    let mut ev = rt.events();
    rt.ensure_started(&web(&c.node, 0, WEB1)).await.unwrap();
    let h = wait_event(&mut ev, LONG, |e| matches!(e.kind, EventKind::Health(_)))
        .await
        .expect("a health event");
    assert_eq!(h.kind, EventKind::Health(HealthStatus::Healthy));
    assert_eq!(
        rt.inspect("web-0-v1").await.unwrap().unwrap().health,
        Some(HealthStatus::Healthy)
    );
}

#[tokio::test]
async fn exec_returns_the_exit_code_and_output_of_a_command_in_the_container() {
    let (rt, c, _g) = setup().await;
    rt.ensure_started(&web(&c.node, 0, WEB1)).await.unwrap();
    let out = rt
        .exec(
            "web-0-v1",
            &args(&[
                "/bin/busybox",
                "sh",
                "-c",
                "echo v=$SHOAL_TEST_VERSION; exit 5",
            ]),
            LONG,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 5);
    assert_eq!(String::from_utf8_lossy(&out.output).trim(), "v=1");
    let probe = args(&[
        "/bin/busybox",
        "wget",
        "-q",
        "-O",
        "-",
        "http://127.0.0.1:8080/healthz",
    ]);
    let ok = wait_until(LONG, || {
        let rt = rt.clone();
        let probe = probe.clone();
        async move {
            rt.exec("web-0-v1", &probe, LONG)
                .await
                .is_ok_and(|o| o.exit_code == 0)
        }
    })
    .await;
    assert!(ok, "the health probe passes by exec");
    assert!(matches!(
        rt.exec(
            "web-0-v1",
            &args(&["/bin/busybox", "sleep", "30"]),
            Duration::from_millis(500)
        )
        .await,
        Err(RuntimeError::Timeout { .. })
    ));
    rt.stop("web-0-v1", Duration::from_secs(5)).await.unwrap();
    assert!(matches!(
        rt.exec("web-0-v1", &probe, LONG).await,
        Err(RuntimeError::NotRunning(_))
    ));
}

#[tokio::test]
async fn stats_report_cpu_use_and_memory_against_the_limit() {
    let (rt, c, _g) = setup().await;
    let mut spec = labelled(InstanceSpec::image(&c.node, "busy", 0, 1, WEB1));
    spec.workload = Workload::Image {
        image: WEB1.into(),
        args: args(&["sh", "-c", "while :; do :; done"]),
    };
    spec.resources.memory_bytes = Some(64 << 20);
    spec.resources.cpus = Some(0.5);
    rt.ensure_started(&spec).await.unwrap();
    let deadline = std::time::Instant::now() + LONG;
    let mut last;
    loop {
        let s = rt.stats("busy-0-v1").await.unwrap();
        last = s;
        if (s.cpu_cores > 0.1 && s.memory_bytes > 0) || std::time::Instant::now() > deadline {
            break;
        }
    }
    assert!(last.cpu_cores > 0.1, "{last:?}");
    assert!(last.cpu_cores < 0.75, "the 0.5 CPU limit holds: {last:?}");
    assert!(last.memory_bytes > 0, "{last:?}");
    assert_eq!(last.memory_limit, Some(64 << 20));
    assert!(last.cpu_total_ns > 0);
}

#[tokio::test]
async fn an_out_of_memory_kill_is_reported() {
    let (rt, c, _g) = setup().await;
    let mut ev = rt.events();
    let mut spec = labelled(InstanceSpec::image(&c.node, "hog", 0, 1, WEB1));
    spec.workload = Workload::Image {
        image: WEB1.into(),
        // Holds 200 MB of zero bytes in a shell variable: far past the 16 MiB limit.
        args: args(&[
            "sh",
            "-c",
            "v=$(head -c 200000000 /dev/zero | tr '\\0' a); sleep 60",
        ]),
    };
    spec.resources.memory_bytes = Some(16 << 20);
    rt.ensure_started(&spec).await.unwrap();
    let oom = wait_event(&mut ev, LONG, |e| e.kind == EventKind::OomKilled).await;
    assert!(oom.is_some(), "an OomKilled event");
    assert!(
        wait_until(LONG, || {
            let rt = rt.clone();
            async move {
                matches!(
                    rt.inspect("hog-0-v1").await.unwrap().map(|i| i.state),
                    Some(InstanceState::Exited {
                        oom_killed: true,
                        ..
                    })
                )
            }
        })
        .await,
        "{:?}",
        rt.inspect("hog-0-v1").await
    );
}

#[tokio::test]
async fn a_restarted_agent_lists_and_adopts_its_running_containers_restarting_none() {
    let (rt, c, _g) = setup().await;
    let a = rt.ensure_started(&web(&c.node, 0, WEB1)).await.unwrap();
    let b = rt.ensure_started(&web(&c.node, 1, WEB1)).await.unwrap();
    drop(rt); // the "agent" goes away; its containers keep running

    let rt2: Arc<dyn ContainerRuntime> = Arc::new(DockerRuntime::connect(&c.node).await.unwrap());
    let listed = rt2.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    for (old, new) in [(&a, &listed[0]), (&b, &listed[1])] {
        assert_eq!(new.instance_id, old.instance_id);
        assert_eq!(new.runtime_id, old.runtime_id);
        assert_eq!(new.state, InstanceState::Running);
        assert_eq!(new.started_at, old.started_at, "not restarted");
        assert_eq!(new.ports, old.ports);
    }
    let adopted = rt2.ensure_started(&web(&c.node, 0, WEB1)).await.unwrap();
    assert_eq!(adopted.runtime_id, a.runtime_id);
    assert_eq!(adopted.started_at, a.started_at);
    assert!(
        wait_for_http(a.port("http").unwrap(), "/", LONG)
            .await
            .is_some()
    );

    // Another node sharing the engine sees none of them.
    let other = DockerRuntime::connect(&format!("{}-other", c.node))
        .await
        .unwrap();
    assert!(other.list().await.unwrap().is_empty());
    assert!(other.inspect("web-0-v1").await.unwrap().is_none());
}

#[tokio::test]
async fn a_missing_image_is_a_clear_error_remembered_without_asking_the_engine_again() {
    let (rt, c, _g) = setup().await;
    let spec = labelled(InstanceSpec::image(
        &c.node,
        "ghost",
        0,
        1,
        "shoal-test/does-not-exist:1",
    ));
    let e = rt.ensure_started(&spec).await.unwrap_err();
    assert!(
        matches!(&e, RuntimeError::ImageNotFound { retry_in: None, .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("shoal-test/does-not-exist:1") && msg.contains("does not pull"),
        "{msg}"
    );
    let e2 = rt.ensure_started(&spec).await.unwrap_err();
    assert!(
        matches!(e2, RuntimeError::ImageNotFound { retry_in: Some(d), .. } if d <= Duration::from_secs(2)),
        "the second attempt is answered from the negative cache: {e2:?}"
    );
    assert!(rt.list().await.unwrap().is_empty(), "nothing left behind");
}

#[tokio::test]
async fn a_taken_host_port_is_a_clear_error_naming_the_port_and_leaves_nothing_behind() {
    let (rt, c, _g) = setup().await;
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut spec = web(&c.node, 0, WEB1);
    spec.ports[0].host_port = Some(port);
    let e = rt.ensure_started(&spec).await.unwrap_err();
    match &e {
        RuntimeError::PortInUse { name, port: p, .. } => {
            assert_eq!((name.as_str(), *p), ("http", port))
        }
        other => panic!("expected PortInUse, got {other:?}"),
    }
    assert!(e.to_string().contains(&port.to_string()), "{e}");
    assert!(
        rt.list().await.unwrap().is_empty(),
        "the failed container was removed"
    );
    drop(taken);
}

#[tokio::test]
async fn an_unreachable_engine_is_a_clear_error_not_a_panic() {
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-docker.sock");
    let e = DockerRuntime::connect_with(
        "dt-unreachable",
        DockerOptions {
            socket: missing.display().to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RuntimeError::EngineUnreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("no-such-docker.sock"), "{e}");

    // A socket file nobody listens on.
    let dead = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let e = DockerRuntime::connect_with(
        "dt-unreachable",
        DockerOptions {
            socket: dead.display().to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RuntimeError::EngineUnreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("unreachable"), "{e}");
}

#[tokio::test]
async fn a_spec_for_a_command_or_another_node_is_refused() {
    let (rt, c, _g) = setup().await;
    let cmd = InstanceSpec::command(&c.node, "p", 0, 1, &["/bin/true"]);
    assert!(matches!(
        rt.ensure_started(&cmd).await,
        Err(RuntimeError::InvalidSpec(_))
    ));
    let other = InstanceSpec::image("elsewhere", "w", 0, 1, WEB1);
    assert!(matches!(
        rt.ensure_started(&other).await,
        Err(RuntimeError::InvalidSpec(_))
    ));
}

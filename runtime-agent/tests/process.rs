//! The process runtime against real local processes (busybox for the HTTP server).
//! Tests serialize on a static lock: the machine has two cores.

mod common;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use shoal_runtime::*;

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const BUSYBOX: &str = "/bin/busybox";
const LONG: Duration = Duration::from_secs(30);

fn need_busybox() {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (apt-get install -y busybox-static) \
         or run scripts/build-test-images.sh, which installs it"
    );
}

fn sh(service: &str, script: &str) -> InstanceSpec {
    let mut s = InstanceSpec::command("pn1", service, 0, 1, &[BUSYBOX, "sh", "-c", script]);
    s.stop_grace = Duration::from_secs(2);
    s
}

fn web(www: &Path, slot: u32) -> InstanceSpec {
    let mut s = InstanceSpec::command(
        "pn1",
        "web",
        slot,
        1,
        &[
            BUSYBOX,
            "httpd",
            "-f",
            "-p",
            "127.0.0.1:${PORT}",
            "-h",
            www.to_str().unwrap(),
        ],
    )
    .with_port("http", 0, None);
    s.ports[0].host_ip = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    s.labels.insert("team".into(), "blue".into());
    s
}

fn www_dir(root: &Path) -> std::path::PathBuf {
    let www = root.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from process v1\n").unwrap();
    std::fs::write(www.join("healthz"), "ok\n").unwrap();
    www
}

/// Kills every process group recorded under a data dir when dropped, so a failing test leaves
/// no process behind.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.0.join("instances")) else {
            return;
        };
        for d in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(d.path().join("state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            // Only a group whose leader is still the recorded process: a pgid can be reused.
            let leader_start = v["pid"].as_i64().and_then(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().nth(19)?.parse::<u64>().ok()
            });
            if leader_start.is_none() || leader_start != v["start_ticks"].as_u64() {
                continue;
            }
            if let Some(pgid) = v["pgid"].as_i64() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn group_alive(pgid: i32) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let Ok(text) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else {
            return false;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.first() != Some(&"Z") && f.get(2).and_then(|p| p.parse::<i32>().ok()) == Some(pgid)
    })
}

fn pid_of(info: &InstanceInfo) -> i32 {
    info.runtime_id
        .strip_prefix("pid:")
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_process_instance_starts_serves_http_on_its_reported_port_and_stops_and_is_removed() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().join("data"));
    let rt = ProcessRuntime::open(dir.path().join("data"), "pn1")
        .await
        .unwrap();
    let mut ev = rt.events();
    let spec = web(&www_dir(dir.path()), 0);
    let info = rt.ensure_started(&spec).await.unwrap();
    assert_eq!(info.state, InstanceState::Running);
    assert_eq!(info.labels[LABEL_NODE], "pn1");
    assert_eq!(info.labels[LABEL_SERVICE], "web");
    assert_eq!(info.labels[LABEL_SLOT], "0");
    assert_eq!(info.labels[LABEL_VERSION], "1");
    assert_eq!(info.labels[LABEL_INSTANCE], "web-0-v1");
    assert_eq!(info.labels["team"], "blue");
    let addr = info.port("http").unwrap();
    assert_ne!(addr.port(), 0);
    let body = wait_for_http(addr, "/", LONG).await.expect("httpd answers");
    assert!(body.contains("hello from process v1"), "{body}");
    assert!(wait_for_http(addr, "/healthz", LONG).await.is_some());

    assert!(
        wait_event(&mut ev, LONG, |e| e.kind == EventKind::Started)
            .await
            .is_some()
    );
    let listed = rt.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].instance_id, "web-0-v1");

    // Idempotent start: same process.
    let again = rt.ensure_started(&spec).await.unwrap();
    assert_eq!(again.runtime_id, info.runtime_id);

    rt.stop("web-0-v1", Duration::from_secs(5)).await.unwrap();
    let ex = wait_event(&mut ev, LONG, |e| {
        matches!(e.kind, EventKind::Exited { .. })
    })
    .await
    .unwrap();
    assert_eq!(
        ex.kind,
        EventKind::Exited { code: Some(143) },
        "SIGTERM = 128 + 15"
    );
    let stopped = rt.inspect("web-0-v1").await.unwrap().unwrap();
    assert!(!stopped.state.is_running());
    assert!(http_get(addr, "/").is_none(), "nothing answers after stop");
    rt.stop("web-0-v1", Duration::from_secs(1)).await.unwrap();

    rt.remove("web-0-v1").await.unwrap();
    rt.remove("web-0-v1").await.unwrap();
    assert!(rt.inspect("web-0-v1").await.unwrap().is_none());
    assert!(rt.list().await.unwrap().is_empty());
    assert!(
        wait_event(&mut ev, LONG, |e| e.kind == EventKind::Removed)
            .await
            .is_some()
    );
    assert!(!dir.path().join("data/instances/web-0-v1").exists());
}

#[tokio::test]
async fn port_variables_are_in_the_environment_and_expanded_in_the_command() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = ProcessRuntime::open(dir.path(), "pn1").await.unwrap();
    let mut spec = sh(
        "env",
        "echo arg=${SHOAL_PORT_ADMIN_API} env=$PORT admin=$SHOAL_PORT_ADMIN_API greeting=$GREETING; sleep 30",
    )
    .with_port("main", 0, None)
    .with_port("admin-api", 0, None);
    spec.env.insert("GREETING".into(), "hi".into());
    let info = rt.ensure_started(&spec).await.unwrap();
    let main = info.port("main").unwrap().port();
    let admin = info.port("admin-api").unwrap().port();
    let want = format!("arg={admin} env={main} admin={admin} greeting=hi");
    let rt2 = rt.clone();
    assert!(
        wait_until(LONG, || {
            let rt2 = rt2.clone();
            let want = want.clone();
            async move { log_lines(&rt2, "env-0-v1", None).await.contains(&want) }
        })
        .await,
        "log: {:?}",
        log_lines(&rt, "env-0-v1", None).await
    );
    rt.remove("env-0-v1").await.unwrap();
}

#[tokio::test]
async fn stop_terminates_the_whole_process_group_and_kills_it_after_the_grace_period() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = ProcessRuntime::open(dir.path(), "pn1").await.unwrap();
    let mut ev = rt.events();
    // The shell ignores SIGTERM; its children are in the same group.
    let spec = sh(
        "stubborn",
        "trap '' TERM; /bin/busybox sleep 300 & /bin/busybox sleep 300 & while :; do /bin/busybox sleep 1; done",
    );
    let info = rt.ensure_started(&spec).await.unwrap();
    let pgid = pid_of(&info);
    assert!(wait_until(LONG, || async { group_alive(pgid) }).await);
    let t0 = std::time::Instant::now();
    rt.stop("stubborn-0-v1", Duration::from_millis(500))
        .await
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "waited the grace period"
    );
    let ex = wait_event(&mut ev, LONG, |e| {
        matches!(e.kind, EventKind::Exited { .. })
    })
    .await
    .unwrap();
    assert_eq!(
        ex.kind,
        EventKind::Exited { code: Some(137) },
        "SIGKILL = 128 + 9"
    );
    assert!(
        wait_until(LONG, || async { !group_alive(pgid) }).await,
        "no process of the group is left"
    );
    rt.remove("stubborn-0-v1").await.unwrap();
}

#[tokio::test]
async fn a_crashing_process_reports_its_exit_code_and_is_replaced_by_the_next_start() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = ProcessRuntime::open(dir.path(), "pn1").await.unwrap();
    let mut ev = rt.events();
    let spec = sh("crashy", "echo dying; exit 3");
    let first = rt.ensure_started(&spec).await.unwrap();
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
    let second = rt.ensure_started(&spec).await.unwrap();
    assert_ne!(first.runtime_id, second.runtime_id, "a new process");
    rt.remove("crashy-0-v1").await.unwrap();
}

#[tokio::test]
async fn exec_runs_with_the_instance_environment_and_returns_code_and_output() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = ProcessRuntime::open(dir.path(), "pn1").await.unwrap();
    let spec = sh("probe", "sleep 60").with_port("http", 0, None);
    let info = rt.ensure_started(&spec).await.unwrap();
    let port = info.port("http").unwrap().port();
    let cmd: Vec<String> = [BUSYBOX, "sh", "-c", "echo port=$PORT; exit 4"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = rt.exec("probe-0-v1", &cmd, LONG).await.unwrap();
    assert_eq!(out.exit_code, 4);
    assert_eq!(
        String::from_utf8_lossy(&out.output).trim(),
        format!("port={port}")
    );
    let slow: Vec<String> = [BUSYBOX, "sleep", "30"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(matches!(
        rt.exec("probe-0-v1", &slow, Duration::from_millis(300))
            .await,
        Err(RuntimeError::Timeout { .. })
    ));
    rt.stop("probe-0-v1", Duration::from_secs(2)).await.unwrap();
    assert!(matches!(
        rt.exec("probe-0-v1", &cmd, LONG).await,
        Err(RuntimeError::NotRunning(_))
    ));
    rt.remove("probe-0-v1").await.unwrap();
}

#[tokio::test]
async fn stats_report_the_cpu_and_memory_of_a_busy_process() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = ProcessRuntime::open(dir.path(), "pn1").await.unwrap();
    let mut spec = sh("busy", "while :; do :; done");
    spec.resources.memory_bytes = Some(64 << 20);
    rt.ensure_started(&spec).await.unwrap();
    // On a loaded two-core machine the loop may not get a whole core: ask for a tenth.
    let deadline = std::time::Instant::now() + LONG;
    let mut last;
    loop {
        let s = rt.stats("busy-0-v1").await.unwrap();
        last = Some(s);
        if (s.cpu_cores > 0.1 && s.memory_bytes > 0) || std::time::Instant::now() > deadline {
            break;
        }
    }
    assert!(
        last.is_some_and(|s| s.cpu_cores > 0.1 && s.memory_bytes > 0),
        "stats: {last:?}"
    );
    let s = last.unwrap();
    assert!(s.cpu_total_ns > 0);
    assert_eq!(s.memory_limit, Some(64 << 20));
    rt.remove("busy-0-v1").await.unwrap();
    assert!(matches!(
        rt.stats("busy-0-v1").await,
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn logs_give_the_last_lines_and_follow_new_ones_until_exit() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = ProcessRuntime::open(dir.path(), "pn1").await.unwrap();
    let spec = sh(
        "chatty",
        "for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2; \
         while [ ! -e go ]; do /bin/busybox sleep 0.1; done; echo late; exit 0",
    );
    rt.ensure_started(&spec).await.unwrap();
    assert!(
        wait_until(LONG, || {
            let rt = rt.clone();
            async move { log_lines(&rt, "chatty-0-v1", None).await.len() >= 6 }
        })
        .await
    );
    assert_eq!(
        log_lines(&rt, "chatty-0-v1", Some(2)).await,
        ["line 5", "oops"]
    );
    let follow = rt
        .logs(
            "chatty-0-v1",
            LogOptions {
                tail: Some(1),
                follow: true,
            },
        )
        .await
        .unwrap();
    // Let the process finish only once the follower is attached (its cwd is its directory).
    std::fs::write(dir.path().join("instances/chatty-0-v1/go"), b"").unwrap();
    let lines: Vec<String> = tokio::time::timeout(LONG, follow.map(|l| l.unwrap().line).collect())
        .await
        .expect("the follow stream ends when the process exits");
    assert_eq!(lines, ["oops", "late"]);
    rt.remove("chatty-0-v1").await.unwrap();
}

#[tokio::test]
async fn a_restarted_agent_adopts_its_running_processes_and_restarts_none() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _cleanup = Cleanup(data.clone());
    let www = www_dir(dir.path());
    let (a, b) = {
        let rt = ProcessRuntime::open(&data, "pn1").await.unwrap();
        let a = rt.ensure_started(&web(&www, 0)).await.unwrap();
        let b = rt.ensure_started(&web(&www, 1)).await.unwrap();
        let c = rt.ensure_started(&sh("gone", "exit 0")).await.unwrap();
        let mut ev = rt.events();
        let _ = c;
        let _ = wait_event(&mut ev, LONG, |e| e.instance_id == "gone-0-v1").await;
        (a, b)
        // The runtime (the "agent") is dropped here; its processes keep running.
    };
    assert!(
        wait_for_http(a.port("http").unwrap(), "/", LONG)
            .await
            .is_some()
    );

    let rt: Arc<dyn ContainerRuntime> = Arc::new(ProcessRuntime::open(&data, "pn1").await.unwrap());
    let listed = rt.list().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|i| i.instance_id.as_str()).collect();
    assert_eq!(ids, ["gone-0-v1", "web-0-v1", "web-1-v1"]);
    for (old, new) in [(&a, &listed[1]), (&b, &listed[2])] {
        assert_eq!(new.state, InstanceState::Running);
        assert_eq!(
            new.runtime_id, old.runtime_id,
            "same process, not restarted"
        );
        assert_eq!(new.ports, old.ports);
    }
    assert!(!listed[0].state.is_running());
    let again = rt.ensure_started(&web(&www, 0)).await.unwrap();
    assert_eq!(
        again.runtime_id, a.runtime_id,
        "ensure_started adopts, does not restart"
    );
    assert!(
        wait_for_http(a.port("http").unwrap(), "/", LONG)
            .await
            .is_some()
    );

    // An adopted process's exit is noticed (code unknown: it is not our child).
    let mut ev = rt.events();
    let pid = pid_of(&b);
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let ex = wait_event(&mut ev, LONG, |e| e.instance_id == "web-1-v1")
        .await
        .unwrap();
    assert_eq!(ex.kind, EventKind::Exited { code: None });

    // Stop works on an adopted process too.
    rt.stop("web-0-v1", Duration::from_secs(5)).await.unwrap();
    assert!(!group_alive(pid_of(&a)));
    for id in ["web-0-v1", "web-1-v1", "gone-0-v1"] {
        rt.remove(id).await.unwrap();
    }
}

#[tokio::test]
async fn a_taken_port_a_missing_program_and_an_image_spec_give_clear_errors() {
    need_busybox();
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = ProcessRuntime::open(dir.path(), "pn1").await.unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut spec = web(&www_dir(dir.path()), 0);
    spec.ports[0].host_port = Some(port);
    let e = rt.ensure_started(&spec).await.unwrap_err();
    assert!(
        matches!(e, RuntimeError::PortInUse { port: p, .. } if p == port),
        "{e}"
    );
    assert!(e.to_string().contains(&port.to_string()), "{e}");

    let missing = InstanceSpec::command("pn1", "nope", 0, 1, &["/nonexistent/shoal-prog"]);
    let e = rt.ensure_started(&missing).await.unwrap_err();
    assert!(matches!(e, RuntimeError::Spawn { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/shoal-prog"), "{e}");

    let image = InstanceSpec::image("pn1", "img", 0, 1, "shoal-test/web:1");
    assert!(matches!(
        rt.ensure_started(&image).await,
        Err(RuntimeError::InvalidSpec(_))
    ));
    let other_node = InstanceSpec::command("pn2", "x", 0, 1, &["true"]);
    assert!(matches!(
        rt.ensure_started(&other_node).await,
        Err(RuntimeError::InvalidSpec(_))
    ));
    assert!(matches!(
        rt.inspect("../etc").await,
        Err(RuntimeError::InvalidSpec(_))
    ));
    assert!(
        rt.list()
            .await
            .unwrap()
            .iter()
            .all(|i| !i.state.is_running())
    );
}

#[tokio::test]
async fn a_corrupt_state_file_is_skipped_not_a_panic() {
    let _g = LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let inst = dir.path().join("instances/bad-0-v1");
    std::fs::create_dir_all(&inst).unwrap();
    std::fs::write(inst.join("state.json"), b"{not json").unwrap();
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let rt = ProcessRuntime::open(dir.path(), "pn1").await.unwrap();
    assert!(rt.list().await.unwrap().is_empty());
}

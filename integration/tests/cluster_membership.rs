//! Real agents (`target/debug/shoal agent`) on 127.0.0.1: joining through a seed, crash
//! detection and restart, refused certificates, tampered and replayed datagrams. The tests in
//! this binary serialize on a static mutex; run it with `--test-threads=1` on a busy machine.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_integration::agents::{serial, shoal_bin, wait_until};
use shoal_membership::cert::{self, IssueOptions};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running agent, killed (SIGKILL) when dropped.
struct Agent {
    child: Option<Child>,
    api: SocketAddr,
    gossip: SocketAddr,
    log: PathBuf,
}

impl Agent {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

struct AgentSpec<'a> {
    cert_dir: &'a Path,
    data_dir: &'a Path,
    gossip: u16,
    advertise: Option<SocketAddr>,
    api: u16,
    seeds: Vec<SocketAddr>,
    config: Option<&'a Path>,
    skip_key_check: bool,
}

fn start(spec: AgentSpec<'_>) -> Agent {
    std::fs::create_dir_all(spec.data_dir).unwrap();
    let log = spec.data_dir.join(format!("agent-{}.log", spec.gossip));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut cmd = Command::new(shoal_bin());
    cmd.arg("agent")
        .args(["--bind", &addr(spec.gossip).to_string()])
        .args(["--api", &addr(spec.api).to_string()])
        .args(["--data-dir", &spec.data_dir.display().to_string()])
        .args(["--cert-dir", &spec.cert_dir.display().to_string()])
        .args(["--runtime", "process"])
        .env("RUST_LOG", "info,shoal_membership=debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    if let Some(a) = spec.advertise {
        cmd.args(["--advertise", &a.to_string()]);
    }
    if !spec.seeds.is_empty() {
        let s: Vec<String> = spec.seeds.iter().map(|a| a.to_string()).collect();
        cmd.args(["--seeds", &s.join(",")]);
    }
    if let Some(c) = spec.config {
        cmd.args(["--config", &c.display().to_string()]);
    }
    if spec.skip_key_check {
        cmd.env("SHOAL_INSECURE_SKIP_KEY_CHECK", "true");
    } else {
        cmd.env_remove("SHOAL_INSECURE_SKIP_KEY_CHECK");
    }
    let child = cmd.spawn().expect("spawning shoal agent");
    Agent {
        child: Some(child),
        api: addr(spec.api),
        gossip: spec.advertise.unwrap_or(addr(spec.gossip)),
        log,
    }
}

fn http_get(to: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn nodes(a: &Agent) -> Vec<Value> {
    match http_get(a.api, "/v1/nodes") {
        Some((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn state_of(a: &Agent, node_id: &str) -> Option<String> {
    nodes(a)
        .iter()
        .find(|n| n["node_id"] == node_id)
        .and_then(|n| n["state"].as_str().map(str::to_string))
}

fn alive_count(a: &Agent) -> usize {
    nodes(a).iter().filter(|n| n["state"] == "alive").count()
}

fn node_id_of(cert_dir: &Path) -> String {
    let bytes = std::fs::read(cert_dir.join(cert::files::NODE_CERT)).unwrap();
    cert::Certificate::decode(&bytes).unwrap().node_id_hex()
}

/// A metric value from `/metrics` (a line `name{labels} value` or `name value`).
fn metric(a: &Agent, line_prefix: &str) -> u64 {
    let Some((200, body)) = http_get(a.api, "/metrics") else {
        return 0;
    };
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

fn wait_live(a: &Agent) {
    let ok = wait_until(Duration::from_secs(60), || {
        matches!(http_get(a.api, "/health/live"), Some((200, _)))
    });
    assert!(ok, "agent {} never became live:\n{}", a.api, a.log_tail());
}

struct Cluster {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ca: PathBuf,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let ca = root.join("ca");
        cert::ca_init(&ca).unwrap();
        Cluster {
            _dir: dir,
            root,
            ca,
        }
    }

    fn issue(&self, name: &str) -> PathBuf {
        self.issue_with(name, &IssueOptions::default())
    }

    fn issue_with(&self, name: &str, opts: &IssueOptions) -> PathBuf {
        let out = self.root.join(format!("certs-{name}"));
        let labels = BTreeMap::from([("zone".to_string(), format!("z-{name}"))]);
        cert::cert_issue_with(
            &self.ca,
            name,
            &labels,
            Duration::from_secs(24 * 3600),
            &out,
            opts,
        )
        .unwrap();
        out
    }

    fn agent(
        &self,
        name: &str,
        certs: &Path,
        gossip: u16,
        api: u16,
        seeds: Vec<SocketAddr>,
    ) -> Agent {
        start(AgentSpec {
            cert_dir: certs,
            data_dir: &self.root.join(format!("data-{name}")),
            gossip,
            advertise: None,
            api,
            seeds,
            config: None,
            skip_key_check: false,
        })
    }
}

#[test]
fn five_agents_seeded_with_the_first_list_five_alive_then_a_killed_one_goes_down_and_comes_back() {
    let _g = serial();
    let c = Cluster::new();
    let names = ["a1", "a2", "a3", "a4", "a5"];
    let certs: Vec<PathBuf> = names.iter().map(|n| c.issue(n)).collect();
    let seed = addr(21_101);
    let mut agents: Vec<Agent> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let seeds = if i == 0 { vec![] } else { vec![seed] };
            c.agent(n, &certs[i], 21_101 + i as u16, 21_201 + i as u16, seeds)
        })
        .collect();
    for a in &agents {
        wait_live(a);
    }
    let t0 = Instant::now();
    let all_five = wait_until(Duration::from_secs(30), || {
        agents.iter().all(|a| alive_count(a) == 5)
    });
    let took = t0.elapsed();
    println!("five agents: all list five alive {took:?} after the last API came up");
    assert!(
        all_five,
        "views: {:?}",
        agents.iter().map(alive_count).collect::<Vec<_>>()
    );
    assert!(took <= Duration::from_secs(3), "took {took:?}");
    // Names and labels come from the certificates.
    let view = nodes(&agents[0]);
    let a3 = view.iter().find(|n| n["name"] == "a3");
    let ok = wait_until(Duration::from_secs(15), || {
        nodes(&agents[0])
            .iter()
            .any(|n| n["name"] == "a3" && n["labels"]["zone"] == "z-a3")
    });
    assert!(ok, "a3 not named in {view:?} ({a3:?})");

    // /v1/self and the CLI.
    let (status, me) = http_get(agents[0].api, "/v1/self").unwrap();
    let me: Value = serde_json::from_str(&me).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        (me["name"].as_str(), me["self"].as_bool()),
        (Some("a1"), Some(true))
    );
    let out = Command::new(shoal_bin())
        .args(["nodes", "--json"])
        .env("SHOAL_ADDR", agents[0].api.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 5);
    let out = Command::new(shoal_bin())
        .args(["nodes", "--addr", &agents[1].api.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 6, "{table}");
    assert!(table.lines().next().unwrap().starts_with("NAME"));
    assert_eq!(table.matches(" alive ").count(), 5, "{table}");

    // kill -9 the fourth: everyone else reports it down.
    let victim = node_id_of(&certs[3]);
    agents[3].kill();
    let t0 = Instant::now();
    let down = wait_until(Duration::from_secs(60), || {
        [0, 1, 2, 4]
            .iter()
            .all(|i| state_of(&agents[*i], &victim).as_deref() == Some("down"))
    });
    println!("kill -9 -> down everywhere after {:?}", t0.elapsed());
    assert!(
        down,
        "views of the victim: {:?}",
        [0, 1, 2, 4].map(|i| state_of(&agents[i], &victim))
    );
    assert_eq!(metric(&agents[0], "shoal_members{state=\"down\"}"), 1);
    assert_eq!(metric(&agents[0], "shoal_members{state=\"alive\"}"), 4);
    assert!(metric(&agents[0], "shoal_swim_probes_sent_total") > 0);
    assert!(metric(&agents[0], "shoal_swim_suspicions_raised_total") >= 1);

    // Restart it with the same certificate: alive everywhere again, still five rows.
    agents[3] = c.agent("a4", &certs[3], 21_104, 21_204, vec![seed]);
    wait_live(&agents[3]);
    let t0 = Instant::now();
    let back = wait_until(Duration::from_secs(60), || {
        agents.iter().all(|a| {
            let v = nodes(a);
            v.len() == 5 && v.iter().all(|n| n["state"] == "alive")
        })
    });
    println!("restarted agent alive everywhere after {:?}", t0.elapsed());
    assert!(
        back,
        "views after restart: {:?}\n{}",
        agents.iter().map(nodes).collect::<Vec<_>>(),
        agents[3].log_tail()
    );
    // A graceful stop (SIGTERM) is seen as down by the others before failure detection could
    // have noticed it (LAN preset, 5 members: probe timeout 0.5 s + suspicion 4 s).
    let leaver = node_id_of(&certs[4]);
    let t0 = Instant::now();
    agents[4].terminate();
    let gone = wait_until(Duration::from_secs(30), || {
        (0..4).all(|i| state_of(&agents[i], &leaver).as_deref() == Some("down"))
    });
    let took = t0.elapsed();
    println!("graceful leave seen as down everywhere after {took:?}");
    assert!(gone);
    assert!(
        took < Duration::from_millis(4500),
        "took {took:?}: not a graceful leave"
    );
}

#[test]
fn agents_with_a_foreign_expired_or_mismatched_certificate_are_refused_never_listed_and_counted() {
    let _g = serial();
    let c = Cluster::new();
    let good = c.issue("good");
    // Another CA.
    let other_ca = c.root.join("other-ca");
    cert::ca_init(&other_ca).unwrap();
    let foreign = c.root.join("certs-foreign");
    cert::cert_issue(
        &other_ca,
        "foreign",
        &BTreeMap::new(),
        Duration::from_secs(3600),
        &foreign,
    )
    .unwrap();
    let now = cert::unix_now();
    let expired = c.issue_with(
        "expired",
        &IssueOptions {
            not_before: Some(now - 7200),
            not_after: Some(now - 3600),
            ..IssueOptions::default()
        },
    );
    let wrong_key = c.issue_with(
        "wrongkey",
        &IssueOptions {
            certify_other_key: true,
            ..IssueOptions::default()
        },
    );
    let good_gossip = addr(21_301);
    let bad_ports = [21_302u16, 21_303, 21_304];
    // The good agent also dials the bad ones (they are among its seeds), so it sees each
    // certificate and counts every reason.
    let g = start(AgentSpec {
        cert_dir: &good,
        data_dir: &c.root.join("data-good"),
        gossip: 21_301,
        advertise: None,
        api: 21_401,
        seeds: bad_ports.iter().map(|p| addr(*p)).collect(),
        config: None,
        skip_key_check: false,
    });
    let bad: Vec<Agent> = [
        (&foreign, "foreign"),
        (&expired, "expired"),
        (&wrong_key, "wrongkey"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (dir, name))| {
        start(AgentSpec {
            cert_dir: dir,
            data_dir: &c.root.join(format!("data-{name}")),
            gossip: bad_ports[i],
            advertise: None,
            api: 21_402 + i as u16,
            seeds: vec![good_gossip],
            config: None,
            skip_key_check: *name == "wrongkey",
        })
    })
    .collect();
    wait_live(&g);
    for b in &bad {
        wait_live(b);
    }
    let reasons = ["unknown_ca", "expired", "key_mismatch"];
    let counted = wait_until(Duration::from_secs(40), || {
        reasons.iter().all(|r| {
            metric(
                &g,
                &format!("shoal_link_handshakes_rejected_total{{reason=\"{r}\"}}"),
            ) >= 1
        })
    });
    let got: Vec<u64> = reasons
        .iter()
        .map(|r| {
            metric(
                &g,
                &format!("shoal_link_handshakes_rejected_total{{reason=\"{r}\"}}"),
            )
        })
        .collect();
    assert!(
        counted,
        "rejections by reason {reasons:?}: {got:?}\n{}",
        g.log_tail()
    );
    // Keep watching for a while: none of them is ever listed, and the good node lists only
    // itself; the bad ones never list the good one.
    let listed = wait_until(Duration::from_secs(5), || nodes(&g).len() != 1);
    assert!(!listed, "the good agent listed {:?}", nodes(&g));
    for b in &bad {
        assert_eq!(nodes(b).len(), 1, "{} listed {:?}", b.gossip, nodes(b));
    }
    assert_eq!(metric(&g, "shoal_link_datagrams_in_total"), 0);
}

/// A UDP relay in front of an agent: forwards every datagram and keeps a copy; a TCP proxy on
/// the same port carries the Noise handshakes through.
struct Relay {
    udp: Arc<UdpSocket>,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    forward: Arc<Mutex<bool>>,
}

fn relay(front: SocketAddr, back: SocketAddr) -> Relay {
    let tcp = TcpListener::bind(front).unwrap();
    thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(inbound) = conn else { return };
            let Ok(outbound) = TcpStream::connect(back) else {
                continue;
            };
            for (mut from, mut to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    let udp = Arc::new(UdpSocket::bind(front).unwrap());
    let captured = Arc::new(Mutex::new(Vec::new()));
    let forward = Arc::new(Mutex::new(true));
    let (u, cap, fwd) = (udp.clone(), captured.clone(), forward.clone());
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = u.recv_from(&mut buf) {
            if *fwd.lock().unwrap() {
                let _ = u.send_to(&buf[..n], back);
            }
            cap.lock().unwrap().push(buf[..n].to_vec());
        }
    });
    Relay {
        udp,
        captured,
        forward,
    }
}

#[test]
fn a_tampered_and_a_replayed_datagram_from_a_raw_socket_are_dropped_and_counted() {
    let _g = serial();
    let c = Cluster::new();
    let (ca, cb) = (c.issue("sender"), c.issue("target"));
    // The target binds 21_502 but advertises the relay at 21_503.
    let front = addr(21_503);
    let r = relay(front, addr(21_502));
    let a = c.agent("sender", &ca, 21_501, 21_601, vec![]);
    let b = start(AgentSpec {
        cert_dir: &cb,
        data_dir: &c.root.join("data-target"),
        gossip: 21_502,
        advertise: Some(front),
        api: 21_602,
        seeds: vec![addr(21_501)],
        config: None,
        skip_key_check: false,
    });
    wait_live(&a);
    wait_live(&b);
    let joined = wait_until(Duration::from_secs(30), || {
        alive_count(&a) == 2 && alive_count(&b) == 2 && r.captured.lock().unwrap().len() >= 3
    });
    assert!(joined, "{:?} {:?}\n{}", nodes(&a), nodes(&b), b.log_tail());
    // Stop forwarding and hold the next datagram from the sender: fresh, never delivered.
    *r.forward.lock().unwrap() = false;
    let held_from = r.captured.lock().unwrap().len();
    let got = wait_until(Duration::from_secs(10), || {
        r.captured.lock().unwrap().len() > held_from
    });
    assert!(got, "the sender sent nothing more");
    thread::sleep(Duration::from_millis(300));
    let held = r.captured.lock().unwrap()[held_from].clone();
    let m = |reason: &str| {
        metric(
            &b,
            &format!("shoal_link_datagrams_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    let (replay_before, auth_before) = (m("replay"), m("auth"));
    let in_before = metric(&b, "shoal_link_datagrams_in_total");

    let raw = UdpSocket::bind(addr(0)).unwrap();
    let mut tampered = held.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x40; // inside the AEAD tag
    raw.send_to(&tampered, addr(21_502)).unwrap();
    thread::sleep(Duration::from_millis(200));
    raw.send_to(&held, addr(21_502)).unwrap(); // the genuine one: accepted once
    thread::sleep(Duration::from_millis(200));
    raw.send_to(&held, addr(21_502)).unwrap(); // again: a replay

    let counted = wait_until(Duration::from_secs(10), || {
        m("replay") > replay_before && m("auth") > auth_before
    });
    assert!(
        counted,
        "replay {replay_before}->{}, auth {auth_before}->{}",
        m("replay"),
        m("auth")
    );
    // Only the genuine datagram got through (the target hears from no one else meanwhile:
    // the sender reaches it only through the relay, which no longer forwards).
    assert_eq!(metric(&b, "shoal_link_datagrams_in_total"), in_before + 1);
    drop(r.udp);
}

/// kill -9 → down, as seen by the other agents: `runs` runs of 3 agents; returns the times.
fn kill_to_down(preset: &str, runs: usize, base: u16) -> Vec<Duration> {
    let c = Cluster::new();
    let config = c.root.join(format!("{preset}.toml"));
    std::fs::write(&config, format!("[membership]\npreset = \"{preset}\"\n")).unwrap();
    let certs: Vec<PathBuf> = (0..3).map(|i| c.issue(&format!("m{i}"))).collect();
    let mut times = Vec::new();
    for run in 0..runs {
        let port = |i: u16| base + (run as u16) * 10 + i;
        let mut agents: Vec<Agent> = (0..3u16)
            .map(|i| {
                start(AgentSpec {
                    cert_dir: &certs[i as usize],
                    data_dir: &c.root.join(format!("data-{preset}-{run}-{i}")),
                    gossip: port(i),
                    advertise: None,
                    api: port(i) + 5,
                    seeds: if i == 0 { vec![] } else { vec![addr(port(0))] },
                    config: Some(&config),
                    skip_key_check: false,
                })
            })
            .collect();
        for a in &agents {
            wait_live(a);
        }
        assert!(wait_until(Duration::from_secs(30), || agents
            .iter()
            .all(|a| alive_count(a) == 3)));
        // Let the cluster settle a little.
        thread::sleep(Duration::from_secs(2));
        let victim = node_id_of(&certs[2]);
        agents[2].kill();
        let t0 = Instant::now();
        let down = wait_until(Duration::from_secs(60), || {
            (0..2).all(|i| state_of(&agents[i], &victim).as_deref() == Some("down"))
        });
        assert!(down);
        times.push(t0.elapsed());
        for a in &mut agents {
            a.kill();
        }
    }
    times
}

#[test]
#[ignore = "a measurement (about a minute); run with --ignored --nocapture --test-threads=1"]
fn kill_to_down_p50_with_the_default_and_the_fast_preset() {
    let _g = serial();
    for (preset, base) in [("lan", 21_700u16), ("fast", 21_800)] {
        let mut t = kill_to_down(preset, 5, base);
        t.sort();
        println!(
            "kill -9 -> down ({preset}): p50 {:?} min {:?} max {:?} runs {:?}",
            t[t.len() / 2],
            t[0],
            t[t.len() - 1],
            t
        );
    }
}

#[test]
fn agent_dev_runs_a_one_node_cluster_with_a_throw_away_ca_and_an_admin_token() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let log = dir.path().join("dev.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(shoal_bin())
        .args(["agent", "--dev", "--name", "devbox"])
        .args(["--bind", &addr(21_901).to_string()])
        .args(["--api", &addr(21_902).to_string()])
        .args(["--data-dir", &data.display().to_string()])
        .args(["--seeds", &addr(21_999).to_string()]) // ignored with --dev
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut a = Agent {
        child: Some(child),
        api: addr(21_902),
        gossip: addr(21_901),
        log,
    };
    wait_live(&a);
    let v = nodes(&a);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(
        (v[0]["name"].as_str(), v[0]["state"].as_str()),
        (Some("devbox"), Some("alive"))
    );
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let ca_bytes = std::fs::read(data.join("ca").join(cert::files::CA_CERT)).unwrap();
    let ca = cert::CaCertificate::decode(&ca_bytes).unwrap();
    cert::verify_admin_token(&ca, token.trim(), cert::unix_now()).unwrap();
    // A second start reuses the same CA and certificate (same node id).
    let id = v[0]["node_id"].clone();
    a.terminate();
    let child = Command::new(shoal_bin())
        .args(["agent", "--dev"])
        .args(["--bind", &addr(21_901).to_string()])
        .args(["--api", &addr(21_902).to_string()])
        .args(["--data-dir", &data.display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    a.child = Some(child);
    wait_live(&a);
    assert_eq!(nodes(&a)[0]["node_id"], id);
}

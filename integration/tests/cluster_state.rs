//! Real agents (`target/debug/shoal agent`) on 127.0.0.1 sharing the cluster state: specs
//! deployed on one node served by another (propagation measured), a partition with writes on
//! both sides (test-only link filter), one leader in a majority and none in a minority,
//! leader failover, and a restart of every agent. Tests serialize on a static mutex; run with
//! `--test-threads=1`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_integration::agents::{http, serial, shoal_bin, wait_until};
use shoal_membership::cert;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running agent, killed when dropped.
struct Agent {
    child: Option<Child>,
    api: SocketAddr,
    log: PathBuf,
}

impl Agent {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

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
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        // Deployed services really run now, and process-runtime instances outlive their agent
        // (static stability): end them with the test, and reap them (this process adopted them).
        if let Some(dir) = self.log.parent() {
            shoal_integration::agents::kill_instances(dir);
            shoal_integration::agents::kill_instances(&dir.join("data"));
        }
        shoal_integration::agents::reap_orphans(Duration::from_millis(500));
    }
}

fn get_json(a: &Agent, path: &str) -> Option<Value> {
    match http(a.api, "GET", path, None, "") {
        Some((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

fn spec_toml(name: &str, replicas: u32) -> String {
    format!("name = \"{name}\"\ncommand = [\"sleep\", \"600\"]\nreplicas = {replicas}\n")
}

struct Cluster {
    _dir: tempfile::TempDir,
    root: PathBuf,
    token: String,
    certs: Vec<PathBuf>,
    ids: Vec<String>,
    base: u16,
    agents: Vec<Agent>,
}

impl Cluster {
    /// `n` certificates; agents are started with [`Cluster::start`].
    fn new(n: usize, base: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let ca = root.join("ca");
        cert::ca_init(&ca).unwrap();
        let token = std::fs::read_to_string(ca.join(cert::files::ADMIN_TOKEN))
            .unwrap()
            .trim()
            .to_string();
        let mut certs = Vec::new();
        let mut ids = Vec::new();
        for i in 0..n {
            let out = root.join(format!("certs-{i}"));
            let c = cert::cert_issue(
                &ca,
                &format!("n{}", i + 1),
                &BTreeMap::new(),
                Duration::from_secs(86_400),
                &out,
            )
            .unwrap();
            ids.push(c.node_id_hex());
            certs.push(out);
        }
        std::fs::write(root.join("node.toml"), "[membership]\npreset = \"fast\"\n").unwrap();
        Cluster {
            _dir: dir,
            root,
            token,
            certs,
            ids,
            base,
            agents: Vec::new(),
        }
    }

    fn gossip(&self, i: usize) -> u16 {
        self.base + i as u16
    }

    fn spawn(&self, i: usize) -> Agent {
        let data = self.root.join(format!("data-{i}"));
        std::fs::create_dir_all(&data).unwrap();
        let log = data.join("agent.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(shoal_bin());
        cmd.arg("agent")
            .args([
                "--config",
                &self.root.join("node.toml").display().to_string(),
            ])
            .args(["--bind", &addr(self.gossip(i)).to_string()])
            .args(["--api", &addr(self.gossip(i) + 50).to_string()])
            .args(["--data-dir", &data.display().to_string()])
            .args(["--cert-dir", &self.certs[i].display().to_string()])
            .args(["--runtime", "process"])
            .env("RUST_LOG", "info")
            .env(
                "SHOAL_TEST_LINK_FILTER",
                self.root.join(format!("filter-{i}")),
            )
            .env_remove("SHOAL_LEASE_MS")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // Every node has a seed, node 0 included (node 1), as an operator would configure it: a
        // restarted node 0 with no seed would wait for foca's periodic announce to down members
        // (about a minute) before anyone talks to it again.
        let seed = if i == 0 { 1 } else { 0 };
        if self.certs.len() > 1 {
            cmd.args(["--seeds", &addr(self.gossip(seed)).to_string()]);
        }
        Agent {
            child: Some(cmd.spawn().expect("spawning shoal agent")),
            api: addr(self.gossip(i) + 50),
            log,
        }
    }

    fn start(&mut self) {
        for i in 0..self.certs.len() {
            let a = self.spawn(i);
            self.agents.push(a);
        }
        self.wait_formed();
    }

    fn wait_formed(&self) {
        let n = self.agents.len();
        for a in &self.agents {
            let ok = wait_until(Duration::from_secs(60), || {
                get_json(a, "/v1/nodes").and_then(|v| {
                    v.as_array()
                        .map(|x| x.iter().filter(|m| m["state"] == "alive").count())
                }) == Some(n)
            });
            assert!(
                ok,
                "agent {} never saw {n} alive: {:?}\n{}",
                a.api,
                get_json(a, "/v1/nodes"),
                self.agents
                    .iter()
                    .map(|x| format!("== {}\n{}", x.api, x.log_tail()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }

    fn put(&self, i: usize, name: &str, replicas: u32) -> (u16, String) {
        http(
            self.agents[i].api,
            "PUT",
            &format!("/v1/services/{name}"),
            Some(&self.token),
            &spec_toml(name, replicas),
        )
        .expect("agent answers")
    }

    fn replicas_at(&self, i: usize, name: &str) -> Option<u64> {
        get_json(&self.agents[i], &format!("/v1/services/{name}"))
            .and_then(|v| v["replicas"].as_u64())
    }

    fn digest(&self, i: usize) -> Option<String> {
        get_json(&self.agents[i], "/v1/state/digest")
            .and_then(|v| v["state_hash"].as_str().map(str::to_string))
    }

    /// Cuts agents `a` off from agents `b` (both directions).
    fn partition(&self, a: &[usize], b: &[usize]) {
        for (side, other) in [(a, b), (b, a)] {
            let ids: Vec<&str> = other.iter().map(|j| self.ids[*j].as_str()).collect();
            for i in side {
                std::fs::write(self.root.join(format!("filter-{i}")), ids.join("\n")).unwrap();
            }
        }
    }

    fn heal(&self) {
        for i in 0..self.certs.len() {
            let _ = std::fs::remove_file(self.root.join(format!("filter-{i}")));
        }
    }

    fn leader_at(&self, i: usize) -> Option<Value> {
        get_json(&self.agents[i], "/v1/leader")
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[test]
fn a_spec_deployed_at_node_1_is_served_by_node_5_and_bad_or_unauthenticated_writes_change_nothing()
{
    let _g = serial();
    let mut c = Cluster::new(5, 23_100);
    c.start();

    // Unauthenticated and invalid writes: refused, nothing changes.
    let (status, _) = http(
        c.agents[0].api,
        "PUT",
        "/v1/services/web",
        None,
        &spec_toml("web", 2),
    )
    .unwrap();
    assert_eq!(status, 401);
    let (status, _) = http(
        c.agents[0].api,
        "PUT",
        "/v1/services/web",
        Some("not-a-token"),
        &spec_toml("web", 2),
    )
    .unwrap();
    assert_eq!(status, 401);
    let (status, body) = http(
        c.agents[0].api,
        "PUT",
        "/v1/services/web",
        Some(&c.token),
        "name = \"web\"\nreplicas = \"many\"\nbogus = 1\n",
    )
    .unwrap();
    assert_eq!(status, 400, "{body}");
    let errors = serde_json::from_str::<Value>(&body).unwrap()["errors"]
        .as_array()
        .unwrap()
        .len();
    assert!(errors >= 2, "every error is reported: {body}");
    let (status, _) = http(c.agents[0].api, "DELETE", "/v1/services/web", None, "").unwrap();
    assert_eq!(status, 401);
    thread::sleep(Duration::from_millis(500));
    for i in 0..5 {
        assert_eq!(
            get_json(&c.agents[i], "/v1/services"),
            Some(Value::Array(vec![]))
        );
    }

    // JSON bodies go through the same validation.
    let (status, body) = http(
        c.agents[1].api,
        "PUT",
        "/v1/services/api",
        Some(&c.token),
        r#"{"name":"api","command":["sleep","600"],"replicas":4}"#,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // Propagation node 1 -> node 5, measured over 25 writes.
    let mut lags = Vec::new();
    for w in 0..25u32 {
        let name = format!("svc-{w}");
        let start = Instant::now();
        let (status, body) = c.put(0, &name, 1 + w % 3);
        assert_eq!(status, 200, "{body}");
        let ok = wait_until(Duration::from_secs(10), || {
            c.replicas_at(4, &name).is_some()
        });
        assert!(
            ok,
            "{name} never reached node 5:\n{}",
            c.agents[4].log_tail()
        );
        lags.push(start.elapsed());
    }
    lags.sort();
    let (p50, p99) = (percentile(&lags, 0.5), percentile(&lags, 0.99));
    eprintln!(
        "propagation node 1 -> node 5 over {} writes: p50 {p50:?}, p99 {p99:?}",
        lags.len()
    );
    assert!(p50 <= Duration::from_millis(1_500), "p50 {p50:?}");
    assert!(p99 <= Duration::from_secs(4), "p99 {p99:?}");

    // An update and a delete made on another node reach everyone.
    assert_eq!(c.put(2, "svc-0", 7).0, 200);
    let (status, _) = http(
        c.agents[3].api,
        "DELETE",
        "/v1/services/svc-1",
        Some(&c.token),
        "",
    )
    .unwrap();
    assert_eq!(status, 200);
    let ok = wait_until(Duration::from_secs(10), || {
        (0..5).all(|i| c.replicas_at(i, "svc-0") == Some(7) && c.replicas_at(i, "svc-1").is_none())
    });
    assert!(ok, "update and delete did not reach every node");
    let list = get_json(&c.agents[4], "/v1/services").unwrap();
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "svc-0")
        .unwrap();
    assert_eq!(row["version"], 2);
    assert_eq!(row["replicas"], 7);
    // The leader placed those services and pushed the placements straight to their nodes.
    let pushed = || -> u64 {
        (0..5)
            .filter_map(|i| http(c.agents[i].api, "GET", "/metrics", None, ""))
            .flat_map(|(_, body)| {
                body.lines()
                    .filter(|l| l.starts_with("shoal_state_placements_pushed_total "))
                    .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
                    .collect::<Vec<_>>()
            })
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(30), || pushed() > 0),
        "no placement was pushed"
    );
    let events = get_json(&c.agents[4], "/v1/events").unwrap();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "service_updated")
    );
}

#[test]
fn after_restarting_all_five_agents_every_spec_is_still_there() {
    let _g = serial();
    let mut c = Cluster::new(5, 23_300);
    c.start();
    for w in 0..10u32 {
        assert_eq!(c.put((w % 5) as usize, &format!("keep-{w}"), w + 1).0, 200);
    }
    let ok = wait_until(Duration::from_secs(15), || {
        (0..5).all(|i| {
            get_json(&c.agents[i], "/v1/services").and_then(|v| v.as_array().map(Vec::len))
                == Some(10)
        })
    });
    assert!(ok, "specs did not spread before the restart");
    for a in c.agents.iter_mut() {
        a.terminate();
    }
    c.agents.clear();
    // Restart in reverse order: the first agent up has no peer to learn from.
    let mut restarted: Vec<Agent> = (0..5).rev().map(|i| c.spawn(i)).collect();
    restarted.reverse();
    c.agents = restarted;
    let first = &c.agents[4];
    let ok = wait_until(Duration::from_secs(30), || {
        get_json(first, "/v1/services").and_then(|v| v.as_array().map(Vec::len)) == Some(10)
    });
    assert!(
        ok,
        "node 5 lost specs across the restart:\n{}",
        first.log_tail()
    );
    for i in 0..5 {
        for w in 0..10u32 {
            let name = format!("keep-{w}");
            let ok = wait_until(Duration::from_secs(30), || {
                c.replicas_at(i, &name) == Some(u64::from(w) + 1)
            });
            assert!(ok, "node {} lost {name}", i + 1);
        }
    }
}

fn leaders(c: &Cluster, nodes: &[usize]) -> Vec<(usize, u64)> {
    nodes
        .iter()
        .filter_map(|&i| {
            let v = c.leader_at(i)?;
            (v["is_self"] == true).then(|| (i, v["epoch"].as_u64().unwrap_or(0)))
        })
        .collect()
}

#[test]
fn a_partition_keeps_one_leader_in_the_majority_none_in_the_minority_and_heals_to_identical_state()
{
    let _g = serial();
    let mut c = Cluster::new(5, 23_500);
    c.start();
    let all = [0, 1, 2, 3, 4];
    let ok = wait_until(Duration::from_secs(30), || leaders(&c, &all).len() == 1);
    assert!(ok, "no single leader formed");
    assert_eq!(c.put(0, "shared", 1).0, 200);
    assert!(wait_until(Duration::from_secs(10), || (0..5)
        .all(|i| c.replicas_at(i, "shared") == Some(1))));

    // Cut the leader's side off: which side is the minority depends on who leads, so cut so
    // that the current leader ends up in the minority of two.
    let leader = leaders(&c, &all)[0].0;
    let other = (leader + 1) % 5;
    let minority: Vec<usize> = vec![leader, other];
    let majority: Vec<usize> = all
        .iter()
        .copied()
        .filter(|i| !minority.contains(i))
        .collect();
    c.partition(&minority, &majority);

    // Writes on both sides; the majority writes later, so its version wins.
    assert_eq!(c.put(minority[0], "shared", 2).0, 200);
    assert_eq!(c.put(minority[1], "left", 1).0, 200);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(c.put(majority[0], "shared", 5).0, 200);
    assert_eq!(c.put(majority[1], "right", 1).0, 200);

    let ok = wait_until(Duration::from_secs(30), || {
        let l = leaders(&c, &all);
        l.len() == 1 && majority.contains(&l[0].0)
    });
    assert!(
        ok,
        "the majority never got exactly one leader: {:?}",
        leaders(&c, &all)
    );
    let ok = wait_until(Duration::from_secs(30), || {
        minority.iter().all(|&i| {
            c.leader_at(i).is_some_and(|v| {
                v["leader"].is_null() && v["reason"].as_str().is_some_and(|r| r.contains("quorum"))
            })
        })
    });
    assert!(
        ok,
        "the minority did not report `no quorum`: {:?}",
        c.leader_at(minority[0])
    );
    // Stable: over two more seconds, still exactly one leader, in the majority.
    for _ in 0..10 {
        let l = leaders(&c, &all);
        assert!(l.len() == 1 && majority.contains(&l[0].0), "{l:?}");
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        c.replicas_at(minority[0], "shared"),
        Some(2),
        "the sides were really cut"
    );

    c.heal();
    let healed = Instant::now();
    let ok = wait_until(Duration::from_secs(5), || {
        let d: Vec<Option<String>> = (0..5).map(|i| c.digest(i)).collect();
        d[0].is_some() && d.iter().all(|x| *x == d[0])
    });
    let took = healed.elapsed();
    assert!(ok, "state digests differ 5 s after the heal");
    eprintln!("identical state digests on all 5 nodes {took:?} after the heal");
    for i in 0..5 {
        assert_eq!(c.replicas_at(i, "shared"), Some(5), "the later write wins");
        assert!(c.replicas_at(i, "left").is_some() && c.replicas_at(i, "right").is_some());
    }
}

#[test]
fn killing_the_leader_elects_another_within_the_lease_plus_two_seconds() {
    let _g = serial();
    let mut c = Cluster::new(5, 23_700);
    c.start();
    let all = [0, 1, 2, 3, 4];
    let mut times = Vec::new();
    for round in 0..3 {
        let alive: Vec<usize> = all
            .iter()
            .copied()
            .filter(|i| c.agents[*i].child.is_some())
            .collect();
        let ok = wait_until(Duration::from_secs(30), || leaders(&c, &alive).len() == 1);
        assert!(ok, "round {round}: no single leader");
        let (leader, epoch) = leaders(&c, &alive)[0];
        c.agents[leader].kill();
        let killed = Instant::now();
        let rest: Vec<usize> = alive.iter().copied().filter(|i| *i != leader).collect();
        if rest.len() < 3 {
            break;
        }
        let ok = wait_until(Duration::from_secs(30), || {
            let l = leaders(&c, &rest);
            l.len() == 1 && l[0].1 > epoch
        });
        assert!(
            ok,
            "round {round}: no new leader after killing n{}: {:?}\n{}",
            leader + 1,
            rest.iter().map(|i| c.leader_at(*i)).collect::<Vec<_>>(),
            rest.iter()
                .map(|i| c.agents[*i].log_tail())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        times.push(killed.elapsed());
        // Restart the killed one so the next round has five voters again, and let it settle
        // (a restarted voter grants no new holder for T(1+ρ)).
        c.agents[leader] = c.spawn(leader);
        c.wait_formed();
        thread::sleep(Duration::from_secs(4));
    }
    times.sort();
    eprintln!("failover after kill -9 of the leader (T = 3 s): {times:?}");
    assert!(
        times[times.len() / 2] <= Duration::from_secs(5),
        "{times:?}"
    );
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(shoal_bin());
    cmd.args(args)
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_TOKEN_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running shoal");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_deploys_lists_removes_and_shows_the_leader_of_a_dev_agent() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("agent.log");
    let out = std::fs::File::create(&log).unwrap();
    let api = addr(23_950);
    let child = Command::new(shoal_bin())
        .args(["agent", "--dev", "--runtime", "process"])
        .args([
            "--bind",
            &addr(23_900).to_string(),
            "--api",
            &api.to_string(),
        ])
        .args(["--data-dir", &data.display().to_string()])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let agent = Agent {
        child: Some(child),
        api,
        log,
    };
    let env = [("SHOAL_ADDR", "127.0.0.1:23950")];
    assert!(wait_until(Duration::from_secs(60), || get_json(
        &agent,
        "/v1/services"
    )
    .is_some()));
    let token = data.join("admin.token");
    let token = token.display().to_string();
    let spec = dir.path().join("web.toml");
    std::fs::write(&spec, spec_toml("web", 3)).unwrap();
    let spec = spec.display().to_string();

    let (code, _, err) = cli(&["deploy", &spec], &env);
    assert_ne!(code, 0, "no token, no deploy");
    assert!(err.contains("token"), "{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"web\"\nreplicas = -1\n").unwrap();
    let (code, _, err) = cli(
        &["deploy", &bad.display().to_string(), "--token-file", &token],
        &env,
    );
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml:"), "located errors: {err}");

    let (code, out, err) = cli(&["deploy", &spec, "--token-file", &token], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deployed web version 1 (3 replicas)"), "{out}");
    let (code, out, _) = cli(&["services"], &env);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains(" 3 ")),
        "{out}"
    );
    let (code, out, _) = cli(&["services", "--json"], &env);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "web");
    let ok = wait_until(Duration::from_secs(30), || {
        cli(&["leader"], &env).1.starts_with("leader: ")
    });
    assert!(
        ok,
        "the one-node cluster never elected itself:\n{}",
        agent.log_tail()
    );
    let tok = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let (code, out, err) = cli(&["rm", "web"], &[env[0], ("SHOAL_TOKEN", tok.trim())]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed web"));
    let (_, out, _) = cli(&["services", "--json"], &env);
    assert_eq!(out.trim(), "[]");
    let (code, _, err) = cli(&["rm", "web", "--token-file", &token], &env);
    assert_eq!(code, 1, "removing a missing service fails");
    assert!(err.contains("no service named web"), "{err}");
}

//! Real agents for multi-node tests: a throw-away cluster authority, certificates, `shoal agent`
//! processes on 127.0.0.1 (the binary built next to the test executable), their HTTP API, and
//! clean-up of everything they leave behind — process-runtime instances outlive their agent by
//! design (static stability), so [`kill_instances`] ends them, and Docker containers of the
//! cluster's nodes are removed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_membership::cert;

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises multi-node tests within one test binary (two cores are shared by everything),
/// and makes the test process the reaper of the instances its agents orphan ([`adopt_orphans`]).
pub fn serial() -> MutexGuard<'static, ()> {
    adopt_orphans();
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes this test process the reaper of its orphaned descendants. An agent killed with `kill -9`
/// leaves its process-runtime instances running (static stability); without this they would be
/// re-parented to whatever supervises the test run, which must not see strangers exit under it.
/// Call before spawning agents; [`reap_orphans`] collects them afterwards.
pub fn adopt_orphans() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("cannot become a child subreaper: {e}");
    }
}

/// Reaps every child of this process that has exited (killed agents, and the instances they
/// orphaned), waiting up to `limit` for children that are still running to end.
pub fn reap_orphans(limit: Duration) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = Instant::now() + limit;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() >= deadline {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            Ok(_) => {}
            // ECHILD: no children left.
            Err(_) => return,
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The `shoal` binary next to the running test executable (`cargo test --workspace` builds it).
pub fn shoal_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let bin = dir.join(format!("shoal{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p shoal`)",
        bin.display()
    );
    bin
}

/// One HTTP/1.1 request with `Connection: close`; (status, body).
pub fn http(
    to: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The start time (clock ticks since boot) of process `pid`, from `/proc/PID/stat`.
fn start_ticks(pid: i64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills every process group the process runtime recorded under `data_dir` whose leader is
/// still the very process it started (same pid *and* start time): a recorded group id may have
/// been reused by an unrelated process since, and must never be signalled then.
pub fn kill_instances(data_dir: &Path) {
    let Ok(dirs) = std::fs::read_dir(data_dir.join("runtime").join("instances")) else {
        return;
    };
    for d in dirs.flatten() {
        let Ok(text) = std::fs::read_to_string(d.path().join("state.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let (Some(pid), Some(pgid)) = (v["pid"].as_i64(), v["pgid"].as_i64()) else {
            continue;
        };
        let alive = start_ticks(pid);
        let same = pid > 1
            && pgid == pid
            && v["exit"].is_null()
            && alive.is_some()
            && alive == v["start_ticks"].as_u64();
        if same {
            // Not `kill -KILL -PGID`: procps' kill reads `-PGID` as an option and ends up
            // signalling -1, i.e. every process on the machine.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Removes every Docker container labelled as belonging to node `name`.
pub fn remove_containers(name: &str) {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=shoal.node={name}")])
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = out {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A running agent, killed when dropped.
pub struct Agent {
    child: Option<Child>,
    /// Its HTTP API.
    pub api: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
    /// Its data dir.
    pub data: PathBuf,
}

impl Agent {
    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The last 30 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// GET a JSON document.
    pub fn get(&self, path: &str) -> Option<Value> {
        match http(self.api, "GET", path, None, "") {
            Some((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a test cluster runs its instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// Local processes.
    Process,
    /// The Docker Engine.
    Docker,
}

/// A cluster of real agents on 127.0.0.1.
pub struct TestCluster {
    _dir: tempfile::TempDir,
    /// Its root directory.
    pub root: PathBuf,
    /// The admin token.
    pub token: String,
    /// Node names.
    pub names: Vec<String>,
    certs: Vec<PathBuf>,
    base: u16,
    runtime: Runtime,
    /// The agents (index = node index); a killed one stays in place, not running.
    pub agents: Vec<Agent>,
}

impl TestCluster {
    /// Certificates for nodes named `{prefix}1..` with these labels. Node `i` has its own loopback
    /// address `127.0.0.{i+1}` (so each serves the published ports itself), gossip on port
    /// `base + i`, API on `base + 50 + i`. The fast membership preset. Start with [`TestCluster::start`].
    pub fn new(
        prefix: &str,
        labels: &[BTreeMap<String, String>],
        base: u16,
        runtime: Runtime,
    ) -> Self {
        adopt_orphans();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let ca = root.join("ca");
        cert::ca_init(&ca).expect("ca init");
        let token = std::fs::read_to_string(ca.join(cert::files::ADMIN_TOKEN))
            .expect("token")
            .trim()
            .to_string();
        let mut certs = Vec::new();
        let mut names = Vec::new();
        for (i, l) in labels.iter().enumerate() {
            let name = format!("{prefix}{}", i + 1);
            let out = root.join(format!("certs-{i}"));
            cert::cert_issue(&ca, &name, l, Duration::from_secs(86_400), &out).expect("cert issue");
            remove_containers(&name);
            names.push(name);
            certs.push(out);
        }
        std::fs::write(root.join("node.toml"), "[membership]\npreset = \"fast\"\n")
            .expect("node.toml");
        TestCluster {
            _dir: dir,
            root,
            token,
            names,
            certs,
            base,
            runtime,
            agents: Vec::new(),
        }
    }

    /// `n` unlabelled nodes.
    pub fn plain(prefix: &str, n: usize, base: u16, runtime: Runtime) -> Self {
        Self::new(prefix, &vec![BTreeMap::new(); n], base, runtime)
    }

    fn gossip(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i as u8 + 1], self.base + i as u16))
    }

    /// Starts node `i`'s agent (seeded with node 0; node 0 with node 1).
    pub fn spawn(&self, i: usize) -> Agent {
        let data = self.root.join(format!("data-{i}"));
        std::fs::create_dir_all(&data).expect("data dir");
        let log = data.join("agent.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let api = SocketAddr::from(([127, 0, 0, i as u8 + 1], self.base + 50 + i as u16));
        let mut cmd = Command::new(shoal_bin());
        cmd.arg("agent")
            .args([
                "--config",
                &self.root.join("node.toml").display().to_string(),
            ])
            .args(["--bind", &self.gossip(i).to_string()])
            .args(["--api", &api.to_string()])
            .args(["--data-dir", &data.display().to_string()])
            .args(["--cert-dir", &self.certs[i].display().to_string()])
            .args([
                "--runtime",
                if self.runtime == Runtime::Docker {
                    "docker"
                } else {
                    "process"
                },
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        // Every node has a seed (node 0's is node 1): a restarted seed-less node 0 would wait
        // about a minute for foca's announce to down members.
        if self.certs.len() > 1 {
            let seed = if i == 0 { 1 } else { 0 };
            cmd.args(["--seeds", &self.gossip(seed).to_string()]);
        }
        Agent {
            child: Some(cmd.spawn().expect("spawning shoal agent")),
            api,
            log,
            data,
        }
    }

    /// Starts every agent and waits until each sees all alive and a leader exists.
    pub fn start(&mut self) {
        for i in 0..self.certs.len() {
            let a = self.spawn(i);
            self.agents.push(a);
        }
        let n = self.agents.len();
        for a in &self.agents {
            let ok = wait_until(Duration::from_secs(60), || {
                a.get("/v1/nodes").and_then(|v| {
                    v.as_array()
                        .map(|x| x.iter().filter(|m| m["state"] == "alive").count())
                }) == Some(n)
            });
            assert!(ok, "agent {} never saw {n} alive:\n{}", a.api, a.log_tail());
        }
        let ok = wait_until(Duration::from_secs(30), || {
            self.agents[0]
                .get("/v1/leader")
                .is_some_and(|v| v["leader"].is_string())
        });
        assert!(ok, "no leader:\n{}", self.agents[0].log_tail());
    }

    /// Restarts node `i`'s agent in place.
    pub fn restart(&mut self, i: usize) {
        self.agents[i].kill();
        let a = self.spawn(i);
        self.agents[i] = a;
    }

    /// The first running agent.
    pub fn any(&self) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.running())
            .expect("a running agent")
    }

    /// PUT a service spec (TOML) through the first running agent.
    pub fn deploy(&self, name: &str, toml: &str) {
        let (status, body) = http(
            self.any().api,
            "PUT",
            &format!("/v1/services/{name}"),
            Some(&self.token),
            toml,
        )
        .expect("agent answers");
        assert_eq!(status, 200, "deploy {name}: {body}");
    }

    /// `shoal ps SERVICE` rows (JSON), as the first running agent sees them.
    pub fn ps(&self, service: &str) -> Vec<Value> {
        self.any()
            .get(&format!("/v1/services/{service}/instances"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Rows of `service` that are assigned, running and ready, as node `i` sees them.
    pub fn running_at(&self, i: usize, service: &str) -> Vec<Value> {
        self.agents[i]
            .get(&format!("/v1/services/{service}/instances"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["assigned"] == true && r["state"] == "running" && r["ready"] == true)
            .collect()
    }

    /// Every event of every running agent.
    pub fn events(&self) -> Vec<Value> {
        self.agents
            .iter()
            .filter(|a| a.running())
            .filter_map(|a| a.get("/v1/events"))
            .flat_map(|v| v.as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The log tails of every agent, for failure messages.
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- {}\n{}\n", a.api, a.log_tail()))
            .collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.kill();
        }
        for a in &self.agents {
            kill_instances(&a.data);
        }
        if self.runtime == Runtime::Docker {
            for n in &self.names {
                remove_containers(n);
            }
        }
        reap_orphans(Duration::from_secs(5));
    }
}

//! The process runtime: each instance is a local command in its own process group, with a
//! state file per instance in the data dir so a restarted agent adopts what still runs. See the
//! crate docs for the restart behaviour.

mod logs;
mod procfs;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::error::{Result, RuntimeError};
use crate::runtime::ContainerRuntime;
use crate::spec::{InstanceSpec, Protocol, Workload, check_instance_id, port_env_name};
use crate::types::{
    BoundPort, EVENT_CHANNEL_CAPACITY, EXEC_OUTPUT_CAP, EventKind, ExecOutput, InstanceInfo,
    InstanceState, LogOptions, LogStream, ResourceStats, RuntimeEvent,
};

/// How often an adopted process (not our child) is checked for exit.
const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// How long to wait for a SIGKILLed group to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Window over which `stats` measures CPU use.
const STATS_WINDOW: Duration = Duration::from_millis(250);
/// State file name inside an instance's directory.
const STATE_FILE: &str = "state.json";
/// Output file name inside an instance's directory.
const LOG_FILE: &str = "output.log";

/// How an instance ended, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ExitRecord {
    /// Exit code; a signal `n` is recorded as `128 + n` like a shell and Docker do; `None`
    /// when the process was adopted and its status could not be collected.
    code: Option<i64>,
}

/// What is persisted per instance in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    spec: InstanceSpec,
    pid: i32,
    pgid: i32,
    start_ticks: u64,
    started_at_ms: u64,
    ports: Vec<BoundPort>,
    env: BTreeMap<String, String>,
    exit: Option<ExitRecord>,
}

struct Instance {
    dir: PathBuf,
    state: Mutex<Persisted>,
    exited: watch::Sender<bool>,
}

impl Instance {
    fn snapshot(&self) -> Persisted {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn info(&self) -> InstanceInfo {
        let p = self.snapshot();
        InstanceInfo {
            instance_id: p.spec.instance_id.clone(),
            service: p.spec.service.clone(),
            slot: p.spec.slot,
            version: p.spec.version,
            node: p.spec.node.clone(),
            runtime_id: format!("pid:{}", p.pid),
            state: match p.exit {
                None => InstanceState::Running,
                Some(e) => InstanceState::Exited {
                    code: e.code,
                    oom_killed: false,
                },
            },
            health: None,
            started_at: Some(UNIX_EPOCH + Duration::from_millis(p.started_at_ms)),
            ports: p.ports.clone(),
            labels: p.spec.all_labels(),
        }
    }

    fn is_running(&self) -> bool {
        !*self.exited.borrow()
    }

    /// Records the exit once (persisting it), kills what is left of the group, and emits the
    /// event. Returns false if it had already been recorded.
    fn record_exit(&self, code: Option<i64>, events: &broadcast::Sender<RuntimeEvent>) -> bool {
        let (pgid, snapshot) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.exit.is_some() {
                return false;
            }
            st.exit = Some(ExitRecord { code });
            (st.pgid, st.clone())
        };
        // Like a container whose PID 1 ends: the rest of the group goes too.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        if let Err(e) = write_state(&self.dir, &snapshot) {
            tracing::warn!(instance = %snapshot.spec.instance_id, error = %e, "cannot persist exit");
        }
        self.exited.send_replace(true);
        let _ = events.send(RuntimeEvent {
            instance_id: snapshot.spec.instance_id.clone(),
            service: Some(snapshot.spec.service.clone()),
            kind: EventKind::Exited { code },
            at: SystemTime::now(),
        });
        true
    }
}

struct Inner {
    node: String,
    dir: PathBuf,
    instances: Mutex<HashMap<String, Arc<Instance>>>,
    start_lock: tokio::sync::Mutex<()>,
    monitors: Mutex<Vec<JoinHandle<()>>>,
    events: broadcast::Sender<RuntimeEvent>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The processes keep running; only this agent's watchers stop.
        for h in self
            .monitors
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}

/// Runs instances as local processes. Cheap to clone.
///
/// Layout of the data dir: `instances/<id>/state.json` (pid, process group, start time, spec,
/// bound ports, exit) and `instances/<id>/output.log` (stdout and stderr, appended; not
/// rotated). When the agent stops, the processes keep running; [`ProcessRuntime::open`] adopts
/// those still alive (same pid *and* same start time) and marks the others exited with an
/// unknown code — see the crate docs. The process runtime sets no CPU or memory limits, has no
/// network isolation (`network` is ignored) and cannot tell an OOM kill from another SIGKILL.
#[derive(Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRuntime")
            .field("node", &self.inner.node)
            .field("dir", &self.inner.dir)
            .finish()
    }
}

fn state_err(path: &Path, detail: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::State {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn write_state(dir: &Path, p: &Persisted) -> Result<()> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(p).map_err(|e| state_err(&tmp, e))?;
    std::fs::write(&tmp, json).map_err(|e| state_err(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(|e| state_err(dir, e))
}

/// Largest state file read back (a spec is small; anything bigger is not ours).
const MAX_STATE_FILE: u64 = 1024 * 1024;

fn read_state(dir: &Path) -> Result<Persisted> {
    let path = dir.join(STATE_FILE);
    let meta = std::fs::metadata(&path).map_err(|e| state_err(&path, e))?;
    if meta.len() > MAX_STATE_FILE {
        return Err(state_err(&path, "state file too large"));
    }
    let bytes = std::fs::read(&path).map_err(|e| state_err(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| state_err(&path, e))
}

/// Expands `${NAME}` from `env`; unknown names are left as they are.
pub(crate) fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) if env.contains_key(&after[..end]) => {
                out.push_str(&env[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Finds the host port for each port of the spec: a fixed one is checked by binding it, an
/// open one is picked by binding port 0. The probe sockets are closed before the process
/// starts, so another program could grab the port in between (the process then fails to bind
/// and exits, which the supervisor sees).
fn allocate_ports(spec: &InstanceSpec) -> Result<Vec<BoundPort>> {
    let mut out = Vec::new();
    let mut keep_tcp = Vec::new();
    let mut keep_udp = Vec::new();
    for p in &spec.ports {
        let ip = p.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let want = p.host_port.unwrap_or(0);
        let addr = SocketAddr::new(ip, want);
        let bound = match p.protocol {
            Protocol::Tcp => TcpListener::bind(addr).and_then(|l| {
                let a = l.local_addr();
                keep_tcp.push(l);
                a
            }),
            Protocol::Udp => UdpSocket::bind(addr).and_then(|s| {
                let a = s.local_addr();
                keep_udp.push(s);
                a
            }),
        };
        let port = match bound {
            Ok(a) => a.port(),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(RuntimeError::PortInUse {
                    name: p.name.clone(),
                    port: want,
                    detail: e.to_string(),
                });
            }
            Err(source) => {
                return Err(RuntimeError::Io {
                    op: "binding a port",
                    source,
                });
            }
        };
        out.push(BoundPort {
            name: p.name.clone(),
            container_port: port,
            host_ip: ip,
            host_port: port,
            protocol: p.protocol,
        });
    }
    Ok(out)
}

impl ProcessRuntime {
    /// Opens the runtime for `node` with its state under `data_dir` (created if needed), and
    /// adopts the instances a previous agent left running. Must be called inside a tokio
    /// runtime.
    pub async fn open(data_dir: impl Into<PathBuf>, node: &str) -> Result<Self> {
        let dir = data_dir.into().join("instances");
        std::fs::create_dir_all(&dir).map_err(|e| state_err(&dir, e))?;
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let rt = ProcessRuntime {
            inner: Arc::new(Inner {
                node: node.into(),
                dir: dir.clone(),
                instances: Mutex::new(HashMap::new()),
                start_lock: tokio::sync::Mutex::new(()),
                monitors: Mutex::new(Vec::new()),
                events,
            }),
        };
        let entries = std::fs::read_dir(&dir).map_err(|e| state_err(&dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let mut p = match read_state(&path) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "ignoring unreadable instance state");
                    continue;
                }
            };
            if p.spec.node != node || check_instance_id(&p.spec.instance_id).is_err() {
                continue;
            }
            let alive = p.exit.is_none() && procfs::is_same_live_process(p.pid, p.start_ticks);
            if p.exit.is_none() && !alive {
                p.exit = Some(ExitRecord { code: None });
                if let Err(e) = write_state(&path, &p) {
                    tracing::warn!(error = %e, "cannot persist exit of a vanished process");
                }
            }
            let (exited, _) = watch::channel(!alive);
            let inst = Arc::new(Instance {
                dir: path,
                state: Mutex::new(p.clone()),
                exited,
            });
            if alive {
                tracing::info!(instance = %p.spec.instance_id, pid = p.pid, "adopted running process");
                rt.spawn_adopted_monitor(inst.clone());
            }
            rt.map().insert(p.spec.instance_id.clone(), inst);
        }
        Ok(rt)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Instance>>> {
        self.inner
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Option<Arc<Instance>> {
        self.map().get(id).cloned()
    }

    fn track(&self, h: JoinHandle<()>) {
        let mut m = self
            .inner
            .monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.retain(|h| !h.is_finished());
        m.push(h);
    }

    fn spawn_adopted_monitor(&self, inst: Arc<Instance>) {
        let events = self.inner.events.clone();
        self.track(tokio::spawn(async move {
            let (pid, start) = {
                let s = inst.snapshot();
                (s.pid, s.start_ticks)
            };
            while procfs::is_same_live_process(pid, start) {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            inst.record_exit(None, &events);
        }));
    }

    fn spawn_child_monitor(&self, inst: Arc<Instance>, mut child: tokio::process::Child) {
        let events = self.inner.events.clone();
        self.track(tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let code = match child.wait().await {
                Ok(st) => st
                    .code()
                    .map(i64::from)
                    .or_else(|| st.signal().map(|s| 128 + i64::from(s))),
                Err(_) => None,
            };
            inst.record_exit(code, &events);
        }));
    }

    async fn start_new(&self, spec: &InstanceSpec, argv: &[String]) -> Result<InstanceInfo> {
        let dir = self.inner.dir.join(&spec.instance_id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| state_err(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| state_err(&dir, e))?;
        let ports = allocate_ports(spec)?;
        let mut env = BTreeMap::new();
        if let Ok(path) = std::env::var("PATH") {
            env.insert("PATH".to_string(), path);
        }
        env.extend(spec.env.clone());
        env.insert("SHOAL_INSTANCE".into(), spec.instance_id.clone());
        env.insert("SHOAL_SERVICE".into(), spec.service.clone());
        env.insert("SHOAL_SLOT".into(), spec.slot.to_string());
        if let Some(first) = ports.first() {
            env.insert("PORT".into(), first.host_port.to_string());
        }
        for p in &ports {
            env.insert(port_env_name(&p.name), p.host_port.to_string());
        }
        let argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();
        let log_path = dir.join(LOG_FILE);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| state_err(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| state_err(&log_path, e))?;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(&env)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            program: argv[0].clone(),
            source,
        })?;
        let pid = child
            .id()
            .ok_or_else(|| state_err(&dir, "spawned process has no pid"))? as i32;
        // The start time is fixed at fork, so it is readable as soon as spawn returns.
        let start_ticks = procfs::read_stat(pid).map(|s| s.start_ticks).unwrap_or(0);
        let persisted = Persisted {
            spec: spec.clone(),
            pid,
            pgid: pid,
            start_ticks,
            started_at_ms: now_ms(),
            ports,
            env,
            exit: None,
        };
        let (exited, _) = watch::channel(false);
        let inst = Arc::new(Instance {
            dir: dir.clone(),
            state: Mutex::new(persisted.clone()),
            exited,
        });
        if let Err(e) = write_state(&dir, &persisted) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(e);
        }
        self.map().insert(spec.instance_id.clone(), inst.clone());
        let info = inst.info();
        let _ = self.inner.events.send(RuntimeEvent {
            instance_id: spec.instance_id.clone(),
            service: Some(spec.service.clone()),
            kind: EventKind::Started,
            at: SystemTime::now(),
        });
        self.spawn_child_monitor(inst, child);
        Ok(info)
    }

    /// Sends `sig` to the group and waits up to `wait` for the instance to be seen as exited.
    async fn signal_and_wait(inst: &Instance, sig: Signal, wait: Duration) -> bool {
        let pgid = inst.snapshot().pgid;
        let _ = killpg(Pid::from_raw(pgid), sig);
        let mut rx = inst.exited.subscribe();
        tokio::time::timeout(wait, rx.wait_for(|e| *e))
            .await
            .is_ok()
    }

    async fn kill_now(&self, inst: &Instance) -> Result<()> {
        if !inst.is_running() {
            return Ok(());
        }
        if Self::signal_and_wait(inst, Signal::SIGKILL, KILL_WAIT).await {
            Ok(())
        } else {
            Err(RuntimeError::Timeout {
                op: "killing the process group",
                after: KILL_WAIT,
            })
        }
    }
}

#[async_trait]
impl ContainerRuntime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn node(&self) -> &str {
        &self.inner.node
    }

    async fn ensure_started(&self, spec: &InstanceSpec) -> Result<InstanceInfo> {
        spec.validate()?;
        if spec.node != self.inner.node {
            return Err(RuntimeError::InvalidSpec(format!(
                "spec is for node `{}` but this runtime runs node `{}`",
                spec.node, self.inner.node
            )));
        }
        let Workload::Command { argv } = &spec.workload else {
            return Err(RuntimeError::InvalidSpec(
                "the process runtime runs commands, not images".into(),
            ));
        };
        let _guard = self.inner.start_lock.lock().await;
        if let Some(existing) = self.get(&spec.instance_id)
            && existing.is_running()
        {
            return Ok(existing.info());
        }
        self.start_new(spec, argv).await
    }

    async fn stop(&self, instance_id: &str, grace: Duration) -> Result<()> {
        check_instance_id(instance_id)?;
        let Some(inst) = self.get(instance_id) else {
            return Ok(());
        };
        if !inst.is_running() {
            return Ok(());
        }
        if Self::signal_and_wait(&inst, Signal::SIGTERM, grace).await {
            return Ok(());
        }
        self.kill_now(&inst).await
    }

    async fn remove(&self, instance_id: &str) -> Result<()> {
        check_instance_id(instance_id)?;
        let Some(inst) = self.get(instance_id) else {
            return Ok(());
        };
        self.kill_now(&inst).await?;
        self.map().remove(instance_id);
        if inst.dir.exists() {
            std::fs::remove_dir_all(&inst.dir).map_err(|e| state_err(&inst.dir, e))?;
        }
        let _ = self.inner.events.send(RuntimeEvent {
            instance_id: instance_id.into(),
            service: Some(inst.snapshot().spec.service),
            kind: EventKind::Removed,
            at: SystemTime::now(),
        });
        Ok(())
    }

    async fn inspect(&self, instance_id: &str) -> Result<Option<InstanceInfo>> {
        check_instance_id(instance_id)?;
        Ok(self.get(instance_id).map(|i| i.info()))
    }

    async fn list(&self) -> Result<Vec<InstanceInfo>> {
        let mut v: Vec<InstanceInfo> = self.map().values().map(|i| i.info()).collect();
        v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(v)
    }

    fn events(&self) -> broadcast::Receiver<RuntimeEvent> {
        self.inner.events.subscribe()
    }

    async fn stats(&self, instance_id: &str) -> Result<ResourceStats> {
        check_instance_id(instance_id)?;
        let inst = self
            .get(instance_id)
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        if !inst.is_running() {
            return Err(RuntimeError::NotRunning(instance_id.into()));
        }
        let snap = inst.snapshot();
        let sample = || {
            procfs::group_members(snap.pgid)
                .iter()
                .map(|(_, s)| s.cpu_ticks)
                .sum::<u64>()
        };
        let t0 = std::time::Instant::now();
        let c0 = sample();
        tokio::time::sleep(STATS_WINDOW).await;
        let members = procfs::group_members(snap.pgid);
        if members.is_empty() {
            return Err(RuntimeError::NotRunning(instance_id.into()));
        }
        let c1: u64 = members.iter().map(|(_, s)| s.cpu_ticks).sum();
        let elapsed = t0.elapsed().as_secs_f64().max(1e-3);
        let memory_bytes = members
            .iter()
            .filter_map(|(pid, _)| procfs::rss_bytes(*pid))
            .sum();
        Ok(ResourceStats {
            cpu_total_ns: c1 * (1_000_000_000 / procfs::TICKS_PER_SEC),
            cpu_cores: c1.saturating_sub(c0) as f64 / procfs::TICKS_PER_SEC as f64 / elapsed,
            memory_bytes,
            memory_limit: snap.spec.resources.memory_bytes,
            at: SystemTime::now(),
        })
    }

    async fn exec(
        &self,
        instance_id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        check_instance_id(instance_id)?;
        let inst = self
            .get(instance_id)
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        if !inst.is_running() {
            return Err(RuntimeError::NotRunning(instance_id.into()));
        }
        let Some(program) = cmd.first() else {
            return Err(RuntimeError::InvalidSpec("exec command is empty".into()));
        };
        let snap = inst.snapshot();
        let mut child = tokio::process::Command::new(program)
            .args(&cmd[1..])
            .env_clear()
            .envs(&snap.env)
            .current_dir(&inst.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                program: program.clone(),
                source,
            })?;
        let pid = child.id().map(|p| p as i32);
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let run = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let read_out = async {
                if let Some(s) = stdout.as_mut() {
                    let _ = s.take(EXEC_OUTPUT_CAP as u64).read_to_end(&mut out).await;
                }
            };
            let read_err = async {
                if let Some(s) = stderr.as_mut() {
                    let _ = s.take(EXEC_OUTPUT_CAP as u64).read_to_end(&mut err).await;
                }
            };
            let (_, _, status) = tokio::join!(read_out, read_err, child.wait());
            (out, err, status)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok((mut out, err, status)) => {
                use std::os::unix::process::ExitStatusExt;
                let status = status.map_err(|source| RuntimeError::Io {
                    op: "waiting for exec",
                    source,
                })?;
                out.extend_from_slice(&err);
                out.truncate(EXEC_OUTPUT_CAP);
                let exit_code = status
                    .code()
                    .map(i64::from)
                    .or_else(|| status.signal().map(|s| 128 + i64::from(s)))
                    .unwrap_or(-1);
                Ok(ExecOutput {
                    exit_code,
                    output: out,
                })
            }
            Err(_) => {
                if let Some(pid) = pid {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                Err(RuntimeError::Timeout {
                    op: "exec",
                    after: timeout,
                })
            }
        }
    }

    async fn logs(&self, instance_id: &str, opts: LogOptions) -> Result<LogStream> {
        check_instance_id(instance_id)?;
        let inst = self
            .get(instance_id)
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        logs::file_log_stream(inst.dir.join(LOG_FILE), opts, inst.exited.subscribe()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn random_state_file_bytes_are_an_error_not_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(STATE_FILE), &bytes).unwrap();
            proptest::prop_assert!(read_state(dir.path()).is_err());
        }

        #[test]
        fn expansion_never_panics(arg in "\\PC{0,60}") {
            let env: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
            let _ = expand(&arg, &env);
        }
    }

    #[test]
    fn known_variables_are_expanded_and_unknown_ones_left_alone() {
        let env: BTreeMap<String, String> = [("PORT".to_string(), "8080".to_string())].into();
        assert_eq!(expand("-p ${PORT}", &env), "-p 8080");
        assert_eq!(expand("${PORT}${PORT}", &env), "80808080");
        assert_eq!(expand("${NOPE} $PORT ${", &env), "${NOPE} $PORT ${");
    }

    #[test]
    fn a_fixed_port_that_is_taken_is_reported_by_name_and_number() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut spec = InstanceSpec::command("n1", "web", 0, 1, &["true"]);
        spec.ports.push(crate::PortSpec {
            name: "http".into(),
            container_port: 0,
            host_port: Some(port),
            host_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            protocol: Protocol::Tcp,
        });
        match allocate_ports(&spec) {
            Err(RuntimeError::PortInUse { name, port: p, .. }) => {
                assert_eq!((name.as_str(), p), ("http", port))
            }
            other => panic!("expected PortInUse, got {other:?}"),
        }
    }

    #[test]
    fn open_ports_get_distinct_os_chosen_numbers() {
        let spec = InstanceSpec::command("n1", "web", 0, 1, &["true"])
            .with_port("a", 0, None)
            .with_port("b", 0, Some(0));
        let ports = allocate_ports(&spec).unwrap();
        assert_ne!(ports[0].host_port, 0);
        assert_ne!(ports[0].host_port, ports[1].host_port);
    }
}

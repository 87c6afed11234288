//! An in-memory runtime for the tests of the layers above, with scripted failures.
//!
//! Deterministic: no processes, no clock reads other than event timestamps, host ports handed out
//! in order from [`FAKE_FIRST_HOST_PORT`]. The test drives it: [`FakeRuntime::fail_next_starts`],
//! [`FakeRuntime::exit`], [`FakeRuntime::oom`], [`FakeRuntime::set_exec_code`],
//! [`FakeRuntime::set_health`], [`FakeRuntime::push_log`], and reads counters back.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::{Result, RuntimeError};
use crate::runtime::ContainerRuntime;
use crate::spec::{InstanceSpec, Workload, check_instance_id};
use crate::types::{
    BoundPort, EVENT_CHANNEL_CAPACITY, EventKind, ExecOutput, HealthStatus, InstanceInfo,
    InstanceState, LogLine, LogOptions, LogSource, LogStream, ResourceStats, RuntimeEvent,
};

/// First host port the fake hands out when a spec asks for any port.
pub const FAKE_FIRST_HOST_PORT: u16 = 40000;

/// A failure the fake returns from a future `ensure_started`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeFailure {
    /// As if the image were missing.
    ImageNotFound,
    /// As if the first port's host port were taken.
    PortInUse,
    /// A generic engine error with this message.
    Engine(String),
}

#[derive(Debug)]
struct FakeInstance {
    spec: InstanceSpec,
    info: InstanceInfo,
    logs: Vec<String>,
}

#[derive(Debug, Default)]
struct FakeState {
    instances: BTreeMap<String, FakeInstance>,
    fail_starts: VecDeque<FakeFailure>,
    missing_images: BTreeSet<String>,
    exec_codes: HashMap<String, i64>,
    stats: HashMap<String, (f64, u64)>,
    next_port: u16,
    starts: HashMap<String, u32>,
    stops: HashMap<String, u32>,
    engine_down: bool,
    next_id: u64,
}

/// The fake runtime.
#[derive(Debug)]
pub struct FakeRuntime {
    node: String,
    state: Mutex<FakeState>,
    events: broadcast::Sender<RuntimeEvent>,
}

impl FakeRuntime {
    /// A fake runtime owning the instances of `node`.
    pub fn new(node: &str) -> Self {
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        FakeRuntime {
            node: node.into(),
            state: Mutex::new(FakeState {
                next_port: FAKE_FIRST_HOST_PORT,
                ..FakeState::default()
            }),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A panic while holding the lock can only come from a test assertion; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, instance_id: &str, service: Option<String>, kind: EventKind) {
        // No subscriber is fine: events are a notification, not a queue of work.
        let _ = self.events.send(RuntimeEvent {
            instance_id: instance_id.into(),
            service,
            kind,
            at: SystemTime::now(),
        });
    }

    /// The next `n` calls to `ensure_started` that would start something fail with `failure`.
    pub fn fail_next_starts(&self, n: usize, failure: FakeFailure) {
        let mut s = self.lock();
        s.fail_starts.extend(std::iter::repeat_n(failure, n));
    }

    /// Makes `image` missing (or present again).
    pub fn set_image_missing(&self, image: &str, missing: bool) {
        let mut s = self.lock();
        if missing {
            s.missing_images.insert(image.into());
        } else {
            s.missing_images.remove(image);
        }
    }

    /// Makes every call fail as if the engine were unreachable (or heals it).
    pub fn set_engine_down(&self, down: bool) {
        self.lock().engine_down = down;
    }

    /// Ends a running instance with `code`, as if its process exited.
    pub fn exit(&self, instance_id: &str, code: i64) -> Result<()> {
        self.end(instance_id, Some(code), false)
    }

    /// Ends a running instance as the OOM killer would (exit code 137).
    pub fn oom(&self, instance_id: &str) -> Result<()> {
        self.end(instance_id, Some(137), true)
    }

    fn end(&self, instance_id: &str, code: Option<i64>, oom: bool) -> Result<()> {
        let service = {
            let mut s = self.lock();
            let inst = s
                .instances
                .get_mut(instance_id)
                .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
            if !inst.info.state.is_running() {
                return Err(RuntimeError::NotRunning(instance_id.into()));
            }
            inst.info.state = InstanceState::Exited {
                code,
                oom_killed: oom,
            };
            inst.info.health = None;
            inst.spec.service.clone()
        };
        if oom {
            self.emit(instance_id, Some(service.clone()), EventKind::OomKilled);
        }
        self.emit(instance_id, Some(service), EventKind::Exited { code });
        Ok(())
    }

    /// The exit code future execs in `instance_id` return (default 0).
    pub fn set_exec_code(&self, instance_id: &str, code: i64) {
        self.lock().exec_codes.insert(instance_id.into(), code);
    }

    /// Sets an instance's engine health and emits the event.
    pub fn set_health(&self, instance_id: &str, health: HealthStatus) -> Result<()> {
        let service = {
            let mut s = self.lock();
            let inst = s
                .instances
                .get_mut(instance_id)
                .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
            inst.info.health = Some(health);
            inst.spec.service.clone()
        };
        self.emit(instance_id, Some(service), EventKind::Health(health));
        Ok(())
    }

    /// Appends a line to an instance's output.
    pub fn push_log(&self, instance_id: &str, line: &str) -> Result<()> {
        let mut s = self.lock();
        let inst = s
            .instances
            .get_mut(instance_id)
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        inst.logs.push(line.into());
        Ok(())
    }

    /// Sets what `stats` reports for an instance.
    pub fn set_stats(&self, instance_id: &str, cpu_cores: f64, memory_bytes: u64) {
        self.lock()
            .stats
            .insert(instance_id.into(), (cpu_cores, memory_bytes));
    }

    /// How many times an instance with this id was actually started.
    pub fn start_count(&self, instance_id: &str) -> u32 {
        self.lock().starts.get(instance_id).copied().unwrap_or(0)
    }

    /// How many times a running instance with this id was stopped.
    pub fn stop_count(&self, instance_id: &str) -> u32 {
        self.lock().stops.get(instance_id).copied().unwrap_or(0)
    }

    fn check_engine(s: &FakeState) -> Result<()> {
        if s.engine_down {
            return Err(RuntimeError::EngineUnreachable {
                endpoint: "fake://".into(),
                detail: "scripted outage".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn node(&self) -> &str {
        &self.node
    }

    async fn ensure_started(&self, spec: &InstanceSpec) -> Result<InstanceInfo> {
        spec.validate()?;
        if spec.node != self.node {
            return Err(RuntimeError::InvalidSpec(format!(
                "spec is for node `{}` but this runtime runs node `{}`",
                spec.node, self.node
            )));
        }
        let info = {
            let mut s = self.lock();
            Self::check_engine(&s)?;
            if let Some(existing) = s.instances.get(&spec.instance_id)
                && existing.info.state.is_running()
            {
                return Ok(existing.info.clone());
            }
            if let Workload::Image { image, .. } = &spec.workload
                && s.missing_images.contains(image)
            {
                return Err(RuntimeError::ImageNotFound {
                    image: image.clone(),
                    retry_in: None,
                });
            }
            if let Some(f) = s.fail_starts.pop_front() {
                return Err(match f {
                    FakeFailure::ImageNotFound => RuntimeError::ImageNotFound {
                        image: match &spec.workload {
                            Workload::Image { image, .. } => image.clone(),
                            Workload::Command { argv } => argv[0].clone(),
                        },
                        retry_in: None,
                    },
                    FakeFailure::PortInUse => {
                        let (name, port) = spec
                            .ports
                            .first()
                            .map(|p| (p.name.clone(), p.host_port.unwrap_or(0)))
                            .unwrap_or_default();
                        RuntimeError::PortInUse {
                            name,
                            port,
                            detail: "scripted".into(),
                        }
                    }
                    FakeFailure::Engine(m) => RuntimeError::Scripted(m),
                });
            }
            let mut ports = Vec::new();
            for p in &spec.ports {
                let host_port = match p.host_port {
                    Some(hp) if hp != 0 => hp,
                    _ => {
                        let hp = s.next_port;
                        s.next_port = s.next_port.checked_add(1).unwrap_or(FAKE_FIRST_HOST_PORT);
                        hp
                    }
                };
                ports.push(BoundPort {
                    name: p.name.clone(),
                    container_port: p.container_port,
                    host_ip: p.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    host_port,
                    protocol: p.protocol,
                });
            }
            s.next_id += 1;
            let info = InstanceInfo {
                instance_id: spec.instance_id.clone(),
                service: spec.service.clone(),
                slot: spec.slot,
                version: spec.version,
                node: spec.node.clone(),
                runtime_id: format!("fake-{}", s.next_id),
                state: InstanceState::Running,
                health: None,
                started_at: Some(SystemTime::now()),
                ports,
                labels: spec.all_labels(),
            };
            *s.starts.entry(spec.instance_id.clone()).or_default() += 1;
            s.instances.insert(
                spec.instance_id.clone(),
                FakeInstance {
                    spec: spec.clone(),
                    info: info.clone(),
                    logs: Vec::new(),
                },
            );
            info
        };
        self.emit(
            &spec.instance_id,
            Some(spec.service.clone()),
            EventKind::Started,
        );
        Ok(info)
    }

    async fn stop(&self, instance_id: &str, _grace: Duration) -> Result<()> {
        let service = {
            let mut s = self.lock();
            Self::check_engine(&s)?;
            let Some(inst) = s.instances.get_mut(instance_id) else {
                return Ok(());
            };
            if !inst.info.state.is_running() {
                return Ok(());
            }
            inst.info.state = InstanceState::Exited {
                code: Some(0),
                oom_killed: false,
            };
            inst.info.health = None;
            let service = inst.spec.service.clone();
            *s.stops.entry(instance_id.into()).or_default() += 1;
            service
        };
        self.emit(
            instance_id,
            Some(service),
            EventKind::Exited { code: Some(0) },
        );
        Ok(())
    }

    async fn remove(&self, instance_id: &str) -> Result<()> {
        let removed = {
            let mut s = self.lock();
            Self::check_engine(&s)?;
            s.instances.remove(instance_id)
        };
        if let Some(inst) = removed {
            if inst.info.state.is_running() {
                self.emit(
                    instance_id,
                    Some(inst.spec.service.clone()),
                    EventKind::Exited { code: Some(137) },
                );
            }
            self.emit(instance_id, Some(inst.spec.service), EventKind::Removed);
        }
        Ok(())
    }

    async fn inspect(&self, instance_id: &str) -> Result<Option<InstanceInfo>> {
        let s = self.lock();
        Self::check_engine(&s)?;
        Ok(s.instances.get(instance_id).map(|i| i.info.clone()))
    }

    async fn list(&self) -> Result<Vec<InstanceInfo>> {
        let s = self.lock();
        Self::check_engine(&s)?;
        Ok(s.instances.values().map(|i| i.info.clone()).collect())
    }

    fn events(&self) -> broadcast::Receiver<RuntimeEvent> {
        self.events.subscribe()
    }

    async fn stats(&self, instance_id: &str) -> Result<ResourceStats> {
        let s = self.lock();
        Self::check_engine(&s)?;
        let inst = s
            .instances
            .get(instance_id)
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        if !inst.info.state.is_running() {
            return Err(RuntimeError::NotRunning(instance_id.into()));
        }
        let (cpu_cores, memory_bytes) = s.stats.get(instance_id).copied().unwrap_or((0.0, 0));
        Ok(ResourceStats {
            cpu_total_ns: 0,
            cpu_cores,
            memory_bytes,
            memory_limit: inst.spec.resources.memory_bytes,
            at: SystemTime::now(),
        })
    }

    async fn exec(
        &self,
        instance_id: &str,
        cmd: &[String],
        _timeout: Duration,
    ) -> Result<ExecOutput> {
        let s = self.lock();
        Self::check_engine(&s)?;
        let inst = s
            .instances
            .get(instance_id)
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        if !inst.info.state.is_running() {
            return Err(RuntimeError::NotRunning(instance_id.into()));
        }
        Ok(ExecOutput {
            exit_code: s.exec_codes.get(instance_id).copied().unwrap_or(0),
            output: cmd.join(" ").into_bytes(),
        })
    }

    async fn logs(&self, instance_id: &str, opts: LogOptions) -> Result<LogStream> {
        check_instance_id(instance_id)?;
        let s = self.lock();
        Self::check_engine(&s)?;
        let inst = s
            .instances
            .get(instance_id)
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        let skip = opts
            .tail
            .map(|t| inst.logs.len().saturating_sub(t))
            .unwrap_or(0);
        let lines: Vec<Result<LogLine>> = inst.logs[skip..]
            .iter()
            .map(|l| {
                Ok(LogLine {
                    source: LogSource::Stdout,
                    line: l.clone(),
                })
            })
            .collect();
        // The fake does not follow: the snapshot is the whole stream.
        Ok(Box::pin(futures_util::stream::iter(lines)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::sync::Arc;

    fn spec(slot: u32) -> InstanceSpec {
        InstanceSpec::image("n1", "web", slot, 1, "img:1").with_port("http", 80, None)
    }

    #[tokio::test]
    async fn starting_twice_starts_once_and_reports_the_same_instance() {
        let rt = FakeRuntime::new("n1");
        let a = rt.ensure_started(&spec(0)).await.unwrap();
        let b = rt.ensure_started(&spec(0)).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(rt.start_count("web-0-v1"), 1);
        assert_eq!(a.ports[0].host_port, FAKE_FIRST_HOST_PORT);
    }

    #[tokio::test]
    async fn scripted_start_failures_fail_exactly_the_next_n_starts() {
        let rt = FakeRuntime::new("n1");
        rt.fail_next_starts(2, FakeFailure::Engine("boom".into()));
        assert!(matches!(
            rt.ensure_started(&spec(0)).await,
            Err(RuntimeError::Scripted(_))
        ));
        rt.fail_next_starts(0, FakeFailure::PortInUse);
        assert!(rt.ensure_started(&spec(0)).await.is_err());
        assert!(rt.ensure_started(&spec(0)).await.is_ok());
        assert_eq!(rt.start_count("web-0-v1"), 1);
    }

    #[tokio::test]
    async fn an_exited_instance_emits_its_code_and_is_replaced_on_the_next_start() {
        let rt = FakeRuntime::new("n1");
        let mut ev = rt.events();
        rt.ensure_started(&spec(0)).await.unwrap();
        rt.exit("web-0-v1", 3).unwrap();
        assert_eq!(ev.recv().await.unwrap().kind, EventKind::Started);
        assert_eq!(
            ev.recv().await.unwrap().kind,
            EventKind::Exited { code: Some(3) }
        );
        let info = rt.inspect("web-0-v1").await.unwrap().unwrap();
        assert_eq!(
            info.state,
            InstanceState::Exited {
                code: Some(3),
                oom_killed: false
            }
        );
        rt.ensure_started(&spec(0)).await.unwrap();
        assert_eq!(rt.start_count("web-0-v1"), 2);
    }

    #[tokio::test]
    async fn an_oom_kill_is_reported_as_an_event_and_in_the_state() {
        let rt = FakeRuntime::new("n1");
        let mut ev = rt.events();
        rt.ensure_started(&spec(0)).await.unwrap();
        rt.oom("web-0-v1").unwrap();
        ev.recv().await.unwrap();
        assert_eq!(ev.recv().await.unwrap().kind, EventKind::OomKilled);
        let info = rt.inspect("web-0-v1").await.unwrap().unwrap();
        assert!(matches!(
            info.state,
            InstanceState::Exited {
                oom_killed: true,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn exec_returns_the_scripted_code_and_refuses_stopped_instances() {
        let rt: Arc<dyn ContainerRuntime> = Arc::new(FakeRuntime::new("n1"));
        rt.ensure_started(&spec(0)).await.unwrap();
        let cmd = vec!["probe".to_string()];
        assert_eq!(
            rt.exec("web-0-v1", &cmd, Duration::from_secs(1))
                .await
                .unwrap()
                .exit_code,
            0
        );
        let fake = FakeRuntime::new("n1");
        fake.ensure_started(&spec(0)).await.unwrap();
        fake.set_exec_code("web-0-v1", 7);
        assert_eq!(
            fake.exec("web-0-v1", &cmd, Duration::from_secs(1))
                .await
                .unwrap()
                .exit_code,
            7
        );
        fake.stop("web-0-v1", Duration::ZERO).await.unwrap();
        assert!(matches!(
            fake.exec("web-0-v1", &cmd, Duration::from_secs(1)).await,
            Err(RuntimeError::NotRunning(_))
        ));
    }

    #[tokio::test]
    async fn stop_and_remove_are_idempotent_and_remove_forgets_the_instance() {
        let rt = FakeRuntime::new("n1");
        rt.ensure_started(&spec(0)).await.unwrap();
        rt.stop("web-0-v1", Duration::ZERO).await.unwrap();
        rt.stop("web-0-v1", Duration::ZERO).await.unwrap();
        rt.stop("nope", Duration::ZERO).await.unwrap();
        assert_eq!(rt.stop_count("web-0-v1"), 1);
        rt.remove("web-0-v1").await.unwrap();
        rt.remove("web-0-v1").await.unwrap();
        assert!(rt.inspect("web-0-v1").await.unwrap().is_none());
        assert!(rt.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_missing_image_and_an_engine_outage_give_clear_errors() {
        let rt = FakeRuntime::new("n1");
        rt.set_image_missing("img:1", true);
        let e = rt.ensure_started(&spec(0)).await.unwrap_err();
        assert!(e.to_string().contains("img:1"), "{e}");
        rt.set_image_missing("img:1", false);
        rt.set_engine_down(true);
        assert!(matches!(
            rt.list().await,
            Err(RuntimeError::EngineUnreachable { .. })
        ));
    }

    #[tokio::test]
    async fn a_spec_for_another_node_is_refused() {
        let rt = FakeRuntime::new("n2");
        assert!(matches!(
            rt.ensure_started(&spec(0)).await,
            Err(RuntimeError::InvalidSpec(_))
        ));
    }

    #[tokio::test]
    async fn logs_honour_tail_and_stats_report_the_scripted_figures() {
        let rt = FakeRuntime::new("n1");
        rt.ensure_started(&spec(0)).await.unwrap();
        for l in ["a", "b", "c"] {
            rt.push_log("web-0-v1", l).unwrap();
        }
        let lines: Vec<String> = rt
            .logs(
                "web-0-v1",
                LogOptions {
                    tail: Some(2),
                    follow: false,
                },
            )
            .await
            .unwrap()
            .map(|l| l.unwrap().line)
            .collect()
            .await;
        assert_eq!(lines, ["b", "c"]);
        rt.set_stats("web-0-v1", 0.5, 1234);
        let st = rt.stats("web-0-v1").await.unwrap();
        assert_eq!((st.cpu_cores, st.memory_bytes), (0.5, 1234));
    }
}

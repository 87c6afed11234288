//! The Docker runtime: instances are containers on the local Docker Engine, driven through
//! bollard. Containers are named `shoal-<node>-<instance>` and carry the identity labels; this
//! runtime only lists, watches and touches containers labelled with its own node.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum,
    HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::error::{Result, RuntimeError};
use crate::negative_cache::NegativeCache;
use crate::runtime::ContainerRuntime;
use crate::spec::{
    InstanceSpec, LABEL_INSTANCE, LABEL_NODE, LABEL_PORT_PREFIX, LABEL_SERVICE, LABEL_SLOT,
    LABEL_VERSION, Protocol, Workload, check_instance_id,
};
use crate::types::{
    BoundPort, EVENT_CHANNEL_CAPACITY, EXEC_OUTPUT_CAP, EventKind, ExecOutput, HealthStatus,
    InstanceInfo, InstanceState, LogLine, LogOptions, LogSource, LogStream, ResourceStats,
    RuntimeEvent, drain_lines,
};

/// The engine's default socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Time the client waits for the engine's response headers.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// First and longest wait before re-subscribing to the engine's events.
const EVENTS_RETRY_MIN: Duration = Duration::from_millis(500);
const EVENTS_RETRY_MAX: Duration = Duration::from_secs(30);

/// Knobs of the Docker runtime.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// Unix socket of the engine.
    pub socket: String,
    /// Run Docker's init (tini) as PID 1, so SIGTERM reaches workloads that ignore it as PID 1
    /// (busybox, most programs without a signal handler). Default true.
    pub init: bool,
}

impl Default for DockerOptions {
    fn default() -> Self {
        DockerOptions {
            socket: DEFAULT_SOCKET.into(),
            init: true,
        }
    }
}

struct Shared {
    node: String,
    docker: Docker,
    options: DockerOptions,
    missing_images: Mutex<NegativeCache>,
    start_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    events: broadcast::Sender<RuntimeEvent>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(h) = self
            .watcher
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            h.abort();
        }
    }
}

/// Runs instances as Docker containers. Cheap to clone.
#[derive(Clone)]
pub struct DockerRuntime {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime")
            .field("node", &self.shared.node)
            .field("socket", &self.shared.options.socket)
            .finish()
    }
}

/// Is this bollard error a transport failure (engine unreachable) rather than an answer?
fn is_transport(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::SocketNotFoundError(_)
            | BollardError::IOError { .. }
            | BollardError::HyperLegacyError { .. }
            | BollardError::HttpClientError { .. }
            | BollardError::RequestTimeoutError
    )
}

fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn message_of(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Docker's container name for an instance of a node.
pub(crate) fn container_name(node: &str, instance_id: &str) -> String {
    format!("shoal-{node}-{instance_id}")
}

/// Seconds for Docker's integer stop timeout: rounded up, so a grace is never cut short.
fn grace_secs(grace: Duration) -> i32 {
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    secs.min(i32::MAX as u64) as i32
}

/// Parses Docker's RFC 3339 UTC timestamps (`2026-11-26T08:16:26.123456789Z`); `None` for the
/// zero time Docker uses for "never" and for anything unexpected.
pub(crate) fn parse_docker_time(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, b),
        None => (time, ""),
    };
    let mut t = hms.splitn(3, ':');
    let h: i64 = t.next()?.parse().ok()?;
    let m: i64 = t.next()?.parse().ok()?;
    let sec: i64 = t.next()?.parse().ok()?;
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || !(0..=23).contains(&h)
        || !(0..=59).contains(&m)
        || !(0..=60).contains(&sec)
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    if secs <= 0 {
        return None;
    }
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some(UNIX_EPOCH + Duration::new(secs as u64, nanos))
}

fn port_key(container_port: u16, proto: Protocol) -> String {
    format!("{container_port}/{}", proto.as_str())
}

/// Builds the instance view from an inspect answer, or `None` if the container is not one of
/// this node's instances.
fn info_from_inspect(node: &str, c: &ContainerInspectResponse) -> Option<InstanceInfo> {
    let labels: BTreeMap<String, String> = c
        .config
        .as_ref()?
        .labels
        .as_ref()?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if labels.get(LABEL_NODE).map(String::as_str) != Some(node) {
        return None;
    }
    let st = c.state.as_ref();
    let running = st.and_then(|s| s.running).unwrap_or(false);
    let status = st.and_then(|s| s.status);
    let state = match status {
        Some(ContainerStateStatusEnum::RUNNING) if running => InstanceState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => InstanceState::Paused,
        Some(ContainerStateStatusEnum::CREATED) => InstanceState::Created,
        _ if running => InstanceState::Running,
        _ => InstanceState::Exited {
            code: st.and_then(|s| s.exit_code),
            oom_killed: st.and_then(|s| s.oom_killed).unwrap_or(false),
        },
    };
    let health = st
        .and_then(|s| s.health.as_ref())
        .and_then(|h| h.status)
        .and_then(|h| match h {
            HealthStatusEnum::STARTING => Some(HealthStatus::Starting),
            HealthStatusEnum::HEALTHY => Some(HealthStatus::Healthy),
            HealthStatusEnum::UNHEALTHY => Some(HealthStatus::Unhealthy),
            _ => None,
        });
    let bound = c.network_settings.as_ref().and_then(|n| n.ports.as_ref());
    let mut ports = Vec::new();
    for (k, v) in &labels {
        let Some(name) = k.strip_prefix(LABEL_PORT_PREFIX) else {
            continue;
        };
        let Some((cport, proto)) = v.split_once('/') else {
            continue;
        };
        let Ok(container_port) = cport.parse::<u16>() else {
            continue;
        };
        let protocol = if proto == "udp" {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        // Prefer the IPv4 binding; an engine with IPv6 lists `::` as well.
        let binding = bound
            .and_then(|m| m.get(v.as_str()))
            .and_then(|b| b.as_ref())
            .and_then(|list| {
                list.iter()
                    .find(|b| b.host_ip.as_deref().is_some_and(|ip| !ip.contains(':')))
                    .or_else(|| list.first())
            });
        let Some(b) = binding else {
            continue;
        };
        let Some(host_port) = b.host_port.as_deref().and_then(|p| p.parse::<u16>().ok()) else {
            continue;
        };
        let host_ip = b
            .host_ip
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse().ok())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        ports.push(BoundPort {
            name: name.to_string(),
            container_port,
            host_ip,
            host_port,
            protocol,
        });
    }
    ports.sort_by(|a, b| a.name.cmp(&b.name));
    let started_at = st
        .and_then(|s| s.started_at.as_deref())
        .and_then(parse_docker_time);
    Some(InstanceInfo {
        instance_id: labels.get(LABEL_INSTANCE)?.clone(),
        service: labels.get(LABEL_SERVICE).cloned().unwrap_or_default(),
        slot: labels
            .get(LABEL_SLOT)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        version: labels
            .get(LABEL_VERSION)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        node: node.to_string(),
        runtime_id: c.id.clone().unwrap_or_default(),
        state,
        health,
        started_at,
        ports,
        labels,
    })
}

/// Builds the create request for a spec.
fn create_body(
    spec: &InstanceSpec,
    image: &str,
    args: &[String],
    init: bool,
) -> ContainerCreateBody {
    let mut labels: HashMap<String, String> = spec.all_labels().into_iter().collect();
    let mut exposed = Vec::new();
    let mut bindings = HashMap::new();
    for p in &spec.ports {
        let key = port_key(p.container_port, p.protocol);
        labels.insert(format!("{LABEL_PORT_PREFIX}{}", p.name), key.clone());
        exposed.push(key.clone());
        bindings.insert(
            key,
            Some(vec![PortBinding {
                host_ip: p.host_ip.map(|ip| ip.to_string()),
                host_port: Some(match p.host_port {
                    Some(hp) if hp != 0 => hp.to_string(),
                    _ => String::new(),
                }),
            }]),
        );
    }
    let host_config = HostConfig {
        port_bindings: Some(bindings),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        nano_cpus: spec.resources.cpus.map(|c| (c * 1e9).round() as i64),
        memory: spec
            .resources
            .memory_bytes
            .map(|m| m.min(i64::MAX as u64) as i64),
        network_mode: spec.network.clone(),
        init: Some(init),
        auto_remove: Some(false),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: (!args.is_empty()).then(|| args.to_vec()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        exposed_ports: Some(exposed),
        stop_timeout: Some(i64::from(grace_secs(spec.stop_grace))),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// Turns a failed start into a clear error, naming the port when it is a port clash.
fn start_error(spec: &InstanceSpec, e: &BollardError) -> RuntimeError {
    let msg = message_of(e);
    let lower = msg.to_ascii_lowercase();
    if lower.contains("port is already allocated") || lower.contains("address already in use") {
        let fixed: Vec<_> = spec
            .ports
            .iter()
            .filter(|p| p.host_port.is_some_and(|hp| hp != 0))
            .collect();
        let named = fixed
            .iter()
            .find(|p| msg.contains(&format!(":{}", p.host_port.unwrap_or(0))))
            .or(fixed.first());
        let (name, port) = named
            .map(|p| (p.name.clone(), p.host_port.unwrap_or(0)))
            .unwrap_or_default();
        return RuntimeError::PortInUse {
            name,
            port,
            detail: msg,
        };
    }
    RuntimeError::Engine {
        op: "start",
        detail: msg,
    }
}

impl DockerRuntime {
    /// Connects to the engine at the default socket for `node`.
    pub async fn connect(node: &str) -> Result<Self> {
        Self::connect_with(node, DockerOptions::default()).await
    }

    /// Connects with explicit options. Negotiates the API version (the engine may speak an
    /// older one than bollard's default) and starts watching this node's container events.
    pub async fn connect_with(node: &str, options: DockerOptions) -> Result<Self> {
        crate::spec::check_instance_id(node)
            .map_err(|_| RuntimeError::InvalidSpec(format!("node name `{node}` is invalid")))?;
        let unreachable = |detail: String| RuntimeError::EngineUnreachable {
            endpoint: options.socket.clone(),
            detail,
        };
        if !std::path::Path::new(options.socket.trim_start_matches("unix://")).exists() {
            return Err(unreachable("socket does not exist".into()));
        }
        let docker = Docker::connect_with_unix(
            &options.socket,
            CLIENT_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| unreachable(e.to_string()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let shared = Arc::new(Shared {
            node: node.into(),
            docker,
            options,
            missing_images: Mutex::new(NegativeCache::default()),
            start_locks: Mutex::new(HashMap::new()),
            events,
            watcher: Mutex::new(None),
        });
        let watcher = tokio::spawn(watch_events(
            shared.docker.clone(),
            shared.node.clone(),
            shared.events.clone(),
            SystemTime::now(),
        ));
        *shared.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        Ok(DockerRuntime { shared })
    }

    /// The bollard client (for tests and tools that need the raw engine).
    pub fn client(&self) -> &Docker {
        &self.shared.docker
    }

    fn err(&self, op: &'static str, e: BollardError) -> RuntimeError {
        if is_transport(&e) {
            RuntimeError::EngineUnreachable {
                endpoint: self.shared.options.socket.clone(),
                detail: e.to_string(),
            }
        } else {
            RuntimeError::Engine {
                op,
                detail: message_of(&e),
            }
        }
    }

    fn name(&self, instance_id: &str) -> String {
        container_name(&self.shared.node, instance_id)
    }

    async fn inspect_raw(&self, instance_id: &str) -> Result<Option<ContainerInspectResponse>> {
        match self
            .shared
            .docker
            .inspect_container(&self.name(instance_id), None)
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.err("inspect", e)),
        }
    }

    async fn force_remove(&self, name: &str) -> Result<()> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.shared.docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            // 409: removal already in progress.
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(self.err("remove", e)),
        }
    }

    fn start_lock(&self, instance_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.shared
            .start_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(instance_id.into())
            .or_default()
            .clone()
    }

    async fn running_info(&self, instance_id: &str) -> Result<InstanceInfo> {
        let c = self
            .inspect_raw(instance_id)
            .await?
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        let info = info_from_inspect(&self.shared.node, &c)
            .ok_or_else(|| RuntimeError::NotFound(instance_id.into()))?;
        if !info.state.is_running() {
            return Err(RuntimeError::NotRunning(instance_id.into()));
        }
        Ok(info)
    }
}

/// Follows the engine's events for this node's containers and republishes them, re-subscribing
/// (from the last event seen) when the stream breaks.
async fn watch_events(
    docker: Docker,
    node: String,
    tx: broadcast::Sender<RuntimeEvent>,
    start: SystemTime,
) {
    let mut last_nano: i64 = start
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let mut retry = EVENTS_RETRY_MIN;
    loop {
        let since = format!(
            "{}.{:09}",
            last_nano / 1_000_000_000,
            last_nano % 1_000_000_000
        );
        let filters: HashMap<&str, Vec<String>> = HashMap::from([
            ("type", vec!["container".to_string()]),
            ("label", vec![format!("{LABEL_NODE}={node}")]),
            (
                "event",
                ["start", "die", "oom", "health_status", "destroy"]
                    .map(String::from)
                    .to_vec(),
            ),
        ]);
        let opts = EventsOptionsBuilder::default()
            .since(&since)
            .filters(&filters)
            .build();
        let mut stream = docker.events(Some(opts));
        while let Some(item) = stream.next().await {
            let msg = match item {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "docker event stream broke");
                    break;
                }
            };
            retry = EVENTS_RETRY_MIN;
            let nano = msg.time_nano.unwrap_or(0);
            if nano != 0 && nano <= last_nano {
                continue; // replayed after a re-subscription
            }
            last_nano = last_nano.max(nano);
            let attrs = msg
                .actor
                .as_ref()
                .and_then(|a| a.attributes.clone())
                .unwrap_or_default();
            let Some(instance_id) = attrs.get(LABEL_INSTANCE).cloned() else {
                continue;
            };
            let action = msg.action.as_deref().unwrap_or("");
            let kind = match action {
                "start" => EventKind::Started,
                "die" => EventKind::Exited {
                    code: attrs.get("exitCode").and_then(|c| c.parse().ok()),
                },
                "oom" => EventKind::OomKilled,
                "destroy" => EventKind::Removed,
                a if a.starts_with("health_status") => match a.rsplit(' ').next() {
                    Some("healthy") => EventKind::Health(HealthStatus::Healthy),
                    Some("unhealthy") => EventKind::Health(HealthStatus::Unhealthy),
                    Some("starting") => EventKind::Health(HealthStatus::Starting),
                    _ => continue,
                },
                _ => continue,
            };
            let at = if nano > 0 {
                UNIX_EPOCH + Duration::from_nanos(nano as u64)
            } else {
                SystemTime::now()
            };
            let _ = tx.send(RuntimeEvent {
                instance_id,
                service: attrs.get(LABEL_SERVICE).cloned(),
                kind,
                at,
            });
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(EVENTS_RETRY_MAX);
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn node(&self) -> &str {
        &self.shared.node
    }

    async fn ensure_started(&self, spec: &InstanceSpec) -> Result<InstanceInfo> {
        spec.validate()?;
        if spec.node != self.shared.node {
            return Err(RuntimeError::InvalidSpec(format!(
                "spec is for node `{}` but this runtime runs node `{}`",
                spec.node, self.shared.node
            )));
        }
        let Workload::Image { image, args } = &spec.workload else {
            return Err(RuntimeError::InvalidSpec(
                "the Docker runtime runs images, not commands".into(),
            ));
        };
        let lock = self.start_lock(&spec.instance_id);
        let _guard = lock.lock().await;

        let name = self.name(&spec.instance_id);
        if let Some(c) = self.inspect_raw(&spec.instance_id).await? {
            match info_from_inspect(&self.shared.node, &c) {
                Some(info) if info.state.is_running() => return Ok(info),
                _ => self.force_remove(&name).await?,
            }
        }

        if let Some(left) = self
            .shared
            .missing_images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(image, Instant::now())
        {
            return Err(RuntimeError::ImageNotFound {
                image: image.clone(),
                retry_in: Some(left),
            });
        }

        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let body = create_body(spec, image, args, self.shared.options.init);
        if let Err(e) = self.shared.docker.create_container(Some(opts), body).await {
            if status_of(&e) == Some(404) {
                self.shared
                    .missing_images
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record_missing(image, Instant::now());
                return Err(RuntimeError::ImageNotFound {
                    image: image.clone(),
                    retry_in: None,
                });
            }
            return Err(self.err("create", e));
        }
        self.shared
            .missing_images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear(image);

        if let Err(e) = self.shared.docker.start_container(&name, None).await {
            let err = if is_transport(&e) {
                self.err("start", e)
            } else {
                start_error(spec, &e)
            };
            // Leave nothing half-made behind.
            if let Err(rm) = self.force_remove(&name).await {
                tracing::warn!(container = %name, error = %rm, "cannot remove a container that failed to start");
            }
            return Err(err);
        }
        let c = self
            .inspect_raw(&spec.instance_id)
            .await?
            .ok_or_else(|| RuntimeError::NotFound(spec.instance_id.clone()))?;
        info_from_inspect(&self.shared.node, &c)
            .ok_or_else(|| RuntimeError::NotFound(spec.instance_id.clone()))
    }

    async fn stop(&self, instance_id: &str, grace: Duration) -> Result<()> {
        check_instance_id(instance_id)?;
        let t = grace_secs(grace);
        let opts = StopContainerOptionsBuilder::default().t(t).build();
        // The client's header timeout must outlast the grace period.
        let docker = self
            .shared
            .docker
            .clone()
            .with_timeout(CLIENT_TIMEOUT + Duration::from_secs(t as u64));
        match docker
            .stop_container(&self.name(instance_id), Some(opts))
            .await
        {
            Ok(()) => Ok(()),
            // 304: already stopped; 404: no such container.
            Err(e) if matches!(status_of(&e), Some(304) | Some(404)) => Ok(()),
            Err(e) => Err(self.err("stop", e)),
        }
    }

    async fn remove(&self, instance_id: &str) -> Result<()> {
        check_instance_id(instance_id)?;
        self.force_remove(&self.name(instance_id)).await?;
        self.shared
            .start_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(instance_id);
        Ok(())
    }

    async fn inspect(&self, instance_id: &str) -> Result<Option<InstanceInfo>> {
        check_instance_id(instance_id)?;
        Ok(self
            .inspect_raw(instance_id)
            .await?
            .and_then(|c| info_from_inspect(&self.shared.node, &c)))
    }

    async fn list(&self) -> Result<Vec<InstanceInfo>> {
        let filters: HashMap<&str, Vec<String>> =
            HashMap::from([("label", vec![format!("{LABEL_NODE}={}", self.shared.node)])]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self
            .shared
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| self.err("list", e))?;
        let ids: Vec<String> = summaries.into_iter().filter_map(|s| s.id).collect();
        let inspected = futures_util::future::join_all(
            ids.iter()
                .map(|id| self.shared.docker.inspect_container(id, None)),
        )
        .await;
        let mut out = Vec::new();
        for r in inspected {
            match r {
                Ok(c) => out.extend(info_from_inspect(&self.shared.node, &c)),
                // Removed between the list and the inspect.
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(self.err("inspect", e)),
            }
        }
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(out)
    }

    fn events(&self) -> broadcast::Receiver<RuntimeEvent> {
        self.shared.events.subscribe()
    }

    async fn stats(&self, instance_id: &str) -> Result<ResourceStats> {
        check_instance_id(instance_id)?;
        self.running_info(instance_id).await?;
        // Not one-shot: the engine waits for a second sample so `precpu_stats` is filled.
        let opts = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(false)
            .build();
        let mut s = self
            .shared
            .docker
            .stats(&self.name(instance_id), Some(opts));
        let st = match s.next().await {
            Some(Ok(st)) => st,
            Some(Err(e)) => return Err(self.err("stats", e)),
            None => {
                return Err(RuntimeError::Engine {
                    op: "stats",
                    detail: "the engine returned no sample".into(),
                });
            }
        };
        let cpu = st.cpu_stats.as_ref();
        let pre = st.precpu_stats.as_ref();
        let total = cpu
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        let pre_total = pre
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        let sys = cpu.and_then(|c| c.system_cpu_usage).unwrap_or(0);
        let pre_sys = pre.and_then(|c| c.system_cpu_usage).unwrap_or(0);
        let online = cpu.and_then(|c| c.online_cpus).unwrap_or(1).max(1);
        let cpu_cores = if sys > pre_sys && total >= pre_total && pre_sys > 0 {
            (total - pre_total) as f64 / (sys - pre_sys) as f64 * f64::from(online)
        } else {
            0.0
        };
        let mem = st.memory_stats.as_ref();
        let usage = mem.and_then(|m| m.usage).unwrap_or(0);
        let inactive = mem
            .and_then(|m| m.stats.as_ref())
            .and_then(|s| {
                s.get("inactive_file")
                    .or_else(|| s.get("total_inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        // Without a limit the engine reports the host's memory as the limit.
        let limit = mem.and_then(|m| m.limit);
        let host_mem_as_limit = self
            .inspect_raw(instance_id)
            .await?
            .and_then(|c| c.host_config)
            .and_then(|h| h.memory)
            .is_none_or(|m| m == 0);
        Ok(ResourceStats {
            cpu_total_ns: total,
            cpu_cores,
            memory_bytes: usage.saturating_sub(inactive),
            memory_limit: if host_mem_as_limit { None } else { limit },
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
        if cmd.is_empty() {
            return Err(RuntimeError::InvalidSpec("exec command is empty".into()));
        }
        self.running_info(instance_id).await?;
        let name = self.name(instance_id);
        let run = async {
            let created = self
                .shared
                .docker
                .create_exec(
                    &name,
                    CreateExecOptions {
                        cmd: Some(cmd.to_vec()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| self.err("exec", e))?;
            let started = self
                .shared
                .docker
                .start_exec(&created.id, None)
                .await
                .map_err(|e| self.err("exec", e))?;
            let mut output = Vec::new();
            if let StartExecResults::Attached {
                output: mut out, ..
            } = started
            {
                while let Some(chunk) = out.next().await {
                    let chunk = chunk.map_err(|e| self.err("exec", e))?;
                    if output.len() < EXEC_OUTPUT_CAP {
                        output.extend_from_slice(&chunk.into_bytes());
                        output.truncate(EXEC_OUTPUT_CAP);
                    }
                }
            }
            let inspected = self
                .shared
                .docker
                .inspect_exec(&created.id)
                .await
                .map_err(|e| self.err("exec", e))?;
            Ok(ExecOutput {
                exit_code: inspected.exit_code.unwrap_or(-1),
                output,
            })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            // The engine has no API to kill an exec; the command ends with the container.
            Err(_) => Err(RuntimeError::Timeout {
                op: "exec",
                after: timeout,
            }),
        }
    }

    async fn logs(&self, instance_id: &str, opts: LogOptions) -> Result<LogStream> {
        check_instance_id(instance_id)?;
        if self.inspect(instance_id).await?.is_none() {
            return Err(RuntimeError::NotFound(instance_id.into()));
        }
        let tail = opts
            .tail
            .map(|n| n.to_string())
            .unwrap_or_else(|| "all".into());
        let lopts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(opts.follow)
            .tail(&tail)
            .build();
        let raw = self
            .shared
            .docker
            .logs(&self.name(instance_id), Some(lopts));
        let socket = self.shared.options.socket.clone();
        struct St<S> {
            raw: S,
            out: Vec<u8>,
            err: Vec<u8>,
            ready: std::collections::VecDeque<Result<LogLine>>,
            done: bool,
        }
        let st = St {
            raw: Box::pin(raw),
            out: Vec::new(),
            err: Vec::new(),
            ready: Default::default(),
            done: false,
        };
        let stream = futures_util::stream::unfold(st, move |mut st| {
            let socket = socket.clone();
            async move {
                loop {
                    if let Some(l) = st.ready.pop_front() {
                        return Some((l, st));
                    }
                    if st.done {
                        return None;
                    }
                    match st.raw.next().await {
                        Some(Ok(chunk)) => {
                            let (buf, src) = match chunk {
                                LogOutput::StdErr { message } => {
                                    st.err.extend_from_slice(&message);
                                    (&mut st.err, LogSource::Stderr)
                                }
                                LogOutput::StdOut { message }
                                | LogOutput::Console { message }
                                | LogOutput::StdIn { message } => {
                                    st.out.extend_from_slice(&message);
                                    (&mut st.out, LogSource::Stdout)
                                }
                            };
                            let mut lines = Vec::new();
                            drain_lines(buf, src, &mut lines);
                            st.ready.extend(lines.into_iter().map(Ok));
                        }
                        Some(Err(e)) => {
                            st.done = true;
                            let err = if is_transport(&e) {
                                RuntimeError::EngineUnreachable {
                                    endpoint: socket.clone(),
                                    detail: e.to_string(),
                                }
                            } else {
                                RuntimeError::Engine {
                                    op: "logs",
                                    detail: message_of(&e),
                                }
                            };
                            st.ready.push_back(Err(err));
                        }
                        None => {
                            st.done = true;
                            for (buf, src) in [
                                (&mut st.out, LogSource::Stdout),
                                (&mut st.err, LogSource::Stderr),
                            ] {
                                if !buf.is_empty() {
                                    st.ready.push_back(Ok(LogLine {
                                        source: src,
                                        line: String::from_utf8_lossy(buf).into_owned(),
                                    }));
                                    buf.clear();
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps_are_parsed_to_the_nanosecond() {
        let t = parse_docker_time("2026-11-26T08:16:26.123456789Z").unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_795_680_986);
        assert_eq!(d.subsec_nanos(), 123_456_789);
        let t = parse_docker_time("1970-01-02T00:00:00Z").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 86_400);
        let t = parse_docker_time("2024-02-29T23:59:59.5Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1_709_251_199, 500_000_000)
        );
    }

    #[test]
    fn the_zero_time_and_garbage_are_not_timestamps() {
        for s in [
            "0001-01-01T00:00:00Z",
            "",
            "2026-13-01T00:00:00Z",
            "2026-11-26T08:16:26+01:00",
            "x-y-zTa:b:cZ",
            "2026-11-26T08:16:26.12a4Z",
        ] {
            assert_eq!(parse_docker_time(s), None, "{s}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_to_a_time_or_none_without_panicking(s in "\\PC{0,40}") {
            let _ = parse_docker_time(&s);
        }

        #[test]
        fn timestamp_shaped_text_with_wild_numbers_does_not_panic(
            y in any::<i64>(), mo in -2i64..15, d in -2i64..34,
            h in -2i64..26, mi in -2i64..62, se in -2i64..62, frac in "[0-9]{0,12}"
        ) {
            let _ = parse_docker_time(&format!("{y}-{mo}-{d}T{h}:{mi}:{se}.{frac}Z"));
        }
    }

    use proptest::prelude::any;

    #[test]
    fn a_grace_period_is_rounded_up_to_whole_seconds() {
        assert_eq!(grace_secs(Duration::ZERO), 0);
        assert_eq!(grace_secs(Duration::from_millis(1)), 1);
        assert_eq!(grace_secs(Duration::from_secs(2)), 2);
        assert_eq!(grace_secs(Duration::from_millis(2500)), 3);
    }

    #[test]
    fn the_create_request_sets_labels_ports_limits_init_and_no_restart() {
        let mut spec = InstanceSpec::image("n1", "web", 2, 7, "shoal-test/web:1")
            .with_port("http", 8080, None)
            .with_port("admin", 9090, Some(19090));
        spec.resources.cpus = Some(0.5);
        spec.resources.memory_bytes = Some(64 << 20);
        spec.env.insert("A".into(), "b".into());
        spec.network = Some("shoalnet".into());
        let body = create_body(&spec, "shoal-test/web:1", &[], true);
        let labels = body.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_NODE], "n1");
        assert_eq!(labels[LABEL_SLOT], "2");
        assert_eq!(labels[LABEL_VERSION], "7");
        assert_eq!(labels["shoal.port.http"], "8080/tcp");
        let hc = body.host_config.as_ref().unwrap();
        assert_eq!(
            hc.restart_policy.as_ref().unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
        assert_eq!(hc.nano_cpus, Some(500_000_000));
        assert_eq!(hc.memory, Some(64 << 20));
        assert_eq!(hc.init, Some(true));
        assert_eq!(hc.network_mode.as_deref(), Some("shoalnet"));
        let pb = hc.port_bindings.as_ref().unwrap();
        assert_eq!(
            pb["8080/tcp"].as_ref().unwrap()[0].host_port.as_deref(),
            Some("")
        );
        assert_eq!(
            pb["9090/tcp"].as_ref().unwrap()[0].host_port.as_deref(),
            Some("19090")
        );
        assert_eq!(body.env.as_ref().unwrap(), &["A=b".to_string()]);
        assert_eq!(body.stop_timeout, Some(10));
    }

    #[test]
    fn a_port_clash_from_the_engine_names_the_port() {
        let spec =
            InstanceSpec::image("n1", "web", 0, 1, "img").with_port("http", 8080, Some(18080));
        let e = BollardError::DockerResponseServerError {
            status_code: 500,
            message: "driver failed programming external connectivity: Bind for 0.0.0.0:18080 failed: port is already allocated".into(),
        };
        match start_error(&spec, &e) {
            RuntimeError::PortInUse { name, port, .. } => {
                assert_eq!((name.as_str(), port), ("http", 18080))
            }
            other => panic!("{other:?}"),
        }
        let e = BollardError::DockerResponseServerError {
            status_code: 500,
            message: "something else".into(),
        };
        assert!(matches!(
            start_error(&spec, &e),
            RuntimeError::Engine { .. }
        ));
    }
}

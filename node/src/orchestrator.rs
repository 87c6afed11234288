//! Wires the orchestration actors (Supervisor, Health, Scheduler from `shoal-actors`) to this
//! agent: a [`ClusterPort`] over the replicated state store and the membership view, the
//! container runtime named by the config, and an actix system on its own thread.
//!
//! Placement keys are node ids in hex. A placement record is honoured whatever its epoch: the
//! store's per-key merge already lets a higher (epoch, seq) win, and a new leader re-publishes
//! every placement under its epoch, so a leader change never empties a node (static stability).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_actors::healthcheck::Health;
use shoal_actors::placement::{Assignment, NodeHealth, NodeView, Placements, Plan};
use shoal_actors::port::{ClusterPort, InstanceReport, ScheduleInputs, ServiceState, SlotWork};
use shoal_actors::scheduler::Scheduler;
use shoal_actors::supervisor::Supervisor;
use shoal_config::{NodeConfig, RuntimeKind};
use shoal_membership::core::MemberState;
use shoal_membership::handle::MembershipHandle;
use shoal_membership::identity::node_id_hex;
use shoal_membership::state::record::InstanceStatus;
use shoal_membership::state::{NodeId, Record, RecordKey, Stamp, Value};
use shoal_runtime::ContainerRuntime;

use crate::cluster::{Cluster, unix_ms};

/// The actors' view of this agent's cluster state.
pub(crate) struct Port {
    cluster: Arc<Cluster>,
    membership: MembershipHandle,
    grace_ms: u64,
    origin: Instant,
    down_since: Mutex<HashMap<NodeId, u64>>,
    last_stamp: AtomicU64,
    advertise_ip: IpAddr,
    writer: std::sync::mpsc::SyncSender<Vec<Record>>,
    /// Offered resources of this node (what placement may reserve here).
    pub(crate) cpu: f64,
    pub(crate) memory: u64,
}

/// The instance id's slot prefix: `web.3.` for `web.3.v2`.
fn slot_prefix(service: &str, slot: u32) -> String {
    format!("{service}.{slot}.v")
}

/// Parses `web.3.v2` into (`web`, 3, 2).
pub(crate) fn parse_instance_id(id: &str) -> Option<(&str, u32, u64)> {
    let (rest, version) = id.rsplit_once(".v")?;
    let (service, slot) = rest.rsplit_once('.')?;
    Some((service, slot.parse().ok()?, version.parse().ok()?))
}

pub(crate) fn parse_node_id(hex: &str) -> Option<NodeId> {
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Port {
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        membership: MembershipHandle,
        cfg: &NodeConfig,
    ) -> Self {
        let (writer, queue) = std::sync::mpsc::sync_channel::<Vec<Record>>(1024);
        let c = cluster.clone();
        let spawned = std::thread::Builder::new()
            .name("shoal-state-writer".into())
            .spawn(move || {
                while let Ok(records) = queue.recv() {
                    c.with_state(|s| {
                        if let Err(e) = s.flush() {
                            tracing::warn!(error = %e, "cannot persist state");
                        }
                    });
                    for r in &records {
                        c.disseminate(r);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the state writer thread");
        }
        Port {
            cluster,
            membership,
            writer,
            grace_ms: cfg.reschedule_grace.as_millis() as u64,
            advertise_ip: cfg.advertise_addr().ip(),
            origin: Instant::now(),
            down_since: Mutex::new(HashMap::new()),
            last_stamp: AtomicU64::new(0),
            cpu: cfg.resources.cpu.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
            }),
            memory: cfg.resources.memory.map_or(u64::MAX, |m| m.bytes()),
        }
    }

    /// A version/seq larger than any this process issued and than the wall clock in ms.
    fn next_stamp(&self) -> u64 {
        let now = unix_ms();
        let mut prev = self.last_stamp.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self
                .last_stamp
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Merges records this node wrote, persists them and gossips them.
    ///
    /// The records are in the in-memory store when this returns; persisting them (a disk write)
    /// and gossiping them happen on the writer thread, so an actor calling this never blocks on
    /// the disk. If the writer is behind (its bounded queue full), the records stay in memory,
    /// are persisted by the next flush and reach the others by anti-entropy; the skip is counted.
    fn write(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        self.cluster.with_state(|s| {
            for r in &records {
                s.store.merge(r.clone());
            }
        });
        let n = records.len() as u64;
        if self.writer.try_send(records).is_err() {
            // Their gossip is dropped (counted with the other dropped deltas); they are
            // persisted by the next flush and reach the others by anti-entropy.
            self.cluster
                .metrics
                .deltas_dropped
                .fetch_add(n, Ordering::Relaxed);
            tracing::warn!("the state writer is behind; a write waits for the next flush");
        }
    }

    /// My instance records whose id is in `service`'s `slot`, except `keep`.
    fn my_instance_keys(&self, service: &str, slot: u32, keep: Option<&str>) -> Vec<RecordKey> {
        let me = self.cluster.node_id;
        let prefix = slot_prefix(service, slot);
        self.cluster.with_state(|s| {
            s.store
                .records()
                .filter(|r| !r.is_tombstone())
                .filter_map(|r| match &r.key {
                    RecordKey::Instance { origin, instance }
                        if *origin == me
                            && instance.starts_with(&prefix)
                            && Some(instance.as_str()) != keep =>
                    {
                        Some(r.key.clone())
                    }
                    _ => None,
                })
                .collect()
        })
    }

    fn tombstone(&self, key: RecordKey) -> Record {
        let v = self.next_stamp();
        Record {
            key,
            stamp: Stamp::version(v),
            written_ms: unix_ms(),
            value: Value::Tombstone,
        }
    }
}

impl ClusterPort for Port {
    fn node_name(&self) -> String {
        self.cluster.name.clone()
    }

    fn assignments(&self) -> Vec<SlotWork> {
        let me = self.cluster.node_id;
        self.cluster.with_state(|s| {
            let mut out = Vec::new();
            for r in s.store.records() {
                if let (RecordKey::Placement { service, slot }, Value::Placement(node)) =
                    (&r.key, &r.value)
                    && *node == me
                    && let Some(entry) = s.store.service(service)
                {
                    out.push(SlotWork {
                        service: service.clone(),
                        slot: *slot,
                        version: entry.template,
                        spec: Arc::new(entry.spec.clone()),
                    });
                }
            }
            out
        })
    }

    fn report(&self, report: InstanceReport) {
        let mut records: Vec<Record> = self
            .my_instance_keys(&report.service, report.slot, Some(&report.instance_id))
            .into_iter()
            .map(|k| self.tombstone(k))
            .collect();
        records.push(Record {
            key: RecordKey::Instance {
                origin: self.cluster.node_id,
                instance: report.instance_id.clone(),
            },
            stamp: Stamp::version(self.next_stamp()),
            written_ms: unix_ms(),
            value: Value::Instance(InstanceStatus {
                service: report.service,
                state: report.state,
                ready: report.ready,
                address: report.address,
                restarts: report.restarts,
            }),
        });
        self.write(records);
    }

    fn forget(&self, service: &str, slot: u32) {
        let records = self
            .my_instance_keys(service, slot, None)
            .into_iter()
            .map(|k| self.tombstone(k))
            .collect();
        self.write(records);
    }

    fn retain_reports(&self, keep: &std::collections::BTreeSet<(String, u32)>) {
        let me = self.cluster.node_id;
        let stale: Vec<RecordKey> = self.cluster.with_state(|s| {
            s.store
                .records()
                .filter(|r| !r.is_tombstone())
                .filter_map(|r| match &r.key {
                    RecordKey::Instance { origin, instance } if *origin == me => {
                        let (service, slot, _) = parse_instance_id(instance)?;
                        (!keep.contains(&(service.to_string(), slot))).then(|| r.key.clone())
                    }
                    _ => None,
                })
                .collect()
        });
        let records = stale.into_iter().map(|k| self.tombstone(k)).collect();
        self.write(records);
    }

    fn event(&self, kind: &str, _service: Option<&str>, message: String) {
        self.cluster.event(kind, message);
    }

    fn leadership(&self) -> Option<u64> {
        let l = self.cluster.leader();
        l.is_self.then_some(l.epoch)
    }

    fn schedule_inputs(&self) -> ScheduleInputs {
        let now = self.now_ms();
        let me = self.cluster.node_id;
        let members: HashMap<NodeId, MemberState> = self
            .membership
            .members()
            .into_iter()
            .map(|m| (m.identity.node_id, m.state))
            .collect();
        let mut events: Vec<(&str, String)> = Vec::new();
        let inputs = self.cluster.with_state(|s| {
            let mut nodes = Vec::new();
            let mut down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
            for r in s.store.records() {
                let (RecordKey::Node(id), Value::Node(info)) = (&r.key, &r.value) else {
                    continue;
                };
                let state = if *id == me {
                    Some(MemberState::Alive)
                } else {
                    members.get(id).copied()
                };
                let health = match state {
                    Some(MemberState::Alive) => {
                        if down.remove(id).is_some() {
                            events.push(("node-up", format!("node {} is alive again", info.name)));
                        }
                        NodeHealth::Alive
                    }
                    Some(MemberState::Suspect) => NodeHealth::Suspect,
                    _ => NodeHealth::Down {
                        since_ms: *down.entry(*id).or_insert_with(|| {
                            events.push((
                                "node-down",
                                format!(
                                    "node {} is down; its instances move elsewhere after {} ms",
                                    info.name, self.grace_ms
                                ),
                            ));
                            now
                        }),
                    },
                };
                let (cpu, memory) = if *id == me {
                    (self.cpu, self.memory)
                } else if info.cpu <= 0.0 && info.memory == 0 {
                    // A node that has not said what it offers is not limited by placement.
                    (f64::MAX, u64::MAX)
                } else {
                    (
                        info.cpu,
                        if info.memory == 0 {
                            u64::MAX
                        } else {
                            info.memory
                        },
                    )
                };
                nodes.push(NodeView {
                    key: node_id_hex(id),
                    name: info.name.clone(),
                    labels: info.labels.clone(),
                    cpu,
                    memory,
                    health,
                });
            }
            // Instances running and ready, per service.
            let mut ready: HashMap<&str, usize> = HashMap::new();
            for r in s.store.records() {
                if let Value::Instance(st) = &r.value
                    && st.state == "running"
                    && st.ready
                {
                    *ready.entry(st.service.as_str()).or_default() += 1;
                }
            }
            let mut services = Vec::new();
            let mut versions = HashMap::new();
            for (_, entry) in s.store.services() {
                versions.insert(entry.spec.name.clone(), entry.template);
                services.push(ServiceState {
                    spec: Arc::new(entry.spec.clone()),
                    version: entry.template,
                    settled: ready.get(entry.spec.name.as_str()).copied().unwrap_or(0)
                        >= entry.spec.replicas as usize,
                });
            }
            let mut current = Placements::new();
            for r in s.store.records() {
                if let (RecordKey::Placement { service, slot }, Value::Placement(node)) =
                    (&r.key, &r.value)
                {
                    current.insert(
                        (service.clone(), *slot),
                        Assignment {
                            node: node_id_hex(node),
                            version: versions.get(service).copied().unwrap_or(0),
                        },
                    );
                }
            }
            ScheduleInputs {
                nodes,
                services,
                current,
                now_ms: now,
                reschedule_grace_ms: self.grace_ms,
            }
        });
        for (kind, message) in events {
            self.cluster.event(kind, message);
        }
        inputs
    }

    fn service_env(&self) -> BTreeMap<String, String> {
        let services: Vec<shoal_config::ServiceSpec> = self
            .cluster
            .with_state(|s| s.store.services().map(|(_, e)| e.spec.clone()).collect());
        shoal_actors::balancer::service_env(&services, self.advertise_ip)
    }

    fn publish(&self, epoch: u64, plan: &Plan) {
        let existing: BTreeMap<(String, u32), (Stamp, Option<NodeId>)> =
            self.cluster.with_state(|s| {
                s.store
                    .records()
                    .filter_map(|r| match (&r.key, &r.value) {
                        (RecordKey::Placement { service, slot }, Value::Placement(n)) => {
                            Some(((service.clone(), *slot), (r.stamp, Some(*n))))
                        }
                        (RecordKey::Placement { service, slot }, _) => {
                            Some(((service.clone(), *slot), (r.stamp, None)))
                        }
                        _ => None,
                    })
                    .collect()
            });
        let mut records = Vec::new();
        for (slot, a) in &plan.assignments {
            let Some(node) = parse_node_id(&a.node) else {
                continue;
            };
            let stale = existing
                .get(slot)
                .is_none_or(|(stamp, n)| *n != Some(node) || stamp.major < epoch);
            if stale {
                records.push(Record {
                    key: RecordKey::Placement {
                        service: slot.0.clone(),
                        slot: slot.1,
                    },
                    stamp: Stamp::placement(epoch, self.next_stamp()),
                    written_ms: unix_ms(),
                    value: Value::Placement(node),
                });
            }
        }
        for (slot, (_, n)) in &existing {
            if n.is_some() && !plan.assignments.contains_key(slot) {
                records.push(Record {
                    key: RecordKey::Placement {
                        service: slot.0.clone(),
                        slot: slot.1,
                    },
                    stamp: Stamp::placement(epoch, self.next_stamp()),
                    written_ms: unix_ms(),
                    value: Value::Tombstone,
                });
            }
        }
        self.write(records);
    }
}

/// The running actors, on their own thread.
pub(crate) struct Orchestrator {
    system: Option<actix::System>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Orchestrator {
    /// Stops the actors (running instances are left running: static stability).
    pub(crate) fn stop(mut self) {
        if let Some(s) = self.system.take() {
            s.stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects the runtime and starts Supervisor, Health and Scheduler on an actix system thread.
pub(crate) fn start(cfg: &NodeConfig, port: Arc<Port>) -> anyhow::Result<Orchestrator> {
    let node = port.node_name();
    let kind = cfg.runtime;
    let data_dir = cfg.data_dir.join("runtime");
    let host_ip: Option<IpAddr> = Some(cfg.advertise_addr().ip());
    let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<actix::System>>();
    let thread = std::thread::Builder::new()
        .name("shoal-actors".into())
        .spawn(move || {
            let system = actix::System::new();
            system.block_on(async move {
                let runtime: anyhow::Result<Arc<dyn ContainerRuntime>> = match kind {
                    RuntimeKind::Docker => shoal_runtime::DockerRuntime::connect(&node)
                        .await
                        .map(|r| Arc::new(r) as Arc<dyn ContainerRuntime>)
                        .context("connecting to the Docker Engine (use --runtime process without Docker)"),
                    RuntimeKind::Process => shoal_runtime::ProcessRuntime::open(data_dir, &node)
                        .await
                        .map(|r| Arc::new(r) as Arc<dyn ContainerRuntime>)
                        .context("opening the process runtime"),
                };
                let runtime = match runtime {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                use actix::{Actor, AsyncContext};
                let cluster: Arc<dyn ClusterPort> = port;
                Supervisor::create(|ctx| {
                    let health =
                        Health::new(runtime.clone(), ctx.address().recipient(), Duration::from_millis(50))
                            .start();
                    Supervisor::new(
                        cluster.clone(),
                        runtime.clone(),
                        host_ip,
                        Some(health.recipient()),
                        Duration::from_millis(250),
                    )
                });
                Scheduler::new(cluster, Duration::from_millis(200)).start();
                let _ = tx.send(Ok(actix::System::current()));
            });
            let _ = system.run();
        })
        .context("starting the actors thread")?;
    let system = rx.recv().context("the actors thread ended at start")??;
    Ok(Orchestrator {
        system: Some(system),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_parse_back_into_service_slot_and_version() {
        assert_eq!(parse_instance_id("web.3.v2"), Some(("web", 3, 2)));
        assert_eq!(parse_instance_id("my-api.0.v17"), Some(("my-api", 0, 17)));
        assert_eq!(parse_instance_id("web.x.v2"), None);
        assert_eq!(parse_instance_id("web"), None);
    }

    #[test]
    fn node_ids_parse_from_hex() {
        let id = [0xab; 16];
        assert_eq!(parse_node_id(&node_id_hex(&id)), Some(id));
        assert_eq!(parse_node_id("zz"), None);
    }
}

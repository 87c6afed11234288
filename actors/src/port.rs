//! The boundary between the actors and the cluster state: what the supervisor, health and
//! scheduler actors read and write. The binary implements it over the replicated state store;
//! [`MemoryCluster`] implements it in memory for tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use shoal_config::ServiceSpec;

use crate::placement::{NodeView, Placements, Plan};

/// A slot this node must run.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotWork {
    /// Service name.
    pub service: String,
    /// Slot number.
    pub slot: u32,
    /// Spec version to run.
    pub version: u64,
    /// The spec.
    pub spec: Arc<ServiceSpec>,
}

/// What this node reports about one of its instances (the owner-only instance record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceReport {
    /// Service name.
    pub service: String,
    /// Slot number.
    pub slot: u32,
    /// Spec version it runs.
    pub version: u64,
    /// Runtime instance id.
    pub instance_id: String,
    /// `starting`, `running`, `exited`, `failed` (gave up), `backoff`, `stopping`.
    pub state: String,
    /// Passes its readiness probe (or has none and runs).
    pub ready: bool,
    /// Restarts so far.
    pub restarts: u32,
    /// `ip:port` of its first port, if it has one.
    pub address: Option<String>,
}

/// A service as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct ServiceState {
    /// The spec.
    pub spec: Arc<ServiceSpec>,
    /// Its version.
    pub version: u64,
    /// All its instances are running and ready (rebalancing allowed).
    pub settled: bool,
}

/// Everything the scheduler needs for one round.
#[derive(Clone, Debug, Default)]
pub struct ScheduleInputs {
    /// The membership view with node info.
    pub nodes: Vec<NodeView>,
    /// The desired services.
    pub services: Vec<ServiceState>,
    /// The current placements.
    pub current: Placements,
    /// Now, on the clock of `NodeHealth::Down::since_ms`.
    pub now_ms: u64,
    /// How long a down node's instances wait before they move.
    pub reschedule_grace_ms: u64,
}

/// The cluster state as the actors use it. Implementations must not block: they are called
/// from actor handlers.
pub trait ClusterPort: Send + Sync + 'static {
    /// This node's name (the runtime's node).
    fn node_name(&self) -> String;
    /// The slots this node must run, from the local copy of the placements. Never empty because
    /// contact was lost: only a placement of a higher epoch takes a slot away.
    fn assignments(&self) -> Vec<SlotWork>;
    /// Writes this node's status of an instance.
    fn report(&self, report: InstanceReport);
    /// Drops this node's status of a slot it no longer runs.
    fn forget(&self, service: &str, slot: u32);
    /// Drops this node's status of every slot not in `keep` (e.g. reports an earlier run of the
    /// agent left behind).
    fn retain_reports(&self, keep: &BTreeSet<(String, u32)>);
    /// Records a cluster event.
    fn event(&self, kind: &str, service: Option<&str>, message: String);
    /// `Some(epoch)` while this node holds the leader lease.
    fn leadership(&self) -> Option<u64>;
    /// The scheduler's inputs, read now.
    fn schedule_inputs(&self) -> ScheduleInputs;
    /// Writes the plan's placements under the lease epoch (the leader only).
    fn publish(&self, epoch: u64, plan: &Plan);
    /// Environment added to every new instance (e.g. `SHOAL_SERVICE_<NAME>_ADDR`, how to reach
    /// other services through this node's proxy). The service's own `env` wins on a clash.
    fn service_env(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// A recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEvent {
    /// Kind (`placed`, `started`, `exited`, ...).
    pub kind: String,
    /// Service, if any.
    pub service: Option<String>,
    /// Text.
    pub message: String,
}

/// In-memory cluster state for tests: one node's view, shared by reference.
#[derive(Clone, Debug, Default)]
pub struct MemoryCluster {
    inner: Arc<Mutex<MemoryState>>,
}

/// The contents of a [`MemoryCluster`].
#[derive(Clone, Debug, Default)]
pub struct MemoryState {
    /// This node's name.
    pub node: String,
    /// Slots assigned to this node.
    pub assignments: Vec<SlotWork>,
    /// Reports by (service, slot).
    pub reports: BTreeMap<(String, u32), InstanceReport>,
    /// Events, oldest first.
    pub events: Vec<RecordedEvent>,
    /// Leader epoch, if leading.
    pub leader_epoch: Option<u64>,
    /// Scheduler inputs.
    pub inputs: ScheduleInputs,
    /// Plans published, with their epoch.
    pub published: Vec<(u64, Plan)>,
}

impl MemoryCluster {
    /// An empty cluster state for `node`.
    pub fn new(node: &str) -> Self {
        let c = MemoryCluster::default();
        c.with(|s| s.node = node.to_string());
        c
    }

    /// Runs `f` on the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }
}

impl ClusterPort for MemoryCluster {
    fn node_name(&self) -> String {
        self.with(|s| s.node.clone())
    }
    fn assignments(&self) -> Vec<SlotWork> {
        self.with(|s| s.assignments.clone())
    }
    fn report(&self, report: InstanceReport) {
        self.with(|s| {
            s.reports
                .insert((report.service.clone(), report.slot), report)
        });
    }
    fn forget(&self, service: &str, slot: u32) {
        self.with(|s| s.reports.remove(&(service.to_string(), slot)));
    }
    fn retain_reports(&self, keep: &BTreeSet<(String, u32)>) {
        self.with(|s| s.reports.retain(|k, _| keep.contains(k)));
    }
    fn event(&self, kind: &str, service: Option<&str>, message: String) {
        self.with(|s| {
            s.events.push(RecordedEvent {
                kind: kind.into(),
                service: service.map(Into::into),
                message,
            })
        });
    }
    fn leadership(&self) -> Option<u64> {
        self.with(|s| s.leader_epoch)
    }
    fn schedule_inputs(&self) -> ScheduleInputs {
        self.with(|s| s.inputs.clone())
    }
    fn publish(&self, epoch: u64, plan: &Plan) {
        self.with(|s| {
            s.inputs.current = plan.assignments.clone();
            s.published.push((epoch, plan.clone()));
        });
    }
}

//! The application's view of a running membership: a snapshot of the member table and the
//! counters (a watch channel, refreshed by the owner task) and graceful shutdown.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::core::{CoreCounters, MemberState, MemberView};
use crate::driver::Control;
use crate::identity::NodeIdentity;

/// What the membership looked like at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This node's current identity.
    pub identity: NodeIdentity,
    /// The member table (this node first).
    pub members: Vec<MemberView>,
    /// The core's counters.
    pub counters: CoreCounters,
}

impl Snapshot {
    /// How many members are in `state` (this node included).
    pub fn count(&self, state: MemberState) -> usize {
        self.members.iter().filter(|m| m.state == state).count()
    }
}

/// A handle on a running membership (cheap to clone).
#[derive(Clone)]
pub struct MembershipHandle {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    control: mpsc::Sender<Control>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl MembershipHandle {
    pub(crate) fn new(
        snapshot: watch::Receiver<Arc<Snapshot>>,
        control: mpsc::Sender<Control>,
        task: JoinHandle<()>,
    ) -> Self {
        Self {
            snapshot,
            control,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// The latest member table.
    pub fn members(&self) -> Vec<MemberView> {
        self.snapshot.borrow().members.clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Queues a cluster-state delta for dissemination (a foca custom broadcast). Never waits:
    /// false when the membership task is gone or its queue is full.
    pub fn broadcast(&self, bytes: Vec<u8>) -> bool {
        self.control.try_send(Control::Broadcast(bytes)).is_ok()
    }

    /// Leaves the cluster gracefully (a few members are told this node is going down), then
    /// stops the membership tasks. Safe to call more than once.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

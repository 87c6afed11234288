//! The `ContainerRuntime` trait every runtime implements.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::Result;
use crate::spec::InstanceSpec;
use crate::types::{ExecOutput, InstanceInfo, LogOptions, LogStream, ResourceStats, RuntimeEvent};

/// Runs instances on this host. Every operation is idempotent: starting what already runs,
/// stopping what is stopped and removing what is gone all succeed without side effects.
///
/// The trait is object safe (`Arc<dyn ContainerRuntime>`); its async methods return boxed
/// futures through `async_trait`.
#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// Short name of the implementation (`docker`, `process`, `fake`).
    fn kind(&self) -> &'static str;

    /// The node whose instances this runtime owns (label `shoal.node`).
    fn node(&self) -> &str;

    /// Makes sure the instance runs. If an instance with this id is already running it is
    /// returned untouched (this is how a restarted agent adopts its instances); if it exists
    /// but has ended, it is replaced by a fresh one. The spec's `node` must be this runtime's.
    async fn ensure_started(&self, spec: &InstanceSpec) -> Result<InstanceInfo>;

    /// Stops the instance: a polite signal, then a kill after `grace`. Stopping an instance
    /// that has ended or does not exist succeeds.
    async fn stop(&self, instance_id: &str, grace: Duration) -> Result<()>;

    /// Removes the instance (killing it if it still runs) and what the runtime kept for it.
    /// Removing an unknown instance succeeds.
    async fn remove(&self, instance_id: &str) -> Result<()>;

    /// The instance's current state, or `None` if this node has no such instance.
    async fn inspect(&self, instance_id: &str) -> Result<Option<InstanceInfo>>;

    /// Every instance this node owns, running or ended.
    async fn list(&self) -> Result<Vec<InstanceInfo>>;

    /// A new subscription to this node's instance events (bounded; see
    /// [`crate::EVENT_CHANNEL_CAPACITY`]).
    fn events(&self) -> broadcast::Receiver<RuntimeEvent>;

    /// CPU and memory use of a running instance.
    async fn stats(&self, instance_id: &str) -> Result<ResourceStats>;

    /// Runs a command in the instance (for probes), with a time limit.
    async fn exec(
        &self,
        instance_id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput>;

    /// The instance's output: the last lines and optionally the lines that follow.
    async fn logs(&self, instance_id: &str, opts: LogOptions) -> Result<LogStream>;
}

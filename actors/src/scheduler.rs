//! The Scheduler actor, on every node, active only on the leader: runs the pure placement
//! ([`crate::placement::place`]) over the cluster state and publishes the plan under the lease
//! epoch, with an event for every change and every newly pending slot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::placement::{Change, Inputs, ServiceInput, SlotKey, check, place};
use crate::port::ClusterPort;

/// Run a placement round now.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Kick;

/// The Scheduler actor.
pub struct Scheduler {
    cluster: Arc<dyn ClusterPort>,
    tick: Duration,
    pending: BTreeMap<SlotKey, String>,
}

impl Scheduler {
    /// A scheduler running a round every `tick` (and on [`Kick`]) while this node leads.
    pub fn new(cluster: Arc<dyn ClusterPort>, tick: Duration) -> Self {
        Scheduler {
            cluster,
            tick,
            pending: BTreeMap::new(),
        }
    }

    fn round(&mut self) {
        let Some(epoch) = self.cluster.leadership() else {
            self.pending.clear();
            return;
        };
        let state = self.cluster.schedule_inputs();
        let services: Vec<ServiceInput<'_>> = state
            .services
            .iter()
            .map(|s| ServiceInput {
                spec: &s.spec,
                version: s.version,
                settled: s.settled,
            })
            .collect();
        let inputs = Inputs {
            nodes: &state.nodes,
            services: &services,
            current: &state.current,
            now_ms: state.now_ms,
            reschedule_grace_ms: state.reschedule_grace_ms,
        };
        let plan = place(&inputs);
        if let Err(errors) = check(&inputs, &plan) {
            // Never publish a plan that breaks an invariant; say so loudly instead.
            tracing::error!(
                ?errors,
                "placement produced an invalid plan; not publishing it"
            );
            return;
        }
        if plan.assignments != state.current {
            self.cluster.publish(epoch, &plan);
            for c in &plan.changes {
                let (kind, service, msg) = match c {
                    Change::Placed { slot, node } => (
                        "placed",
                        &slot.0,
                        format!("{}/{} placed on {node}", slot.0, slot.1),
                    ),
                    Change::Moved {
                        slot,
                        from,
                        to,
                        reason,
                    } => (
                        "moved",
                        &slot.0,
                        format!("{}/{} moved from {from} to {to}: {reason}", slot.0, slot.1),
                    ),
                    Change::Removed { slot, node } => (
                        "unplaced",
                        &slot.0,
                        format!("{}/{} removed from {node}", slot.0, slot.1),
                    ),
                };
                self.cluster.event(kind, Some(service), msg);
            }
        }
        let mut now_pending = BTreeMap::new();
        for p in plan.pending {
            if self.pending.get(&p.slot) != Some(&p.reason) {
                self.cluster.event(
                    "pending",
                    Some(&p.slot.0),
                    format!("{}/{} pending: {}", p.slot.0, p.slot.1, p.reason),
                );
            }
            now_pending.insert(p.slot, p.reason);
        }
        self.pending = now_pending;
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.tick, |act, _| act.round());
    }
}

impl Handler<Kick> for Scheduler {
    type Result = ();
    fn handle(&mut self, _: Kick, _: &mut Context<Self>) {
        self.round();
    }
}

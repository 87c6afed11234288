//! The Supervisor actor, on every node: keeps the runtime's instances equal to the slots the
//! cluster state assigns to this node. A thin shell over [`crate::reconcile::Reconciler`]: it
//! reads the assignments, lists the runtime, performs the starts and removals the reconciler asks
//! for, turns runtime exit events and liveness verdicts into restarts, and reports instance
//! status. Runtime calls run as futures beside the actor, never blocking its mailbox.
//!
//! Static stability: nothing is stopped because the leader or the gossip is unreachable; only a
//! placement of a higher epoch, applied to the local state, takes a slot away.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use shoal_runtime::{ContainerRuntime, EventKind, RuntimeEvent};
use tokio::sync::broadcast::error::RecvError;

use crate::health::Verdict;
use crate::healthcheck::{HealthSet, Watch};
use crate::port::{ClusterPort, InstanceReport, SlotWork};
use crate::reconcile::{Action, Reconciler};
use crate::restart::Exit;

/// Reconcile now (the assignments may have changed).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Reconcile;

/// A runtime event, forwarded from the runtime's event channel.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RuntimeEventMsg(pub RuntimeEvent);

/// A verdict of the health actor about an instance.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ProbeVerdict {
    /// The instance.
    pub instance_id: String,
    /// What the probes decided.
    pub verdict: Verdict,
}

/// The Supervisor actor.
pub struct Supervisor {
    cluster: Arc<dyn ClusterPort>,
    runtime: Arc<dyn ContainerRuntime>,
    host_ip: Option<IpAddr>,
    health: Option<Recipient<HealthSet>>,
    core: Reconciler,
    desired: Vec<SlotWork>,
    reported: BTreeMap<(String, u32), InstanceReport>,
    clock: Instant,
    busy: bool,
    again: bool,
    pruned: bool,
    tick: Duration,
}

impl Supervisor {
    /// A supervisor reconciling every `tick` (and on [`Reconcile`] and runtime events).
    pub fn new(
        cluster: Arc<dyn ClusterPort>,
        runtime: Arc<dyn ContainerRuntime>,
        host_ip: Option<IpAddr>,
        health: Option<Recipient<HealthSet>>,
        tick: Duration,
    ) -> Self {
        Supervisor {
            cluster,
            runtime,
            host_ip,
            health,
            core: Reconciler::default(),
            desired: Vec::new(),
            reported: BTreeMap::new(),
            clock: Instant::now(),
            busy: false,
            again: false,
            pruned: false,
            tick,
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            self.again = true;
            return;
        }
        self.busy = true;
        self.desired = self.cluster.assignments();
        let extra_env = self.cluster.service_env();
        let runtime = self.runtime.clone();
        let list = async move { runtime.list().await };
        ctx.spawn(list.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(actual) => {
                    let node = act.runtime.node().to_string();
                    let now = act.now_ms();
                    let actions =
                        act.core
                            .plan(&node, act.host_ip, &act.desired, &actual, &extra_env, now);
                    act.execute(actions, ctx);
                }
                Err(e) => tracing::warn!(error = %e, "listing the runtime's instances failed"),
            }
            act.busy = false;
            act.publish();
            if std::mem::take(&mut act.again) {
                act.reconcile(ctx);
            }
        }));
    }

    fn execute(&mut self, actions: Vec<Action>, ctx: &mut Context<Self>) {
        for action in actions {
            let runtime = self.runtime.clone();
            match action {
                Action::Start(spec) => {
                    let Some(work) = self
                        .desired
                        .iter()
                        .find(|w| w.service == spec.service && w.slot == spec.slot)
                        .cloned()
                    else {
                        continue;
                    };
                    let fut = async move { runtime.ensure_started(&spec).await };
                    ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                        let now = act.now_ms();
                        let res = res.map_err(|e| e.to_string());
                        let retry = res.is_err();
                        act.core.started(
                            &work.spec,
                            work.slot,
                            res.as_ref().map_err(Clone::clone),
                            now,
                        );
                        act.publish();
                        if retry {
                            act.schedule_for(&work.service, work.slot, ctx);
                        }
                    }));
                }
                Action::Remove {
                    instance_id,
                    grace_ms,
                } => {
                    let id = instance_id.clone();
                    let fut = async move {
                        runtime.stop(&id, Duration::from_millis(grace_ms)).await?;
                        runtime.remove(&id).await
                    };
                    ctx.spawn(fut.into_actor(self).map(move |res, act, _| match res {
                        Ok(()) => act.cluster.event(
                            "removed",
                            None,
                            format!("{instance_id} stopped and removed: no longer assigned here"),
                        ),
                        Err(e) => tracing::warn!(%instance_id, error = %e, "removing failed"),
                    }));
                }
            }
        }
    }

    /// Reconciles when the slot's backoff ends.
    fn schedule_for(&mut self, service: &str, slot: u32, ctx: &mut Context<Self>) {
        let Some(st) = self.core.slots.get(&(service.to_string(), slot)) else {
            return;
        };
        if st.stopped_for_good {
            return;
        }
        let wait = st.not_before_ms.saturating_sub(self.now_ms());
        if wait == 0 {
            self.reconcile(ctx);
        } else {
            ctx.run_later(Duration::from_millis(wait + 1), |act, ctx| {
                act.reconcile(ctx)
            });
        }
    }

    /// Writes changed reports and events, and tells the health actor what runs.
    fn publish(&mut self) {
        for note in self.core.notes.drain(..) {
            self.cluster
                .event(note.kind, Some(&note.service), note.message);
        }
        let reports = self.core.reports();
        let mut seen = BTreeMap::new();
        for r in reports {
            let key = (r.service.clone(), r.slot);
            if self.reported.get(&key) != Some(&r) {
                self.cluster.report(r.clone());
            }
            seen.insert(key, r);
        }
        for key in self.reported.keys() {
            if !seen.contains_key(key) {
                self.cluster.forget(&key.0, key.1);
            }
        }
        if !self.pruned {
            // Reports an earlier run of this agent left for slots it no longer holds.
            self.cluster.retain_reports(&seen.keys().cloned().collect());
            self.pruned = true;
        }
        self.reported = seen;
        if let Some(health) = &self.health {
            let watches = self
                .core
                .slots
                .iter()
                .filter(|(_, st)| st.running)
                .filter_map(|((service, slot), st)| {
                    let work = self
                        .desired
                        .iter()
                        .find(|w| &w.service == service && w.slot == *slot)?;
                    Some(Watch {
                        instance_id: st.instance_id.clone(),
                        spec: work.spec.clone(),
                        ports: st.ports.clone(),
                    })
                })
                .collect();
            health.do_send(HealthSet(watches));
        }
    }

    fn exited(&mut self, instance_id: &str, exit: Exit, ctx: &mut Context<Self>) {
        let Some((service, slot)) = self.core.slot_of(instance_id) else {
            return;
        };
        let Some(work) = self
            .desired
            .iter()
            .find(|w| w.service == service && w.slot == slot)
            .cloned()
        else {
            return;
        };
        let now = self.now_ms();
        self.core.exited_slot(&service, slot, exit, now, &work.spec);
        self.publish();
        self.schedule_for(&service, slot, ctx);
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let mut events = self.runtime.events();
        let me = ctx.address();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ev) => me.do_send(RuntimeEventMsg(ev)),
                    // Missed events: a full reconcile catches up with reality.
                    Err(RecvError::Lagged(_)) => me.do_send(Reconcile),
                    Err(RecvError::Closed) => break,
                }
                if !me.connected() {
                    break;
                }
            }
        });
        ctx.run_interval(self.tick, |act, ctx| act.reconcile(ctx));
        self.reconcile(ctx);
    }
}

impl Handler<Reconcile> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: Reconcile, ctx: &mut Context<Self>) {
        self.reconcile(ctx);
    }
}

impl Handler<RuntimeEventMsg> for Supervisor {
    type Result = ();
    fn handle(&mut self, RuntimeEventMsg(ev): RuntimeEventMsg, ctx: &mut Context<Self>) {
        match ev.kind {
            EventKind::Exited { code } => {
                self.exited(&ev.instance_id, Exit::Code(code.unwrap_or(-1)), ctx)
            }
            EventKind::OomKilled => self.exited(&ev.instance_id, Exit::OomKilled, ctx),
            EventKind::Removed => self.reconcile(ctx),
            EventKind::Started | EventKind::Health(_) => {}
        }
    }
}

impl Handler<ProbeVerdict> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: ProbeVerdict, ctx: &mut Context<Self>) {
        let Some(key) = self.core.slot_of(&msg.instance_id) else {
            return;
        };
        match msg.verdict {
            Verdict::Nothing => {}
            Verdict::Ready(ready) => {
                if let Some(st) = self.core.slots.get_mut(&key) {
                    if st.ready != ready {
                        self.cluster.event(
                            if ready { "ready" } else { "unready" },
                            Some(&key.0),
                            format!(
                                "{}/{} is {}",
                                key.0,
                                key.1,
                                if ready { "ready" } else { "not ready" }
                            ),
                        );
                    }
                    st.ready = ready;
                }
                self.publish();
            }
            Verdict::Restart { probe, failures } => {
                self.cluster.event(
                    "unhealthy",
                    Some(&key.0),
                    format!(
                        "{}/{}: {probe:?} probe failed {failures} times in a row; restarting",
                        key.0, key.1
                    ),
                );
                let grace = self
                    .desired
                    .iter()
                    .find(|w| w.service == key.0 && w.slot == key.1)
                    .map_or(Duration::from_secs(10), |w| w.spec.stop_grace);
                let runtime = self.runtime.clone();
                let id = msg.instance_id.clone();
                let fut = async move { runtime.stop(&id, grace).await };
                ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                    if let Err(e) = res {
                        tracing::warn!(instance = %msg.instance_id, error = %e, "stopping an unhealthy instance failed");
                    }
                    act.exited(&msg.instance_id, Exit::Unhealthy, ctx);
                }));
            }
        }
    }
}

//! The supervisor's core, sans I/O: compares the slots assigned to this node with the instances
//! the runtime has, and says what to start and what to remove; turns exits into restart
//! decisions. The actor in [`crate::supervisor`] performs the actions and feeds back results.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use shoal_config::ServiceSpec;
use shoal_runtime::{
    InstanceInfo, InstanceSpec, InstanceState, PortSpec, Protocol, Resources, Workload,
};

use crate::port::{InstanceReport, SlotWork};
use crate::restart::{Decision, Exit, RestartTracker};

/// The runtime instance id of a slot running a version: `web.3.v2`.
pub fn instance_id(service: &str, slot: u32, version: u64) -> String {
    format!("{service}.{slot}.v{version}")
}

/// The runtime's instance spec for a slot.
pub fn instance_spec(
    node: &str,
    host_ip: Option<IpAddr>,
    work: &SlotWork,
    extra_env: &BTreeMap<String, String>,
) -> InstanceSpec {
    let spec: &ServiceSpec = &work.spec;
    let workload = match (&spec.image, &spec.command) {
        (Some(image), _) => Workload::Image {
            image: image.clone(),
            args: Vec::new(),
        },
        (None, Some(argv)) => Workload::Command { argv: argv.clone() },
        (None, None) => Workload::Command { argv: Vec::new() },
    };
    let mut env = spec.env.clone();
    for (k, v) in extra_env {
        env.entry(k.clone()).or_insert_with(|| v.clone());
    }
    env.insert("SHOAL_SERVICE".into(), spec.name.clone());
    env.insert("SHOAL_SLOT".into(), work.slot.to_string());
    env.insert("SHOAL_VERSION".into(), work.version.to_string());
    InstanceSpec {
        instance_id: instance_id(&spec.name, work.slot, work.version),
        service: spec.name.clone(),
        slot: work.slot,
        version: work.version,
        node: node.to_string(),
        workload,
        env,
        ports: spec
            .ports
            .iter()
            .map(|p| PortSpec {
                name: p.name.clone(),
                container_port: p.container,
                host_port: None,
                host_ip,
                protocol: Protocol::Tcp,
            })
            .collect(),
        resources: Resources {
            cpus: (spec.resources.cpu > 0.0).then_some(spec.resources.cpu),
            memory_bytes: spec.resources.memory.map(|m| m.bytes()),
        },
        stop_grace: spec.stop_grace,
        network: None,
        labels: BTreeMap::new(),
    }
}

/// What the supervisor should do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start (or adopt) the slot's instance.
    Start(Box<InstanceSpec>),
    /// Stop, then remove, an instance this node no longer runs.
    Remove {
        /// Its id.
        instance_id: String,
        /// Stop grace, ms.
        grace_ms: u64,
    },
}

/// Where a slot stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    /// Restart bookkeeping.
    pub restarts: RestartTracker,
    /// Not before this time may it start again (backoff), ms.
    pub not_before_ms: u64,
    /// The policy said no more restarts.
    pub stopped_for_good: bool,
    /// Last seen running (an exit is a transition from this).
    pub running: bool,
    /// Readiness as the health actor last said.
    pub ready: bool,
    /// The instance's address.
    pub address: Option<String>,
    /// The instance id last started.
    pub instance_id: String,
    /// Its ports by name.
    pub ports: BTreeMap<String, std::net::SocketAddr>,
    /// The version it runs.
    pub version: u64,
    /// A start is in flight.
    pub starting: bool,
}

/// An event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Kind: `started`, `exited`, `restart`, `backoff`, `gave-up`, `stopped`.
    pub kind: &'static str,
    /// Service.
    pub service: String,
    /// Text.
    pub message: String,
}

/// The sans-I/O supervisor state for one node.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Slot states by (service, slot).
    pub slots: BTreeMap<(String, u32), SlotState>,
    /// Events to record, drained by the actor.
    pub notes: Vec<Note>,
}

impl Reconciler {
    /// Compares desired slots with the runtime's instances at `now_ms`; returns actions.
    pub fn plan(
        &mut self,
        node: &str,
        host_ip: Option<IpAddr>,
        desired: &[SlotWork],
        actual: &[InstanceInfo],
        extra_env: &BTreeMap<String, String>,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let wanted: BTreeMap<String, &SlotWork> = desired
            .iter()
            .map(|w| (instance_id(&w.service, w.slot, w.version), w))
            .collect();
        let by_id: BTreeMap<&str, &InstanceInfo> =
            actual.iter().map(|i| (i.instance_id.as_str(), i)).collect();
        // Instances nobody wants any more are stopped and removed.
        for info in actual {
            if !wanted.contains_key(&info.instance_id) {
                let grace_ms = desired
                    .iter()
                    .find(|w| w.service == info.service)
                    .map_or(10_000, |w| w.spec.stop_grace.as_millis() as u64);
                actions.push(Action::Remove {
                    instance_id: info.instance_id.clone(),
                    grace_ms,
                });
            }
        }
        // Slots no longer assigned here are forgotten.
        let keys: BTreeSet<(String, u32)> = desired
            .iter()
            .map(|w| (w.service.clone(), w.slot))
            .collect();
        self.slots.retain(|k, _| keys.contains(k));
        for (id, work) in wanted {
            let key = (work.service.clone(), work.slot);
            let st = self.slots.entry(key).or_default();
            if st.version != work.version || st.instance_id != id {
                // A new slot, or a new version of it: fresh restart bookkeeping.
                *st = SlotState {
                    version: work.version,
                    instance_id: id.clone(),
                    ..SlotState::default()
                };
            }
            match by_id.get(id.as_str()).map(|i| &i.state) {
                Some(InstanceState::Running) => {
                    if !st.running {
                        st.running = true;
                        st.restarts.started(now_ms);
                    }
                    let info = by_id[id.as_str()];
                    st.address = info.ports.first().map(|p| p.local_addr().to_string());
                    st.ports = info
                        .ports
                        .iter()
                        .map(|p| (p.name.clone(), p.local_addr()))
                        .collect();
                }
                Some(InstanceState::Exited { code, oom_killed }) => {
                    let exit = if *oom_killed {
                        Exit::OomKilled
                    } else {
                        Exit::Code(code.unwrap_or(-1))
                    };
                    if st.running {
                        self.exited_slot(&work.service, work.slot, exit, now_ms, &work.spec);
                    }
                    let Some(st) = self.slots.get_mut(&(work.service.clone(), work.slot)) else {
                        continue;
                    };
                    if !st.stopped_for_good && !st.starting && now_ms >= st.not_before_ms {
                        st.starting = true;
                        actions.push(Action::Start(Box::new(instance_spec(
                            node, host_ip, work, extra_env,
                        ))));
                    }
                }
                Some(InstanceState::Created | InstanceState::Paused) | None => {
                    if !st.stopped_for_good && !st.starting && now_ms >= st.not_before_ms {
                        st.starting = true;
                        actions.push(Action::Start(Box::new(instance_spec(
                            node, host_ip, work, extra_env,
                        ))));
                    }
                }
            }
        }
        actions
    }

    /// The instance of a slot ended; applies the restart policy. Returns the time at which a
    /// start is allowed again, if any.
    pub fn exited_slot(
        &mut self,
        service: &str,
        slot: u32,
        exit: Exit,
        now_ms: u64,
        spec: &ServiceSpec,
    ) -> Option<u64> {
        let st = self.slots.get_mut(&(service.to_string(), slot))?;
        if !st.running {
            return None;
        }
        st.running = false;
        st.ready = false;
        let what = match exit {
            Exit::Code(c) => format!("exited with code {c}"),
            Exit::OomKilled => "was killed for memory".to_string(),
            Exit::Unhealthy => "failed its liveness probe".to_string(),
        };
        let note = |kind, message| Note {
            kind,
            service: service.to_string(),
            message,
        };
        self.notes.push(note(
            "exited",
            format!("{service}/{slot} ({}) {what}", st.instance_id),
        ));
        match st.restarts.exited(now_ms, exit, &spec.restart) {
            Decision::RestartNow => {
                st.not_before_ms = now_ms;
                self.notes.push(note(
                    "restart",
                    format!(
                        "{service}/{slot} restarting at once (restart {})",
                        st.restarts.total
                    ),
                ));
                Some(now_ms)
            }
            Decision::RestartAt(at) => {
                st.not_before_ms = at;
                self.notes.push(note(
                    "backoff",
                    format!(
                        "{service}/{slot} restarting in {} ms (restart {}, {} in a row)",
                        at - now_ms,
                        st.restarts.total,
                        st.restarts.consecutive
                    ),
                ));
                Some(at)
            }
            Decision::Stay => {
                st.stopped_for_good = true;
                self.notes.push(note(
                    "stopped",
                    format!("{service}/{slot} stays exited (restart policy)"),
                ));
                None
            }
            Decision::GiveUp { attempts } => {
                st.stopped_for_good = true;
                self.notes.push(note(
                    "gave-up",
                    format!("{service}/{slot} gave up after {attempts} restarts in a row"),
                ));
                None
            }
        }
    }

    /// A start finished.
    pub fn started(
        &mut self,
        spec: &ServiceSpec,
        slot: u32,
        result: Result<&InstanceInfo, String>,
        now_ms: u64,
    ) {
        let service = spec.name.as_str();
        let Some(st) = self.slots.get_mut(&(service.to_string(), slot)) else {
            return;
        };
        st.starting = false;
        match result {
            Ok(info) if info.state.is_running() => {
                if !st.running {
                    st.running = true;
                    st.restarts.started(now_ms);
                    self.notes.push(Note {
                        kind: "started",
                        service: service.to_string(),
                        message: format!("{service}/{slot} ({}) running", info.instance_id),
                    });
                }
                st.address = info.ports.first().map(|p| p.local_addr().to_string());
                st.ports = info
                    .ports
                    .iter()
                    .map(|p| (p.name.clone(), p.local_addr()))
                    .collect();
            }
            Ok(_) => {}
            Err(e) => {
                // Failing to start counts as a failed run, so the backoff applies.
                st.running = true;
                st.restarts.started(now_ms);
                self.notes.push(Note {
                    kind: "start-failed",
                    service: service.to_string(),
                    message: format!("{service}/{slot}: {e}"),
                });
                self.exited_slot(service, slot, Exit::Code(-1), now_ms, spec);
            }
        }
    }

    /// The slot whose current instance has this id.
    pub fn slot_of(&self, instance_id: &str) -> Option<(String, u32)> {
        self.slots
            .iter()
            .find(|(_, st)| st.instance_id == instance_id)
            .map(|(k, _)| k.clone())
    }

    /// The status report of every slot.
    pub fn reports(&self) -> Vec<InstanceReport> {
        self.slots
            .iter()
            .map(|((service, slot), st)| InstanceReport {
                service: service.clone(),
                slot: *slot,
                version: st.version,
                instance_id: st.instance_id.clone(),
                state: if st.running {
                    "running".into()
                } else if st.stopped_for_good {
                    "exited".into()
                } else if st.starting {
                    "starting".into()
                } else {
                    "backoff".into()
                },
                ready: st.running && st.ready,
                restarts: st.restarts.total,
                address: st.address.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn an_instance_gets_the_service_addresses_but_its_own_env_wins() {
        let mut spec = ServiceSpec::with_image("web", "shoal-test/web:1");
        spec.env
            .insert("SHOAL_SERVICE_DB_ADDR".into(), "mine".into());
        let work = SlotWork {
            service: "web".into(),
            slot: 2,
            version: 3,
            spec: Arc::new(spec),
        };
        let extra = BTreeMap::from([
            (
                "SHOAL_SERVICE_DB_ADDR".to_string(),
                "127.0.0.1:5432".to_string(),
            ),
            (
                "SHOAL_SERVICE_API_ADDR".to_string(),
                "127.0.0.1:18080".to_string(),
            ),
        ]);
        let s = instance_spec("n1", None, &work, &extra);
        assert_eq!(s.instance_id, "web.2.v3");
        assert_eq!(s.env["SHOAL_SERVICE_API_ADDR"], "127.0.0.1:18080");
        assert_eq!(s.env["SHOAL_SERVICE_DB_ADDR"], "mine");
        assert_eq!(s.env["SHOAL_SLOT"], "2");
    }
}

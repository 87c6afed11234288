//! The Health actor, on every node: probes this node's running instances (HTTP GET, TCP connect,
//! exec) on the schedule [`crate::health::HealthTracker`] gives, and sends its verdicts — restart
//! (liveness or startup failing) or readiness changes — to the supervisor. Each probe runs as a
//! future beside the actor with its own timeout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use shoal_config::{Check, ServiceSpec};
use shoal_runtime::ContainerRuntime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::health::{HealthTracker, ProbeKind, Verdict};
use crate::supervisor::ProbeVerdict;

/// One running instance to watch.
#[derive(Clone, Debug)]
pub struct Watch {
    /// Its id.
    pub instance_id: String,
    /// Its service's spec (the probes).
    pub spec: Arc<ServiceSpec>,
    /// Its ports by name.
    pub ports: BTreeMap<String, SocketAddr>,
}

/// The complete set of running instances to watch; instances not in it are dropped.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct HealthSet(pub Vec<Watch>);

struct Watched {
    watch: Watch,
    tracker: HealthTracker,
    inflight: HashSet<ProbeKind>,
}

/// The Health actor.
pub struct Health {
    runtime: Arc<dyn ContainerRuntime>,
    verdicts: Recipient<ProbeVerdict>,
    watched: HashMap<String, Watched>,
    clock: Instant,
    tick: Duration,
}

impl Health {
    /// A health actor sending verdicts to `verdicts`, checking for due probes every `tick`.
    pub fn new(
        runtime: Arc<dyn ContainerRuntime>,
        verdicts: Recipient<ProbeVerdict>,
        tick: Duration,
    ) -> Self {
        Health {
            runtime,
            verdicts,
            watched: HashMap::new(),
            clock: Instant::now(),
            tick,
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn run_due(&mut self, ctx: &mut Context<Self>) {
        let now = self.now_ms();
        let mut launches = Vec::new();
        for (id, w) in &mut self.watched {
            for kind in w.tracker.due(now) {
                if w.inflight.insert(kind)
                    && let Some(probe) = w.tracker.probe(kind)
                {
                    launches.push((id.clone(), kind, probe.clone(), w.watch.ports.clone()));
                }
            }
        }
        for (id, kind, probe, ports) in launches {
            let runtime = self.runtime.clone();
            let timeout = probe.timeout;
            let check_id = id.clone();
            let fut = async move {
                let check = async {
                    match probe.check() {
                        Some(Check::Http(h)) => match ports.get(&h.port) {
                            Some(addr) => http_ok(*addr, &h.path).await,
                            None => false,
                        },
                        Some(Check::Tcp(t)) => match ports.get(&t.port) {
                            Some(addr) => TcpStream::connect(addr).await.is_ok(),
                            None => false,
                        },
                        Some(Check::Exec(e)) => runtime
                            .exec(&check_id, &e.command, timeout)
                            .await
                            .is_ok_and(|o| o.exit_code == 0),
                        None => false,
                    }
                };
                tokio::time::timeout(timeout, check).await.unwrap_or(false)
            };
            ctx.spawn(fut.into_actor(self).map(move |ok, act, _| {
                let now = act.now_ms();
                let Some(w) = act.watched.get_mut(&id) else {
                    return;
                };
                w.inflight.remove(&kind);
                let verdict = w.tracker.record(kind, ok, now);
                if verdict != Verdict::Nothing {
                    act.verdicts.do_send(ProbeVerdict {
                        instance_id: id.clone(),
                        verdict,
                    });
                }
            }));
        }
    }
}

/// An HTTP/1.1 GET; true for a 2xx or 3xx status.
async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: shoal-probe\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    head.starts_with("HTTP/1.") && code.is_some_and(|c| (200..400).contains(&c))
}

impl Actor for Health {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.tick, |act, ctx| act.run_due(ctx));
    }
}

impl Handler<HealthSet> for Health {
    type Result = ();
    fn handle(&mut self, HealthSet(watches): HealthSet, ctx: &mut Context<Self>) {
        let now = self.now_ms();
        let ids: HashSet<String> = watches.iter().map(|w| w.instance_id.clone()).collect();
        self.watched.retain(|id, _| ids.contains(id));
        for w in watches {
            match self.watched.get_mut(&w.instance_id) {
                Some(existing) => existing.watch = w,
                None => {
                    let tracker = HealthTracker::new(&w.spec.health, now);
                    if tracker.ready() {
                        // No readiness probe: running means ready.
                        self.verdicts.do_send(ProbeVerdict {
                            instance_id: w.instance_id.clone(),
                            verdict: Verdict::Ready(true),
                        });
                    }
                    self.watched.insert(
                        w.instance_id.clone(),
                        Watched {
                            watch: w,
                            tracker,
                            inflight: HashSet::new(),
                        },
                    );
                }
            }
        }
        self.run_due(ctx);
    }
}

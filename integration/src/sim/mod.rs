//! A deterministic simulation of many membership cores in one process: a virtual clock, one
//! event heap, a seeded RNG and an in-memory network with loss, delay and partitions. It drives
//! the real [`MembershipCore`] — no sockets, no tokio, no wall clock — so a run is a pure
//! function of its seed.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_membership::core::{
    CoreConfig, Effects, Input, MemberEvent, MemberState, MembershipCore, PeerMeta, TimerEvent,
};
use shoal_membership::identity::{NodeIdBytes, NodeIdentity};

/// Network and run parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// RNG seed: the same seed gives the same run.
    pub seed: u64,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Smallest one-way delay.
    pub delay_min: Duration,
    /// Largest one-way delay (uniform between the two).
    pub delay_max: Duration,
    /// The membership preset every node uses.
    pub core: CoreConfig,
}

impl SimConfig {
    /// A LAN: no loss, 0.1–1 ms delay, the LAN preset.
    pub fn lan(seed: u64) -> Self {
        Self {
            seed,
            loss: 0.0,
            delay_min: Duration::from_micros(100),
            delay_max: Duration::from_millis(1),
            core: CoreConfig::lan(),
        }
    }
}

/// Network counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Bytes sent (SWIM payload, before any link overhead).
    pub bytes_sent: u64,
    /// Datagrams lost to random loss.
    pub lost: u64,
    /// Datagrams dropped by a partition or because the receiver is down.
    pub blocked: u64,
    /// Datagrams delivered.
    pub delivered: u64,
}

enum Event {
    Deliver {
        to: usize,
        from: NodeIdBytes,
        bytes: Bytes,
    },
    Timer {
        node: usize,
        life: u32,
        ev: TimerEvent,
    },
}

struct Scheduled {
    at: Duration,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse for earliest first, FIFO among equal times.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct SimNode {
    core: MembershipCore,
    up: bool,
    life: u32,
    seeds: Vec<usize>,
}

/// One membership event seen by one node at one virtual time.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Virtual time.
    pub at: Duration,
    /// The node that saw it.
    pub node: usize,
    /// What it saw.
    pub event: MemberEvent,
}

/// The simulation.
pub struct Sim {
    cfg: SimConfig,
    now: Duration,
    seq: u64,
    heap: BinaryHeap<Scheduled>,
    rng: StdRng,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    groups: Option<Vec<u32>>,
    /// Network counters.
    pub stats: NetStats,
    /// Every membership event, in order.
    pub log: Vec<Observed>,
}

/// The node id of simulated node `i` (never zero).
pub fn node_id(i: usize) -> NodeIdBytes {
    ((i as u128) + 1).to_be_bytes()
}

/// The (never contacted) address of simulated node `i`.
pub fn node_addr(i: usize) -> SocketAddr {
    let i = i as u32;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 77, (i >> 8) as u8, (i & 0xff) as u8),
        7946,
    ))
}

impl Sim {
    /// An empty simulation.
    pub fn new(cfg: SimConfig) -> Self {
        Self {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            now: Duration::ZERO,
            seq: 0,
            heap: BinaryHeap::new(),
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            groups: None,
            stats: NetStats::default(),
            log: Vec::new(),
        }
    }

    /// The virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Number of nodes ever added.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was added.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Adds and starts a node that announces to `seeds` (node indices); returns its index.
    pub fn add_node(&mut self, seeds: &[usize]) -> usize {
        let i = self.nodes.len();
        let core = self.make_core(i, 1, seeds);
        self.by_addr.insert(node_addr(i), i);
        self.nodes.push(SimNode {
            core,
            up: true,
            life: 0,
            seeds: seeds.to_vec(),
        });
        let fx = self.nodes[i].core.start(self.now);
        self.apply(i, fx);
        i
    }

    fn make_core(&mut self, i: usize, epoch: u64, seeds: &[usize]) -> MembershipCore {
        let id = NodeIdentity::new(node_id(i), node_addr(i), epoch);
        let meta = PeerMeta {
            name: format!("sim-{i}"),
            labels: Default::default(),
        };
        let rng_seed = self.rng.random::<u64>();
        MembershipCore::new(
            id,
            self.cfg.core.clone(),
            seeds.iter().map(|s| node_addr(*s)).collect(),
            rng_seed,
            meta,
        )
    }

    /// Crashes node `i` (no goodbye; its timers and inbound datagrams are lost).
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].up = false;
        self.nodes[i].life += 1;
    }

    /// Restarts a crashed node with a new boot epoch (a process restart).
    pub fn restart(&mut self, i: usize) {
        let epoch = self.nodes[i].core.identity().boot_epoch + 1_000;
        let seeds = self.nodes[i].seeds.clone();
        let core = self.make_core(i, epoch, &seeds);
        let n = &mut self.nodes[i];
        n.core = core;
        n.up = true;
        n.life += 1;
        let fx = self.nodes[i].core.start(self.now);
        self.apply(i, fx);
    }

    /// Makes node `i` leave gracefully, then stops it.
    pub fn leave(&mut self, i: usize) {
        let fx = self.nodes[i].core.handle(Input::Leave, self.now);
        self.apply(i, fx);
        self.crash(i);
    }

    /// Splits the network: datagrams flow only between nodes with the same group number.
    /// `group(i)` is asked for every node.
    pub fn partition(&mut self, group: impl Fn(usize) -> u32) {
        self.groups = Some((0..self.nodes.len()).map(group).collect());
    }

    /// Removes the partition.
    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// The core of node `i`.
    pub fn core(&self, i: usize) -> &MembershipCore {
        &self.nodes[i].core
    }

    /// Whether node `i` is running.
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].up
    }

    /// How node `observer` sees node `subject` (`None`: unknown).
    pub fn state_of(&self, observer: usize, subject: usize) -> Option<MemberState> {
        let id = node_id(subject);
        self.nodes[observer]
            .core
            .members()
            .into_iter()
            .find(|m| m.identity.node_id == id)
            .map(|m| m.state)
    }

    /// Number of active members node `i` knows, itself included.
    pub fn active_view(&self, i: usize) -> usize {
        self.nodes[i].core.num_active() + 1
    }

    /// Runs until virtual time `t`.
    pub fn run_until(&mut self, t: Duration) {
        while let Some(top) = self.heap.peek() {
            if top.at > t {
                break;
            }
            let Some(s) = self.heap.pop() else { break };
            self.now = s.at;
            self.dispatch(s.event);
        }
        self.now = self.now.max(t);
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let t = self.now + d;
        self.run_until(t);
    }

    /// Runs until `cond` holds (checked every `step`) or `limit` passes; returns whether it held.
    pub fn run_until_cond(
        &mut self,
        limit: Duration,
        step: Duration,
        mut cond: impl FnMut(&Sim) -> bool,
    ) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if cond(self) {
                return true;
            }
            self.run_for(step);
        }
        cond(self)
    }

    fn push(&mut self, at: Duration, event: Event) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Deliver { to, from, bytes } => {
                if !self.nodes[to].up {
                    self.stats.blocked += 1;
                    return;
                }
                self.stats.delivered += 1;
                let now = self.now;
                let fx = self.nodes[to].core.handle(
                    Input::Datagram {
                        from: Some(from),
                        bytes: &bytes,
                    },
                    now,
                );
                self.apply(to, fx);
            }
            Event::Timer { node, life, ev } => {
                if !self.nodes[node].up || self.nodes[node].life != life {
                    return;
                }
                let now = self.now;
                let fx = self.nodes[node].core.handle(Input::Timer(ev), now);
                self.apply(node, fx);
            }
        }
    }

    fn apply(&mut self, i: usize, fx: Effects) {
        let from = self.nodes[i].core.identity().node_id;
        for (addr, bytes) in fx.sends {
            self.stats.sent += 1;
            self.stats.bytes_sent += bytes.len() as u64;
            let Some(&to) = self.by_addr.get(&addr) else {
                self.stats.blocked += 1;
                continue;
            };
            if let Some(g) = &self.groups
                && g.get(i) != g.get(to)
            {
                self.stats.blocked += 1;
                continue;
            }
            if self.cfg.loss > 0.0 && self.rng.random::<f64>() < self.cfg.loss {
                self.stats.lost += 1;
                continue;
            }
            let lo = self.cfg.delay_min.as_nanos() as u64;
            let hi = self.cfg.delay_max.as_nanos() as u64;
            let delay = if hi > lo {
                self.rng.random_range(lo..=hi)
            } else {
                lo
            };
            let at = self.now + Duration::from_nanos(delay);
            self.push(at, Event::Deliver { to, from, bytes });
        }
        let life = self.nodes[i].life;
        for (delay, ev) in fx.timers {
            let at = self.now + delay;
            self.push(at, Event::Timer { node: i, life, ev });
        }
        for event in fx.events {
            self.log.push(Observed {
                at: self.now,
                node: i,
                event,
            });
        }
    }
}

/// The `p`-th percentile (0–100) of `values` (nearest rank); `None` if empty.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

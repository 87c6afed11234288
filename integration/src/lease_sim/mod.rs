//! A deterministic simulation of the leader lease: many nodes in one process, a virtual real
//! time, per-node clocks running at different rates, an in-memory network with loss, delay and
//! partitions, process pauses and crash-restarts — driving the real sans-I/O lease state
//! machines from `shoal_membership::lease`.
//!
//! The checker records, for every lease a node believes it holds, the real-time interval it
//! believes so (its local expiry converted with its clock rate), and reports any two intervals
//! of different (holder, epoch) that overlap.
//!
//! [`state`] simulates cluster-state convergence the same way.

pub mod state;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_membership::lease::{
    Candidate, LeaseConfig, LeaseEvent, LeaseReply, LeaseRequest, Voter, VoterDurable,
};

/// What a run is made of.
#[derive(Clone, Debug)]
pub struct LeaseSimConfig {
    /// Number of nodes (all voters).
    pub nodes: usize,
    /// RNG seed.
    pub seed: u64,
    /// The lease parameters every node uses.
    pub lease: LeaseConfig,
    /// The real clock-rate spread: each node's clock runs at a rate drawn from
    /// [1 − actual_drift, 1 + actual_drift]. Within the bound when ≤ `lease.drift`.
    pub actual_drift: f64,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Message delay range, ms (a few messages get up to 10× this).
    pub delay_ms: (u64, u64),
    /// Random partitions.
    pub partitions: bool,
    /// Random process pauses (up to 2 × T).
    pub pauses: bool,
    /// Random crash-restarts.
    pub crashes: bool,
    /// Virtual duration of the run.
    pub duration: Duration,
}

impl LeaseSimConfig {
    /// A chaotic run: 5 nodes, 5 % loss, partitions, pauses, crashes, drift within the bound.
    pub fn chaos(seed: u64) -> Self {
        Self {
            nodes: 5,
            seed,
            lease: LeaseConfig::default(),
            actual_drift: LeaseConfig::default().drift,
            loss: 0.05,
            delay_ms: (1, 40),
            partitions: true,
            pauses: true,
            crashes: true,
            duration: Duration::from_secs(60),
        }
    }

    /// A calm run (no loss, no faults) for scripted scenarios.
    pub fn calm(nodes: usize, seed: u64) -> Self {
        Self {
            nodes,
            seed,
            lease: LeaseConfig::default(),
            actual_drift: LeaseConfig::default().drift,
            loss: 0.0,
            delay_ms: (1, 5),
            partitions: false,
            pauses: false,
            crashes: false,
            duration: Duration::from_secs(60),
        }
    }
}

/// One lease as believed by its holder, in real (virtual) time, microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseInterval {
    /// The holder.
    pub holder: usize,
    /// The epoch.
    pub epoch: u64,
    /// When it was acquired (or renewed).
    pub start_us: u64,
    /// When the holder's clock says it ends.
    pub end_us: u64,
}

/// What a run produced.
#[derive(Clone, Debug, Default)]
pub struct LeaseSimReport {
    /// Every lease acquisition and renewal.
    pub intervals: Vec<LeaseInterval>,
    /// Pairs of overlapping intervals of different (holder, epoch).
    pub violations: Vec<(LeaseInterval, LeaseInterval)>,
    /// Events processed.
    pub events: u64,
    /// Distinct epochs that had a holder.
    pub epochs: usize,
}

#[derive(Clone, Debug)]
enum Msg {
    Request(LeaseRequest),
    Reply(LeaseReply),
}

#[derive(Clone, Debug)]
enum Event {
    Tick(usize),
    Deliver { to: usize, from: usize, msg: Msg },
    Chaos,
    Restart(usize),
}

struct Node {
    id: [u8; 16],
    rate: f64,
    offset_us: u64,
    up: bool,
    paused_until: u64,
    durable: VoterDurable,
    voter: Voter,
    cand: Candidate,
}

/// A running simulation.
pub struct LeaseSim {
    cfg: LeaseSimConfig,
    rng: StdRng,
    now_us: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    nodes: Vec<Node>,
    group: Vec<usize>,
    report: LeaseSimReport,
}

fn node_id(i: usize) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[15] = i as u8;
    id[0] = 0x10;
    id
}

impl LeaseSim {
    /// A simulation; nothing runs until [`LeaseSim::run_until`].
    pub fn new(cfg: LeaseSimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut nodes = Vec::new();
        for i in 0..cfg.nodes {
            let rate = 1.0 + (rng.random::<f64>() * 2.0 - 1.0) * cfg.actual_drift;
            let offset_us = rng.random_range(0..1_000_000_000u64);
            let local = Duration::from_micros(offset_us);
            nodes.push(Node {
                id: node_id(i),
                rate,
                offset_us,
                up: true,
                paused_until: 0,
                durable: VoterDurable::default(),
                voter: Voter::new(node_id(i), cfg.lease, VoterDurable::default(), local),
                cand: Candidate::new(node_id(i), cfg.lease, 0),
            });
        }
        let mut sim = Self {
            group: vec![0; cfg.nodes],
            cfg,
            rng,
            now_us: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            nodes,
            report: LeaseSimReport::default(),
        };
        for i in 0..sim.nodes.len() {
            let t = sim.rng.random_range(0..100_000);
            sim.schedule(t, Event::Tick(i));
        }
        if sim.cfg.partitions || sim.cfg.pauses || sim.cfg.crashes {
            let t = sim.rng.random_range(1_000_000..5_000_000);
            sim.schedule(t, Event::Chaos);
        }
        sim
    }

    /// Every node's clock rate.
    pub fn rates(&self) -> Vec<f64> {
        self.nodes.iter().map(|n| n.rate).collect()
    }

    fn schedule(&mut self, after_us: u64, e: Event) {
        self.seq += 1;
        let idx = self.events.len();
        self.events.push(Some(e));
        self.queue
            .push(Reverse((self.now_us + after_us, self.seq, idx)));
    }

    fn local(&self, i: usize) -> Duration {
        let n = &self.nodes[i];
        Duration::from_micros(n.offset_us + (self.now_us as f64 * n.rate) as u64)
    }

    /// Virtual time now.
    pub fn now(&self) -> Duration {
        Duration::from_micros(self.now_us)
    }

    /// Runs events up to virtual time `t`.
    pub fn run_until(&mut self, t: Duration) {
        let end = t.as_micros() as u64;
        while let Some(Reverse((at, _, idx))) = self.queue.peek().copied() {
            if at > end {
                break;
            }
            self.queue.pop();
            self.now_us = at;
            if let Some(e) = self.events[idx].take() {
                self.report.events += 1;
                self.handle(e);
            }
        }
        self.now_us = end;
    }

    /// Splits the network: `groups[i]` is node i's side; messages cross no side.
    pub fn partition(&mut self, groups: &[usize]) {
        self.group = groups.to_vec();
    }

    /// Heals every partition.
    pub fn heal(&mut self) {
        self.group = vec![0; self.nodes.len()];
    }

    /// Crashes node `i` (it loses everything but its voter's persisted epoch).
    pub fn crash(&mut self, i: usize) {
        self.kill(i);
    }

    /// The process dies: whatever lease it believed it held dies with it (the interval ends
    /// now), while the voters' promises to it keep running.
    fn kill(&mut self, i: usize) {
        self.nodes[i].up = false;
        let now = self.now_us;
        for iv in self.report.intervals.iter_mut() {
            if iv.holder == i && iv.end_us > now {
                iv.end_us = now;
            }
        }
    }

    /// Restarts a crashed node now.
    pub fn restart(&mut self, i: usize) {
        self.do_restart(i);
    }

    /// The nodes that believe they lead now, with their epochs.
    pub fn leaders_now(&self) -> Vec<(usize, u64)> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .filter_map(|i| self.nodes[i].cand.leading(self.local(i)).map(|e| (i, e)))
            .collect()
    }

    /// Finishes the run: computes violations.
    pub fn finish(mut self) -> LeaseSimReport {
        let iv = &self.report.intervals;
        let mut v = Vec::new();
        for (a_i, a) in iv.iter().enumerate() {
            for b in iv.iter().skip(a_i + 1) {
                let same = a.holder == b.holder && a.epoch == b.epoch;
                if !same && a.start_us < b.end_us && b.start_us < a.end_us {
                    v.push((*a, *b));
                }
            }
        }
        self.report.violations = v;
        let mut epochs: Vec<u64> = iv.iter().map(|i| i.epoch).collect();
        epochs.sort_unstable();
        epochs.dedup();
        self.report.epochs = epochs.len();
        self.report
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.group[a] == self.group[b]
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if from == to {
            self.schedule(0, Event::Deliver { to, from, msg });
            return;
        }
        if !self.reachable(from, to) || self.rng.random::<f64>() < self.cfg.loss {
            return;
        }
        let (lo, hi) = self.cfg.delay_ms;
        let mut d = self.rng.random_range(lo..=hi) * 1000;
        if self.rng.random::<f64>() < 0.02 {
            d *= 10;
        }
        self.schedule(d, Event::Deliver { to, from, msg });
    }

    fn should_try(&mut self, i: usize) -> bool {
        // The node's failure-detector view: the up nodes on its side, each missed with a small
        // probability (views are not exact); it tries when it sees no lower id.
        for j in 0..i {
            if self.nodes[j].up && self.reachable(i, j) && self.rng.random::<f64>() > 0.05 {
                return false;
            }
        }
        true
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::Tick(i) => {
                let next = self.rng.random_range(80_000..150_000);
                if !self.nodes[i].up {
                    return;
                }
                if self.now_us < self.nodes[i].paused_until {
                    let wait = self.nodes[i].paused_until - self.now_us;
                    self.schedule(wait, Event::Tick(i));
                    return;
                }
                self.schedule(next, Event::Tick(i));
                let try_ = self.should_try(i);
                let now = self.local(i);
                let n = self.nodes.len();
                if let Some(req) = self.nodes[i].cand.tick(now, try_, n) {
                    for j in 0..n {
                        self.send(i, j, Msg::Request(req));
                    }
                }
            }
            Event::Deliver { to, from, msg } => {
                if !self.nodes[to].up {
                    return;
                }
                if self.now_us < self.nodes[to].paused_until {
                    let wait = self.nodes[to].paused_until - self.now_us;
                    self.schedule(wait, Event::Deliver { to, from, msg });
                    return;
                }
                let now = self.local(to);
                match msg {
                    Msg::Request(req) => {
                        let reply = self.nodes[to].voter.handle(&req, now);
                        // Persisted before the reply leaves.
                        self.nodes[to].durable = self.nodes[to].voter.durable();
                        self.send(to, from, Msg::Reply(reply));
                    }
                    Msg::Reply(reply) => {
                        if let Some(LeaseEvent::Acquired { epoch, until, .. }) =
                            self.nodes[to].cand.on_reply(&reply, now)
                        {
                            let left = until.saturating_sub(now).as_micros() as f64;
                            let end_us = self.now_us + (left / self.nodes[to].rate) as u64;
                            self.report.intervals.push(LeaseInterval {
                                holder: to,
                                epoch,
                                start_us: self.now_us,
                                end_us,
                            });
                        }
                    }
                }
            }
            Event::Chaos => {
                self.chaos();
                let t = self.rng.random_range(500_000..6_000_000);
                self.schedule(t, Event::Chaos);
            }
            Event::Restart(i) => self.do_restart(i),
        }
    }

    fn chaos(&mut self) {
        let n = self.nodes.len();
        let pick = self.rng.random_range(0..4u32);
        match pick {
            0 if self.cfg.partitions => {
                let groups: Vec<usize> = (0..n).map(|_| self.rng.random_range(0..2)).collect();
                self.group = groups;
            }
            1 if self.cfg.partitions => self.heal(),
            2 if self.cfg.pauses => {
                let i = self.rng.random_range(0..n);
                let max = (self.cfg.lease.duration.as_micros() as u64) * 2;
                let d = self.rng.random_range(100_000..max);
                self.nodes[i].paused_until = self.now_us + d;
            }
            3 if self.cfg.crashes => {
                let i = self.rng.random_range(0..n);
                if self.nodes[i].up {
                    self.kill(i);
                    let d = self.rng.random_range(200_000..8_000_000);
                    self.schedule(d, Event::Restart(i));
                }
            }
            _ => {}
        }
    }

    fn do_restart(&mut self, i: usize) {
        if self.nodes[i].up {
            return;
        }
        // A reboot: the monotonic clock starts from a new origin; only the voter's durable
        // state survives.
        self.nodes[i].offset_us = self.rng.random_range(0..1_000_000_000u64);
        let now = self.local(i);
        let d = self.nodes[i].durable;
        let id = self.nodes[i].id;
        self.nodes[i].voter = Voter::new(id, self.cfg.lease, d, now);
        self.nodes[i].cand = Candidate::new(id, self.cfg.lease, d.max_epoch);
        self.nodes[i].up = true;
        self.nodes[i].paused_until = 0;
        self.schedule(1_000, Event::Tick(i));
    }
}

/// Runs one whole randomized simulation.
pub fn run(cfg: LeaseSimConfig) -> LeaseSimReport {
    let d = cfg.duration;
    let mut sim = LeaseSim::new(cfg);
    sim.run_until(d);
    sim.finish()
}

//! A deterministic simulation of cluster-state convergence: nodes holding the real
//! [`DurableState`] (in-memory backend), deltas spread by push gossip with loss (as foca custom
//! broadcasts do: a record that was news is passed on to a few peers), anti-entropy rounds with
//! the real sync protocol, partitions, and per-node wall clocks with skew.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_config::ServiceSpec;
use shoal_membership::state::{DurableState, MemBackend, MergeOutcome, Record};
use shoal_membership::sync::protocol::sync_pair;

/// Parameters of a state simulation.
#[derive(Clone, Debug)]
pub struct StateSimConfig {
    /// Nodes.
    pub nodes: usize,
    /// RNG seed.
    pub seed: u64,
    /// Gossip message loss.
    pub loss: f64,
    /// Peers a node passes news to.
    pub fanout: usize,
    /// Delay of one gossip hop, ms (foca gossips every 200 ms).
    pub hop_ms: (u64, u64),
    /// Anti-entropy period per node, ms.
    pub anti_entropy_ms: u64,
    /// Wall-clock skew between nodes, ± ms.
    pub skew_ms: u64,
}

impl StateSimConfig {
    /// Defaults: 5 % loss, fanout 3, hops 50–250 ms, anti-entropy every 2 s, skew ±100 ms.
    pub fn new(nodes: usize, seed: u64) -> Self {
        Self {
            nodes,
            seed,
            loss: 0.05,
            fanout: 3,
            hop_ms: (50, 250),
            anti_entropy_ms: 2_000,
            skew_ms: 100,
        }
    }
}

enum Ev {
    Deliver(usize, Box<Record>),
    AntiEntropy(usize),
    SyncWith(usize, usize),
}

/// A running state simulation.
pub struct StateSim {
    cfg: StateSimConfig,
    rng: StdRng,
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Ev>>,
    /// The nodes' states.
    pub nodes: Vec<DurableState>,
    skew: Vec<i64>,
    group: Vec<usize>,
    /// Bytes moved by anti-entropy.
    pub sync_bytes: usize,
}

const EPOCH_MS: u64 = 1_800_000_000_000;

impl StateSim {
    /// A simulation with empty stores.
    pub fn new(cfg: StateSimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut nodes = Vec::new();
        let mut skew = Vec::new();
        for i in 0..cfg.nodes {
            let mut id = [0u8; 16];
            id[15] = i as u8;
            nodes.push(
                DurableState::open(id, Box::new(MemBackend::default())).expect("memory backend"),
            );
            let s = cfg.skew_ms as i64;
            skew.push(rng.random_range(-s..=s));
        }
        let mut sim = Self {
            group: vec![0; cfg.nodes],
            cfg,
            rng,
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            nodes,
            skew,
            sync_bytes: 0,
        };
        for i in 0..sim.nodes.len() {
            let t = sim.rng.random_range(0..sim.cfg.anti_entropy_ms);
            sim.schedule(t, Ev::AntiEntropy(i));
        }
        sim
    }

    fn schedule(&mut self, after: u64, e: Ev) {
        self.seq += 1;
        self.events.push(Some(e));
        self.queue.push(Reverse((
            self.now_ms + after,
            self.seq,
            self.events.len() - 1,
        )));
    }

    fn wall(&self, i: usize) -> u64 {
        (EPOCH_MS + self.now_ms).saturating_add_signed(self.skew[i])
    }

    /// Virtual time now.
    pub fn now(&self) -> Duration {
        Duration::from_millis(self.now_ms)
    }

    /// Splits the network (`groups[i]` is node i's side).
    pub fn partition(&mut self, groups: &[usize]) {
        self.group = groups.to_vec();
    }

    /// Heals the network. As in the agent, where SWIM reports the members of the other side
    /// up again, each node then runs one anti-entropy round with a node it could not reach
    /// (within a second: the time SWIM takes to see them).
    pub fn heal(&mut self) {
        let old = std::mem::replace(&mut self.group, vec![0; self.nodes.len()]);
        let n = self.nodes.len();
        for i in 0..n {
            let others: Vec<usize> = (0..n).filter(|&j| old[j] != old[i]).collect();
            if others.is_empty() {
                continue;
            }
            let j = others[self.rng.random_range(0..others.len())];
            let d = self.rng.random_range(0..1_000);
            self.schedule(d, Ev::SyncWith(i, j));
        }
    }

    fn sync(&mut self, i: usize, peer: usize) {
        if peer == i || self.group[peer] != self.group[i] {
            return;
        }
        let (a, b) = if i < peer {
            let (l, r) = self.nodes.split_at_mut(peer);
            (&mut l[i], &mut r[0])
        } else {
            let (l, r) = self.nodes.split_at_mut(i);
            (&mut r[0], &mut l[peer])
        };
        let (up, down) = sync_pair(&mut a.store, &mut b.store);
        self.sync_bytes += up + down;
    }

    /// Node `i` accepts a write of `spec` (as its API would) and gossips it.
    pub fn put(&mut self, i: usize, spec: ServiceSpec) {
        let wall = self.wall(i);
        let r = self.nodes[i]
            .put_service(spec, wall)
            .expect("memory backend");
        self.spread(i, r);
    }

    /// Node `i` deletes a service and gossips the tombstone.
    pub fn delete(&mut self, i: usize, name: &str) {
        let wall = self.wall(i);
        if let Some(r) = self.nodes[i]
            .delete_service(name, wall)
            .expect("memory backend")
        {
            self.spread(i, r);
        }
    }

    fn spread(&mut self, from: usize, r: Record) {
        let n = self.nodes.len();
        let mut peers: Vec<usize> = (0..n).filter(|&j| j != from).collect();
        for k in 0..self.cfg.fanout.min(peers.len()) {
            let pick = self.rng.random_range(k..peers.len());
            peers.swap(k, pick);
            let to = peers[k];
            if self.group[to] != self.group[from] || self.rng.random::<f64>() < self.cfg.loss {
                continue;
            }
            let (lo, hi) = self.cfg.hop_ms;
            let d = self.rng.random_range(lo..=hi);
            self.schedule(d, Ev::Deliver(to, Box::new(r.clone())));
        }
    }

    /// Runs to virtual time `t`.
    pub fn run_until(&mut self, t: Duration) {
        let end = t.as_millis() as u64;
        while let Some(Reverse((at, _, idx))) = self.queue.peek().copied() {
            if at > end {
                break;
            }
            self.queue.pop();
            self.now_ms = at;
            match self.events[idx].take() {
                Some(Ev::Deliver(to, r)) => {
                    let wall = self.wall(to);
                    if let Ok(MergeOutcome::Applied) =
                        self.nodes[to].merge_remote((*r).clone(), wall)
                    {
                        self.spread(to, *r);
                    }
                }
                Some(Ev::AntiEntropy(i)) => {
                    let n = self.nodes.len();
                    let peer = (i + self.rng.random_range(1..n.max(2))) % n;
                    self.sync(i, peer);
                    let p = self.cfg.anti_entropy_ms;
                    self.schedule(p, Ev::AntiEntropy(i));
                }
                Some(Ev::SyncWith(i, j)) => self.sync(i, j),
                None => {}
            }
        }
        self.now_ms = end;
    }

    /// Every node's state hash.
    pub fn digests(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.store.digest().state_hash())
            .collect()
    }

    /// Whether every node holds the same state.
    pub fn converged(&self) -> bool {
        let d = self.digests();
        d.iter().all(|x| *x == d[0])
    }
}

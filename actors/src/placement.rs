//! Placement: a pure function of (membership view, specs, current placements) → plan. The leader
//! runs it; every node would compute the same plan from the same inputs.
//!
//! A service's replicas are *slots*. Each round:
//! 1. A current assignment is kept while its node is still usable for it (not down past the
//!    reschedule grace, constraints still hold, resources still fit): nothing moves without a
//!    reason, so a change moves as few instances as possible.
//! 2. Surplus slots (scale down) are removed from the most crowded spread domains first.
//! 3. Missing slots take the smallest free slot numbers and go, one at a time, to the eligible
//!    node whose domains hold the fewest instances of the service at each level of the `spread`
//!    hierarchy (outermost first), then the fewest on the node, then the fewest instances of any
//!    service, then the highest rendezvous hash of (service, slot, node) — a stable tie-break.
//! 4. A service whose instances are all settled (running and ready, as the caller says) and whose
//!    spread is uneven by more than one between sibling domains gets **one** move per round toward
//!    even spread: when a node joins or comes back, the cluster rebalances gradually,
//!    health-gated.
//! 5. A slot that fits nowhere is *pending*, with the reason.
//!
//! [`check`] is the invariant checker every placement test runs; `tests/placement.rs` compares
//! the plan with a brute-force oracle on small clusters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use shoal_config::{Constraint, ServiceSpec};

/// A node's key in placements: stable across restarts (the node id, or its name in tests).
pub type NodeKey = String;

/// (service name, slot number).
pub type SlotKey = (String, u32);

/// What membership says of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeHealth {
    /// Alive: may receive new instances.
    Alive,
    /// Suspected: keeps its instances, receives no new ones.
    Suspect,
    /// Declared down at `since_ms`: its instances move once the reschedule grace has passed.
    Down {
        /// When it was declared down (milliseconds on the caller's clock).
        since_ms: u64,
    },
    /// Draining on the operator's request: keeps nothing new, its instances move now.
    Drain,
}

/// One node as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    /// Stable key.
    pub key: NodeKey,
    /// Node name (for `node.name` constraints).
    pub name: String,
    /// Node labels (constraints and spread).
    pub labels: BTreeMap<String, String>,
    /// CPU cores offered.
    pub cpu: f64,
    /// Memory offered, bytes.
    pub memory: u64,
    /// Membership state.
    pub health: NodeHealth,
}

/// One service to place.
#[derive(Clone, Debug)]
pub struct ServiceInput<'a> {
    /// Its spec.
    pub spec: &'a ServiceSpec,
    /// Its spec version (assignments made now carry it).
    pub version: u64,
    /// All its instances are running and ready: a rebalancing move is allowed.
    pub settled: bool,
}

/// Where a slot runs and which spec version it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The node.
    pub node: NodeKey,
    /// The spec version.
    pub version: u64,
}

/// Every assignment in the cluster.
pub type Placements = BTreeMap<SlotKey, Assignment>;

/// Everything placement looks at.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// The membership view.
    pub nodes: &'a [NodeView],
    /// The services (desired state).
    pub services: &'a [ServiceInput<'a>],
    /// The current placements.
    pub current: &'a Placements,
    /// Now, on the same clock as `NodeHealth::Down::since_ms`.
    pub now_ms: u64,
    /// How long a down node's instances wait before they move.
    pub reschedule_grace_ms: u64,
}

/// Why a change was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new slot was placed.
    Placed {
        /// The slot.
        slot: SlotKey,
        /// Its node.
        node: NodeKey,
    },
    /// A slot moved.
    Moved {
        /// The slot.
        slot: SlotKey,
        /// The node it left.
        from: NodeKey,
        /// The node it went to.
        to: NodeKey,
        /// Why.
        reason: String,
    },
    /// A slot was removed (scale down or service deleted).
    Removed {
        /// The slot.
        slot: SlotKey,
        /// The node it ran on.
        node: NodeKey,
    },
}

/// A slot that could not be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The slot.
    pub slot: SlotKey,
    /// Why, in words an operator can act on.
    pub reason: String,
}

/// The result of a placement round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The complete new placements.
    pub assignments: Placements,
    /// What changed, in order.
    pub changes: Vec<Change>,
    /// Slots that could not be placed.
    pub pending: Vec<Pending>,
}

/// 64-bit mix (splitmix64 finaliser): a cheap, stable hash for rendezvous tie-breaks.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn str_hash(s: &str) -> u64 {
    // FNV-1a, then mixed: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// The rendezvous weight of (service, slot) on a node: higher wins ties.
pub fn rendezvous(service_hash: u64, slot: u32, node_hash: u64) -> u64 {
    mix(service_hash ^ mix(u64::from(slot).wrapping_add(0x9e37_79b9_7f4a_7c15)) ^ node_hash)
}

impl NodeHealth {
    fn accepts_new(self) -> bool {
        self == NodeHealth::Alive
    }

    fn keeps_instances(self, now_ms: u64, grace_ms: u64) -> bool {
        match self {
            NodeHealth::Alive | NodeHealth::Suspect => true,
            NodeHealth::Down { since_ms } => now_ms.saturating_sub(since_ms) < grace_ms,
            NodeHealth::Drain => false,
        }
    }
}

fn reservation(spec: &ServiceSpec) -> (f64, u64) {
    (
        spec.resources.cpu,
        spec.resources.memory.map_or(0, |m| m.bytes()),
    )
}

const EPS: f64 = 1e-9;

/// Per-node running totals while a plan is built.
#[derive(Clone, Debug, Default)]
struct Usage {
    cpu: f64,
    memory: u64,
    instances: u32,
}

impl Usage {
    fn add(&mut self, (cpu, mem): (f64, u64), sign: i32) {
        if sign > 0 {
            self.cpu += cpu;
            self.memory = self.memory.saturating_add(mem);
            self.instances += 1;
        } else {
            self.cpu -= cpu;
            self.memory = self.memory.saturating_sub(mem);
            self.instances = self.instances.saturating_sub(1);
        }
    }
}

/// (count, child id) of the sparsest or most crowded child of a parent domain.
type Extreme = Option<(u32, u32)>;

/// Most spread levels a service may name (the config crate validates this).
const MAX_LEVELS: usize = shoal_config::MAX_SPREAD_LEVELS;

/// A placement score: spread counts per level, then this service on the node, then all
/// instances on the node. Compared lexicographically; lower is better.
type Score = [u32; MAX_LEVELS + 2];

/// The spread domains of every node for one spread hierarchy, interned per level.
struct Domains {
    /// For each node (global index), its domain id at each level.
    of_node: Vec<[u32; MAX_LEVELS]>,
    /// For each level, the parent domain id (at level - 1) of each domain id; level 0 → 0.
    parent: Vec<Vec<u32>>,
    /// For each innermost domain, its domain id at every level (itself last).
    ancestors: Vec<[u32; MAX_LEVELS]>,
}

impl Domains {
    fn new(levels: &[String], nodes: &[NodeView]) -> Self {
        let levels = &levels[..levels.len().min(MAX_LEVELS)];
        let mut ids: Vec<HashMap<(u32, &str), u32>> = vec![HashMap::new(); levels.len()];
        let mut parent: Vec<Vec<u32>> = vec![Vec::new(); levels.len()];
        let of_node: Vec<[u32; MAX_LEVELS]> = nodes
            .iter()
            .map(|n| {
                let mut out = [0u32; MAX_LEVELS];
                for (l, key) in levels.iter().enumerate() {
                    let up = if l == 0 { 0 } else { out[l - 1] };
                    let value = n.labels.get(key).map_or("", String::as_str);
                    let next = ids[l].len() as u32;
                    let id = *ids[l].entry((up, value)).or_insert(next);
                    if id == next {
                        parent[l].push(up);
                    }
                    out[l] = id;
                }
                out
            })
            .collect();
        // The ancestor chain of every innermost domain, to score a domain without its nodes.
        let inner = levels.len().checked_sub(1);
        let mut ancestors = vec![[0u32; MAX_LEVELS]; inner.map_or(0, |l| parent[l].len())];
        if let Some(last) = inner {
            for ids in &of_node {
                ancestors[ids[last] as usize] = *ids;
            }
        }
        Domains {
            of_node,
            parent,
            ancestors,
        }
    }
}

/// Everything about the cluster that does not depend on the service, computed once per round.
struct Cluster<'a> {
    nodes: &'a [NodeView],
    index: HashMap<&'a str, usize>,
    hash: Vec<u64>,
    domains: HashMap<&'a [String], Rc<Domains>>,
    matches: HashMap<&'a [Constraint], Rc<Vec<bool>>>,
    usage: Vec<Usage>,
}

impl<'a> Cluster<'a> {
    fn new(nodes: &'a [NodeView]) -> Self {
        Cluster {
            nodes,
            index: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.key.as_str(), i))
                .collect(),
            hash: nodes.iter().map(|n| str_hash(&n.key)).collect(),
            domains: HashMap::new(),
            matches: HashMap::new(),
            usage: vec![Usage::default(); nodes.len()],
        }
    }

    fn planner(
        &mut self,
        spec: &'a ServiceSpec,
        keep: impl Fn(&NodeView) -> bool,
    ) -> ServicePlanner<'a> {
        let nodes = self.nodes;
        let domains = self
            .domains
            .entry(&spec.placement.spread)
            .or_insert_with(|| Rc::new(Domains::new(&spec.placement.spread, nodes)))
            .clone();
        let matches = self
            .matches
            .entry(&spec.placement.constraints)
            .or_insert_with(|| {
                Rc::new(
                    nodes
                        .iter()
                        .map(|n| {
                            spec.placement
                                .constraints
                                .iter()
                                .all(|c| c.matches(&n.name, &n.labels))
                        })
                        .collect(),
                )
            })
            .clone();
        let eligible: Vec<usize> = (0..nodes.len())
            .filter(|i| matches[*i] && keep(&nodes[*i]))
            .collect();
        let mut local = vec![u32::MAX; nodes.len()];
        for (l, g) in eligible.iter().enumerate() {
            local[*g] = l as u32;
        }
        let counts = domains.parent.iter().map(|p| vec![0; p.len()]).collect();
        let levels = domains.parent.len();
        ServicePlanner {
            open_in: Vec::new(),
            open_now: Vec::new(),
            members: Vec::new(),
            name: &spec.name,
            spec,
            hash: str_hash(&spec.name),
            reservation: reservation(spec),
            levels,
            on_node: vec![0; eligible.len()],
            eligible,
            local,
            domains,
            counts,
        }
    }
}

struct ServicePlanner<'a> {
    name: &'a str,
    spec: &'a ServiceSpec,
    hash: u64,
    reservation: (f64, u64),
    levels: usize,
    /// Global indices of the nodes this service may use.
    eligible: Vec<usize>,
    /// Global index → index into `eligible` (`u32::MAX`: not eligible).
    local: Vec<u32>,
    domains: Rc<Domains>,
    /// Instances of this service per domain, per level.
    counts: Vec<Vec<u32>>,
    /// Instances of this service per eligible node.
    on_node: Vec<u32>,
    /// The eligible nodes of each innermost domain (indices into `eligible`).
    members: Vec<Vec<usize>>,
    /// Per eligible node: can take one more instance now (see [`ServicePlanner::refresh`]).
    open_now: Vec<bool>,
    /// Per innermost domain: how many of its nodes are open now.
    open_in: Vec<u32>,
}

impl ServicePlanner<'_> {
    /// Recomputes which nodes can take an instance; call once the usage of the services placed
    /// before this one is final. [`ServicePlanner::take`] keeps it current afterwards.
    fn refresh(&mut self, c: &Cluster<'_>) {
        if self.levels > 0 && self.members.is_empty() {
            self.members = vec![Vec::new(); self.domains.ancestors.len()];
            for i in 0..self.eligible.len() {
                let d = self.dom(i, self.levels - 1) as usize;
                self.members[d].push(i);
            }
        }
        self.open_now = (0..self.eligible.len()).map(|i| self.open(c, i)).collect();
        self.open_in = vec![0; self.members.len()];
        if self.levels > 0 {
            for i in 0..self.eligible.len() {
                if self.open_now[i] {
                    let d = self.dom(i, self.levels - 1) as usize;
                    self.open_in[d] += 1;
                }
            }
        }
    }

    fn local_of(&self, c: &Cluster<'_>, key: &str) -> Option<usize> {
        let g = *c.index.get(key)?;
        let l = self.local[g];
        (l != u32::MAX).then_some(l as usize)
    }

    fn dom(&self, i: usize, level: usize) -> u32 {
        self.domains.of_node[self.eligible[i]][level]
    }

    fn add(&mut self, i: usize, delta: i32) {
        for l in 0..self.levels {
            let d = self.dom(i, l) as usize;
            self.counts[l][d] = self.counts[l][d].saturating_add_signed(delta);
        }
        self.on_node[i] = self.on_node[i].saturating_add_signed(delta);
    }

    /// Records one more (or one fewer) instance on eligible node `i`.
    fn take(&mut self, c: &mut Cluster<'_>, i: usize, sign: i32) {
        c.usage[self.eligible[i]].add(self.reservation, sign);
        self.add(i, sign);
        if !self.open_now.is_empty() {
            let now = self.open(c, i);
            if now != self.open_now[i] {
                self.open_now[i] = now;
                if self.levels > 0 {
                    let d = self.dom(i, self.levels - 1) as usize;
                    self.open_in[d] = if now {
                        self.open_in[d] + 1
                    } else {
                        self.open_in[d] - 1
                    };
                }
            }
        }
    }

    /// The spread score of putting one more instance on node `i`: lower is better.
    fn score(&self, c: &Cluster<'_>, i: usize) -> Score {
        let mut s = [0u32; MAX_LEVELS + 2];
        for (l, slot) in s.iter_mut().enumerate().take(self.levels) {
            *slot = self.counts[l][self.dom(i, l) as usize];
        }
        s[self.levels] = self.on_node[i];
        s[self.levels + 1] = c.usage[self.eligible[i]].instances;
        s
    }

    fn fits(&self, c: &Cluster<'_>, i: usize) -> bool {
        let (cpu, mem) = self.reservation;
        let g = self.eligible[i];
        let (n, u) = (&c.nodes[g], &c.usage[g]);
        let mpn = self.spec.placement.max_per_node;
        (mpn == 0 || self.on_node[i] < mpn)
            && u.cpu + cpu <= n.cpu + EPS
            && u.memory.saturating_add(mem) <= n.memory
    }

    fn open(&self, c: &Cluster<'_>, i: usize) -> bool {
        c.nodes[self.eligible[i]].health.accepts_new() && self.fits(c, i)
    }

    /// The best node for `slot`, if any has room: the innermost domain with the lowest counts
    /// level by level (ties: the highest rendezvous weight of the domain), then in it the node
    /// with the fewest instances of the service, then of all services (ties: rendezvous weight).
    /// Needs [`ServicePlanner::refresh`] first.
    fn choose(&self, c: &Cluster<'_>, slot: u32, exclude: Option<usize>) -> Option<usize> {
        if self.levels == 0 {
            return self.choose_among(c, slot, exclude, 0..self.eligible.len());
        }
        let mut best: Option<(usize, Score, u64)> = None;
        for (d, anc) in self.domains.ancestors.iter().enumerate() {
            let reserved = exclude
                .is_some_and(|x| self.open_now[x] && self.dom(x, self.levels - 1) as usize == d);
            if self.open_in[d] <= u32::from(reserved) {
                continue;
            }
            let mut score = [0u32; MAX_LEVELS + 2];
            for l in 0..self.levels {
                score[l] = self.counts[l][anc[l] as usize];
            }
            let tie = rendezvous(self.hash, slot, mix(d as u64 ^ 0x5bd1_e995));
            let better = match &best {
                None => true,
                Some((_, s, t)) => score < *s || (score == *s && tie > *t),
            };
            if better {
                best = Some((d, score, tie));
            }
        }
        let (d, _, _) = best?;
        self.choose_among(c, slot, exclude, self.members[d].iter().copied())
    }

    fn choose_among(
        &self,
        c: &Cluster<'_>,
        slot: u32,
        exclude: Option<usize>,
        candidates: impl Iterator<Item = usize>,
    ) -> Option<usize> {
        let mut best: Option<(usize, Score, u64)> = None;
        for i in candidates {
            if Some(i) == exclude {
                continue;
            }
            let score = self.score(c, i);
            if let Some((_, s, _)) = &best
                && score > *s
            {
                continue;
            }
            if !self
                .open_now
                .get(i)
                .copied()
                .unwrap_or_else(|| self.open(c, i))
            {
                continue;
            }
            let tie = rendezvous(self.hash, slot, c.hash[self.eligible[i]]);
            let better = match &best {
                None => true,
                Some((_, s, t)) => score < *s || tie > *t,
            };
            if better {
                best = Some((i, score, tie));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// Why nothing fits, for the pending event.
    fn why_not(&self, c: &Cluster<'_>) -> String {
        if self.eligible.is_empty() {
            let cons: Vec<String> = self
                .spec
                .placement
                .constraints
                .iter()
                .map(ToString::to_string)
                .collect();
            let all = c.nodes.len();
            return if cons.is_empty() {
                format!("no usable node (of {all})")
            } else {
                format!(
                    "no node satisfies the constraints [{}] (of {all} nodes)",
                    cons.join(", ")
                )
            };
        }
        let alive: Vec<usize> = (0..self.eligible.len())
            .filter(|i| c.nodes[self.eligible[*i]].health.accepts_new())
            .collect();
        if alive.is_empty() {
            return format!(
                "all {} eligible nodes are suspect or down",
                self.eligible.len()
            );
        }
        let (cpu, mem) = self.reservation;
        let mpn = self.spec.placement.max_per_node;
        let (mut full_mpn, mut full_cpu, mut full_mem) = (0, 0, 0);
        for i in &alive {
            let g = self.eligible[*i];
            let (n, u) = (&c.nodes[g], &c.usage[g]);
            if mpn != 0 && self.on_node[*i] >= mpn {
                full_mpn += 1;
            } else if u.cpu + cpu > n.cpu + EPS {
                full_cpu += 1;
            } else if u.memory.saturating_add(mem) > n.memory {
                full_mem += 1;
            }
        }
        let mut parts = Vec::new();
        if full_mpn > 0 {
            parts.push(format!("{full_mpn} at max_per_node = {mpn}"));
        }
        if full_cpu > 0 {
            parts.push(format!("{full_cpu} without {cpu} free CPU"));
        }
        if full_mem > 0 {
            parts.push(format!("{full_mem} without {mem} bytes of free memory"));
        }
        format!(
            "no room on any of {} eligible nodes: {}",
            alive.len(),
            parts.join(", ")
        )
    }

    /// For scale-down: the held slot whose removal best evens the spread (the one in the most
    /// crowded domains; among equals, the lowest rendezvous weight, then the highest slot).
    fn victim(&self, c: &Cluster<'_>, held: &BTreeMap<u32, usize>) -> Option<u32> {
        held.iter()
            .max_by_key(|(slot, i)| {
                let mut s = self.score(c, **i);
                s[self.levels + 1] = 0;
                let tie = rendezvous(self.hash, **slot, c.hash[self.eligible[**i]]);
                (s, std::cmp::Reverse(tie), **slot)
            })
            .map(|(slot, _)| *slot)
    }

    /// The outermost sibling imbalance of two or more: (level, crowded, sparse). The level after
    /// the last spread level is the node level (siblings: nodes under one innermost domain), where
    /// the ids are indices into `eligible`. Only children that can take an instance count as
    /// sparse.
    fn imbalance(&self, c: &Cluster<'_>) -> Option<(usize, u32, u32)> {
        let open: Vec<bool> = (0..self.eligible.len()).map(|i| self.open(c, i)).collect();
        for l in 0..=self.levels {
            // parent → (min over open children, max over all children), each (count, child id)
            let mut by_parent: BTreeMap<u32, (Extreme, Extreme)> = BTreeMap::new();
            let mut seen: BTreeSet<u32> = BTreeSet::new();
            let mut open_child: BTreeSet<u32> = BTreeSet::new();
            let mut child_of: Vec<(u32, u32, u32)> = Vec::new(); // (parent, child, count)
            for (i, is_open) in open.iter().enumerate() {
                let (parent, child, count) = self.child(i, l);
                if *is_open {
                    open_child.insert(child);
                }
                if seen.insert(child) {
                    child_of.push((parent, child, count));
                }
            }
            for (parent, child, count) in child_of {
                let e = by_parent.entry(parent).or_default();
                if e.1.is_none_or(|(mc, _)| count > mc) {
                    e.1 = Some((count, child));
                }
                if open_child.contains(&child) && e.0.is_none_or(|(mc, _)| count < mc) {
                    e.0 = Some((count, child));
                }
            }
            for (lo, hi) in by_parent.values() {
                if let (Some((lc, ld)), Some((hc, hd))) = (lo, hi)
                    && *hc >= lc + 2
                {
                    return Some((l, *hd, *ld));
                }
            }
        }
        None
    }

    /// Node `i` as a child at `level`: (parent id, child id, instances of the service in the
    /// child). At the node level the child is the node itself (an index into `eligible`).
    fn child(&self, i: usize, level: usize) -> (u32, u32, u32) {
        if level < self.levels {
            let d = self.dom(i, level);
            (
                self.domains.parent[level][d as usize],
                d,
                self.counts[level][d as usize],
            )
        } else {
            let parent = if self.levels == 0 {
                0
            } else {
                self.dom(i, self.levels - 1)
            };
            (parent, i as u32, self.on_node[i])
        }
    }

    /// Whether eligible node `i` lies in the crowded domain `d` at `level` (at the node level,
    /// `d` is an index into `eligible`).
    fn in_domain(&self, i: usize, level: usize, d: u32) -> bool {
        if level < self.levels {
            self.dom(i, level) == d
        } else {
            i as u32 == d
        }
    }

    /// The largest sibling skew per level (and the node level), as in [`sibling_skew`].
    fn skew(&self, c: &Cluster<'_>) -> Vec<u32> {
        let open: Vec<bool> = (0..self.eligible.len()).map(|i| self.fits(c, i)).collect();
        let mut out = Vec::new();
        for l in 0..=self.levels {
            let mut children: BTreeMap<(u32, u32), (u32, bool)> = BTreeMap::new();
            for (i, is_open) in open.iter().enumerate() {
                let (parent, child, count) = self.child(i, l);
                children.entry((parent, child)).or_insert((count, false)).1 |= *is_open;
            }
            let mut groups: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
            for ((parent, _), (count, open)) in children {
                let g = groups.entry(parent).or_insert((u32::MAX, 0));
                if open {
                    g.0 = g.0.min(count);
                }
                g.1 = g.1.max(count);
            }
            let worst = groups
                .values()
                .map(|(lo, hi)| {
                    if *lo == u32::MAX {
                        0
                    } else {
                        hi.saturating_sub(*lo)
                    }
                })
                .max()
                .unwrap_or(0);
            out.push(worst);
        }
        out
    }
}

/// Computes the next placements. Pure: same inputs, same plan.
pub fn place(inputs: &Inputs<'_>) -> Plan {
    let mut plan = Plan::default();
    let mut cluster = Cluster::new(inputs.nodes);
    let mut services: Vec<&ServiceInput<'_>> = inputs.services.iter().collect();
    services.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let known: BTreeSet<&str> = services.iter().map(|s| s.spec.name.as_str()).collect();

    // Slots of deleted services are removed.
    for (slot, a) in inputs.current {
        if !known.contains(slot.0.as_str()) {
            plan.changes.push(Change::Removed {
                slot: slot.clone(),
                node: a.node.clone(),
            });
        }
    }

    let (now, grace) = (inputs.now_ms, inputs.reschedule_grace_ms);
    let keeps = |n: &NodeView| n.health.keeps_instances(now, grace);

    // Pass 1: keep what may stay, so every service's usage is known before anything new goes.
    let mut work = Vec::with_capacity(services.len());
    for svc in &services {
        let mut p = cluster.planner(svc.spec, keeps);
        let mut held = BTreeMap::new();
        let mut lost = BTreeMap::new();
        let range = (svc.spec.name.clone(), 0)..=(svc.spec.name.clone(), u32::MAX);
        for ((_, slot), a) in inputs.current.range(range) {
            let reason = match p.local_of(&cluster, &a.node) {
                Some(i) if p.fits(&cluster, i) => {
                    p.take(&mut cluster, i, 1);
                    held.insert(*slot, i);
                    continue;
                }
                Some(_) => "the node no longer has room for it",
                None => match cluster
                    .index
                    .get(a.node.as_str())
                    .map(|g| &inputs.nodes[*g])
                {
                    None => "its node left the cluster",
                    Some(n) if n.health == NodeHealth::Drain => "its node is draining",
                    Some(n) if !keeps(n) => "its node is down",
                    Some(_) => "its node no longer satisfies the constraints",
                },
            };
            lost.insert(*slot, (a.node.clone(), reason.to_string()));
        }
        work.push((svc, p, held, lost));
    }

    // Pass 2: per service, scale down, re-place displaced slots, fill, then rebalance once.
    for (svc, mut p, mut held, mut lost) in work {
        let name = p.name.to_string();
        let want = svc.spec.replicas as usize;
        let changes_before = plan.changes.len();
        // Scale down: drop lost slots first, then the held slots in the most crowded domains.
        while held.len() + lost.len() > want {
            if let Some((slot, (node, _))) = lost.pop_last() {
                plan.changes.push(Change::Removed {
                    slot: (name.clone(), slot),
                    node,
                });
                continue;
            }
            let Some(slot) = p.victim(&cluster, &held) else {
                break;
            };
            let i = held.remove(&slot).unwrap_or_default();
            p.take(&mut cluster, i, -1);
            let node = inputs.nodes[p.eligible[i]].key.clone();
            plan.changes.push(Change::Removed {
                slot: (name.clone(), slot),
                node,
            });
        }
        // The slots to fill: displaced ones keep their number, new ones take the smallest free.
        let mut to_fill: Vec<(u32, Option<(NodeKey, String)>)> =
            lost.into_iter().map(|(s, v)| (s, Some(v))).collect();
        let mut next = 0u32;
        while held.len() + to_fill.len() < want {
            while held.contains_key(&next) || to_fill.iter().any(|(s, _)| *s == next) {
                next += 1;
            }
            to_fill.push((next, None));
        }
        if !to_fill.is_empty() {
            p.refresh(&cluster);
        }
        for (slot, from) in to_fill {
            let slot_key = (name.clone(), slot);
            match p.choose(&cluster, slot, None) {
                Some(i) => {
                    p.take(&mut cluster, i, 1);
                    held.insert(slot, i);
                    let to = inputs.nodes[p.eligible[i]].key.clone();
                    plan.changes.push(match from {
                        Some((from, reason)) => Change::Moved {
                            slot: slot_key,
                            from,
                            to,
                            reason,
                        },
                        None => Change::Placed {
                            slot: slot_key,
                            node: to,
                        },
                    });
                }
                None => {
                    if let Some((node, _)) = from {
                        plan.changes.push(Change::Removed {
                            slot: slot_key.clone(),
                            node,
                        });
                    }
                    plan.pending.push(Pending {
                        slot: slot_key,
                        reason: p.why_not(&cluster),
                    });
                }
            }
        }
        // Rebalance: one move per round, only when every instance is settled and nothing else
        // changed for this service this round.
        if svc.settled
            && plan.changes.len() == changes_before
            && let Some((level, crowded, _)) = p.imbalance(&cluster)
        {
            let candidates: BTreeMap<u32, usize> = held
                .iter()
                .filter(|(_, i)| p.in_domain(**i, level, crowded))
                .map(|(s, i)| (*s, *i))
                .collect();
            if let Some(slot) = p.victim(&cluster, &candidates) {
                p.refresh(&cluster);
                let from = held[&slot];
                p.take(&mut cluster, from, -1);
                let to = p
                    .choose(&cluster, slot, Some(from))
                    .filter(|to| !p.in_domain(*to, level, crowded));
                let target = to.unwrap_or(from);
                p.take(&mut cluster, target, 1);
                held.insert(slot, target);
                if to.is_some() {
                    plan.changes.push(Change::Moved {
                        slot: (name.clone(), slot),
                        from: inputs.nodes[p.eligible[from]].key.clone(),
                        to: inputs.nodes[p.eligible[target]].key.clone(),
                        reason: "rebalancing toward even spread".into(),
                    });
                }
            }
        }
        for (slot, i) in held {
            let node = inputs.nodes[p.eligible[i]].key.clone();
            plan.assignments.insert(
                (name.clone(), slot),
                Assignment {
                    node,
                    version: svc.version,
                },
            );
        }
    }
    plan
}

/// The largest difference in instance counts between sibling spread domains, per level, over
/// domains that could still take an instance (a full domain may hold fewer). The last entry is
/// the node level (nodes under the same innermost domain). Counts come from `plan`.
pub fn sibling_skew(inputs: &Inputs<'_>, plan: &Plan, service: &str) -> Vec<u32> {
    let Some(svc) = inputs.services.iter().find(|s| s.spec.name == service) else {
        return vec![];
    };
    let mut cluster = Cluster::new(inputs.nodes);
    for ((s, _), a) in &plan.assignments {
        if let (Some(spec), Some(g)) = (
            inputs.services.iter().find(|x| &x.spec.name == s),
            cluster.index.get(a.node.as_str()),
        ) {
            let g = *g;
            cluster.usage[g].add(reservation(spec.spec), 1);
        }
    }
    let mut p = cluster.planner(svc.spec, |n| n.health.accepts_new());
    for ((s, _), a) in &plan.assignments {
        if s == service
            && let Some(i) = p.local_of(&cluster, &a.node)
        {
            p.add(i, 1);
        }
    }
    p.skew(&cluster)
}

/// The invariant checker: every placement test runs it on every plan. Returns every violation.
pub fn check(inputs: &Inputs<'_>, plan: &Plan) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let by_key: HashMap<&str, &NodeView> =
        inputs.nodes.iter().map(|n| (n.key.as_str(), n)).collect();
    let specs: HashMap<&str, &ServiceInput<'_>> = inputs
        .services
        .iter()
        .map(|s| (s.spec.name.as_str(), s))
        .collect();
    let mut usage: HashMap<&str, (f64, u64)> = HashMap::new();
    let mut per_node: HashMap<(&str, &str), u32> = HashMap::new();
    let mut per_service: HashMap<&str, usize> = HashMap::new();
    for ((service, slot), a) in &plan.assignments {
        let Some(svc) = specs.get(service.as_str()) else {
            errors.push(format!("{service}/{slot} belongs to no service"));
            continue;
        };
        *per_service.entry(service).or_default() += 1;
        let Some(node) = by_key.get(a.node.as_str()) else {
            errors.push(format!("{service}/{slot} is on unknown node {}", a.node));
            continue;
        };
        let was_here = inputs
            .current
            .get(&(service.clone(), *slot))
            .is_some_and(|c| c.node == a.node);
        if !node
            .health
            .keeps_instances(inputs.now_ms, inputs.reschedule_grace_ms)
        {
            errors.push(format!(
                "{service}/{slot} is on {} which is {:?}",
                a.node, node.health
            ));
        } else if !was_here && !node.health.accepts_new() {
            errors.push(format!(
                "{service}/{slot} was newly placed on {:?} node {}",
                node.health, a.node
            ));
        }
        for c in &svc.spec.placement.constraints {
            if !c.matches(&node.name, &node.labels) {
                errors.push(format!("{service}/{slot} on {} breaks `{c}`", a.node));
            }
        }
        let (cpu, mem) = reservation(svc.spec);
        let u = usage.entry(a.node.as_str()).or_default();
        u.0 += cpu;
        u.1 += mem;
        *per_node
            .entry((service.as_str(), a.node.as_str()))
            .or_default() += 1;
        if a.version != svc.version {
            errors.push(format!(
                "{service}/{slot} carries version {} not {}",
                a.version, svc.version
            ));
        }
    }
    for (node, (cpu, mem)) in &usage {
        if let Some(n) = by_key.get(node)
            && (*cpu > n.cpu + EPS || *mem > n.memory)
        {
            errors.push(format!(
                "{node} is over capacity: {cpu} CPU of {}, {mem} B of {}",
                n.cpu, n.memory
            ));
        }
    }
    for ((service, node), count) in &per_node {
        let mpn = specs[service].spec.placement.max_per_node;
        if mpn != 0 && *count > mpn {
            errors.push(format!(
                "{service} has {count} instances on {node}, max_per_node {mpn}"
            ));
        }
    }
    for svc in inputs.services {
        let name = svc.spec.name.as_str();
        let placed = per_service.get(name).copied().unwrap_or(0);
        let pending = plan.pending.iter().filter(|p| p.slot.0 == name).count();
        if placed + pending != svc.spec.replicas as usize {
            errors.push(format!(
                "{name}: {placed} placed + {pending} pending != {} replicas",
                svc.spec.replicas
            ));
        }
        if pending > 0 {
            // A pending slot is only allowed when no node could take it.
            let mut cluster = Cluster::new(inputs.nodes);
            for ((s, _), a) in &plan.assignments {
                if let (Some(x), Some(g)) =
                    (specs.get(s.as_str()), cluster.index.get(a.node.as_str()))
                {
                    let g = *g;
                    cluster.usage[g].add(reservation(x.spec), 1);
                }
            }
            let mut probe = cluster.planner(svc.spec, |n| n.health.accepts_new());
            for ((s, _), a) in &plan.assignments {
                if s == name
                    && let Some(i) = probe.local_of(&cluster, &a.node)
                {
                    probe.add(i, 1);
                }
            }
            probe.refresh(&cluster);
            if probe.choose(&cluster, 0, None).is_some() {
                errors.push(format!("{name} has pending slots although a node has room"));
            }
        }
    }
    // Stability: an assignment that could stay, stayed (rebalancing moves excepted).
    for (slot, a) in inputs.current {
        let Some(new) = plan.assignments.get(slot) else {
            continue;
        };
        if new.node != a.node {
            let explained = plan
                .changes
                .iter()
                .any(|c| matches!(c, Change::Moved { slot: s, .. } if s == slot));
            if !explained {
                errors.push(format!(
                    "{}/{} moved without a recorded reason",
                    slot.0, slot.1
                ));
            }
        }
    }
    let rebalances = plan
        .changes
        .iter()
        .filter(|c| matches!(c, Change::Moved { reason, .. } if reason.starts_with("rebalancing")))
        .fold(HashMap::<&str, u32>::new(), |mut m, c| {
            if let Change::Moved { slot, .. } = c {
                *m.entry(slot.0.as_str()).or_default() += 1;
            }
            m
        });
    for (s, n) in rebalances {
        if n > 1 {
            errors.push(format!(
                "{s}: {n} rebalancing moves in one round (at most one)"
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

//! Placement against its invariant checker (on every plan), hand-made topologies, property tests
//! on random clusters, and a brute-force oracle on small ones.

use std::collections::BTreeMap;

use proptest::prelude::*;
use shoal_actors::placement::*;
use shoal_config::{ByteSize, ServiceSpec};

fn node(key: &str, labels: &[(&str, &str)]) -> NodeView {
    NodeView {
        key: key.to_string(),
        name: key.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cpu: 4.0,
        memory: 8 << 30,
        health: NodeHealth::Alive,
    }
}

fn service(name: &str, replicas: u32) -> ServiceSpec {
    let mut s = ServiceSpec::with_image(name, "shoal-test/web:1");
    s.replicas = replicas;
    s
}

fn run(nodes: &[NodeView], specs: &[ServiceSpec], current: &Placements, settled: bool) -> Plan {
    run_at(nodes, specs, current, settled, 0)
}

fn run_at(
    nodes: &[NodeView],
    specs: &[ServiceSpec],
    current: &Placements,
    settled: bool,
    now_ms: u64,
) -> Plan {
    let services: Vec<ServiceInput<'_>> = specs
        .iter()
        .map(|s| ServiceInput {
            spec: s,
            version: 1,
            settled,
        })
        .collect();
    let inputs = Inputs {
        nodes,
        services: &services,
        current,
        now_ms,
        reschedule_grace_ms: 2000,
    };
    let plan = place(&inputs);
    if let Err(e) = check(&inputs, &plan) {
        panic!("invariants broken:\n{}", e.join("\n"));
    }
    assert_eq!(place(&inputs), plan, "placement must be deterministic");
    plan
}

fn skew(nodes: &[NodeView], specs: &[ServiceSpec], plan: &Plan, service: &str) -> Vec<u32> {
    let services: Vec<ServiceInput<'_>> = specs
        .iter()
        .map(|s| ServiceInput {
            spec: s,
            version: 1,
            settled: true,
        })
        .collect();
    let empty = Placements::new();
    let inputs = Inputs {
        nodes,
        services: &services,
        current: &empty,
        now_ms: 0,
        reschedule_grace_ms: 0,
    };
    sibling_skew(&inputs, plan, service)
}

fn per_node(plan: &Plan) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in plan.assignments.values() {
        *m.entry(a.node.clone()).or_default() += 1;
    }
    m
}

/// Counts per domain value of `label` (global, not per parent).
fn by_label(nodes: &[NodeView], plan: &Plan, labels: &[&str]) -> BTreeMap<Vec<String>, usize> {
    let mut m = BTreeMap::new();
    for a in plan.assignments.values() {
        let n = nodes.iter().find(|n| n.key == a.node).unwrap();
        let key = labels
            .iter()
            .map(|l| n.labels.get(*l).cloned().unwrap_or_default())
            .collect();
        *m.entry(key).or_default() += 1;
    }
    m
}

#[test]
fn six_replicas_on_three_nodes_go_two_per_node() {
    let nodes = vec![node("n1", &[]), node("n2", &[]), node("n3", &[])];
    let plan = run(&nodes, &[service("web", 6)], &Placements::new(), false);
    assert_eq!(
        per_node(&plan).values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    assert!(plan.pending.is_empty());
    assert_eq!(plan.changes.len(), 6);
}

fn two_dcs_three_racks() -> Vec<NodeView> {
    let mut nodes = Vec::new();
    for (i, (dc, rack)) in [
        ("dc1", "r1"),
        ("dc1", "r2"),
        ("dc1", "r3"),
        ("dc2", "r1"),
        ("dc2", "r2"),
        ("dc2", "r3"),
    ]
    .iter()
    .enumerate()
    {
        nodes.push(node(
            &format!("n{}", i + 1),
            &[
                ("datacenter", dc),
                ("rack", rack),
                ("disk", if i % 2 == 0 { "ssd" } else { "hdd" }),
            ],
        ));
    }
    nodes
}

#[test]
fn nine_replicas_over_two_datacenters_and_three_racks_have_skew_at_most_one_at_every_level() {
    let nodes = two_dcs_three_racks();
    let mut spec = service("web", 9);
    spec.placement.spread = vec!["datacenter".into(), "rack".into()];
    let plan = run(
        &nodes,
        std::slice::from_ref(&spec),
        &Placements::new(),
        false,
    );
    let dcs = by_label(&nodes, &plan, &["datacenter"]);
    let racks = by_label(&nodes, &plan, &["datacenter", "rack"]);
    let (dmin, dmax) = (dcs.values().min().unwrap(), dcs.values().max().unwrap());
    let (rmin, rmax) = (racks.values().min().unwrap(), racks.values().max().unwrap());
    assert!(dmax - dmin <= 1, "datacenters {dcs:?}");
    assert!(rmax - rmin <= 1, "racks {racks:?}");
    assert_eq!(racks.len(), 6);
    assert!(skew(&nodes, &[spec], &plan, "web").iter().all(|s| *s <= 1));
}

#[test]
fn constraints_are_honoured() {
    let nodes = two_dcs_three_racks();
    let mut spec = service("db", 4);
    spec.placement.constraints = vec!["node.labels.disk == ssd".parse().unwrap()];
    let plan = run(&nodes, &[spec], &Placements::new(), false);
    for a in plan.assignments.values() {
        let n = nodes.iter().find(|n| n.key == a.node).unwrap();
        assert_eq!(n.labels["disk"], "ssd");
    }
    assert_eq!(plan.assignments.len(), 4);
}

#[test]
fn an_impossible_constraint_leaves_every_replica_pending_with_the_reason() {
    let nodes = two_dcs_three_racks();
    let mut spec = service("gpu", 3);
    spec.placement.constraints = vec!["node.labels.gpu exists".parse().unwrap()];
    let plan = run(&nodes, &[spec], &Placements::new(), false);
    assert!(plan.assignments.is_empty());
    assert_eq!(plan.pending.len(), 3);
    assert!(
        plan.pending[0]
            .reason
            .contains("no node satisfies the constraints [node.labels.gpu exists]"),
        "{:?}",
        plan.pending
    );
}

#[test]
fn max_per_node_and_capacity_limit_placement_and_say_why() {
    let nodes = vec![node("n1", &[]), node("n2", &[])];
    let mut spec = service("web", 5);
    spec.placement.max_per_node = 2;
    let plan = run(&nodes, &[spec], &Placements::new(), false);
    assert_eq!(plan.assignments.len(), 4);
    assert_eq!(plan.pending.len(), 1);
    assert!(
        plan.pending[0].reason.contains("max_per_node = 2"),
        "{:?}",
        plan.pending
    );

    let mut big = service("big", 3);
    big.resources.cpu = 3.0;
    big.resources.memory = Some(ByteSize(1 << 30));
    let plan = run(&nodes, &[big], &Placements::new(), false);
    assert_eq!(plan.assignments.len(), 2);
    assert!(
        plan.pending[0].reason.contains("without 3 free CPU"),
        "{:?}",
        plan.pending
    );
}

#[test]
fn scaling_up_moves_nothing_and_scaling_down_keeps_the_spread() {
    let nodes = two_dcs_three_racks();
    let mut spec = service("web", 4);
    spec.placement.spread = vec!["datacenter".into(), "rack".into()];
    let first = run(
        &nodes,
        std::slice::from_ref(&spec),
        &Placements::new(),
        false,
    );
    spec.replicas = 9;
    let up = run(
        &nodes,
        std::slice::from_ref(&spec),
        &first.assignments,
        false,
    );
    for (slot, a) in &first.assignments {
        assert_eq!(&up.assignments[slot], a, "scaling up moved {slot:?}");
    }
    assert_eq!(up.changes.len(), 5);
    spec.replicas = 3;
    let down = run(&nodes, std::slice::from_ref(&spec), &up.assignments, false);
    assert_eq!(down.assignments.len(), 3);
    let dcs = by_label(&nodes, &down, &["datacenter"]);
    assert!(
        dcs.values().max().unwrap() - dcs.values().min().unwrap() <= 1,
        "{dcs:?}"
    );
    assert_eq!(by_label(&nodes, &down, &["datacenter", "rack"]).len(), 3);
}

#[test]
fn a_down_node_keeps_its_instances_during_the_grace_then_they_move_and_nothing_else_does() {
    let mut nodes = vec![node("n1", &[]), node("n2", &[]), node("n3", &[])];
    let specs = [service("web", 6)];
    let first = run(&nodes, &specs, &Placements::new(), false);
    nodes[1].health = NodeHealth::Down { since_ms: 10_000 };
    let within = run_at(&nodes, &specs, &first.assignments, false, 11_000);
    assert_eq!(
        within.assignments, first.assignments,
        "moved during the grace"
    );
    let after = run_at(&nodes, &specs, &first.assignments, false, 12_500);
    let moved: Vec<_> = after
        .changes
        .iter()
        .filter(|c| matches!(c, Change::Moved { .. }))
        .collect();
    assert_eq!(moved.len(), 2, "{:?}", after.changes);
    for c in moved {
        let Change::Moved { from, reason, .. } = c else {
            unreachable!()
        };
        assert_eq!(from, "n2");
        assert_eq!(reason, "its node is down");
    }
    assert_eq!(
        per_node(&after).values().copied().collect::<Vec<_>>(),
        vec![3, 3]
    );
}

#[test]
fn a_joining_node_receives_instances_one_move_per_round_and_only_when_settled() {
    let mut nodes = vec![node("n1", &[]), node("n2", &[])];
    let specs = [service("web", 6)];
    let mut current = run(&nodes, &specs, &Placements::new(), true).assignments;
    nodes.push(node("n3", &[]));
    let unsettled = run(&nodes, &specs, &current, false);
    assert_eq!(unsettled.assignments, current, "moved while not settled");
    let mut rounds = 0;
    loop {
        let plan = run(&nodes, &specs, &current, true);
        let moves = plan
            .changes
            .iter()
            .filter(|c| matches!(c, Change::Moved { .. }))
            .count();
        assert!(moves <= 1);
        if moves == 0 {
            break;
        }
        current = plan.assignments;
        rounds += 1;
        assert!(rounds < 10, "does not converge");
    }
    assert_eq!(rounds, 2);
    assert_eq!(
        per_node(&run(&nodes, &specs, &current, true))
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
}

#[test]
fn a_deleted_service_loses_its_slots() {
    let nodes = vec![node("n1", &[])];
    let first = run(
        &nodes,
        &[service("web", 2), service("api", 1)],
        &Placements::new(),
        false,
    );
    let plan = run(&nodes, &[service("api", 1)], &first.assignments, false);
    assert_eq!(plan.assignments.len(), 1);
    assert_eq!(
        plan.changes
            .iter()
            .filter(|c| matches!(c, Change::Removed { .. }))
            .count(),
        2
    );
}

// --- random clusters ---

fn arb_nodes() -> impl Strategy<Value = Vec<NodeView>> {
    prop::collection::vec(
        (0u8..2, 0u8..3, 0u8..2, 1u32..5, prop::bool::weighted(0.1)),
        1..12,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (dc, rack, disk, cpu, down))| {
                let mut n = node(&format!("n{i:02}"), &[]);
                n.labels.insert("datacenter".into(), format!("dc{dc}"));
                n.labels.insert("rack".into(), format!("r{rack}"));
                if disk == 1 {
                    n.labels.insert("disk".into(), "ssd".into());
                }
                n.cpu = f64::from(cpu);
                if down {
                    n.health = NodeHealth::Down { since_ms: 0 };
                }
                n
            })
            .collect()
    })
}

fn arb_specs() -> impl Strategy<Value = Vec<ServiceSpec>> {
    prop::collection::vec((0u32..15, 0u8..3, any::<bool>(), 0u32..4, 0u8..4), 1..4).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (replicas, spread, ssd, mpn, cpu))| {
                let mut s = service(&format!("s{i}"), replicas);
                s.placement.spread = match spread {
                    0 => vec![],
                    1 => vec!["datacenter".into()],
                    _ => vec!["datacenter".into(), "rack".into()],
                };
                if ssd {
                    s.placement.constraints = vec!["node.labels.disk == ssd".parse().unwrap()];
                }
                s.placement.max_per_node = mpn;
                s.resources.cpu = f64::from(cpu) * 0.5;
                s
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn fresh_plans_keep_every_invariant_and_spread_with_skew_at_most_one(nodes in arb_nodes(), specs in arb_specs()) {
        let plan = run(&nodes, &specs, &Placements::new(), false);
        for s in &specs {
            // With one service the spread is exact; with several, resources shared between them
            // can close a domain early, which the skew definition already accounts for.
            let sk = skew(&nodes, &specs, &plan, &s.name);
            prop_assert!(sk.iter().all(|x| *x <= 1), "{}: skew {:?}", s.name, sk);
        }
    }

    #[test]
    fn losing_a_node_moves_only_its_instances(nodes in arb_nodes(), specs in arb_specs(), victim in any::<prop::sample::Index>()) {
        let first = run(&nodes, &specs, &Placements::new(), false);
        let mut after = nodes.clone();
        let v = victim.index(after.len());
        let gone = after.remove(v).key;
        let plan = run(&after, &specs, &first.assignments, false);
        for (slot, a) in &first.assignments {
            if a.node != gone && let Some(b) = plan.assignments.get(slot) {
                prop_assert_eq!(&b.node, &a.node, "{:?} moved although its node stayed", slot);
            }
        }
    }

    #[test]
    fn rebalancing_converges_to_an_even_spread(nodes in arb_nodes(), specs in arb_specs(), extra in 1usize..4) {
        // Place on a subset, then let the rest join and rebalance round after round.
        let k = nodes.len().saturating_sub(extra).max(1);
        let mut current = run(&nodes[..k], &specs, &Placements::new(), true).assignments;
        for _ in 0..200 {
            let plan = run(&nodes, &specs, &current, true);
            if plan.assignments == current { break; }
            current = plan.assignments;
        }
        let plan = run(&nodes, &specs, &current, true);
        prop_assert_eq!(&plan.assignments, &current, "did not converge");
        for s in &specs {
            let sk = skew(&nodes, &specs, &plan, &s.name);
            // Node-level skew inside a domain is not rebalanced (only the spread levels are).
            let levels = s.placement.spread.len();
            prop_assert!(sk[..levels].iter().all(|x| *x <= 1), "{}: skew {:?}", s.name, sk);
        }
    }
}

// --- oracle: brute force on small clusters ---

/// Every way of putting `total` identical instances on nodes with these capacities.
fn compositions(caps: &[u32], total: u32, out: &mut Vec<Vec<u32>>, cur: &mut Vec<u32>) {
    if cur.len() == caps.len() {
        if total == 0 {
            out.push(cur.clone());
        }
        return;
    }
    for c in 0..=caps[cur.len()].min(total) {
        cur.push(c);
        compositions(caps, total - c, out, cur);
        cur.pop();
    }
}

type Path = Vec<String>;

/// Skew per level (and node level) of a distribution, computed naively from label paths.
fn naive_skew(nodes: &[NodeView], levels: &[String], counts: &[u32], caps: &[u32]) -> Vec<u32> {
    let path = |n: &NodeView, l: usize| -> Vec<String> {
        levels[..l]
            .iter()
            .map(|k| n.labels.get(k).cloned().unwrap_or_default())
            .collect()
    };
    let mut out = Vec::new();
    for l in 0..=levels.len() {
        // children at depth l+1 (or nodes when l == levels.len()), grouped by parent path (depth l)
        let mut groups: BTreeMap<Path, BTreeMap<Path, (u32, bool)>> = BTreeMap::new();
        for (i, n) in nodes.iter().enumerate() {
            let parent = path(n, l);
            let child = if l < levels.len() {
                path(n, l + 1)
            } else {
                vec![n.key.clone()]
            };
            let e = groups
                .entry(parent)
                .or_default()
                .entry(child)
                .or_insert((0, false));
            e.0 += counts[i];
            e.1 |= counts[i] < caps[i];
        }
        let worst = groups
            .values()
            .map(|ch| {
                let hi = ch.values().map(|c| c.0).max().unwrap_or(0);
                let lo = ch.values().filter(|c| c.1).map(|c| c.0).min();
                lo.map_or(0, |lo| hi.saturating_sub(lo))
            })
            .max()
            .unwrap_or(0);
        out.push(worst);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn placement_matches_the_brute_force_oracle(
        raw in prop::collection::vec((0u8..2, 0u8..2, 1u32..4), 1..6),
        replicas in 0u32..7,
        spread in 0u8..3,
        mpn in 0u32..3,
    ) {
        let nodes: Vec<NodeView> = raw.iter().enumerate().map(|(i, (dc, rack, cpu))| {
            let mut n = node(&format!("n{i}"), &[]);
            n.labels.insert("datacenter".into(), format!("dc{dc}"));
            n.labels.insert("rack".into(), format!("r{rack}"));
            n.cpu = f64::from(*cpu);
            n
        }).collect();
        let mut spec = service("web", replicas);
        spec.resources.cpu = 1.0;
        spec.placement.max_per_node = mpn;
        spec.placement.spread = match spread { 0 => vec![], 1 => vec!["datacenter".into()], _ => vec!["datacenter".into(), "rack".into()] };
        let plan = run(&nodes, std::slice::from_ref(&spec), &Placements::new(), false);

        // The oracle: the most instances that fit, and the best skew any distribution achieves.
        let caps: Vec<u32> = nodes.iter().map(|n| {
            let by_cpu = n.cpu as u32;
            if mpn == 0 { by_cpu } else { by_cpu.min(mpn) }
        }).collect();
        let placeable = replicas.min(caps.iter().sum());
        let mut all = Vec::new();
        compositions(&caps, placeable, &mut all, &mut Vec::new());
        // The best skew any distribution reaches at each level, level by level.
        let skews: Vec<Vec<u32>> = all.iter().map(|c| naive_skew(&nodes, &spec.placement.spread, c, &caps)).collect();
        let best: Vec<u32> = (0..=spec.placement.spread.len()).map(|l| skews.iter().map(|s| s[l]).min().unwrap()).collect();

        prop_assert_eq!(plan.assignments.len() as u32, placeable);
        let counts: Vec<u32> = nodes.iter().map(|n| plan.assignments.values().filter(|a| a.node == n.key).count() as u32).collect();
        let ours = naive_skew(&nodes, &spec.placement.spread, &counts, &caps);
        // Skew at most 1 wherever some distribution reaches it; never worse than the best otherwise.
        for l in 0..ours.len() {
            prop_assert!(ours[l] <= best[l].max(1), "level {}: ours {:?}, best {:?}", l, ours, best);
        }
    }
}

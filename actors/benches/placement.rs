//! Placement benchmark: 10,000 instances (1,000 services × 10 replicas) on 1,000 nodes, spread
//! over datacenter > zone > rack, half the services constrained to SSD nodes. Prints the time of
//! a fresh placement, a steady-state round (nothing to change) and a round after a node is lost,
//! each against the goal (100 ms) and against a baseline measured in the same run: one pass that
//! only evaluates every service's constraints on every node (work any placer must do).
//!
//! Run: `cargo bench -p shoal-actors --bench placement`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use shoal_actors::placement::*;
use shoal_config::ServiceSpec;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                black_box(f());
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let nodes: Vec<NodeView> = (0..1000)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("datacenter".to_string(), format!("dc{}", i % 3));
            labels.insert("zone".to_string(), format!("z{}", (i / 3) % 3));
            labels.insert("rack".to_string(), format!("r{}", (i / 9) % 12));
            if i % 2 == 0 {
                labels.insert("disk".to_string(), "ssd".to_string());
            }
            NodeView {
                key: format!("node-{i:04}"),
                name: format!("node-{i:04}"),
                labels,
                cpu: 16.0,
                memory: 64 << 30,
                health: NodeHealth::Alive,
            }
        })
        .collect();
    let specs: Vec<ServiceSpec> = (0..1000)
        .map(|i| {
            let mut s = ServiceSpec::with_image(&format!("svc-{i:04}"), "shoal-test/web:1");
            s.replicas = 10;
            s.resources.cpu = 0.1;
            s.placement.spread = vec!["datacenter".into(), "zone".into(), "rack".into()];
            if i % 2 == 0 {
                s.placement.constraints = vec!["node.labels.disk == ssd".parse().unwrap()];
            }
            s
        })
        .collect();
    let services: Vec<ServiceInput<'_>> = specs
        .iter()
        .map(|s| ServiceInput {
            spec: s,
            version: 1,
            settled: false,
        })
        .collect();
    let empty = Placements::new();
    let fresh_inputs = Inputs {
        nodes: &nodes,
        services: &services,
        current: &empty,
        now_ms: 0,
        reschedule_grace_ms: 0,
    };

    let baseline = time(5, || {
        let mut eligible = 0usize;
        for s in &specs {
            for n in &nodes {
                if s.placement
                    .constraints
                    .iter()
                    .all(|c| c.matches(&n.name, &n.labels))
                {
                    eligible += 1;
                }
            }
        }
        eligible
    });
    let plan = place(&fresh_inputs);
    assert_eq!(plan.assignments.len(), 10_000);
    check(&fresh_inputs, &plan).expect("invariants");
    let fresh = time(5, || place(&fresh_inputs));

    let steady_inputs = Inputs {
        current: &plan.assignments,
        ..fresh_inputs.clone()
    };
    let steady = time(5, || place(&steady_inputs));

    let mut fewer = nodes.clone();
    fewer[0].health = NodeHealth::Down { since_ms: 0 };
    let lost_inputs = Inputs {
        nodes: &fewer,
        now_ms: 10_000,
        ..steady_inputs.clone()
    };
    let lost_plan = place(&lost_inputs);
    check(&lost_inputs, &lost_plan).expect("invariants");
    let moved = lost_plan
        .changes
        .iter()
        .filter(|c| matches!(c, Change::Moved { .. }))
        .count();
    let lost = time(5, || place(&lost_inputs));

    let goal = Duration::from_millis(100);
    println!(
        "placement: 10,000 instances (1,000 services x 10) on 1,000 nodes, spread dc>zone>rack"
    );
    println!("  baseline (constraints on every node, every service): {baseline:?}");
    for (what, d) in [
        ("fresh placement", fresh),
        ("steady round", steady),
        ("node lost", lost),
    ] {
        println!(
            "  {what:<16} {d:>10.2?}   {:.2}x baseline   {:.2} of the 100 ms goal",
            d.as_secs_f64() / baseline.as_secs_f64(),
            d.as_secs_f64() / goal.as_secs_f64()
        );
    }
    println!("  instances moved after losing one node: {moved}");
}

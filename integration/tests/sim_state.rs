//! Cluster-state convergence in the deterministic simulation: partitions with writes on both
//! sides, propagation time, and a seeded sweep.

use std::time::Duration;

use shoal_config::ServiceSpec;
use shoal_integration::lease_sim::state::{StateSim, StateSimConfig};

fn spec(name: &str, replicas: u32) -> ServiceSpec {
    let text = format!("name = \"{name}\"\ncommand = [\"sleep\", \"60\"]\nreplicas = {replicas}\n");
    shoal_config::load_service_str("sim.toml", &text).expect("valid spec")
}

fn advance(sim: &mut StateSim, ms: u64) {
    let t = sim.now() + Duration::from_millis(ms);
    sim.run_until(t);
}

fn converge_within(sim: &mut StateSim, limit: Duration) -> Duration {
    let start = sim.now();
    while !sim.converged() {
        advance(sim, 50);
        assert!(
            sim.now() - start <= limit,
            "not converged after {limit:?}: {:?}",
            sim.digests()
        );
    }
    sim.now() - start
}

#[test]
fn writes_on_both_sides_of_a_partition_merge_to_the_later_write_after_the_heal() {
    let mut sim = StateSim::new(StateSimConfig::new(5, 11));
    sim.put(0, spec("web", 1));
    sim.put(0, spec("db", 1));
    advance(&mut sim, 5_000);
    assert!(sim.converged());

    sim.partition(&[0, 0, 1, 1, 1]);
    sim.put(0, spec("web", 2));
    sim.put(1, spec("left-only", 1));
    advance(&mut sim, 1_000);
    sim.delete(1, "db");
    advance(&mut sim, 1_000);
    // The majority side writes later: its writes win.
    sim.put(3, spec("web", 5));
    sim.put(4, spec("db", 3));
    sim.put(2, spec("right-only", 1));
    advance(&mut sim, 5_000);
    assert!(!sim.converged(), "the sides cannot talk");
    assert_eq!(sim.nodes[0].store.service("web").unwrap().spec.replicas, 2);
    assert!(sim.nodes[0].store.service("db").is_none());

    sim.heal();
    let took = converge_within(&mut sim, Duration::from_secs(5));
    eprintln!("converged {took:?} after the heal");
    for n in &sim.nodes {
        assert_eq!(n.store.service("web").unwrap().spec.replicas, 5);
        assert_eq!(
            n.store.service("db").unwrap().spec.replicas,
            3,
            "a later update beats an earlier delete"
        );
        assert!(n.store.service("left-only").is_some());
        assert!(n.store.service("right-only").is_some());
    }
}

#[test]
fn a_later_delete_beats_an_earlier_update_made_on_the_other_side() {
    let mut sim = StateSim::new(StateSimConfig::new(5, 5));
    sim.put(2, spec("api", 1));
    advance(&mut sim, 5_000);
    sim.partition(&[0, 0, 0, 1, 1]);
    sim.put(0, spec("api", 4));
    advance(&mut sim, 2_000);
    sim.delete(4, "api");
    advance(&mut sim, 2_000);
    sim.heal();
    converge_within(&mut sim, Duration::from_secs(5));
    assert!(sim.nodes.iter().all(|n| n.store.service("api").is_none()));
}

#[test]
fn a_write_reaches_all_five_nodes_within_a_second_at_five_percent_loss() {
    let mut sim = StateSim::new(StateSimConfig::new(5, 3));
    let mut lags = Vec::new();
    for w in 0..25u32 {
        let name = format!("svc{w}");
        sim.put((w % 5) as usize, spec(&name, 1));
        let start = sim.now();
        loop {
            if sim.nodes.iter().all(|n| n.store.service(&name).is_some()) {
                break;
            }
            advance(&mut sim, 10);
            assert!(sim.now() - start < Duration::from_secs(10));
        }
        lags.push(sim.now() - start);
        advance(&mut sim, 300);
    }
    lags.sort();
    let p50 = lags[lags.len() / 2];
    let p99 = lags[lags.len() - 1];
    eprintln!("virtual propagation to all 5: p50 {p50:?}, max {p99:?}");
    assert!(p50 <= Duration::from_millis(1_000));
    assert!(p99 <= Duration::from_millis(2_500));
}

#[test]
fn fifty_seeded_runs_with_random_partitions_and_writes_all_converge_after_the_heal() {
    for seed in 0..50u64 {
        let mut sim = StateSim::new(StateSimConfig::new(5, seed));
        let mut x = seed;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize
        };
        for round in 0..4 {
            let groups: Vec<usize> = (0..5).map(|_| next() % 2).collect();
            sim.partition(&groups);
            for _ in 0..6 {
                let node = next() % 5;
                let name = format!("s{}", next() % 8);
                if next() % 4 == 0 {
                    sim.delete(node, &name);
                } else {
                    sim.put(node, spec(&name, (round + 1) as u32));
                }
                advance(&mut sim, (next() % 700) as u64);
            }
        }
        sim.heal();
        let start = sim.now();
        while !sim.converged() {
            advance(&mut sim, 50);
            assert!(
                sim.now() - start <= Duration::from_secs(5),
                "seed {seed} did not converge"
            );
        }
    }
}

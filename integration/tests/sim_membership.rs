//! The membership core in the deterministic simulation: joins, false positives, crashes,
//! partitions, and the gossip load. Fast seeds run in `cargo test`; the N = 1000 run and the
//! bandwidth figure are `#[ignore]`d and print their figures.

use std::time::Duration;

use shoal_integration::sim::{Sim, SimConfig, node_id, percentile};
use shoal_membership::core::{MemberEvent, MemberState};

const SEC: Duration = Duration::from_secs(1);

/// Starts `n` nodes, each announcing to node 0, staggered by 10 ms, and runs until every node
/// sees all `n` alive (or panics after `limit`).
fn formed_cluster(cfg: SimConfig, n: usize, limit: Duration) -> Sim {
    let mut sim = Sim::new(cfg);
    sim.add_node(&[]);
    for _ in 1..n {
        sim.run_for(Duration::from_millis(10));
        sim.add_node(&[0]);
    }
    let formed = sim.run_until_cond(limit, SEC, |s| (0..n).all(|i| s.active_view(i) == n));
    let short: Vec<(usize, usize)> = (0..n)
        .map(|i| (i, sim.active_view(i)))
        .filter(|(_, v)| *v != n)
        .collect();
    assert!(
        formed,
        "cluster of {n} did not form within {limit:?}: nodes with a short view {short:?}"
    );
    sim
}

fn lossy(seed: u64, loss: f64) -> SimConfig {
    SimConfig {
        loss,
        ..SimConfig::lan(seed)
    }
}

/// Adds one node to a formed cluster and returns, for every other live node, how long after the
/// join started it learned of the newcomer (`None`: not within `window`).
fn measure_join(sim: &mut Sim, window: Duration) -> Vec<Option<Duration>> {
    let start = sim.now();
    let log_from = sim.log.len();
    let joiner = sim.add_node(&[0]);
    sim.run_for(window);
    let id = node_id(joiner);
    (0..joiner)
        .filter(|i| sim.is_up(*i))
        .map(|i| {
            sim.log[log_from..]
                .iter()
                .find(|o| o.node == i && matches!(&o.event, MemberEvent::Up(m) if m.node_id == id))
                .map(|o| o.at - start)
        })
        .collect()
}

fn join_figures(
    n: usize,
    loss: f64,
    seed: u64,
    joins: usize,
    window: Duration,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    // n - 1 members, then each join makes it n (the joiner leaves again before the next join).
    let limit = Duration::from_secs(if n > 200 { 600 } else { 120 });
    let mut sim = formed_cluster(lossy(seed, loss), n - 1, limit);
    let mut all = Vec::new();
    let mut per_join_p99 = Vec::new();
    let mut missing = 0;
    for _ in 0..joins {
        let times = measure_join(&mut sim, window);
        let known: Vec<Duration> = times.iter().flatten().copied().collect();
        missing += times.len() - known.len();
        // The time by which 99 % of the n nodes knew: the joiner itself (at 0) and the others
        // (a node that never learned within the window counts as "much later").
        let mut padded: Vec<Duration> = times.iter().map(|t| t.unwrap_or(window * 10)).collect();
        padded.push(Duration::ZERO);
        padded.sort();
        per_join_p99.push(percentile(&padded, 99.0).unwrap_or(window * 10));
        all.extend(known);
        let last = sim.len() - 1;
        sim.leave(last);
        sim.run_for(Duration::from_secs(5));
    }
    (all, per_join_p99, missing)
}

#[test]
fn a_join_reaches_99_percent_of_100_nodes_within_1_5_s_at_5_percent_loss() {
    let (all, per_join, missing) = join_figures(100, 0.05, 7, 3, Duration::from_secs(5));
    let p50 = percentile(&all, 50.0).unwrap();
    let p99 = percentile(&all, 99.0).unwrap();
    println!(
        "N=100 loss=5%: join known by node: p50 {p50:?} p99 {p99:?}; per join 99%-time {per_join:?}; never within 5 s: {missing}"
    );
    for t in &per_join {
        assert!(
            *t <= Duration::from_millis(1500),
            "99 % of nodes knew only after {t:?}"
        );
    }
}

#[test]
fn no_member_is_falsely_declared_down_over_ten_virtual_minutes_at_5_percent_loss() {
    let n = 100;
    let mut sim = formed_cluster(lossy(11, 0.05), n, Duration::from_secs(120));
    let log_from = sim.log.len();
    sim.run_for(Duration::from_secs(600));
    let downs: Vec<_> = sim.log[log_from..]
        .iter()
        .filter(|o| matches!(o.event, MemberEvent::Down(_)))
        .collect();
    let raised: u64 = (0..n)
        .map(|i| sim.core(i).counters().suspicions_raised)
        .sum();
    let refuted: u64 = (0..n)
        .map(|i| sim.core(i).counters().suspicions_refuted)
        .sum();
    let failed: u64 = (0..n).map(|i| sim.core(i).counters().probes_failed).sum();
    println!(
        "N={n} loss=5% 600 s: probes failed {failed}, suspicions raised {raised}, refuted {refuted}, false downs {}",
        downs.len()
    );
    assert!(downs.is_empty(), "false downs: {downs:?}");
    assert!(
        raised > 0,
        "5 % loss must cause some suspicions, or the counter is broken"
    );
    assert_eq!(raised, refuted, "every suspicion of a live node is refuted");
    assert!((0..n).all(|i| sim.active_view(i) == n));
}

#[test]
fn a_crashed_node_is_declared_down_by_every_other_node() {
    let n = 20;
    let mut sim = formed_cluster(lossy(3, 0.01), n, Duration::from_secs(60));
    sim.crash(5);
    let down_everywhere =
        sim.run_until_cond(Duration::from_secs(60), Duration::from_millis(100), |s| {
            (0..n)
                .filter(|i| *i != 5)
                .all(|i| s.state_of(i, 5) == Some(MemberState::Down))
        });
    assert!(down_everywhere);
    let confirmed: u64 = (0..n)
        .map(|i| sim.core(i).counters().suspicions_confirmed)
        .sum();
    assert!(confirmed >= 1);
    // Restarted with a new boot epoch, it is alive everywhere again.
    sim.restart(5);
    let back = sim.run_until_cond(Duration::from_secs(30), Duration::from_millis(100), |s| {
        (0..n).all(|i| s.state_of(i, 5) == Some(MemberState::Alive) && s.active_view(i) == n)
    });
    assert!(back);
}

#[test]
fn a_partitioned_minority_rejoins_by_itself_after_the_partition_heals() {
    let n = 12;
    let mut sim = formed_cluster(SimConfig::lan(5), n, Duration::from_secs(60));
    // Nodes 8..12 are cut off from the rest (including the seed, node 0).
    sim.partition(|i| u32::from(i >= 8));
    let split = sim.run_until_cond(Duration::from_secs(60), SEC, |s| {
        s.active_view(0) == 8 && s.active_view(9) == 4
    });
    assert!(
        split,
        "views after the split: {} / {}",
        sim.active_view(0),
        sim.active_view(9)
    );
    // Minority nodes know only each other; cut them from each other too so they are alone and
    // fall back to their seeds.
    sim.partition(|i| if i >= 8 { i as u32 } else { 0 });
    let alone = sim.run_until_cond(Duration::from_secs(60), SEC, |s| {
        (8..n).all(|i| s.active_view(i) == 1)
    });
    assert!(alone);
    sim.heal();
    let healed = sim.run_until_cond(Duration::from_secs(120), SEC, |s| {
        (0..n).all(|i| s.active_view(i) == n)
    });
    assert!(
        healed,
        "views after healing: {:?}",
        (0..n).map(|i| sim.active_view(i)).collect::<Vec<_>>()
    );
    let announces: u64 = (8..n).map(|i| sim.core(i).counters().seed_announces).sum();
    assert!(
        announces > 4,
        "healing went through seed re-announces ({announces})"
    );
}

#[test]
fn a_node_whose_seed_is_unreachable_at_start_joins_once_it_is_reachable() {
    let n = 8;
    let mut sim = formed_cluster(SimConfig::lan(17), n, Duration::from_secs(60));
    // The newcomer starts cut off from everyone: its first announces are lost.
    sim.partition(|i| u32::from(i >= n));
    let late = sim.add_node(&[0]);
    sim.partition(|i| u32::from(i >= n));
    sim.run_for(Duration::from_secs(20));
    assert_eq!(sim.active_view(late), 1);
    sim.heal();
    // Only the seed re-announce (backoff 1, 2, 4, 8, 16, 30 s) can bring it in now.
    let joined = sim.run_until_cond(Duration::from_secs(60), SEC, |s| {
        (0..=late).all(|i| s.active_view(i) == n + 1)
    });
    assert!(joined, "view of the newcomer: {}", sim.active_view(late));
    assert!(sim.core(late).counters().seed_announces >= 5);
}

#[test]
fn the_preset_is_re_tuned_when_the_cluster_crosses_ten_members() {
    let sim = formed_cluster(SimConfig::lan(9), 12, Duration::from_secs(60));
    for i in 0..12 {
        assert!(
            sim.core(i).counters().retunes >= 1,
            "node {i} never re-tuned"
        );
        assert_eq!(
            sim.core(i).swim_config().suspect_to_down_after,
            Duration::from_secs(8),
            "the LAN formula for a cluster of 100 (12 rounded up): 4 * log10(100) s"
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut sim = formed_cluster(lossy(seed, 0.05), 10, Duration::from_secs(30));
        sim.run_for(Duration::from_secs(20));
        (sim.stats, sim.log.len())
    };
    assert_eq!(run(42), run(42));
}

#[test]
#[ignore = "N = 1000 takes minutes in debug; run with --ignored --nocapture for the figures"]
fn a_join_reaches_99_percent_of_1000_nodes() {
    let (all, per_join, missing) = join_figures(1000, 0.05, 13, 3, Duration::from_secs(10));
    println!(
        "N=1000 loss=5%: p50 {:?} p99 {:?}; per join 99%-time {per_join:?}; never within 10 s: {missing}",
        percentile(&all, 50.0).unwrap(),
        percentile(&all, 99.0).unwrap()
    );
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn gossip_bytes_per_second_per_node_at_50_idle() {
    let n = 50;
    let mut sim = formed_cluster(SimConfig::lan(21), n, Duration::from_secs(60));
    // Let the join updates die out, then measure an idle minute.
    sim.run_for(Duration::from_secs(60));
    let before = sim.stats;
    let secs = 120u64;
    sim.run_for(Duration::from_secs(secs));
    let bytes = sim.stats.bytes_sent - before.bytes_sent;
    let dgrams = sim.stats.sent - before.sent;
    let per_node = bytes as f64 / (n as f64 * secs as f64);
    let dg_per_node = dgrams as f64 / (n as f64 * secs as f64);
    println!(
        "N={n} idle LAN preset: {per_node:.0} B/s per node sent ({dg_per_node:.2} datagrams/s, {:.0} B avg) before link overhead",
        bytes as f64 / dgrams as f64
    );
}

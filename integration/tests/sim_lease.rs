//! The leader lease in the deterministic simulation: safety under partitions, loss, pauses,
//! crash-restarts and bounded clock-rate drift; one leader in a majority, none in a minority;
//! failover time.

use std::time::Duration;

use shoal_integration::lease_sim::{LeaseSim, LeaseSimConfig, run};

fn sweep(seeds: std::ops::Range<u64>, make: impl Fn(u64) -> LeaseSimConfig) -> (usize, usize, u64) {
    let mut bad = 0;
    let mut leases = 0;
    let mut events = 0;
    for seed in seeds {
        let r = run(make(seed));
        if !r.violations.is_empty() {
            bad += 1;
            if bad == 1 {
                eprintln!("seed {seed}: {:?}", r.violations[0]);
            }
        }
        leases += r.epochs;
        events += r.events;
    }
    (bad, leases, events)
}

#[test]
fn hundreds_of_chaotic_runs_never_show_two_unexpired_leases_at_once() {
    let (bad, epochs, events) = sweep(0..300, LeaseSimConfig::chaos);
    eprintln!("300 runs: {epochs} lease epochs, {events} events");
    assert_eq!(bad, 0, "runs with overlapping leases");
    assert!(epochs > 300, "leaders were elected ({epochs} epochs)");
}

#[test]
#[ignore = "large sweep (~1 min): cargo test -p shoal-integration --test sim_lease -- --ignored"]
fn ten_thousand_chaotic_runs_never_show_two_unexpired_leases_at_once() {
    let (bad, epochs, events) = sweep(1_000_000..1_010_000, LeaseSimConfig::chaos);
    eprintln!("10000 runs: {epochs} lease epochs, {events} events");
    assert_eq!(bad, 0);
}

#[test]
fn clocks_drifting_beyond_the_stated_bound_are_caught_by_the_checker() {
    // The checker is not vacuous: when real clocks drift 10x more than the lease assumes,
    // some runs do show two leases at once.
    let (bad, _, _) = sweep(0..100, |s| LeaseSimConfig {
        actual_drift: 0.5,
        ..LeaseSimConfig::chaos(s)
    });
    assert!(bad > 0, "no violation found with drift beyond the bound");
}

fn settle(sim: &mut LeaseSim, secs: u64) {
    let t = sim.now() + Duration::from_secs(secs);
    sim.run_until(t);
}

#[test]
fn a_majority_partition_has_exactly_one_leader_and_a_minority_none() {
    let mut sim = LeaseSim::new(LeaseSimConfig::calm(5, 7));
    settle(&mut sim, 8);
    let before = sim.leaders_now();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].0, 0, "the lowest id leads");
    // The leader and one other node are cut off from the other three.
    sim.partition(&[0, 0, 1, 1, 1]);
    settle(&mut sim, 10);
    let after = sim.leaders_now();
    assert_eq!(after.len(), 1, "exactly one leader: {after:?}");
    assert_eq!(after[0].0, 2, "the lowest id of the majority leads");
    assert!(after[0].1 > before[0].1, "under a higher epoch");
    // Heal: still one leader.
    sim.heal();
    settle(&mut sim, 10);
    assert_eq!(sim.leaders_now().len(), 1);
    let r = sim.finish();
    assert!(r.violations.is_empty());
}

#[test]
fn a_three_three_split_of_six_voters_has_no_leader_on_either_side() {
    let mut sim = LeaseSim::new(LeaseSimConfig::calm(6, 3));
    settle(&mut sim, 8);
    assert_eq!(sim.leaders_now().len(), 1);
    sim.partition(&[0, 0, 0, 1, 1, 1]);
    settle(&mut sim, 10);
    assert!(sim.leaders_now().is_empty(), "{:?}", sim.leaders_now());
}

#[test]
fn failover_after_the_leader_crashes_stays_within_the_lease_plus_two_seconds() {
    let mut worst = Duration::ZERO;
    let mut all = Vec::new();
    for seed in 0..20 {
        let mut sim = LeaseSim::new(LeaseSimConfig::calm(5, seed));
        settle(&mut sim, 8);
        let leader = sim.leaders_now()[0].0;
        sim.crash(leader);
        let crashed_at = sim.now();
        loop {
            let t = sim.now() + Duration::from_millis(20);
            sim.run_until(t);
            if !sim.leaders_now().is_empty() {
                break;
            }
            assert!(
                sim.now() - crashed_at < Duration::from_secs(30),
                "no failover"
            );
        }
        let took = sim.now() - crashed_at;
        all.push(took);
        worst = worst.max(took);
    }
    all.sort();
    eprintln!(
        "virtual failover (T = 3 s): p50 {:?}, max {:?}",
        all[all.len() / 2],
        worst
    );
    assert!(worst <= Duration::from_secs(5), "failover took {worst:?}");
}

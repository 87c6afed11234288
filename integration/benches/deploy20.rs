//! Deploy benchmark: 20 replicas of `shoal-test/web:1` through a shoal agent with the Docker
//! runtime (deploy → all 20 running, as `shoal ps` reports them) against 20 `docker run -d` of
//! the same image with a published port, in the same run: a sequential loop (as an operator
//! types it) and 20 launched at once. Prints the times and the ratios; medians of `ROUNDS`
//! (env `DEPLOY20_ROUNDS`, default 3).
//!
//! Run: `cargo build --release -p shoal && cargo bench -p shoal-integration --bench deploy20`
//! (the agent binary must sit next to the bench; needs the Docker Engine and the test
//! images from `scripts/build-test-images.sh`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_integration::agents::{Runtime, TestCluster, remove_containers, wait_until};

const IMAGE: &str = "shoal-test/web:1";
const LABEL: &str = "shoal.bench=deploy20";

fn docker(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cleanup_baseline() {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={LABEL}")])
        .output()
        .expect("docker ps");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        docker(&args);
    }
}

fn run_args(i: usize) -> Vec<String> {
    [
        "run",
        "-d",
        "--init",
        "--label",
        LABEL,
        "--name",
        &format!("deploy20-{i}"),
        "-p",
        "127.0.0.1::8080",
        IMAGE,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn baseline_sequential() -> Duration {
    let t = Instant::now();
    for i in 0..20 {
        let args = run_args(i);
        assert!(
            docker(&args.iter().map(String::as_str).collect::<Vec<_>>()),
            "docker run failed"
        );
    }
    let d = t.elapsed();
    cleanup_baseline();
    d
}

fn baseline_parallel() -> Duration {
    let t = Instant::now();
    let children: Vec<_> = (0..20)
        .map(|i| {
            Command::new("docker")
                .args(run_args(i))
                .stdout(Stdio::null())
                .spawn()
                .expect("docker run")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().expect("docker run").success());
    }
    let d = t.elapsed();
    cleanup_baseline();
    d
}

fn shoal(c: &TestCluster, round: usize) -> Duration {
    let name = format!("web{round}");
    let spec = format!(
        "name = \"{name}\"\nimage = \"{IMAGE}\"\nreplicas = 20\nstop_grace = \"1s\"\n[[ports]]\nname = \"http\"\ncontainer = 8080\n"
    );
    let t = Instant::now();
    c.deploy(&name, &spec);
    let ok = wait_until(Duration::from_secs(120), || {
        let rows = c.ps(&name);
        rows.len() == 20
            && rows
                .iter()
                .all(|r| r["state"] == "running" && r["assigned"] == true)
    });
    let d = t.elapsed();
    assert!(ok, "20 replicas never ran: {:#?}", c.ps(&name));
    let (status, _) = shoal_integration::agents::http(
        c.any().api,
        "DELETE",
        &format!("/v1/services/{name}"),
        Some(&c.token),
        "",
    )
    .expect("delete");
    assert_eq!(status, 200);
    assert!(wait_until(Duration::from_secs(120), || c
        .ps(&name)
        .is_empty()));
    remove_containers(&c.names[0]);
    d
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("DEPLOY20_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    assert!(
        docker(&["image", "inspect", IMAGE]),
        "{IMAGE} is missing: run scripts/build-test-images.sh"
    );
    cleanup_baseline();
    let mut c = TestCluster::plain("bench", 1, 25_500, Runtime::Docker);
    c.start();
    let (mut ours, mut seq, mut par) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        ours.push(shoal(&c, round));
        seq.push(baseline_sequential());
        par.push(baseline_parallel());
    }
    let (o, s, p) = (
        median(ours.clone()),
        median(seq.clone()),
        median(par.clone()),
    );
    println!("deploy 20 replicas of {IMAGE}, medians of {rounds} rounds");
    println!("  shoal deploy -> 20 running          {o:>10.2?}   all {ours:?}");
    println!(
        "  20 x docker run -d (sequential)    {s:>10.2?}   ratio shoal/this {:.3}",
        o.as_secs_f64() / s.as_secs_f64()
    );
    println!(
        "  20 x docker run -d (in parallel)   {p:>10.2?}   ratio shoal/this {:.3}",
        o.as_secs_f64() / p.as_secs_f64()
    );
}

//! Benchmark: 20 instances started concurrently through `DockerRuntime` (until every
//! `ensure_started` has returned a running container) against the baseline an operator would
//! use, measured in the same run on the same engine and image:
//!
//! * `seq`: a shell loop of 20 `docker run -d` (one after the other, as typed by an operator);
//! * `par`: the same 20 `docker run -d` launched at once from the shell (`&` then `wait`).
//!
//! Each container gets the same configuration both ways: Docker's init, restart policy `no`,
//! a published port on 127.0.0.1 chosen by the engine, and a label. Rounds alternate the three
//! methods; the medians and the ratios ours/baseline are printed (goal ≤ 1.1). Everything the
//! benchmark creates carries `shoal.bench=1` and is removed after each method, outside the
//! timed part. Run: `cargo bench -p shoal-runtime --bench start20` (release build). Set
//! `START20_ROUNDS` to change the number of rounds (default 3).

use std::time::{Duration, Instant};

use shoal_runtime::{ContainerRuntime, DockerRuntime, InstanceSpec};

const N: usize = 20;
const IMAGE: &str = "shoal-test/web:1";

fn sh(script: &str) -> std::process::Output {
    std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run bash")
}

fn cleanup(label: &str) {
    sh(&format!(
        "ids=$(docker ps -aq --filter label={label}); [ -z \"$ids\" ] || docker rm -f -v $ids >/dev/null"
    ));
}

fn spec(node: &str, slot: u32) -> InstanceSpec {
    let mut s = InstanceSpec::image(node, "bench", slot, 1, IMAGE).with_port("http", 8080, None);
    s.ports[0].host_ip = Some("127.0.0.1".parse().expect("ip"));
    s.labels.insert("shoal.bench".into(), "1".into());
    s.stop_grace = Duration::from_secs(10);
    s
}

async fn ours(rt: &DockerRuntime, node: &str) -> Duration {
    let specs: Vec<InstanceSpec> = (0..N as u32).map(|i| spec(node, i)).collect();
    let t0 = Instant::now();
    let results = futures_util::future::join_all(specs.iter().map(|s| rt.ensure_started(s))).await;
    let took = t0.elapsed();
    for r in &results {
        match r {
            Ok(info) if info.state.is_running() => {}
            other => panic!("start failed: {other:?}"),
        }
    }
    took
}

fn docker_run_script(tag: &str, parallel: bool) -> String {
    let amp = if parallel { " &" } else { "" };
    let wait = if parallel { "\nwait" } else { "" };
    format!(
        "set -e\nfor i in $(seq 1 {N}); do\n  docker run -d --init --restart no -p 127.0.0.1::8080 \
         --label shoal.bench=1 --label shoal.bench.run={tag} --name shoal-bench-{tag}-$i {IMAGE} >/dev/null{amp}\ndone{wait}\n"
    )
}

fn baseline(tag: &str, parallel: bool) -> Duration {
    let script = docker_run_script(tag, parallel);
    let t0 = Instant::now();
    let out = sh(&script);
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "docker run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let running = sh(&format!(
        "docker ps -q --filter label=shoal.bench.run={tag} --filter status=running | wc -l"
    ));
    let count: usize = String::from_utf8_lossy(&running.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert_eq!(count, N, "all baseline containers running");
    took
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn load() -> String {
    String::from_utf8_lossy(&sh("uptime").stdout)
        .trim()
        .to_string()
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("START20_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let node = format!("bench{}", std::process::id());
    let rt = DockerRuntime::connect(&node)
        .await
        .unwrap_or_else(|e| panic!("the benchmark needs the Docker engine: {e}"));
    if rt.client().inspect_image(IMAGE).await.is_err() {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/build-test-images.sh"
        );
        assert!(
            sh(&format!("bash {script}")).status.success(),
            "build images"
        );
    }
    cleanup("shoal.bench=1");
    println!(
        "start20: {N} containers of {IMAGE}, {rounds} rounds; load before: {}",
        load()
    );

    // Warm-up: one container each way (image layers, engine caches), untimed.
    let warm = rt.ensure_started(&spec(&node, 999)).await.expect("warm-up");
    assert!(warm.state.is_running());
    sh(&format!(
        "docker run -d --init -p 127.0.0.1::8080 --label shoal.bench=1 {IMAGE} >/dev/null"
    ));
    cleanup("shoal.bench=1");

    let (mut t_ours, mut t_seq, mut t_par) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        let o = ours(&rt, &node).await;
        cleanup("shoal.bench=1");
        let s = baseline(&format!("s{r}"), false);
        cleanup("shoal.bench=1");
        let p = baseline(&format!("p{r}"), true);
        cleanup("shoal.bench=1");
        println!(
            "round {r}: shoal {:>6.2}s  docker-run loop {:>6.2}s  docker-run parallel {:>6.2}s",
            o.as_secs_f64(),
            s.as_secs_f64(),
            p.as_secs_f64()
        );
        t_ours.push(o);
        t_seq.push(s);
        t_par.push(p);
    }
    let (o, s, p) = (median(&mut t_ours), median(&mut t_seq), median(&mut t_par));
    println!(
        "median: shoal (20 concurrent ensure_started) {:.2}s",
        o.as_secs_f64()
    );
    println!(
        "median: 20 x `docker run -d` shell loop      {:.2}s",
        s.as_secs_f64()
    );
    println!(
        "median: 20 x `docker run -d &` + wait         {:.2}s",
        p.as_secs_f64()
    );
    println!(
        "ratio shoal / docker-run loop     = {:.3} (goal <= 1.1)",
        o.as_secs_f64() / s.as_secs_f64()
    );
    println!(
        "ratio shoal / docker-run parallel = {:.3}",
        o.as_secs_f64() / p.as_secs_f64()
    );
    println!("load after: {}", load());
}

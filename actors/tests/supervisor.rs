//! The Supervisor and Health actors over the fake runtime and the in-memory cluster state:
//! assigned slots run, exits are restarted at once then with backoff, unassigned instances are
//! removed, liveness failures restart, readiness failures only flip `ready`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use shoal_actors::healthcheck::Health;
use shoal_actors::port::{MemoryCluster, SlotWork};
use shoal_actors::reconcile::instance_id;
use shoal_actors::supervisor::{Reconcile, Supervisor};
use shoal_config::{ExecCheck, Probe, ServiceSpec};
use shoal_runtime::{ContainerRuntime, FakeRuntime};

async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn work(spec: &Arc<ServiceSpec>, slot: u32) -> SlotWork {
    SlotWork {
        service: spec.name.clone(),
        slot,
        version: 1,
        spec: spec.clone(),
    }
}

fn web() -> ServiceSpec {
    let mut s = ServiceSpec::with_image("web", "shoal-test/web:1");
    s.restart.backoff.base = Duration::from_millis(100);
    s.restart.backoff.cap = Duration::from_secs(5);
    s.stop_grace = Duration::from_millis(100);
    s
}

struct Rig {
    cluster: MemoryCluster,
    fake: Arc<FakeRuntime>,
    sup: Addr<Supervisor>,
}

fn rig(spec: ServiceSpec, slots: u32) -> Rig {
    let spec = Arc::new(spec);
    let cluster = MemoryCluster::new("n1");
    cluster.with(|s| s.assignments = (0..slots).map(|i| work(&spec, i)).collect());
    let fake = Arc::new(FakeRuntime::new("n1"));
    let runtime: Arc<dyn ContainerRuntime> = fake.clone();
    let port: Arc<dyn shoal_actors::port::ClusterPort> = Arc::new(cluster.clone());
    let sup = Supervisor::create(|ctx| {
        let health = Health::new(
            runtime.clone(),
            ctx.address().recipient(),
            Duration::from_millis(20),
        )
        .start();
        Supervisor::new(
            port,
            runtime,
            None,
            Some(health.recipient()),
            Duration::from_millis(200),
        )
    });
    Rig { cluster, fake, sup }
}

fn state(c: &MemoryCluster, slot: u32) -> Option<(String, bool, u32)> {
    c.with(|s| {
        s.reports
            .get(&("web".to_string(), slot))
            .map(|r| (r.state.clone(), r.ready, r.restarts))
    })
}

#[actix::test]
async fn assigned_slots_are_started_and_reported_running_and_ready() {
    let r = rig(web(), 3);
    wait_until("3 running", Duration::from_secs(10), || {
        (0..3).all(|i| state(&r.cluster, i) == Some(("running".into(), true, 0)))
    })
    .await;
    assert_eq!(r.fake.list().await.unwrap().len(), 3);
    let events = r
        .cluster
        .with(|s| s.events.iter().filter(|e| e.kind == "started").count());
    assert_eq!(events, 3);
}

#[actix::test]
async fn an_exited_instance_is_restarted_at_once_then_with_growing_backoff() {
    let r = rig(web(), 1);
    let id = instance_id("web", 0, 1);
    wait_until("running", Duration::from_secs(10), || {
        state(&r.cluster, 0).is_some_and(|s| s.0 == "running")
    })
    .await;
    let mut restart_times = Vec::new();
    for n in 1..=4u32 {
        let t = Instant::now();
        r.fake.exit(&id, 1).unwrap();
        wait_until("restarted", Duration::from_secs(20), || {
            r.fake.start_count(&id) == n + 1
        })
        .await;
        restart_times.push(t.elapsed());
        wait_until("reported", Duration::from_secs(10), || {
            state(&r.cluster, 0).is_some_and(|s| s.0 == "running" && s.2 == n)
        })
        .await;
    }
    // Immediate, then about 100, 200, 400 ms: each wait longer than the one before.
    assert!(
        restart_times[0] < Duration::from_millis(100) + Duration::from_millis(400),
        "{restart_times:?}"
    );
    assert!(
        restart_times[1] >= Duration::from_millis(100),
        "{restart_times:?}"
    );
    assert!(
        restart_times[2] >= Duration::from_millis(200),
        "{restart_times:?}"
    );
    assert!(
        restart_times[3] >= Duration::from_millis(400),
        "{restart_times:?}"
    );
    let backoffs: Vec<String> = r.cluster.with(|s| {
        s.events
            .iter()
            .filter(|e| e.kind == "backoff")
            .map(|e| e.message.clone())
            .collect()
    });
    assert_eq!(backoffs.len(), 3, "{backoffs:?}");
    assert!(
        backoffs[0].contains("in 100 ms") && backoffs[2].contains("in 400 ms"),
        "{backoffs:?}"
    );
}

#[actix::test]
async fn an_instance_no_longer_assigned_is_stopped_and_removed() {
    let r = rig(web(), 2);
    wait_until("2 running", Duration::from_secs(10), || r.fake_count() == 2).await;
    r.cluster.with(|s| s.assignments.truncate(1));
    r.sup.do_send(Reconcile);
    let gone = instance_id("web", 1, 1);
    wait_until("removed", Duration::from_secs(10), || {
        r.fake.stop_count(&gone) >= 1
    })
    .await;
    wait_until("1 left", Duration::from_secs(10), || r.fake_count() == 1).await;
    wait_until("report dropped", Duration::from_secs(10), || {
        state(&r.cluster, 1).is_none()
    })
    .await;
}

impl Rig {
    fn fake_count(&self) -> usize {
        let fake = self.fake.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(fake.list())
                .unwrap()
                .len()
        })
        .join()
        .unwrap()
    }
}

fn exec_probe() -> Probe {
    let mut p = Probe::new(
        None,
        None,
        Some(ExecCheck {
            command: vec!["check".into()],
        }),
    );
    p.interval = Duration::from_millis(50);
    p.timeout = Duration::from_millis(50);
    p.failure_threshold = 2;
    p
}

#[actix::test]
async fn a_failing_liveness_probe_restarts_the_instance() {
    let mut spec = web();
    spec.health.liveness = Some(exec_probe());
    let r = rig(spec, 1);
    let id = instance_id("web", 0, 1);
    wait_until("running", Duration::from_secs(10), || {
        state(&r.cluster, 0).is_some_and(|s| s.0 == "running")
    })
    .await;
    r.fake.set_exec_code(&id, 1);
    wait_until("restarted", Duration::from_secs(10), || {
        r.fake.start_count(&id) >= 2
    })
    .await;
    r.fake.set_exec_code(&id, 0);
    assert!(
        r.cluster
            .with(|s| s.events.iter().any(|e| e.kind == "unhealthy"))
    );
}

#[actix::test]
async fn a_failing_readiness_probe_flips_ready_and_restarts_nothing() {
    let mut spec = web();
    spec.health.readiness = Some(exec_probe());
    let r = rig(spec, 1);
    let id = instance_id("web", 0, 1);
    wait_until("ready", Duration::from_secs(10), || {
        state(&r.cluster, 0) == Some(("running".into(), true, 0))
    })
    .await;
    r.fake.set_exec_code(&id, 1);
    wait_until("not ready", Duration::from_secs(10), || {
        state(&r.cluster, 0) == Some(("running".into(), false, 0))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.fake.start_count(&id), 1, "readiness must never restart");
    r.fake.set_exec_code(&id, 0);
    wait_until("ready again", Duration::from_secs(10), || {
        state(&r.cluster, 0) == Some(("running".into(), true, 0))
    })
    .await;
}

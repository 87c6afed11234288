//! Cluster-state benchmark: 1,000 services and 10,000 placements. Prints full-sync time and
//! bytes (a new node catching up through the anti-entropy protocol), an incremental sync after
//! one change, persistence time, and the store's memory — each as a ratio against a baseline
//! measured in the same run (plain bincode encode + decode of the same records; their encoded
//! size).
//!
//! Run: `cargo bench -p shoal-membership --bench state`

use std::hint::black_box;
use std::time::Instant;

use shoal_membership::state::codec;
use shoal_membership::state::{
    DurableState, HlcTimestamp, MemBackend, Record, RecordKey, RedbBackend, Stamp, StateStore,
    Value,
};
use shoal_membership::sync::protocol::sync_pair;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * 4)
        .unwrap_or(0)
}

fn records() -> Vec<Record> {
    let mut out = Vec::new();
    for i in 0..1_000u32 {
        let text = format!(
            "name = \"svc-{i:04}\"\nimage = \"registry.local/team/svc-{i:04}:1.{i}\"\nreplicas = 10\n\
             [resources]\ncpu = 0.5\nmemory = \"256MiB\"\n[[ports]]\nname = \"http\"\ncontainer = 8080\n\
             [env]\nMODE = \"production\"\nREGION = \"west\"\n"
        );
        let spec = shoal_config::load_service_str("bench.toml", &text).expect("valid spec");
        out.push(Record::service(
            spec,
            1,
            HlcTimestamp::new(1_800_000_000_000 + u64::from(i), 0),
            [1; 16],
        ));
        for slot in 0..10u32 {
            let mut node = [0u8; 16];
            node[0] = (i * 10 + slot) as u8 % 50;
            out.push(Record {
                key: RecordKey::Placement {
                    service: format!("svc-{i:04}"),
                    slot,
                },
                stamp: Stamp::placement(7, u64::from(i * 10 + slot)),
                written_ms: 1_800_000_000_000,
                value: Value::Placement(node),
            });
        }
    }
    out
}

fn best_of<T>(n: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut last = None;
    for _ in 0..n {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        last = Some(v);
    }
    (best, last.expect("n > 0"))
}

fn main() {
    let recs = records();
    println!(
        "records: {} (1,000 services + 10,000 placements)",
        recs.len()
    );

    // Baseline: encode and decode every record once, no protocol, no store.
    let (t_base, raw_bytes) = best_of(5, || {
        let mut bytes = 0usize;
        for r in &recs {
            let b = codec::encode(r).expect("encode");
            bytes += b.len();
            black_box(codec::decode::<Record>(&b).expect("decode"));
        }
        bytes
    });
    println!(
        "baseline encode+decode: {:.1} ms, {} bytes",
        t_base * 1e3,
        raw_bytes
    );

    let rss0 = rss_kib();
    let (full, _) = StateStore::from_records(recs.clone());
    let rss1 = rss_kib();
    println!(
        "store memory: ~{} KiB estimated, {} KiB RSS growth; {:.2}x the encoded size",
        full.approx_bytes() / 1024,
        rss1.saturating_sub(rss0),
        (rss1.saturating_sub(rss0) * 1024) as f64 / raw_bytes as f64
    );

    // Full sync: an empty node catches up.
    let mut t_full = f64::MAX;
    let mut moved = (0, 0);
    for _ in 0..5 {
        let mut src = StateStore::from_records(recs.clone()).0;
        let mut fresh = StateStore::new();
        let t = Instant::now();
        moved = sync_pair(&mut fresh, &mut src);
        t_full = t_full.min(t.elapsed().as_secs_f64());
        assert_eq!(fresh.digest(), src.digest());
    }
    let (up, down) = moved;
    println!(
        "full sync (digest, snapshot, merge): {:.1} ms = {:.2}x baseline; {} bytes = {:.3}x the raw records",
        t_full * 1e3,
        t_full / t_base,
        up + down,
        (up + down) as f64 / raw_bytes as f64
    );

    // Incremental: one changed placement between two full stores.
    let mut a = StateStore::from_records(recs.clone()).0;
    let mut b = StateStore::from_records(recs.clone()).0;
    b.merge(Record {
        key: RecordKey::Placement {
            service: "svc-0500".into(),
            slot: 3,
        },
        stamp: Stamp::placement(8, 1),
        written_ms: 1_800_000_000_001,
        value: Value::Placement([9; 16]),
    });
    let t0 = Instant::now();
    let (up, down) = sync_pair(&mut a, &mut b);
    let t_one = t0.elapsed().as_secs_f64();
    assert_eq!(a.digest(), b.digest());
    println!(
        "incremental sync after one change: {:.2} ms = {:.3}x baseline; {} bytes = {:.4}x the raw records",
        t_one * 1e3,
        t_one / t_base,
        up + down,
        (up + down) as f64 / raw_bytes as f64
    );

    // Persistence: the whole state into redb, then loaded back.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let t = Instant::now();
    {
        let mut d = DurableState::open([1; 16], Box::new(RedbBackend::open(&path).expect("redb")))
            .expect("open");
        for r in &recs {
            d.store.merge(r.clone());
        }
        d.flush().expect("flush");
    }
    let t_save = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let d = DurableState::open([1; 16], Box::new(RedbBackend::open(&path).expect("redb")))
        .expect("open");
    let t_load = t.elapsed().as_secs_f64();
    assert_eq!(d.store.len(), recs.len());
    let file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "redb: save {:.1} ms ({:.2}x baseline), load {:.1} ms ({:.2}x baseline), file {} KiB",
        t_save * 1e3,
        t_save / t_base,
        t_load * 1e3,
        t_load / t_base,
        file / 1024
    );
    let mem = DurableState::open([1; 16], Box::new(MemBackend::default())).expect("open");
    black_box(mem.store.len());
}

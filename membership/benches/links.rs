//! Link benchmarks (`cargo bench -p shoal-membership --bench links`), each printed with a
//! baseline measured in the same run:
//! 1. XX handshakes per second on one core, both sides in one thread, certificates checked,
//!    against a bare snow XX handshake without certificates.
//! 2. Bytes added per sealed datagram, and seal+open time per datagram against a plain copy.
//! 3. Encrypted stream throughput (NoiseStream over loopback TCP) against plaintext
//!    length-prefixed frames over loopback TCP, alternating runs.
//!
//! `SHOAL_BENCH_QUICK=1` shrinks every loop (a smoke run).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_membership::cert::{CertificateAuthority, NodeCredentials, unix_now};
use shoal_membership::link::frame::{DEFAULT_MAX_FRAME, StreamCodec};
use shoal_membership::link::handshake::{
    Initiator, LinkKind, Responder, datagram_confirmation, stream_confirmation,
};
use shoal_membership::link::session::SessionTable;
use shoal_membership::link::{LinkMetrics, Links, NoiseStream, Plane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn quick() -> bool {
    std::env::var_os("SHOAL_BENCH_QUICK").is_some()
}

fn creds(ca: &CertificateAuthority, name: &str) -> Arc<NodeCredentials> {
    Arc::new(
        ca.issue(
            name,
            &BTreeMap::new(),
            Duration::from_secs(3600),
            unix_now(),
        )
        .unwrap(),
    )
}

/// One full XX handshake with certificates, both sides, as the links run it.
fn shoal_handshake(a: &Arc<NodeCredentials>, b: &Arc<NodeCredentials>, now: u64) {
    let k = LinkKind::Stream(Plane::Control);
    let (init, m1) = Initiator::start(k, a.clone(), 0, None).unwrap();
    let mut resp = Responder::new(k, b.clone(), 0).unwrap();
    let m2 = resp.on_msg1(&m1).unwrap();
    let (m3, pending) = init.on_msg2(&m2, now).unwrap();
    let mut ts = resp.on_msg3(&m3, now).unwrap().into_transport().unwrap();
    let c = stream_confirmation(&mut ts).unwrap();
    black_box(pending.confirm_stream(&c).unwrap());
}

/// The baseline: a bare snow XX handshake with the same suite and no payloads.
fn bare_handshake(a: &[u8], b: &[u8]) {
    let p = || "Noise_XX_25519_AESGCM_SHA256".parse().unwrap();
    let mut i = snow::Builder::new(p())
        .local_private_key(a)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut r = snow::Builder::new(p())
        .local_private_key(b)
        .unwrap()
        .build_responder()
        .unwrap();
    let (mut m, mut pl) = ([0u8; 1024], [0u8; 1024]);
    let n = i.write_message(&[], &mut m).unwrap();
    r.read_message(&m[..n], &mut pl).unwrap();
    let n = r.write_message(&[], &mut m).unwrap();
    i.read_message(&m[..n], &mut pl).unwrap();
    let n = i.write_message(&[], &mut m).unwrap();
    r.read_message(&m[..n], &mut pl).unwrap();
    black_box((
        i.into_transport_mode().unwrap(),
        r.into_transport_mode().unwrap(),
    ));
}

fn rate(n: u32, f: impl Fn()) -> f64 {
    f(); // warm up
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn bench_handshakes() {
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let (a, b) = (creds(&ca, "a"), creds(&ca, "b"));
    let now = unix_now();
    let ka = snow::Builder::new("Noise_XX_25519_AESGCM_SHA256".parse().unwrap())
        .generate_keypair()
        .unwrap();
    let kb = snow::Builder::new("Noise_XX_25519_AESGCM_SHA256".parse().unwrap())
        .generate_keypair()
        .unwrap();
    let n = if quick() { 50 } else { 2000 };
    let mut ours = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..3 {
        bare.push(rate(n, || bare_handshake(&ka.private, &kb.private)));
        ours.push(rate(n, || shoal_handshake(&a, &b, now)));
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (o, b) = (best(&ours), best(&bare));
    println!("handshakes (one thread, both sides, best of 3 x {n}):");
    println!(
        "  shoal XX + certificates : {o:>9.0} /s  ({:.1} us each)",
        1e6 / o
    );
    println!(
        "  bare snow XX (baseline) : {b:>9.0} /s  ({:.1} us each)",
        1e6 / b
    );
    println!("  ratio shoal/bare        : {:.2}", o / b);
}

fn bench_datagrams() {
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let (a, b) = (creds(&ca, "a"), creds(&ca, "b"));
    let now_unix = unix_now();
    let (a_addr, b_addr): (SocketAddr, SocketAddr) = (
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    let (ta, tb) = (SessionTable::new(), SessionTable::new());
    let (init, m1) = Initiator::start(LinkKind::Gossip, a, 11, Some(a_addr)).unwrap();
    let mut resp = Responder::new(LinkKind::Gossip, b, 22).unwrap();
    let m2 = resp.on_msg1(&m1).unwrap();
    let (m3, pending) = init.on_msg2(&m2, now_unix).unwrap();
    let est = resp.on_msg3(&m3, now_unix).unwrap();
    let info_b = est.info.clone();
    let keys_b = est.into_stateless().unwrap();
    let c = datagram_confirmation(&keys_b).unwrap();
    let (info_a, keys_a) = pending.confirm_datagram(&c).unwrap();
    let now = Instant::now();
    tb.install(&info_b, a_addr, keys_b, now);
    ta.install(&info_a, b_addr, keys_a, now);

    println!("sealed datagrams:");
    for size in [64usize, 512, 1400] {
        let pt = vec![7u8; size];
        let sealed = ta.seal(b_addr, &pt, now, now_unix).unwrap();
        println!(
            "  {size:>5} B plaintext -> {:>5} B on the wire: {} B added",
            sealed.bytes.len(),
            sealed.bytes.len() - size
        );
    }
    let n = if quick() { 1000 } else { 200_000 };
    let pt = vec![7u8; 1200];
    let start = Instant::now();
    for _ in 0..n {
        let s = ta.seal(b_addr, &pt, now, now_unix).unwrap();
        black_box(tb.open(&s.bytes, now, now_unix).unwrap());
    }
    let crypto = start.elapsed().as_secs_f64() / n as f64;
    let start = Instant::now();
    for _ in 0..n {
        let mut v = Vec::with_capacity(pt.len() + 29);
        v.extend_from_slice(&pt);
        black_box(v.clone());
    }
    let copy = start.elapsed().as_secs_f64() / n as f64;
    println!(
        "  seal+open of 1200 B     : {:>7.2} us per datagram",
        crypto * 1e6
    );
    println!(
        "  two plain copies (base) : {:>7.2} us per datagram  (ratio {:.1}x)",
        copy * 1e6,
        crypto / copy
    );
}

const FRAME: usize = 64 * 1024;

async fn plain_run(total: usize) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; FRAME];
        while got < total {
            let len = s.read_u32().await.unwrap() as usize;
            assert!(len <= FRAME);
            s.read_exact(&mut buf[..len]).await.unwrap();
            got += len;
        }
        s.write_u8(1).await.unwrap();
    });
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let frame = vec![0x5au8; FRAME];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let mut out = Vec::with_capacity(FRAME + 4);
        out.extend_from_slice(&(FRAME as u32).to_be_bytes());
        out.extend_from_slice(&frame);
        c.write_all(&out).await.unwrap();
        sent += FRAME;
    }
    c.read_u8().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    server.await.unwrap();
    total as f64 / secs / 1e6
}

async fn noise_run(total: usize, a: Arc<NodeCredentials>, b: Arc<NodeCredentials>) -> f64 {
    let m = Arc::new(LinkMetrics::default());
    let (_udp, listener) = Links::bind("127.0.0.1:0".parse().unwrap(), b, m.clone())
        .await
        .unwrap();
    let addr = listener.local_addr();
    let server = tokio::spawn(async move {
        let (mut s, _, _) = listener.accept().await.unwrap();
        let mut got = 0usize;
        while got < total {
            got += s.recv_frame().await.unwrap().len();
        }
        s.send_frame(b"done").await.unwrap();
    });
    let (mut c, _) = NoiseStream::connect(addr, Plane::Data, a, m).await.unwrap();
    let frame = vec![0x5au8; FRAME];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        c.send_frame(&frame).await.unwrap();
        sent += FRAME;
    }
    c.recv_frame().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    server.await.unwrap();
    total as f64 / secs / 1e6
}

/// The stream codec alone, in memory: seal and open 64 KiB frames in one thread.
fn codec_run(total: usize, a: &Arc<NodeCredentials>, b: &Arc<NodeCredentials>) -> f64 {
    let k = LinkKind::Stream(Plane::Data);
    let now = unix_now();
    let (init, m1) = Initiator::start(k, a.clone(), 0, None).unwrap();
    let mut resp = Responder::new(k, b.clone(), 0).unwrap();
    let m2 = resp.on_msg1(&m1).unwrap();
    let (m3, pending) = init.on_msg2(&m2, now).unwrap();
    let mut rts = resp.on_msg3(&m3, now).unwrap().into_transport().unwrap();
    let c = stream_confirmation(&mut rts).unwrap();
    let (_, its) = pending.confirm_stream(&c).unwrap();
    let mut tx = StreamCodec::new(its, DEFAULT_MAX_FRAME);
    let mut rx = StreamCodec::new(rts, DEFAULT_MAX_FRAME);
    let frame = vec![0x5au8; FRAME];
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        let wire = tx.seal_frame(&frame).unwrap();
        rx.push_bytes(&wire);
        done += black_box(rx.next_frame().unwrap().unwrap()).len();
    }
    total as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn bench_streams() {
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let (a, b) = (creds(&ca, "a"), creds(&ca, "b"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let total = if quick() { 8 << 20 } else { 512 << 20 };
    let (mut plain, mut enc) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for _ in 0..3 {
            plain.push(plain_run(total).await);
            enc.push(noise_run(total, a.clone(), b.clone()).await);
        }
    });
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let (p, e) = (med(&mut plain), med(&mut enc));
    let codec = codec_run(total / 4, &a, &b);
    println!(
        "stream throughput, loopback TCP, {} MiB in 64 KiB frames, median of 3 alternating runs:",
        total >> 20
    );
    println!("  plaintext frames (baseline) : {p:>8.0} MB/s");
    println!("  Noise AES-256-GCM frames    : {e:>8.0} MB/s");
    println!("  ratio encrypted/plaintext   : {:.2}", e / p);
    println!("  (codec alone in memory, seal+open in one thread: {codec:.0} MB/s)");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    bench_handshakes();
    bench_datagrams();
    bench_streams();
}

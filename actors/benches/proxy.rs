//! Data-plane benchmark: the same work direct to a backend, through shoal's proxy (TCP mode with
//! splice and with a copy loop, HTTP mode), across two nodes (plaintext and Noise data plane),
//! and through HAProxy (Debian's package, `nbthread 1`) as the anchor. Figures are printed as
//! ratios against the direct run measured in this same run.
//!
//! Run: `cargo bench -p shoal-actors --bench proxy` (release). The backend, the proxies of node A
//! (where clients connect), node B (the far end of cross-node runs) and the load generator each
//! get a one-thread tokio runtime; HAProxy gets one thread. On a shared
//! 2-core machine absolute figures are order-of-magnitude only; the ratios are the result.
//! Env: `PROXY_BENCH_SECS` (seconds per request/response run, default 3), `PROXY_BENCH_MIB`
//! (bulk transfer size, default 1024).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_actors::pick::Policy;
use shoal_actors::proxy::remote::{
    NoiseDialer, PlainDialer, RemoteDialer, serve_noise_stream, serve_plain,
};
use shoal_actors::proxy::{Endpoint, Protocol, Proxy, ProxyOptions, Route, RoutingTable};
use shoal_membership::cert::{CertificateAuthority, unix_now};
use shoal_membership::link::{LinkMetrics, LinkOptions, NoiseListener, Plane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const BODY: usize = 100;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Backend: HTTP/1.1 keep-alive, 100-byte body; `GET /bulk` streams PROXY_BENCH_MIB MiB.

async fn backend(l: TcpListener, bulk: u64) {
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(async move {
            let _ = backend_conn(s, bulk).await;
        });
    }
}

async fn backend_conn(mut s: TcpStream, bulk: u64) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let small = {
        let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
        r.extend(std::iter::repeat_n(b'x', BODY));
        r
    };
    let chunk = vec![7u8; 256 * 1024];
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break e;
            }
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let is_bulk = buf.starts_with(b"GET /bulk");
        buf.drain(..end + 4);
        if is_bulk {
            s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {bulk}\r\n\r\n").as_bytes())
                .await?;
            let mut left = bulk;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
        } else {
            s.write_all(&small).await?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator

/// Reads one response with a Content-Length body; returns the body length.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u64> {
    let mut tmp = vec![0u8; 64 * 1024];
    let end = loop {
        if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break e;
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let len: u64 = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or(std::io::ErrorKind::InvalidData)?;
    buf.drain(..end + 4);
    let mut have = buf.len() as u64;
    if have >= len {
        buf.drain(..len as usize);
        return Ok(len);
    }
    buf.clear();
    while have < len {
        let want = ((len - have) as usize).min(tmp.len());
        let n = s.read(&mut tmp[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n as u64;
    }
    Ok(len)
}

struct RrResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i])
}

/// `conns` keep-alive connections; each sends a request, waits for the answer, and (with
/// `rate_per_conn`) waits until its next scheduled send; latency counts from the send.
async fn request_response(
    addr: SocketAddr,
    conns: usize,
    secs: f64,
    rate_per_conn: Option<f64>,
) -> RrResult {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let mut buf = Vec::new();
            let interval = rate_per_conn.map(|r| Duration::from_secs_f64(1.0 / r));
            let mut next = Instant::now();
            while Instant::now() < deadline {
                if interval.is_some() {
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep(next - now).await;
                    }
                }
                // latency from the actual send: tokio's timer (1 ms granularity) paces the
                // sends, so counting from the scheduled time would add its lateness to every path
                let start = Instant::now();
                s.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
                    .await
                    .expect("send");
                read_response(&mut s, &mut buf).await.expect("response");
                lat.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if let Some(iv) = interval {
                    next += iv;
                }
            }
            lat
        }));
    }
    let t0 = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let el = t0.elapsed().as_secs_f64().max(secs);
    all.sort_unstable();
    RrResult {
        rps: all.len() as f64 / el,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
    }
}

/// One bulk transfer of the backend's `/bulk` body; GB/s (10^9 bytes per second).
async fn bulk(addr: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /bulk HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .expect("send");
    let t0 = Instant::now();
    let n = read_response(&mut s, &mut Vec::new())
        .await
        .expect("bulk body");
    n as f64 / t0.elapsed().as_secs_f64() / 1e9
}

// ---------------------------------------------------------------------------------------------
// Rig

fn route(protocol: Protocol, ep: Endpoint) -> RoutingTable {
    RoutingTable {
        version: 1,
        routes: BTreeMap::from([(
            80,
            Route {
                service: "bench".into(),
                published: 80,
                protocol,
                policy: Policy::RoundRobin,
                proxy_protocol: false,
                stop_grace: Duration::from_secs(10),
                endpoints: vec![ep],
            },
        )]),
    }
}

fn endpoint(addr: SocketAddr, node_addr: SocketAddr, local: bool) -> Endpoint {
    Endpoint {
        instance: "b1".into(),
        node: if local { "a" } else { "b" }.into(),
        addr,
        node_addr,
        local,
        weight: 1,
        ready: true,
        draining: false,
    }
}

/// A proxy on 127.0.0.1:0 serving `table`; returns its published address.
async fn local_proxy(
    dialer: Arc<dyn RemoteDialer>,
    opts: ProxyOptions,
    table: RoutingTable,
) -> SocketAddr {
    let p = Proxy::new(dialer, opts);
    p.publish(table);
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(p.serve(l, 80));
    a
}

/// Node B (data plane on 127.0.0.2, the backend local to it) and node A (published port on
/// 127.0.0.1, the backend remote); returns node A's published address.
/// Node B runs on its own runtime `b_rt` (a second node is a second process).
async fn cross_node(
    b_rt: &tokio::runtime::Handle,
    backend: SocketAddr,
    noise: bool,
    protocol: Protocol,
) -> SocketAddr {
    let ca = CertificateAuthority::generate(unix_now()).expect("ca");
    let issue = |n: &str| {
        Arc::new(
            ca.issue(n, &BTreeMap::new(), Duration::from_secs(3600), unix_now())
                .expect("cert"),
        )
    };
    let plain: Arc<dyn RemoteDialer> = Arc::new(PlainDialer::default());
    let b = Proxy::new(plain.clone(), ProxyOptions::default());
    let b_creds = issue("b");
    let bp = b.clone();
    let data = b_rt
        .spawn(async move {
            if noise {
                let l = NoiseListener::bind(
                    "127.0.0.2:0".parse().expect("addr"),
                    b_creds,
                    Arc::new(LinkMetrics::default()),
                )
                .await
                .expect("noise bind");
                let a = l.local_addr();
                tokio::spawn(async move {
                    while let Ok((s, _, plane)) = l.accept().await {
                        if plane == Plane::Data {
                            tokio::spawn(serve_noise_stream(bp.clone(), s));
                        }
                    }
                });
                a
            } else {
                let l = TcpListener::bind("127.0.0.2:0").await.expect("bind");
                let a = l.local_addr().expect("addr");
                tokio::spawn(serve_plain(bp, l));
                a
            }
        })
        .await
        .expect("node b");
    b.publish(route(protocol, endpoint(backend, data, true)));
    let dialer: Arc<dyn RemoteDialer> = if noise {
        Arc::new(NoiseDialer::new(
            issue("a"),
            Arc::new(LinkMetrics::default()),
            LinkOptions::default(),
        ))
    } else {
        plain
    };
    local_proxy(
        dialer,
        ProxyOptions::default(),
        route(protocol, endpoint(backend, data, false)),
    )
    .await
}

struct Haproxy {
    child: Child,
    tcp: SocketAddr,
    http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start_haproxy(backend: SocketAddr) -> Option<Haproxy> {
    let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let dir = tempfile::tempdir().ok()?;
    let (tp, hp) = (free_port(), free_port());
    let cfg = format!(
        "global\n  nbthread 1\n  maxconn 4000\n\
         defaults\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend ft\n  bind 127.0.0.1:{tp}\n  mode tcp\n  default_backend bt\n\
         backend bt\n  mode tcp\n  option splice-auto\n  server s1 {backend}\n\
         frontend fh\n  bind 127.0.0.1:{hp}\n  mode http\n  option http-keep-alive\n  default_backend bh\n\
         backend bh\n  mode http\n  http-reuse always\n  server s1 {backend}\n"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).ok()?;
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let tcp: SocketAddr = format!("127.0.0.1:{tp}").parse().ok()?;
    let http: SocketAddr = format!("127.0.0.1:{hp}").parse().ok()?;
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if std::net::TcpStream::connect(tcp).is_ok() && std::net::TcpStream::connect(http).is_ok() {
            return Some(Haproxy {
                child,
                tcp,
                http,
                _dir: dir,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` / nextest discovery: nothing to run as a test.
        return;
    }
    let secs = env_u64("PROXY_BENCH_SECS", 3) as f64;
    let mib = env_u64("PROXY_BENCH_MIB", 1024);
    let backend_rt = runtime();
    let proxy_rt = runtime();
    let client_rt = runtime();
    let node_b_rt = runtime();
    let b_rt = node_b_rt.handle().clone();

    let backend_addr = backend_rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        tokio::spawn(backend(l, mib * 1024 * 1024));
        a
    });
    let plain: Arc<dyn RemoteDialer> = Arc::new(PlainDialer::default());
    let ep = endpoint(backend_addr, backend_addr, true);
    let (splice_tcp, copy_tcp, http, x_plain, x_noise, x_plain_http, x_noise_http) = proxy_rt
        .block_on(async {
            let copy_opts = ProxyOptions {
                splice: false,
                ..ProxyOptions::default()
            };
            (
                local_proxy(
                    plain.clone(),
                    ProxyOptions::default(),
                    route(Protocol::Tcp, ep.clone()),
                )
                .await,
                local_proxy(plain.clone(), copy_opts, route(Protocol::Tcp, ep.clone())).await,
                local_proxy(
                    plain.clone(),
                    ProxyOptions::default(),
                    route(Protocol::Http, ep.clone()),
                )
                .await,
                cross_node(&b_rt, backend_addr, false, Protocol::Tcp).await,
                cross_node(&b_rt, backend_addr, true, Protocol::Tcp).await,
                cross_node(&b_rt, backend_addr, false, Protocol::Http).await,
                cross_node(&b_rt, backend_addr, true, Protocol::Http).await,
            )
        });
    let haproxy = start_haproxy(backend_addr);
    if haproxy.is_none() {
        println!("HAProxy not found (apt-get install -y haproxy): its columns are skipped");
    }

    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("proxy bench: {secs} s per request/response run, {mib} MiB bulk; loadavg {uptime}");

    let mut rr: Vec<(&str, SocketAddr)> = vec![
        ("direct", backend_addr),
        ("shoal tcp (splice)", splice_tcp),
        ("shoal tcp (copy)", copy_tcp),
        ("shoal http", http),
    ];
    if let Some(h) = &haproxy {
        rr.push(("haproxy tcp", h.tcp));
        rr.push(("haproxy http", h.http));
    }
    rr.push(("cross-node plain tcp", x_plain));
    rr.push(("cross-node noise tcp", x_noise));
    rr.push(("cross-node plain http", x_plain_http));
    rr.push(("cross-node noise http", x_noise_http));

    // 1. closed-loop throughput, 16 keep-alive connections
    println!("\n## request/response, 16 keep-alive connections, closed loop (100-byte body)");
    println!(
        "{:<24} {:>10} {:>9} {:>9} {:>9}",
        "path", "req/s", "÷direct", "p50 µs", "p99 µs"
    );
    let mut max: BTreeMap<&str, f64> = BTreeMap::new();
    for (name, addr) in &rr {
        let r = client_rt.block_on(request_response(*addr, 16, secs, None));
        let base = *max.get("direct").unwrap_or(&r.rps);
        println!(
            "{:<24} {:>10.0} {:>9.3} {:>9.0} {:>9.0}",
            name,
            r.rps,
            r.rps / base,
            r.p50_us,
            r.p99_us
        );
        max.insert(name, r.rps);
    }
    if let (Some(h), Some(s)) = (max.get("haproxy http"), max.get("shoal http")) {
        println!("shoal http ÷ haproxy http: {:.3}", s / h);
    }
    if let (Some(h), Some(s)) = (max.get("haproxy tcp"), max.get("shoal tcp (splice)")) {
        println!("shoal tcp ÷ haproxy tcp: {:.3}", s / h);
    }
    if let (Some(p), Some(n)) = (
        max.get("cross-node plain tcp"),
        max.get("cross-node noise tcp"),
    ) {
        println!("cross-node noise ÷ plain (tcp req/s): {:.3}", n / p);
    }

    // 2. moderate load: a fixed rate of 25 % of the slowest path's maximum, so that every path
    //    runs at moderate load (paced sends, latency from each send), 8 connections
    let slowest = max.values().copied().fold(f64::INFINITY, f64::min);
    let rate = if slowest.is_finite() {
        slowest * 0.25
    } else {
        2000.0
    };
    println!(
        "\n## fixed rate {rate:.0} req/s over 8 connections (25 % of the slowest path's max): added latency"
    );
    println!(
        "{:<24} {:>9} {:>9} {:>11} {:>11}",
        "path", "p50 µs", "p99 µs", "+p50 µs", "+p99 µs"
    );
    let mut direct: Option<(f64, f64)> = None;
    for (name, addr) in &rr {
        let r = client_rt.block_on(request_response(*addr, 8, secs, Some(rate / 8.0)));
        let (b50, b99) = *direct.get_or_insert((r.p50_us, r.p99_us));
        println!(
            "{:<24} {:>9.0} {:>9.0} {:>11.0} {:>11.0}",
            name,
            r.p50_us,
            r.p99_us,
            r.p50_us - b50,
            r.p99_us - b99
        );
    }

    // 3. bulk, one connection, median of 3
    println!("\n## bulk transfer, one connection, {mib} MiB (median of 3)");
    println!("{:<24} {:>8} {:>9}", "path", "GB/s", "÷direct");
    let mut bulk_paths: Vec<(&str, SocketAddr)> = vec![
        ("direct", backend_addr),
        ("shoal tcp (splice)", splice_tcp),
        ("shoal tcp (copy)", copy_tcp),
    ];
    if let Some(h) = &haproxy {
        bulk_paths.push(("haproxy tcp", h.tcp));
    }
    bulk_paths.push(("cross-node plain tcp", x_plain));
    bulk_paths.push(("cross-node noise tcp", x_noise));
    let mut gbs: BTreeMap<&str, f64> = BTreeMap::new();
    for (name, addr) in &bulk_paths {
        let mut v: Vec<f64> = (0..3).map(|_| client_rt.block_on(bulk(*addr))).collect();
        v.sort_by(f64::total_cmp);
        let g = v[1];
        let base = *gbs.get("direct").unwrap_or(&g);
        println!("{:<24} {:>8.2} {:>9.3}", name, g, g / base);
        gbs.insert(name, g);
    }
    if let (Some(p), Some(n)) = (
        gbs.get("cross-node plain tcp"),
        gbs.get("cross-node noise tcp"),
    ) {
        println!("cross-node noise ÷ plain (bulk): {:.3}", n / p);
    }
    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nloadavg after: {uptime}");
    drop(haproxy);
}

//! The data plane over real loopback sockets: in-process "nodes" (a proxy each, on 127.0.0.1/2/3,
//! with a Noise data-plane listener) and tiny HTTP backends that answer their own id. Tests
//! serialize on one mutex (they open many sockets and measure spreads).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_actors::balancer::{Balancer, UpdateRoutes};
use shoal_actors::pick::Policy;
use shoal_actors::proxy::remote::{
    NoiseDialer, PlainDialer, RemoteDialer, serve_noise_stream, serve_plain,
};
use shoal_actors::proxy::{
    Endpoint, EndpointStats, Protocol, Proxy, ProxyError, ProxyOptions, Route, RoutingTable,
    wait_until,
};
use shoal_membership::cert::{CertificateAuthority, NodeCredentials, unix_now};
use shoal_membership::link::{LinkMetrics, LinkOptions, NoiseListener, Plane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PORT: u16 = 8080;
const LONG: Duration = Duration::from_secs(30);

/// A recognisable response body for the capture test.
fn secret_body() -> Vec<u8> {
    let mut v = Vec::with_capacity(256 * 1024);
    let mut i = 0u64;
    while v.len() < 256 * 1024 {
        v.extend_from_slice(format!("SHOAL-KNOWN-RESPONSE-BODY-{i:08}|").as_bytes());
        i += 1;
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Backends

struct Backend {
    id: String,
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    kill: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(ip: &str, id: &str) -> Backend {
        Self::start_with(ip, id, false).await
    }

    /// `expect_proxy_header`: the backend reads a PROXY v2 header first and answers with the
    /// client address it names.
    async fn start_with(ip: &str, id: &str, expect_proxy_header: bool) -> Backend {
        let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let (kill, kill_rx) = watch::channel(false);
        let id2 = id.to_string();
        let acc = accepted.clone();
        let task = tokio::spawn(async move {
            let mut k = kill_rx.clone();
            loop {
                tokio::select! {
                    r = l.accept() => {
                        let Ok((s, _)) = r else { continue };
                        acc.fetch_add(1, Ordering::Relaxed);
                        let id = id2.clone();
                        let k = kill_rx.clone();
                        tokio::spawn(async move {
                            let _ = backend_conn(s, id, k, expect_proxy_header).await;
                        });
                    }
                    _ = k.wait_for(|d| *d) => return,
                }
            }
        });
        Backend {
            id: id.to_string(),
            addr,
            accepted,
            kill,
            task,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops the listener and resets every open connection (as a crashed process would).
    fn kill(&self) {
        let _ = self.kill.send(true);
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn backend_conn(
    mut s: TcpStream,
    id: String,
    mut kill: watch::Receiver<bool>,
    expect_proxy_header: bool,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut client = String::new();
    if expect_proxy_header {
        let mut h = [0u8; 28];
        s.read_exact(&mut h).await?;
        if h[12] == 0x21 && h[13] == 0x11 {
            client = format!(
                "{}.{}.{}.{}:{}",
                h[16],
                h[17],
                h[18],
                h[19],
                u16::from_be_bytes([h[24], h[25]])
            );
        } else {
            client = "bad-proxy-header".into();
        }
    }
    let work = async {
        let mut buf = Vec::new();
        loop {
            let Some(path) = read_head(&mut s, &mut buf).await? else {
                return Ok(());
            };
            let head = |n: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
            match path.as_str() {
                "/slow" => {
                    // 10 chunks over ~1 s
                    let chunk = format!("{id}-chunk\n");
                    s.write_all(head(chunk.len() * 10).as_bytes()).await?;
                    for _ in 0..10 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        s.write_all(chunk.as_bytes()).await?;
                    }
                }
                "/secret" => {
                    let b = secret_body();
                    s.write_all(head(b.len()).as_bytes()).await?;
                    s.write_all(&b).await?;
                }
                "/client" => {
                    s.write_all(head(client.len()).as_bytes()).await?;
                    s.write_all(client.as_bytes()).await?;
                }
                _ => {
                    s.write_all(head(id.len()).as_bytes()).await?;
                    s.write_all(id.as_bytes()).await?;
                }
            }
        }
    };
    tokio::select! {
        r = work => r,
        _ = kill.wait_for(|d| *d) => {
            // a crash: reset, not a clean close
            let _ = s.set_zero_linger();
            Ok(())
        }
    }
}

/// Reads one request head; returns its path, or `None` at end of file.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            return Ok(Some(path));
        }
        if buf.len() > 16 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Reads one response (head + Content-Length body) from `s`; `Err` on a short or reset reply.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, Vec<u8>), String> {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut tmp = [0u8; 16384];
        let n = s.read(&mut tmp).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the response head".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end + 4);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or("no content-length")?;
    while buf.len() < len {
        let mut tmp = [0u8; 65536];
        let n = s.read(&mut tmp).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("short body: {} of {len}", buf.len()));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = buf.drain(..len).collect();
    Ok((status, body))
}

/// One request on its own connection.
async fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let (status, body) = read_response(&mut s, &mut Vec::new()).await?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    Ok(body)
}

async fn get_id(addr: SocketAddr) -> Result<String, String> {
    Ok(String::from_utf8_lossy(&get(addr, "/").await?).to_string())
}

/// `n` requests on one kept-alive connection; the ids (or statuses) answered.
async fn keepalive_ids(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for _ in 0..n {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let (status, body) = read_response(&mut s, &mut buf).await.unwrap();
        out.push(if status == 200 {
            String::from_utf8_lossy(&body).to_string()
        } else {
            format!("status {status}")
        });
    }
    out
}

fn tally(ids: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for id in ids {
        *m.entry(id).or_default() += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Nodes

struct Node {
    name: String,
    proxy: Arc<Proxy>,
    /// The published port's listener address on this node.
    public: SocketAddr,
    /// The data plane (Noise link port).
    data: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
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

/// A node on `ip` with a Noise data plane; remote endpoints are dialed with Noise.
async fn noise_node(ca: &CertificateAuthority, name: &str, ip: &str) -> Node {
    let c = creds(ca, name);
    let dialer = NoiseDialer::new(
        c.clone(),
        Arc::new(LinkMetrics::default()),
        LinkOptions::default(),
    );
    node_with(name, ip, Arc::new(dialer), Some(c), ProxyOptions::default()).await
}

async fn node_with(
    name: &str,
    ip: &str,
    dialer: Arc<dyn RemoteDialer>,
    noise: Option<Arc<NodeCredentials>>,
    opts: ProxyOptions,
) -> Node {
    let ip: IpAddr = ip.parse().unwrap();
    let proxy = Proxy::new(dialer, opts);
    let mut tasks = Vec::new();
    let data = if let Some(c) = noise {
        let l = NoiseListener::bind(SocketAddr::new(ip, 0), c, Arc::new(LinkMetrics::default()))
            .await
            .unwrap();
        let data = l.local_addr();
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok((s, _peer, plane)) = l.accept().await {
                if plane == Plane::Data {
                    let p = p.clone();
                    tokio::spawn(async move {
                        let _ = serve_noise_stream(p, s).await;
                    });
                }
            }
        }));
        data
    } else {
        let l = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let data = l.local_addr().unwrap();
        tasks.push(tokio::spawn(serve_plain(proxy.clone(), l)));
        data
    };
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let public = l.local_addr().unwrap();
    tasks.push(tokio::spawn(proxy.clone().serve(l, PORT)));
    Node {
        name: name.to_string(),
        proxy,
        public,
        data,
        tasks,
    }
}

/// (backend, node name, node data address)
type Placed<'a> = (&'a Backend, &'a str, SocketAddr);

fn route(protocol: Protocol, policy: Policy, placed: &[Placed<'_>], here: &str) -> Route {
    Route {
        service: "web".into(),
        published: PORT,
        protocol,
        policy,
        proxy_protocol: false,
        stop_grace: Duration::from_secs(10),
        endpoints: placed
            .iter()
            .map(|(b, node, data)| Endpoint {
                instance: b.id.clone(),
                node: node.to_string(),
                addr: b.addr,
                node_addr: *data,
                local: *node == here,
                weight: 1,
                ready: true,
                draining: false,
            })
            .collect(),
    }
}

fn table(version: u64, r: Route) -> RoutingTable {
    RoutingTable {
        version,
        routes: BTreeMap::from([(PORT, r)]),
    }
}

fn stats(n: &Node, instance: &str) -> Arc<EndpointStats> {
    n.proxy.metrics().endpoint("web", instance)
}

fn get_u(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Three nodes on 127.0.0.1/2/3 with two backends each; every node's table lists all six.
async fn three_nodes(
    protocol: Protocol,
) -> (
    CertificateAuthority,
    Vec<Node>,
    Vec<Backend>,
    HashMap<String, String>,
) {
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let mut nodes = Vec::new();
    let mut backends = Vec::new();
    let mut home = HashMap::new();
    for (k, ip) in ips.iter().enumerate() {
        let name = format!("n{}", k + 1);
        nodes.push(noise_node(&ca, &name, ip).await);
        for j in 0..2 {
            let id = format!("{name}-web{j}");
            backends.push(Backend::start(ip, &id).await);
            home.insert(id, name.clone());
        }
    }
    let placed: Vec<Placed<'_>> = backends
        .iter()
        .map(|b| {
            let n = nodes.iter().find(|n| n.name == home[&b.id]).unwrap();
            (b, n.name.as_str(), n.data)
        })
        .collect();
    for n in &nodes {
        n.proxy.publish(table(
            1,
            route(protocol, Policy::RoundRobin, &placed, &n.name),
        ));
    }
    (ca, nodes, backends, home)
}

// ---------------------------------------------------------------------------------------------
// Must-show: spread across nodes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_replicas_on_three_nodes_share_600_connections_to_one_node_within_ten_percent() {
    let _g = SERIAL.lock().await;
    let (_ca, nodes, backends, home) = three_nodes(Protocol::Tcp).await;
    let entry = nodes[0].public;
    let mut ids = Vec::new();
    // 600 connections, 8 at a time
    for _ in 0..75 {
        let batch: Vec<_> = (0..8).map(|_| tokio::spawn(get_id(entry))).collect();
        for b in batch {
            ids.push(b.await.unwrap().expect("request through the mesh"));
        }
    }
    let t = tally(ids);
    eprintln!("spread: {t:?}");
    assert_eq!(t.len(), 6, "every instance answered: {t:?}");
    for b in &backends {
        let n = t.get(&b.id).copied().unwrap_or(0);
        assert!((90..=110).contains(&n), "{} got {n}", b.id);
    }
    // the remote ones really went through the other nodes' data planes
    let remote: u64 = backends
        .iter()
        .filter(|b| home[&b.id] != "n1")
        .map(|b| get_u(&stats(&nodes[0], &b.id).total))
        .sum();
    assert!(remote >= 360);
    let served_for_others: u64 = nodes[1..]
        .iter()
        .map(|n| get_u(&n.proxy.metrics().data_streams_accepted))
        .sum();
    assert_eq!(served_for_others, remote);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_balances_every_request_of_one_kept_alive_connection_across_nodes() {
    let _g = SERIAL.lock().await;
    let (_ca, nodes, backends, _home) = three_nodes(Protocol::Http).await;
    let ids = keepalive_ids(nodes[1].public, 600).await;
    let t = tally(ids);
    eprintln!("spread: {t:?}");
    for b in &backends {
        let n = t.get(&b.id).copied().unwrap_or(0);
        assert!((90..=110).contains(&n), "{} got {n}: {t:?}", b.id);
        let s = stats(&nodes[1], &b.id);
        assert_eq!(get_u(&s.status[1]) as usize, n, "2xx counted per instance");
        assert_eq!(
            s.latency.count() as usize,
            n,
            "latency observed per request"
        );
    }
    // pooled upstream connections: far fewer than requests
    let conns: u64 = backends.iter().map(|b| b.accepted()).sum();
    assert!(conns < 60, "{conns} upstream connections for 600 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_apply_per_request_in_http_mode() {
    let _g = SERIAL.lock().await;
    let a = Backend::start("127.0.0.1", "stable").await;
    let b = Backend::start("127.0.0.1", "canary").await;
    let n = node_with(
        "n1",
        "127.0.0.1",
        Arc::new(PlainDialer::default()),
        None,
        ProxyOptions::default(),
    )
    .await;
    let mut r = route(
        Protocol::Http,
        Policy::Weighted,
        &[(&a, "n1", n.data), (&b, "n1", n.data)],
        "n1",
    );
    r.endpoints[0].weight = 9;
    r.endpoints[1].weight = 1;
    n.proxy.publish(table(1, r));
    let t = tally(keepalive_ids(n.public, 400).await);
    assert_eq!(t.get("stable"), Some(&360), "{t:?}");
    assert_eq!(t.get("canary"), Some(&40), "{t:?}");
}

// ---------------------------------------------------------------------------------------------
// Must-show: readiness and draining

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_is_not_ready_receives_no_new_connection() {
    let _g = SERIAL.lock().await;
    let bs = [
        Backend::start("127.0.0.1", "a").await,
        Backend::start("127.0.0.1", "b").await,
        Backend::start("127.0.0.1", "c").await,
    ];
    for policy in [
        Policy::RoundRobin,
        Policy::LeastConnections,
        Policy::Weighted,
    ] {
        let n = node_with(
            "n1",
            "127.0.0.1",
            Arc::new(PlainDialer::default()),
            None,
            ProxyOptions::default(),
        )
        .await;
        let placed: Vec<Placed<'_>> = bs.iter().map(|b| (b, "n1", n.data)).collect();
        let mut r = route(Protocol::Tcp, policy, &placed, "n1");
        r.endpoints[1].ready = false;
        n.proxy.publish(table(1, r));
        let before = bs[1].accepted();
        let mut ids = Vec::new();
        for _ in 0..100 {
            ids.push(get_id(n.public).await.unwrap());
        }
        let t = tally(ids);
        assert_eq!(
            bs[1].accepted(),
            before,
            "{policy:?}: not-ready b was connected to"
        );
        assert_eq!(t.get("b"), None, "{policy:?}");
        assert_eq!(t.get("a"), Some(&50), "{policy:?}: {t:?}");
        assert_eq!(t.get("c"), Some(&50), "{policy:?}: {t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_gets_no_new_connection_and_finishes_a_long_response_in_flight() {
    let _g = SERIAL.lock().await;
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let n = node_with(
        "n1",
        "127.0.0.1",
        Arc::new(PlainDialer::default()),
        None,
        ProxyOptions::default(),
    )
    .await;
    let placed = [(&a, "n1", n.data), (&b, "n1", n.data)];
    let r = route(Protocol::Tcp, Policy::RoundRobin, &placed, "n1");
    n.proxy.publish(table(1, r.clone()));
    // round robin starts at a: the long response is on a
    let slow = tokio::spawn(get(n.public, "/slow"));
    let sa = stats(&n, "a");
    assert!(wait_until(|| get_u(&sa.active) == 1, LONG).await);
    let mut r2 = r.clone();
    r2.endpoints[0].draining = true; // stop_grace 10 s
    n.proxy.publish(table(2, r2));
    for _ in 0..20 {
        assert_eq!(get_id(n.public).await.unwrap(), "b");
    }
    let body = slow
        .await
        .unwrap()
        .expect("the in-flight response completes");
    assert_eq!(body, "a-chunk\n".repeat(10).into_bytes());
    assert_eq!(get_u(&sa.drain_closed), 0);
    assert_eq!(get_u(&sa.relay_errors), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_past_its_stop_grace_is_cut_and_counted() {
    let _g = SERIAL.lock().await;
    let a = Backend::start("127.0.0.1", "a").await;
    let n = node_with(
        "n1",
        "127.0.0.1",
        Arc::new(PlainDialer::default()),
        None,
        ProxyOptions::default(),
    )
    .await;
    let mut r = route(
        Protocol::Tcp,
        Policy::RoundRobin,
        &[(&a, "n1", n.data)],
        "n1",
    );
    r.stop_grace = Duration::from_millis(100);
    n.proxy.publish(table(1, r.clone()));
    let slow = tokio::spawn(get(n.public, "/slow"));
    let sa = stats(&n, "a");
    assert!(wait_until(|| get_u(&sa.active) == 1, LONG).await);
    r.endpoints[0].draining = true;
    n.proxy.publish(table(2, r));
    assert!(slow.await.unwrap().is_err(), "cut after stop_grace");
    assert_eq!(get_u(&sa.drain_closed), 1);
    // and with no ready instance left, a new connection is refused and counted
    assert!(get_id(n.public).await.is_err());
    let svc = n.proxy.metrics().service("web");
    assert!(wait_until(|| get_u(&svc.no_endpoint) == 1, LONG).await);
}

// ---------------------------------------------------------------------------------------------
// Must-show: an instance dies under load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_under_load_fails_only_its_open_connections_and_counts_them() {
    let _g = SERIAL.lock().await;
    let bs = [
        Backend::start("127.0.0.1", "a").await,
        Backend::start("127.0.0.1", "b").await,
        Backend::start("127.0.0.1", "c").await,
    ];
    let n = node_with(
        "n1",
        "127.0.0.1",
        Arc::new(PlainDialer::default()),
        None,
        ProxyOptions::default(),
    )
    .await;
    let placed: Vec<Placed<'_>> = bs.iter().map(|b| (b, "n1", n.data)).collect();
    n.proxy.publish(table(
        1,
        route(Protocol::Tcp, Policy::RoundRobin, &placed, "n1"),
    ));
    // steady load: 6 clients, each request a ~1 s streamed response
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::<Result<Vec<u8>, String>>::new()));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (stop, results, addr) = (stop.clone(), results.clone(), n.public);
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = get(addr, "/slow").await;
                results.lock().unwrap().push(r);
            }
        }));
    }
    let sc = stats(&n, "c");
    assert!(wait_until(|| get_u(&sc.active) >= 1 && get_u(&sc.total) >= 2, LONG).await);
    bs[2].kill();
    // keep the load on after the kill: new connections to c fail to connect and are retried
    let svc = n.proxy.metrics().service("web");
    assert!(wait_until(|| get_u(&sc.connect_errors) >= 3, LONG).await);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let results = results.lock().unwrap();
    let failed = results.iter().filter(|r| r.is_err()).count() as u64;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    eprintln!(
        "ok {ok}, failed {failed}, c relay errors {}, c connect errors {}, retries {}",
        get_u(&sc.relay_errors),
        get_u(&sc.connect_errors),
        get_u(&svc.retries)
    );
    assert!(failed >= 1, "the connections open on c failed");
    // every failed request was an error the proxy reported on c, and no more than the six
    // connections that can have been open on c at once (a connection whose response had just
    // completed may also be reset: reported, but the client had its answer)
    let reported = get_u(&sc.relay_errors);
    assert!(failed <= reported, "{failed} failures, {reported} reported");
    assert!(reported <= 6, "no more than were open at once");
    for id in ["a", "b"] {
        assert_eq!(get_u(&stats(&n, id).relay_errors), 0);
    }
    assert_eq!(get_u(&svc.retries), get_u(&sc.connect_errors));
    assert_eq!(get_u(&svc.no_endpoint), 0);
}

// ---------------------------------------------------------------------------------------------
// Must-show: encryption between nodes

/// A TCP relay that records every byte it forwards (both directions).
async fn tap(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cap = Arc::new(Mutex::new(Vec::new()));
    let c = cap.clone();
    let task = tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let Ok(b) = TcpStream::connect(to).await else {
                    return;
                };
                let (mut ar, mut aw) = a.into_split();
                let (mut br, mut bw) = b.into_split();
                let c2 = c.clone();
                let one = async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = ar.read(&mut buf).await {
                        if n == 0 || bw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        c.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = bw.shutdown().await;
                };
                let two = async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = br.read(&mut buf).await {
                        if n == 0 || aw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        c2.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = aw.shutdown().await;
                };
                tokio::join!(one, two);
            });
        }
    });
    (addr, cap, task)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends `/secret` from node 1 to a backend on node 2 through a tap on node 2's data plane;
/// returns the body received and the bytes captured.
async fn transfer_through_tap(encrypted: bool) -> (Vec<u8>, Vec<u8>) {
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let (n1, n2) = if encrypted {
        (
            noise_node(&ca, "n1", "127.0.0.1").await,
            noise_node(&ca, "n2", "127.0.0.2").await,
        )
    } else {
        let plain = || Arc::new(PlainDialer::default());
        (
            node_with("n1", "127.0.0.1", plain(), None, ProxyOptions::default()).await,
            node_with("n2", "127.0.0.2", plain(), None, ProxyOptions::default()).await,
        )
    };
    let b = Backend::start("127.0.0.2", "secret-holder").await;
    let (tap_addr, cap, tap_task) = tap(n2.data).await;
    n1.proxy.publish(table(
        1,
        route(
            Protocol::Tcp,
            Policy::RoundRobin,
            &[(&b, "n2", tap_addr)],
            "n1",
        ),
    ));
    n2.proxy.publish(table(
        1,
        route(
            Protocol::Tcp,
            Policy::RoundRobin,
            &[(&b, "n2", tap_addr)],
            "n2",
        ),
    ));
    let body = get(n1.public, "/secret").await.unwrap();
    // The tap records what it has forwarded; give it a moment to record the last chunks
    // before it is stopped (the client may see them first).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cap.lock().unwrap().len() <= body.len() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tap_task.abort();
    let captured = cap.lock().unwrap().clone();
    (body, captured)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_between_nodes_is_encrypted_on_the_wire() {
    let _g = SERIAL.lock().await;
    let secret = secret_body();
    let needle = &secret[1000..1064];
    let (body, captured) = transfer_through_tap(true).await;
    assert_eq!(body, secret, "the body arrived intact");
    assert!(
        captured.len() > secret.len(),
        "the transfer crossed the tap"
    );
    assert!(
        !contains(&captured, needle),
        "the body is visible on the wire"
    );
    assert!(!contains(&captured, b"SHOAL-KNOWN-RESPONSE"));
    // the same capture of the plaintext baseline does show it (the check can fail)
    let (body, captured) = transfer_through_tap(false).await;
    assert_eq!(body, secret);
    assert!(contains(&captured, needle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_connects_only_to_its_own_instances() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let n2 = noise_node(&ca, "n2", "127.0.0.2").await;
    let b = Backend::start("127.0.0.2", "x").await;
    let other = Backend::start("127.0.0.2", "not-in-table").await;
    n2.proxy.publish(table(
        1,
        route(
            Protocol::Tcp,
            Policy::RoundRobin,
            &[(&b, "n2", n2.data)],
            "n2",
        ),
    ));
    let dialer = NoiseDialer::new(
        creds(&ca, "n1"),
        Arc::new(LinkMetrics::default()),
        LinkOptions::default(),
    );
    assert!(dialer.dial(n2.data, b.addr).await.is_ok());
    match dialer.dial(n2.data, other.addr).await {
        Err(ProxyError::RemoteRefused(a)) => assert_eq!(a, other.addr),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("the data plane relayed to an address outside its table"),
    }
    assert_eq!(other.accepted(), 0);
    assert_eq!(get_u(&n2.proxy.metrics().data_streams_refused), 1);
    // a peer of another cluster cannot open a data stream at all
    let foreign = CertificateAuthority::generate(unix_now()).unwrap();
    let d2 = NoiseDialer::new(
        creds(&foreign, "evil"),
        Arc::new(LinkMetrics::default()),
        LinkOptions::default(),
    );
    assert!(d2.dial(n2.data, b.addr).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Retries, PROXY header, Balancer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connect_is_retried_on_another_instance_and_counted() {
    let _g = SERIAL.lock().await;
    let a = Backend::start("127.0.0.1", "a").await;
    let dead = Backend::start("127.0.0.1", "dead").await;
    let dead_remote = Backend::start("127.0.0.2", "dead-remote").await;
    dead.kill();
    dead_remote.kill();
    // wait until the dead listeners are really closed
    for d in [&dead, &dead_remote] {
        assert!(wait_until_async(|| async { TcpStream::connect(d.addr).await.is_err() }).await);
    }
    for protocol in [Protocol::Tcp, Protocol::Http] {
        let plain = || Arc::new(PlainDialer::default());
        let n = node_with("n1", "127.0.0.1", plain(), None, ProxyOptions::default()).await;
        let n2 = node_with("n2", "127.0.0.2", plain(), None, ProxyOptions::default()).await;
        let placed = [
            (&dead, "n1", n.data),
            (&dead_remote, "n2", n2.data),
            (&a, "n1", n.data),
        ];
        n.proxy
            .publish(table(1, route(protocol, Policy::RoundRobin, &placed, "n1")));
        n2.proxy
            .publish(table(1, route(protocol, Policy::RoundRobin, &placed, "n2")));
        for _ in 0..10 {
            assert_eq!(get_id(n.public).await.unwrap(), "a", "{protocol:?}");
        }
        let errors: u64 = ["dead", "dead-remote"]
            .iter()
            .map(|id| {
                let e = get_u(&stats(&n, id).connect_errors);
                assert!(e >= 3, "{protocol:?}: {id} connect errors {e}");
                e
            })
            .sum();
        assert_eq!(
            get_u(&n.proxy.metrics().service("web").retries),
            errors,
            "{protocol:?}"
        );
        assert_eq!(
            get_u(&n2.proxy.metrics().data_streams_connect_failed),
            get_u(&stats(&n, "dead-remote").connect_errors)
        );
    }
}

async fn wait_until_async<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = std::time::Instant::now() + LONG;
    while std::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_asks_for_it_sees_the_client_address_in_a_proxy_v2_header() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let n1 = noise_node(&ca, "n1", "127.0.0.1").await;
    let n2 = noise_node(&ca, "n2", "127.0.0.2").await;
    let local = Backend::start_with("127.0.0.1", "local", true).await;
    let remote = Backend::start_with("127.0.0.2", "remote", true).await;
    let placed = [(&local, "n1", n1.data), (&remote, "n2", n2.data)];
    for n in [&n1, &n2] {
        let mut r = route(Protocol::Tcp, Policy::RoundRobin, &placed, &n.name);
        r.proxy_protocol = true;
        n.proxy.publish(table(1, r));
    }
    for _ in 0..2 {
        let mut s = TcpStream::connect(n1.public).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(b"GET /client HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let (_, body) = read_response(&mut s, &mut Vec::new()).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&body), me.to_string());
    }
    assert_eq!(local.accepted(), 1);
    assert_eq!(remote.accepted(), 1);
}

#[actix::test]
async fn the_balancer_listens_on_published_ports_and_stops_when_they_disappear() {
    use actix::Actor;
    let _g = SERIAL.lock().await;
    let a = Backend::start("127.0.0.3", "a").await;
    let proxy = Proxy::new(Arc::new(PlainDialer::default()), ProxyOptions::default());
    let bal = Balancer::new(proxy.clone(), "127.0.0.3".parse().unwrap()).start();
    // a free port number on 127.0.0.3
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut r = route(
        Protocol::Tcp,
        Policy::RoundRobin,
        &[(&a, "n3", "127.0.0.3:1".parse().unwrap())],
        "n3",
    );
    r.published = port;
    let t = RoutingTable {
        version: 7,
        routes: BTreeMap::from([(port, r)]),
    };
    let applied = bal.send(UpdateRoutes(t)).await.unwrap();
    assert_eq!(applied.version, 7);
    let addr = applied.listening[&port];
    assert_eq!(addr, SocketAddr::new("127.0.0.3".parse().unwrap(), port));
    assert_eq!(proxy.table().version, 7);
    assert_eq!(get_id(addr).await.unwrap(), "a");
    let applied = bal
        .send(UpdateRoutes(RoutingTable {
            version: 8,
            routes: BTreeMap::new(),
        }))
        .await
        .unwrap();
    assert!(applied.listening.is_empty());
    assert!(wait_until_async(|| async { TcpStream::connect(addr).await.is_err() }).await);
    // the instance is gone from the table: the data plane no longer connects to it
    assert!(!proxy.is_local_target(a.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_at_most_max_connections_at_once_and_queues_the_rest() {
    let _g = SERIAL.lock().await;
    let a = Backend::start("127.0.0.1", "a").await;
    let opts = ProxyOptions {
        max_connections: 2,
        ..ProxyOptions::default()
    };
    let n = node_with(
        "n1",
        "127.0.0.1",
        Arc::new(PlainDialer::default()),
        None,
        opts,
    )
    .await;
    n.proxy.publish(table(
        1,
        route(
            Protocol::Tcp,
            Policy::RoundRobin,
            &[(&a, "n1", n.data)],
            "n1",
        ),
    ));
    let slow: Vec<_> = (0..3)
        .map(|_| tokio::spawn(get(n.public, "/slow")))
        .collect();
    let sa = stats(&n, "a");
    assert!(wait_until(|| get_u(&sa.active) == 2, LONG).await);
    // the third waits in the accept queue while two are served
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.accepted(), 2);
    for s in slow {
        assert!(
            s.await.unwrap().is_ok(),
            "the queued connection is served later"
        );
    }
    assert_eq!(a.accepted(), 3);
}

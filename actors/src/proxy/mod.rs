//! The data plane: every node listens on every published port and forwards each connection
//! (TCP mode) or each request (HTTP mode, [`http`]) to a ready instance — a local one directly,
//! a remote one through an encrypted data-plane stream to its node ([`remote`]).
//!
//! The routing table ([`RoutingTable`]) is built by the Balancer actor and published through an
//! [`ArcSwap`]: the byte path loads it once per connection (or request) and never waits on the
//! actor. Per-endpoint state that must outlive table versions (active connections, counters, the
//! drain signal) lives in [`ProxyMetrics`], keyed by service and instance.

pub mod http;
pub mod remote;
pub mod splice;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::pick::{Candidate, Picker, Policy};
use remote::RemoteDialer;

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The Noise link failed.
    #[error("link: {0}")]
    Link(#[from] shoal_membership::MembershipError),
    /// A data-plane header did not decode.
    #[error("bad data-plane header: {0}")]
    BadHeader(String),
    /// The remote node could not connect to the instance.
    #[error("the remote node could not connect to {0}")]
    RemoteConnect(SocketAddr),
    /// The remote node refused: the address is not one of its instances.
    #[error("{0} is not an instance of the remote node")]
    RemoteRefused(SocketAddr),
    /// No ready instance (after retries).
    #[error("no ready instance for port {0}")]
    NoEndpoint(u16),
    /// A connect to a local instance failed or timed out.
    #[error("connect to {0} failed")]
    Connect(SocketAddr),
}

/// What a published port carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Bytes, balanced per connection.
    #[default]
    Tcp,
    /// HTTP/1.1, balanced per request.
    Http,
}

/// One instance a route may send traffic to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Instance id (unique in the cluster).
    pub instance: String,
    /// Node that runs it.
    pub node: String,
    /// The instance's address as its own node reaches it.
    pub addr: SocketAddr,
    /// The data-plane address of its node (its link port); unused when `local`.
    pub node_addr: SocketAddr,
    /// Runs on this node: connect directly.
    pub local: bool,
    /// Share under weighted choice.
    pub weight: u32,
    /// Passed its readiness checks.
    pub ready: bool,
    /// Being stopped or replaced: no new connections; open ones get `stop_grace`.
    pub draining: bool,
}

/// One published port of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Service name.
    pub service: String,
    /// The published port every node listens on.
    pub published: u16,
    /// TCP or HTTP.
    pub protocol: Protocol,
    /// Endpoint choice.
    pub policy: Policy,
    /// Send a PROXY protocol v2 header to the instance first (TCP mode).
    pub proxy_protocol: bool,
    /// How long open connections of a draining instance may continue.
    pub stop_grace: Duration,
    /// The instances.
    pub endpoints: Vec<Endpoint>,
}

/// What the Balancer publishes: every route of the cluster, by published port.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingTable {
    /// Increases with every change (nodes confirm the version they serve).
    pub version: u64,
    /// Routes by published port.
    pub routes: BTreeMap<u16, Route>,
}

/// Latency histogram bucket upper bounds, microseconds (the last bucket is unbounded).
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000, 10_000_000,
];

/// A fixed-bucket latency histogram of atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket of [`LATENCY_BOUNDS_US`], plus one for larger values.
    pub buckets: [AtomicU64; 17],
    /// Sum of observations, microseconds.
    pub sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// Counters of one instance as seen by this node's proxy.
#[derive(Debug)]
pub struct EndpointStats {
    /// Connections open now (TCP) or requests in flight (HTTP).
    pub active: AtomicU64,
    /// Connections (TCP) or requests (HTTP) sent to it.
    pub total: AtomicU64,
    /// Bytes client → instance (counted when a connection ends).
    pub bytes_in: AtomicU64,
    /// Bytes instance → client (counted when a connection ends).
    pub bytes_out: AtomicU64,
    /// Connects that failed (each was retried on another instance if any remained).
    pub connect_errors: AtomicU64,
    /// Connections that ended with an error after connecting (reset, instance died).
    pub relay_errors: AtomicU64,
    /// Connections closed because the instance drained past its `stop_grace`.
    pub drain_closed: AtomicU64,
    /// HTTP responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub status: [AtomicU64; 5],
    /// HTTP time to response head.
    pub latency: Histogram,
    drain: watch::Sender<bool>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            relay_errors: AtomicU64::new(0),
            drain_closed: AtomicU64::new(0),
            status: Default::default(),
            latency: Histogram::default(),
            drain: watch::Sender::new(false),
        }
    }
}

impl EndpointStats {
    /// Whether the instance is draining (or gone from the table).
    pub fn draining(&self) -> bool {
        *self.drain.borrow()
    }
}

/// Counters of one service.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Connections (TCP) or requests (HTTP) accepted on its published port.
    pub accepted: AtomicU64,
    /// Connects retried on another instance.
    pub retries: AtomicU64,
    /// Connections or requests refused: no ready instance left to try.
    pub no_endpoint: AtomicU64,
}

/// Every counter of this node's proxy.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    endpoints: Mutex<BTreeMap<(String, String), Arc<EndpointStats>>>,
    services: Mutex<BTreeMap<String, Arc<ServiceStats>>>,
    /// Data-plane streams accepted from other nodes.
    pub data_streams_accepted: AtomicU64,
    /// Data-plane streams refused (bad header, not a local instance).
    pub data_streams_refused: AtomicU64,
    /// Data-plane streams whose local connect failed.
    pub data_streams_connect_failed: AtomicU64,
    /// Bytes relayed for other nodes (both ways).
    pub data_bytes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl ProxyMetrics {
    /// The counters of `instance` of `service` (created on first use).
    pub fn endpoint(&self, service: &str, instance: &str) -> Arc<EndpointStats> {
        lock(&self.endpoints)
            .entry((service.to_string(), instance.to_string()))
            .or_default()
            .clone()
    }

    /// The counters of `service` (created on first use).
    pub fn service(&self, service: &str) -> Arc<ServiceStats> {
        lock(&self.services)
            .entry(service.to_string())
            .or_default()
            .clone()
    }

    /// Every instance's counters, by (service, instance).
    pub fn endpoints(&self) -> Vec<((String, String), Arc<EndpointStats>)> {
        lock(&self.endpoints)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every service's counters.
    pub fn services(&self) -> Vec<(String, Arc<ServiceStats>)> {
        lock(&self.services)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A route as the byte path sees it: the route plus its live counters and picker.
#[derive(Debug)]
pub struct LiveRoute {
    /// The route.
    pub route: Route,
    /// Counters per endpoint, same order as `route.endpoints`.
    pub stats: Vec<Arc<EndpointStats>>,
    /// Counters of the service.
    pub service: Arc<ServiceStats>,
    picker: Mutex<Picker>,
}

impl LiveRoute {
    /// Chooses an endpoint not in `tried`.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let cands: Vec<Candidate> = self
            .route
            .endpoints
            .iter()
            .zip(&self.stats)
            .map(|(e, s)| Candidate {
                weight: e.weight,
                ready: e.ready,
                draining: e.draining || s.draining(),
                active: s.active.load(Ordering::Relaxed),
            })
            .collect();
        lock(&self.picker).pick(&cands, tried)
    }
}

/// The published table.
#[derive(Debug, Default)]
pub struct LiveTable {
    /// Version of the [`RoutingTable`] it was built from.
    pub version: u64,
    /// Routes by published port.
    pub routes: HashMap<u16, Arc<LiveRoute>>,
}

/// Tunables of the proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Instances tried per connection or request before giving up.
    pub max_connect_attempts: usize,
    /// Deadline of one connect.
    pub connect_timeout: Duration,
    /// Use `splice(2)` for local TCP connections without a PROXY header.
    pub splice: bool,
    /// Idle upstream connections kept per instance in HTTP mode.
    pub http_pool_per_endpoint: usize,
    /// Client connections served at once by this node (all published ports together); further
    /// connections wait in the kernel's accept queue.
    pub max_connections: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            max_connect_attempts: 3,
            connect_timeout: Duration::from_secs(2),
            splice: true,
            http_pool_per_endpoint: 64,
            max_connections: 16_384,
        }
    }
}

/// One node's proxy: the published table, the counters and the remote dialer.
pub struct Proxy {
    table: ArcSwap<LiveTable>,
    metrics: Arc<ProxyMetrics>,
    dialer: Arc<dyn RemoteDialer>,
    opts: ProxyOptions,
    pub(crate) pools: http::Pools,
    slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("version", &self.table.load().version)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy with an empty table.
    pub fn new(dialer: Arc<dyn RemoteDialer>, opts: ProxyOptions) -> Arc<Self> {
        Arc::new(Proxy {
            table: ArcSwap::from_pointee(LiveTable::default()),
            metrics: Arc::new(ProxyMetrics::default()),
            dialer,
            slots: Arc::new(tokio::sync::Semaphore::new(opts.max_connections.max(1))),
            opts,
            pools: http::Pools::default(),
        })
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// The options.
    pub fn options(&self) -> &ProxyOptions {
        &self.opts
    }

    /// The table being served.
    pub fn table(&self) -> Arc<LiveTable> {
        self.table.load_full()
    }

    /// Publishes a new table: new connections use it at once. Instances that are draining, or
    /// that left the table, are signalled: their open connections get their route's
    /// `stop_grace`, then close.
    pub fn publish(&self, table: RoutingTable) {
        let old = self.table.load_full();
        let mut live = HashMap::new();
        let mut present = std::collections::HashSet::new();
        for (port, route) in table.routes {
            let stats: Vec<_> = route
                .endpoints
                .iter()
                .map(|e| {
                    let s = self.metrics.endpoint(&route.service, &e.instance);
                    s.drain.send_if_modified(|d| {
                        let changed = *d != e.draining;
                        *d = e.draining;
                        changed
                    });
                    present.insert((route.service.clone(), e.instance.clone()));
                    s
                })
                .collect();
            let service = self.metrics.service(&route.service);
            let picker = Mutex::new(Picker::new(route.policy));
            live.insert(
                port,
                Arc::new(LiveRoute {
                    route,
                    stats,
                    service,
                    picker,
                }),
            );
        }
        for r in old.routes.values() {
            for (e, s) in r.route.endpoints.iter().zip(&r.stats) {
                if !present.contains(&(r.route.service.clone(), e.instance.clone())) {
                    s.drain.send_replace(true);
                }
            }
        }
        self.table.store(Arc::new(LiveTable {
            version: table.version,
            routes: live,
        }));
    }

    /// Whether `addr` is a local instance in the table (the only targets the data-plane server
    /// connects to for other nodes).
    pub fn is_local_target(&self, addr: SocketAddr) -> bool {
        self.table
            .load()
            .routes
            .values()
            .any(|r| r.route.endpoints.iter().any(|e| e.local && e.addr == addr))
    }

    /// Binds `bind` and serves the published port `port` on it until the task is aborted.
    pub async fn bind_and_serve(
        self: Arc<Self>,
        bind: SocketAddr,
        port: u16,
    ) -> Result<(), ProxyError> {
        let l = TcpListener::bind(bind).await?;
        self.serve(l, port).await;
        Ok(())
    }

    /// Serves the published port `port` on `listener` until the task is aborted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, port: u16) {
        loop {
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            let (s, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept on port {port}: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let route = me.table.load().routes.get(&port).cloned();
                let Some(route) = route else { return };
                match route.route.protocol {
                    Protocol::Tcp => me.handle_tcp(route, s, peer).await,
                    Protocol::Http => http::serve_connection(me, port, s, peer).await,
                }
            });
        }
    }

    async fn handle_tcp(&self, route: Arc<LiveRoute>, client: TcpStream, peer: SocketAddr) {
        inc(&route.service.accepted);
        let local_addr = client.local_addr().unwrap_or(peer);
        let mut tried = Vec::new();
        for attempt in 0..self.opts.max_connect_attempts {
            let Some(i) = route.pick(&tried) else { break };
            if attempt > 0 {
                inc(&route.service.retries);
            }
            let ep = &route.route.endpoints[i];
            let st = route.stats[i].clone();
            let _active = Active::new(&st);
            let up = match self.connect(ep).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!("connect to {} ({}) failed: {e}", ep.instance, ep.addr);
                    inc(&st.connect_errors);
                    tried.push(i);
                    continue;
                }
            };
            inc(&st.total);
            let prefix = if route.route.proxy_protocol {
                proxy_v2_header(peer, local_addr)
            } else {
                Vec::new()
            };
            let relay = async {
                match up {
                    Upstream::Local(u) => relay_local(u, client, prefix, self.opts.splice).await,
                    Upstream::Remote(t) => t.relay(Box::new(client), prefix).await,
                }
            };
            let grace = route.route.stop_grace;
            let mut drain = st.drain.subscribe();
            let drained = async move {
                if drain.wait_for(|d| *d).await.is_err() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(grace).await;
            };
            tokio::select! {
                r = relay => match r {
                    Ok((a, b)) => {
                        st.bytes_in.fetch_add(a, Ordering::Relaxed);
                        st.bytes_out.fetch_add(b, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!("connection to {} ended: {e}", ep.instance);
                        inc(&st.relay_errors);
                    }
                },
                _ = drained => inc(&st.drain_closed),
            }
            return;
        }
        inc(&route.service.no_endpoint);
    }

    pub(crate) async fn connect(&self, ep: &Endpoint) -> Result<Upstream, ProxyError> {
        if ep.local {
            let s = tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(ep.addr))
                .await
                .map_err(|_| ProxyError::Connect(ep.addr))??;
            s.set_nodelay(true)?;
            Ok(Upstream::Local(s))
        } else {
            let t = tokio::time::timeout(
                self.opts.connect_timeout,
                self.dialer.dial(ep.node_addr, ep.addr),
            )
            .await
            .map_err(|_| ProxyError::Connect(ep.addr))??;
            Ok(Upstream::Remote(t))
        }
    }
}

pub(crate) enum Upstream {
    Local(TcpStream),
    Remote(Box<dyn remote::Tunnel>),
}

/// Counts an endpoint's active connection for as long as it lives.
pub(crate) struct Active(Arc<EndpointStats>);

impl Active {
    pub(crate) fn new(s: &Arc<EndpointStats>) -> Self {
        s.active.fetch_add(1, Ordering::Relaxed);
        Active(s.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn relay_local(
    mut up: TcpStream,
    mut client: TcpStream,
    prefix: Vec<u8>,
    use_splice: bool,
) -> Result<(u64, u64), ProxyError> {
    if !prefix.is_empty() {
        up.write_all(&prefix).await?;
    }
    if use_splice {
        Ok(splice::splice_bidirectional(&mut client, &mut up).await?)
    } else {
        Ok(
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut up, 64 * 1024, 64 * 1024)
                .await?,
        )
    }
}

/// A PROXY protocol v2 header (PROXY command, TCP) naming `src` (the client) and `dst` (the
/// address it connected to). Mixed families are sent as IPv6 (IPv4-mapped).
pub fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    const SIG: [u8; 12] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];
    let mut out = SIG.to_vec();
    out.push(0x21); // version 2, PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // TCP over IPv4
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            out.push(0x21); // TCP over IPv6
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// Waits until `cond` holds, polling, or `deadline` passes; returns whether it held.
pub async fn wait_until(mut cond: impl FnMut() -> bool, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_v2_header_for_ipv4_has_the_spec_layout() {
        let h = proxy_v2_header(
            "10.1.2.3:5000".parse().unwrap(),
            "127.0.0.2:80".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 12);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[10, 1, 2, 3]);
        assert_eq!(&h[24..26], &5000u16.to_be_bytes());
        assert_eq!(&h[26..28], &80u16.to_be_bytes());
    }

    #[test]
    fn the_histogram_puts_observations_in_their_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(100));
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[4].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[16].load(Ordering::Relaxed), 1);
        assert_eq!(h.count(), 3);
    }
}

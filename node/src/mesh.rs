//! The routing mesh of this agent: every 250 ms the routing table is rebuilt from the replicated
//! state (service specs, instance records, member addresses) and, when it changed, published to
//! the proxy and the published-port listeners are brought in step (`shoal_actors::balancer`).
//! Data-plane streams from other nodes are handed to the proxy by the cluster's accept loop.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shoal_actors::balancer::{InstanceView, PortListeners, table_from_state};
use shoal_actors::proxy::remote::NoiseDialer;
use shoal_actors::proxy::{Proxy, ProxyOptions, RoutingTable};
use shoal_config::ServiceSpec;
use shoal_membership::cert::NodeCredentials;
use shoal_membership::identity::node_id_hex;
use shoal_membership::link::{LinkMetrics, LinkOptions};
use shoal_membership::state::{RecordKey, Value};

use crate::cluster::Cluster;

/// The running mesh; dropping it stops the listeners (open connections finish).
pub(crate) struct Mesh {
    pub(crate) proxy: Arc<Proxy>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The services and instances of the state, as the routing table needs them.
fn snapshot(c: &Cluster, self_addr: SocketAddr) -> (Vec<ServiceSpec>, Vec<InstanceView>) {
    let mut addrs: BTreeMap<_, _> = c.known_addrs();
    addrs.insert(c.node_id, self_addr);
    c.with_state(|s| {
        let services = s.store.services().map(|(_, e)| e.spec.clone()).collect();
        let mut instances = Vec::new();
        for r in s.store.records() {
            if let (RecordKey::Instance { origin, instance }, Value::Instance(st)) =
                (&r.key, &r.value)
            {
                let Some(node_addr) = addrs.get(origin) else {
                    continue;
                };
                instances.push(InstanceView {
                    service: st.service.clone(),
                    instance: instance.clone(),
                    node: node_id_hex(origin),
                    node_addr: *node_addr,
                    local: *origin == c.node_id,
                    state: st.state.clone(),
                    ready: st.ready,
                    address: st.address.clone(),
                    weight: 1,
                });
            }
        }
        (services, instances)
    })
}

/// Starts the mesh: published ports on `bind_ip`, remote instances over Noise data streams.
pub(crate) fn start(
    cluster: Arc<Cluster>,
    creds: Arc<NodeCredentials>,
    links: Arc<LinkMetrics>,
    bind_ip: IpAddr,
    self_addr: SocketAddr,
) -> Mesh {
    let dialer = NoiseDialer::new(creds, links, LinkOptions::default());
    let proxy = Proxy::new(Arc::new(dialer), ProxyOptions::default());
    let p = proxy.clone();
    let task = tokio::spawn(async move {
        let mut listeners = PortListeners::new(p, bind_ip);
        let mut last: Option<RoutingTable> = None;
        let mut version = 0u64;
        loop {
            let (services, instances) = snapshot(&cluster, self_addr);
            let mut table = table_from_state(version, &services, &instances);
            if last.as_ref().is_none_or(|l| l.routes != table.routes) {
                version += 1;
                table.version = version;
                listeners.apply(table.clone());
                last = Some(table);
            } else if !listeners.applied().failed.is_empty() {
                // e.g. another agent on the same address holds the port
                listeners.retry_failed();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    Mesh { proxy, task }
}

/// Reads one counter of an instance.
type Getter = fn(&shoal_actors::proxy::EndpointStats) -> u64;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The proxy's counters in OpenMetrics text (no `# EOF`): per service and per instance
/// connections, bytes, errors, HTTP status classes and a latency histogram.
pub(crate) fn render_proxy_metrics(m: &shoal_actors::proxy::ProxyMetrics) -> String {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let services = m.services();
    let endpoints = m.endpoints();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    for (name, help, get) in [
        (
            "shoal_proxy_accepted",
            "Connections (tcp) or requests (http) accepted on a published port.",
            0,
        ),
        (
            "shoal_proxy_retries",
            "Connects retried on another instance.",
            1,
        ),
        (
            "shoal_proxy_no_endpoint",
            "Connections or requests refused: no ready instance left.",
            2,
        ),
    ] {
        family(&mut out, name, "counter", help);
        for (svc, s) in &services {
            let v = match get {
                0 => s.accepted.load(Relaxed),
                1 => s.retries.load(Relaxed),
                _ => s.no_endpoint.load(Relaxed),
            };
            let _ = writeln!(out, "{name}_total{{service=\"{}\"}} {v}", esc(svc));
        }
    }
    family(
        &mut out,
        "shoal_proxy_active",
        "gauge",
        "Connections open (tcp) or requests in flight (http) per instance.",
    );
    for ((svc, inst), e) in &endpoints {
        let _ = writeln!(
            out,
            "shoal_proxy_active{{service=\"{}\",instance=\"{}\"}} {}",
            esc(svc),
            esc(inst),
            e.active.load(Relaxed)
        );
    }
    let counters: [(&str, &str, Getter); 6] = [
        (
            "shoal_proxy_connections",
            "Connections (tcp) or requests (http) sent to an instance.",
            |e| e.total.load(Relaxed),
        ),
        (
            "shoal_proxy_bytes_in",
            "Bytes client to instance (counted when a connection ends).",
            |e| e.bytes_in.load(Relaxed),
        ),
        (
            "shoal_proxy_bytes_out",
            "Bytes instance to client (counted when a connection ends).",
            |e| e.bytes_out.load(Relaxed),
        ),
        (
            "shoal_proxy_connect_errors",
            "Connects to an instance that failed.",
            |e| e.connect_errors.load(Relaxed),
        ),
        (
            "shoal_proxy_relay_errors",
            "Connections that ended with an error after connecting.",
            |e| e.relay_errors.load(Relaxed),
        ),
        (
            "shoal_proxy_drain_closed",
            "Connections closed because the instance drained past its stop_grace.",
            |e| e.drain_closed.load(Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        family(&mut out, name, "counter", help);
        for ((svc, inst), e) in &endpoints {
            let _ = writeln!(
                out,
                "{name}_total{{service=\"{}\",instance=\"{}\"}} {}",
                esc(svc),
                esc(inst),
                get(e)
            );
        }
    }
    family(
        &mut out,
        "shoal_proxy_http_responses",
        "counter",
        "HTTP responses per instance by status class.",
    );
    for ((svc, inst), e) in &endpoints {
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            let _ = writeln!(
                out,
                "shoal_proxy_http_responses_total{{service=\"{}\",instance=\"{}\",class=\"{class}\"}} {}",
                esc(svc),
                esc(inst),
                e.status[i].load(Relaxed)
            );
        }
    }
    family(
        &mut out,
        "shoal_proxy_http_latency_seconds",
        "histogram",
        "HTTP time to response head per instance.",
    );
    for ((svc, inst), e) in &endpoints {
        let labels = format!("service=\"{}\",instance=\"{}\"", esc(svc), esc(inst));
        let mut cumulative = 0u64;
        for (i, bound) in shoal_actors::proxy::LATENCY_BOUNDS_US.iter().enumerate() {
            cumulative += e.latency.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "shoal_proxy_http_latency_seconds_bucket{{{labels},le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let count = e.latency.count();
        let _ = writeln!(
            out,
            "shoal_proxy_http_latency_seconds_bucket{{{labels},le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "shoal_proxy_http_latency_seconds_sum{{{labels}}} {}",
            e.latency.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "shoal_proxy_http_latency_seconds_count{{{labels}}} {count}"
        );
    }
    out
}

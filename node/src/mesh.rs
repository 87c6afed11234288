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

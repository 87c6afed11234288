//! The Balancer actor: receives routing tables (built from the state store's instance records by
//! whoever owns that wiring), publishes them to the node's [`Proxy`] through its `ArcSwap`, and
//! starts or stops a listener per published port on the node's own address. The byte path never
//! goes through the actor: listeners and connections are plain tokio tasks.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message, MessageResponse};
use tokio::task::JoinHandle;

use shoal_config::ServiceSpec;

use crate::pick::Policy;
use crate::proxy::{Endpoint, Protocol, Proxy, Route, RoutingTable};

/// A new routing table to serve.
#[derive(Debug, Message)]
#[rtype(result = "Applied")]
pub struct UpdateRoutes(pub RoutingTable);

/// The published ports being served and the table version.
#[derive(Debug, Message)]
#[rtype(result = "Applied")]
pub struct Status;

/// What the node serves after an update.
#[derive(Debug, Clone, Default, PartialEq, Eq, MessageResponse)]
pub struct Applied {
    /// The table version now published.
    pub version: u64,
    /// Published ports with a listener, and the address each is bound to.
    pub listening: BTreeMap<u16, SocketAddr>,
    /// Published ports that could not be bound, with the reason (retried on the next update).
    pub failed: BTreeMap<u16, String>,
}

/// The listeners of the published ports of one node, kept in step with the routing table
/// (used by the [`Balancer`] actor, and directly by an agent that has no actix system at hand).
/// Dropping it stops every listener (open connections continue).
#[derive(Debug)]
pub struct PortListeners {
    proxy: Arc<Proxy>,
    bind_ip: IpAddr,
    listeners: BTreeMap<u16, (SocketAddr, JoinHandle<()>)>,
    version: u64,
    failed: BTreeMap<u16, String>,
}

impl PortListeners {
    /// Listeners on `bind_ip` (the node's own address) for `proxy`.
    pub fn new(proxy: Arc<Proxy>, bind_ip: IpAddr) -> Self {
        PortListeners {
            proxy,
            bind_ip,
            listeners: BTreeMap::new(),
            version: 0,
            failed: BTreeMap::new(),
        }
    }

    /// What is served now.
    pub fn applied(&self) -> Applied {
        Applied {
            version: self.version,
            listening: self.listeners.iter().map(|(p, (a, _))| (*p, *a)).collect(),
            failed: self.failed.clone(),
        }
    }

    fn bind(&self, port: u16) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let std = std::net::TcpListener::bind(SocketAddr::new(self.bind_ip, port))?;
        std.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(std)?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(self.proxy.clone().serve(l, port));
        Ok((addr, task))
    }

    /// Publishes `table` to the proxy, then binds the ports that appeared (a failed bind is
    /// reported and retried on the next call) and stops listening on those that disappeared.
    /// Must run inside a tokio runtime.
    pub fn apply(&mut self, table: RoutingTable) -> Applied {
        self.version = table.version;
        let wanted: Vec<u16> = table.routes.keys().copied().collect();
        // Publish first: a new listener must find its route.
        self.proxy.publish(table);
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for p in gone {
            if let Some((_, t)) = self.listeners.remove(&p) {
                t.abort();
            }
        }
        self.failed.clear();
        for p in wanted {
            if self.listeners.contains_key(&p) {
                continue;
            }
            match self.bind(p) {
                Ok(x) => {
                    self.listeners.insert(p, x);
                }
                Err(e) => {
                    tracing::warn!("cannot listen on published port {p}: {e}");
                    self.failed.insert(p, e.to_string());
                }
            }
        }
        self.applied()
    }
}

impl PortListeners {
    /// Tries again to bind the ports whose bind failed, without republishing the table.
    pub fn retry_failed(&mut self) -> Applied {
        let failed: Vec<u16> = self.failed.keys().copied().collect();
        for p in failed {
            match self.bind(p) {
                Ok(x) => {
                    self.failed.remove(&p);
                    self.listeners.insert(p, x);
                }
                Err(e) => {
                    self.failed.insert(p, e.to_string());
                }
            }
        }
        self.applied()
    }
}

impl Drop for PortListeners {
    fn drop(&mut self) {
        for (_, (_, t)) in std::mem::take(&mut self.listeners) {
            t.abort();
        }
    }
}

/// The actor.
#[derive(Debug)]
pub struct Balancer {
    listeners: PortListeners,
}

impl Balancer {
    /// A balancer serving published ports on `bind_ip` (the node's own address).
    pub fn new(proxy: Arc<Proxy>, bind_ip: IpAddr) -> Self {
        Balancer {
            listeners: PortListeners::new(proxy, bind_ip),
        }
    }
}

impl Actor for Balancer {
    type Context = Context<Self>;
}

impl Handler<UpdateRoutes> for Balancer {
    type Result = Applied;

    fn handle(&mut self, msg: UpdateRoutes, _ctx: &mut Self::Context) -> Applied {
        self.listeners.apply(msg.0)
    }
}

impl Handler<Status> for Balancer {
    type Result = Applied;

    fn handle(&mut self, _msg: Status, _ctx: &mut Self::Context) -> Applied {
        self.listeners.applied()
    }
}

/// One instance as the routing table needs it (from the state store's instance records, with
/// the owning node's data-plane address resolved from membership).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub instance: String,
    /// The node running it.
    pub node: String,
    /// That node's data-plane (link) address.
    pub node_addr: SocketAddr,
    /// Whether that node is this node.
    pub local: bool,
    /// Runtime state (`starting`, `running`, `stopping`, ...).
    pub state: String,
    /// Passes its readiness probe.
    pub ready: bool,
    /// `ip:port` of its first port, as its node reaches it.
    pub address: Option<String>,
    /// Share under weighted choice (1 unless a rollout says otherwise).
    pub weight: u32,
}

/// Builds the routing table from service specs and instance records. The instance records
/// carry one address (the first port's), so a route is made for a service's first port when
/// it is published; instances without a parseable address are left out; an instance whose
/// state is `stopping` is draining; one that is neither `running` nor `stopping` is not ready.
pub fn table_from_state(
    version: u64,
    services: &[ServiceSpec],
    instances: &[InstanceView],
) -> RoutingTable {
    let mut routes = BTreeMap::new();
    for spec in services {
        let Some(port) = spec.ports.first() else {
            continue;
        };
        let Some(published) = port.published else {
            continue;
        };
        let endpoints = instances
            .iter()
            .filter(|i| i.service == spec.name)
            .filter_map(|i| {
                let addr: SocketAddr = i.address.as_deref()?.parse().ok()?;
                Some(Endpoint {
                    instance: i.instance.clone(),
                    node: i.node.clone(),
                    addr,
                    node_addr: i.node_addr,
                    local: i.local,
                    weight: i.weight,
                    ready: i.ready && matches!(i.state.as_str(), "running" | "stopping"),
                    draining: i.state == "stopping",
                })
            })
            .collect();
        routes.insert(
            published,
            Route {
                service: spec.name.clone(),
                published,
                protocol: match port.protocol {
                    shoal_config::Protocol::Tcp => Protocol::Tcp,
                    shoal_config::Protocol::Http => Protocol::Http,
                },
                policy: Policy::RoundRobin,
                proxy_protocol: port.proxy_protocol,
                stop_grace: spec.stop_grace,
                endpoints,
            },
        );
    }
    RoutingTable { version, routes }
}

/// The environment every instance gets to reach other services through its node's proxy:
/// `SHOAL_SERVICE_<NAME>_ADDR=<node ip>:<published port>` for every service with a published
/// port (name upper-cased, `-` and `.` turned into `_`), the first published port of each.
pub fn service_env(services: &[ServiceSpec], node_ip: IpAddr) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for spec in services {
        let Some(published) = spec.ports.iter().find_map(|p| p.published) else {
            continue;
        };
        let name: String = spec
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        env.insert(
            format!("SHOAL_SERVICE_{name}_ADDR"),
            SocketAddr::new(node_ip, published).to_string(),
        );
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, published: Option<u16>, protocol: &str) -> ServiceSpec {
        let toml = format!(
            "name = \"{name}\"\nimage = \"x\"\n[[ports]]\nname = \"p\"\ncontainer = 80\n{}protocol = \"{protocol}\"\n",
            published
                .map(|p| format!("published = {p}\n"))
                .unwrap_or_default()
        );
        toml::from_str(&toml).expect("spec")
    }

    fn inst(service: &str, id: &str, state: &str, ready: bool, local: bool) -> InstanceView {
        InstanceView {
            service: service.into(),
            instance: id.into(),
            node: if local { "a" } else { "b" }.into(),
            node_addr: "127.0.0.2:7946".parse().unwrap(),
            local,
            state: state.into(),
            ready,
            address: Some("127.0.0.9:8000".into()),
            weight: 1,
        }
    }

    #[test]
    fn the_table_routes_published_first_ports_with_readiness_and_draining() {
        let services = [spec("web", Some(8080), "http"), spec("db", None, "tcp")];
        let instances = [
            inst("web", "w1", "running", true, true),
            inst("web", "w2", "running", false, false),
            inst("web", "w3", "stopping", true, false),
            inst("db", "d1", "running", true, true),
        ];
        let t = table_from_state(3, &services, &instances);
        assert_eq!(t.version, 3);
        assert_eq!(t.routes.len(), 1, "db publishes nothing");
        let r = &t.routes[&8080];
        assert_eq!(r.protocol, Protocol::Http);
        let e: Vec<_> = r
            .endpoints
            .iter()
            .map(|e| (e.instance.as_str(), e.ready, e.draining, e.local))
            .collect();
        assert_eq!(
            e,
            vec![
                ("w1", true, false, true),
                ("w2", false, false, false),
                ("w3", true, true, false)
            ]
        );
    }

    #[test]
    fn an_instance_without_an_address_is_left_out() {
        let mut i = inst("web", "w1", "running", true, true);
        i.address = Some("not an address".into());
        let t = table_from_state(1, &[spec("web", Some(80), "tcp")], &[i]);
        assert!(t.routes[&80].endpoints.is_empty());
    }

    #[test]
    fn every_published_service_gets_an_address_variable() {
        let env = service_env(
            &[spec("web-api", Some(8080), "tcp"), spec("db", None, "tcp")],
            "127.0.0.2".parse().unwrap(),
        );
        assert_eq!(
            env,
            BTreeMap::from([(
                "SHOAL_SERVICE_WEB_API_ADDR".to_string(),
                "127.0.0.2:8080".to_string()
            )])
        );
    }
}

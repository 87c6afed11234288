//! The Balancer actor: receives routing tables (built from the state store's instance records by
//! whoever owns that wiring), publishes them to the node's [`Proxy`] through its `ArcSwap`, and
//! starts or stops a listener per published port on the node's own address. The byte path never
//! goes through the actor: listeners and connections are plain tokio tasks.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message, MessageResponse};
use tokio::task::JoinHandle;

use crate::proxy::{Proxy, RoutingTable};

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

/// The actor.
#[derive(Debug)]
pub struct Balancer {
    proxy: Arc<Proxy>,
    bind_ip: IpAddr,
    listeners: BTreeMap<u16, (SocketAddr, JoinHandle<()>)>,
    version: u64,
    failed: BTreeMap<u16, String>,
}

impl Balancer {
    /// A balancer serving published ports on `bind_ip` (the node's own address).
    pub fn new(proxy: Arc<Proxy>, bind_ip: IpAddr) -> Self {
        Balancer {
            proxy,
            bind_ip,
            listeners: BTreeMap::new(),
            version: 0,
            failed: BTreeMap::new(),
        }
    }

    fn applied(&self) -> Applied {
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
}

impl Actor for Balancer {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for (_, (_, t)) in std::mem::take(&mut self.listeners) {
            t.abort();
        }
    }
}

impl Handler<UpdateRoutes> for Balancer {
    type Result = Applied;

    fn handle(&mut self, msg: UpdateRoutes, _ctx: &mut Self::Context) -> Applied {
        let table = msg.0;
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

impl Handler<Status> for Balancer {
    type Result = Applied;

    fn handle(&mut self, _msg: Status, _ctx: &mut Self::Context) -> Applied {
        self.applied()
    }
}

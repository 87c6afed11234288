//! The agent's HTTP API (actix-web): `GET /v1/nodes`, `GET /v1/self`, `GET /health/live`,
//! `GET /metrics`. Read-only for now; every handler reads the latest membership snapshot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde::{Deserialize, Serialize};
use shoal_membership::core::MemberView;
use shoal_membership::handle::MembershipHandle;
use shoal_membership::identity::node_id_hex;
use shoal_membership::link::LinkMetrics;

/// What the handlers read.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) membership: MembershipHandle,
    pub(crate) links: Arc<LinkMetrics>,
    pub(crate) cluster: Arc<crate::cluster::Cluster>,
}

/// One member, as `/v1/nodes` and `/v1/self` show it (and `shoal nodes` reads it back).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct NodeJson {
    /// Name from the certificate (`null` until this node has heard from the member directly).
    pub(crate) name: Option<String>,
    /// 32 hex characters.
    pub(crate) node_id: String,
    /// Gossip address.
    pub(crate) addr: SocketAddr,
    /// `alive`, `suspect` or `down`.
    pub(crate) state: String,
    /// Labels from the certificate.
    pub(crate) labels: BTreeMap<String, String>,
    /// SWIM incarnation.
    pub(crate) incarnation: u16,
    /// Boot epoch of the member's current identity (unix ms at its start).
    pub(crate) boot_epoch: u64,
    /// Whether this is the node answering.
    #[serde(rename = "self")]
    pub(crate) is_self: bool,
}

impl From<&MemberView> for NodeJson {
    fn from(m: &MemberView) -> Self {
        NodeJson {
            name: m.meta.as_ref().map(|x| x.name.clone()),
            node_id: node_id_hex(&m.identity.node_id),
            addr: m.identity.addr,
            state: m.state.as_str().to_string(),
            labels: m
                .meta
                .as_ref()
                .map(|x| x.labels.clone())
                .unwrap_or_default(),
            incarnation: m.incarnation,
            boot_epoch: m.identity.boot_epoch,
            is_self: m.is_self,
        }
    }
}

async fn nodes(state: web::Data<ApiState>) -> HttpResponse {
    let snap = state.membership.snapshot();
    let body: Vec<NodeJson> = snap.members.iter().map(NodeJson::from).collect();
    HttpResponse::Ok().json(body)
}

async fn this_node(state: web::Data<ApiState>) -> HttpResponse {
    let snap = state.membership.snapshot();
    match snap.members.iter().find(|m| m.is_self) {
        Some(m) => HttpResponse::Ok().json(NodeJson::from(m)),
        None => HttpResponse::ServiceUnavailable().body("membership not started"),
    }
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    let snap = state.membership.snapshot();
    let text = crate::metrics::render(&snap, &state.links.snapshot());
    let text = crate::api_services::append_metrics(text, &state.cluster);
    let text = match state.cluster.data_plane.get() {
        Some(proxy) => {
            let extra = crate::mesh::render_proxy_metrics(proxy.metrics());
            let trimmed = text.trim_end();
            match trimmed.strip_suffix("# EOF") {
                Some(head) => format!("{head}{extra}# EOF\n"),
                None => format!("{trimmed}\n{extra}"),
            }
        }
        None => text,
    };
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(text)
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({ "error": "no such endpoint" }))
}

/// Serves the API on an already bound listener; the returned server runs when awaited (or
/// spawned).
pub(crate) fn server(listener: std::net::TcpListener, state: ApiState) -> std::io::Result<Server> {
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/v1/nodes", web::get().to(nodes))
            .route("/v1/self", web::get().to(this_node))
            .route("/health/live", web::get().to(live))
            .route("/metrics", web::get().to(metrics))
            .configure(crate::api_services::routes)
            .configure(crate::api_instances::routes)
            .default_service(web::to(not_found))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(2)
    .listen(listener)?
    .run();
    Ok(server)
}

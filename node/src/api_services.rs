//! The desired-state API: `PUT/GET/DELETE /v1/services[/{name}]`, `GET /v1/leader`,
//! `GET /v1/events`, and the state metrics appended to `/metrics`.
//!
//! Any node accepts writes (the leader is not special to clients). A spec is validated exactly
//! like `shoal validate` (a JSON body is turned into TOML and goes through the same loader); a
//! bad spec gets 400 with every error and changes nothing. Mutating calls need
//! `Authorization: Bearer <admin token>` (signed by the cluster CA); reads are open.

use std::sync::atomic::Ordering;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use shoal_membership::state::record::ServiceEntry;

use crate::api::ApiState;
use crate::cluster::{Cluster, unix_ms};

/// The largest spec body accepted.
const MAX_SPEC_BYTES: usize = 256 * 1024;

/// A service as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct ServiceJson {
    name: String,
    version: u64,
    replicas: u32,
    updated_ms: u64,
    updated_by: String,
    spec: serde_json::Value,
}

fn service_json(c: &Cluster, e: &ServiceEntry, stamp_ms: u64, writer: &[u8; 16]) -> ServiceJson {
    ServiceJson {
        name: e.spec.name.clone(),
        version: e.version,
        replicas: e.spec.replicas,
        updated_ms: stamp_ms,
        updated_by: c.name_of(writer),
        spec: serde_json::to_value(&e.spec).unwrap_or(serde_json::Value::Null),
    }
}

pub(crate) fn error(status: actix_web::http::StatusCode, msg: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": msg.into() }))
}

pub(crate) fn authorize(req: &HttpRequest, c: &Cluster) -> Result<(), Box<HttpResponse>> {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(token) = header.strip_prefix("Bearer ") else {
        return Err(Box::new(error(
            actix_web::http::StatusCode::UNAUTHORIZED,
            "this call needs Authorization: Bearer <admin token>",
        )));
    };
    c.check_admin(token.trim()).map_err(|e| {
        Box::new(error(
            actix_web::http::StatusCode::UNAUTHORIZED,
            format!("admin token refused: {e}"),
        ))
    })
}

/// Turns a JSON body into TOML text so it goes through the same loader as a file.
fn json_to_toml(body: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("request body: invalid JSON: {e}"))?;
    if !value.is_object() {
        return Err("request body: a service spec must be a JSON object".into());
    }
    toml::to_string(&value).map_err(|e| format!("request body: cannot express as TOML: {e}"))
}

async fn put_service(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<ApiState>,
) -> HttpResponse {
    let c = &state.cluster;
    if let Err(r) = authorize(&req, c) {
        return *r;
    }
    let name = path.into_inner();
    if body.len() > MAX_SPEC_BYTES {
        return error(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("spec larger than {MAX_SPEC_BYTES} bytes"),
        );
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(
            actix_web::http::StatusCode::BAD_REQUEST,
            "the body is not UTF-8",
        );
    };
    let is_json = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"))
        || text.trim_start().starts_with('{');
    let toml_text = if is_json {
        match json_to_toml(text) {
            Ok(t) => t,
            Err(e) => {
                return HttpResponse::BadRequest().json(serde_json::json!({ "errors": [e] }));
            }
        }
    } else {
        text.to_string()
    };
    let spec = match shoal_config::load_service_str(&format!("{name}.toml"), &toml_text) {
        Ok(s) => s,
        Err(d) => {
            let errors: Vec<String> = d.0.iter().map(|x| x.to_string()).collect();
            return HttpResponse::BadRequest().json(serde_json::json!({ "errors": errors }));
        }
    };
    if spec.name != name {
        return HttpResponse::BadRequest().json(serde_json::json!({
            "errors": [format!("name: the spec names `{}` but the URL names `{name}`", spec.name)]
        }));
    }
    let result = c.with_state(|s| s.put_service(spec, unix_ms()));
    match result {
        Ok(record) => {
            c.disseminate(&record);
            let (version, replicas) = c.with_state(|s| {
                s.store
                    .service(&name)
                    .map(|e| (e.version, e.spec.replicas))
                    .unwrap_or((0, 0))
            });
            c.event(
                "service_updated",
                format!(
                    "service {name} version {version} ({replicas} replicas) written on {}",
                    c.name
                ),
            );
            HttpResponse::Ok().json(serde_json::json!({
                "name": name, "version": version, "replicas": replicas
            }))
        }
        Err(e) => error(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot persist the spec: {e}"),
        ),
    }
}

async fn delete_service(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    let c = &state.cluster;
    if let Err(r) = authorize(&req, c) {
        return *r;
    }
    let name = path.into_inner();
    match c.with_state(|s| s.delete_service(&name, unix_ms())) {
        Ok(Some(record)) => {
            c.disseminate(&record);
            c.event(
                "service_removed",
                format!("service {name} removed on {}", c.name),
            );
            HttpResponse::Ok().json(serde_json::json!({ "name": name, "removed": true }))
        }
        Ok(None) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            format!("no service named {name}"),
        ),
        Err(e) => error(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot persist the delete: {e}"),
        ),
    }
}

async fn list_services(state: web::Data<ApiState>) -> HttpResponse {
    let c = &state.cluster;
    let rows: Vec<ServiceJson> = c
        .with_state(|s| {
            s.store
                .services()
                .map(|(r, e)| {
                    let ms = shoal_membership::state::HlcTimestamp(r.stamp.major).wall_ms();
                    (e.clone(), ms, r.stamp.node)
                })
                .collect::<Vec<_>>()
        })
        .iter()
        .map(|(e, ms, w)| service_json(c, e, *ms, w))
        .collect();
    HttpResponse::Ok().json(rows)
}

async fn get_service(path: web::Path<String>, state: web::Data<ApiState>) -> HttpResponse {
    let c = &state.cluster;
    let name = path.into_inner();
    let found = c.with_state(|s| {
        let key = shoal_membership::state::RecordKey::Service(name.clone());
        let r = s.store.get(&key)?;
        let e = s.store.service(&name)?.clone();
        Some((
            e,
            shoal_membership::state::HlcTimestamp(r.stamp.major).wall_ms(),
            r.stamp.node,
        ))
    });
    match found {
        Some((e, ms, w)) => HttpResponse::Ok().json(service_json(c, &e, ms, &w)),
        None => error(
            actix_web::http::StatusCode::NOT_FOUND,
            format!("no service named {name}"),
        ),
    }
}

async fn leader(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(state.cluster.leader())
}

async fn events(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(state.cluster.events())
}

async fn digest(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "state_hash": format!("{:016x}", state.cluster.state_hash()),
        "records": state.cluster.counts().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    }))
}

/// Registers the routes.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_SPEC_BYTES + 1))
        .route("/v1/services", web::get().to(list_services))
        .route("/v1/services/{name}", web::get().to(get_service))
        .route("/v1/services/{name}", web::put().to(put_service))
        .route("/v1/services/{name}", web::delete().to(delete_service))
        .route("/v1/leader", web::get().to(leader))
        .route("/v1/events", web::get().to(events))
        .route("/v1/state/digest", web::get().to(digest));
}

/// The state metrics in the Prometheus text format (appended to `/metrics`).
pub(crate) fn render_metrics(c: &Cluster) -> String {
    use std::fmt::Write;
    let m = &c.metrics;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP shoal_state_records Cluster-state records held, by class."
    );
    let _ = writeln!(out, "# TYPE shoal_state_records gauge");
    for (class, n) in c.counts() {
        let _ = writeln!(out, "shoal_state_records{{class=\"{class}\"}} {n}");
    }
    let counters = [
        (
            "shoal_state_sync_rounds",
            "Anti-entropy exchanges completed",
            &m.sync_rounds,
        ),
        (
            "shoal_state_sync_failures",
            "Anti-entropy exchanges that failed",
            &m.sync_failures,
        ),
        (
            "shoal_state_sync_bytes_sent",
            "Bytes sent on control streams",
            &m.sync_bytes_sent,
        ),
        (
            "shoal_state_sync_bytes_received",
            "Bytes received on control streams",
            &m.sync_bytes_received,
        ),
        (
            "shoal_state_deltas_sent",
            "State deltas queued for gossip",
            &m.deltas_sent,
        ),
        (
            "shoal_state_deltas_dropped",
            "State deltas dropped (membership queue full)",
            &m.deltas_dropped,
        ),
        (
            "shoal_state_deltas_applied",
            "Gossiped deltas that were news",
            &m.deltas_applied,
        ),
        (
            "shoal_lease_requests",
            "Lease rounds started by this node",
            &m.lease_requests,
        ),
        (
            "shoal_lease_acquisitions",
            "Lease rounds that reached a quorum",
            &m.lease_grants,
        ),
        (
            "shoal_state_placements_pushed",
            "Placements the leader pushed straight to their nodes",
            &m.placements_pushed,
        ),
        (
            "shoal_state_push_failures",
            "Placement pushes dropped or failed (gossip still carries them)",
            &m.push_failures,
        ),
        (
            "shoal_state_flush_failures",
            "Failed writes to the state database",
            &m.flush_failures,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}.");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name}_total {}", v.load(Ordering::Relaxed));
    }
    let count = m.lag_count.load(Ordering::Relaxed);
    let sum = m.lag_ms_sum.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP shoal_state_propagation_lag_seconds Write-to-apply lag of service records learned from peers."
    );
    let _ = writeln!(out, "# TYPE shoal_state_propagation_lag_seconds summary");
    let _ = writeln!(
        out,
        "shoal_state_propagation_lag_seconds_sum {}",
        sum as f64 / 1000.0
    );
    let _ = writeln!(out, "shoal_state_propagation_lag_seconds_count {count}");
    let _ = writeln!(
        out,
        "# HELP shoal_state_propagation_lag_max_seconds Largest lag seen."
    );
    let _ = writeln!(out, "# TYPE shoal_state_propagation_lag_max_seconds gauge");
    let _ = writeln!(
        out,
        "shoal_state_propagation_lag_max_seconds {}",
        m.lag_ms_max.load(Ordering::Relaxed) as f64 / 1000.0
    );
    let l = c.leader();
    let _ = writeln!(
        out,
        "# HELP shoal_leader_epoch The lease epoch of the current (or last known) leader."
    );
    let _ = writeln!(out, "# TYPE shoal_leader_epoch gauge");
    let _ = writeln!(out, "shoal_leader_epoch {}", l.epoch);
    let _ = writeln!(
        out,
        "# HELP shoal_is_leader 1 when this node holds the leader lease."
    );
    let _ = writeln!(out, "# TYPE shoal_is_leader gauge");
    let _ = writeln!(out, "shoal_is_leader {}", u8::from(l.is_self));
    out
}

/// Appends the state metrics to the membership ones (before the OpenMetrics `# EOF`).
pub(crate) fn append_metrics(text: String, c: &Cluster) -> String {
    let trimmed = text.trim_end();
    match trimmed.strip_suffix("# EOF") {
        Some(head) => format!("{head}{}# EOF\n", render_metrics(c)),
        None => format!("{trimmed}\n{}", render_metrics(c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_spec_becomes_toml_the_loader_accepts() {
        let t = json_to_toml(r#"{"name":"web","command":["sleep","5"],"replicas":2}"#).unwrap();
        let s = shoal_config::load_service_str("x.toml", &t).unwrap();
        assert_eq!((s.name.as_str(), s.replicas), ("web", 2));
        assert!(json_to_toml("[1,2]").is_err());
        assert!(json_to_toml("{nope").is_err());
    }
}

//! Instances and scaling on the HTTP API: `GET /v1/instances`, `GET /v1/services/{name}/instances`
//! (what `shoal ps` prints) and `POST /v1/services/{name}/scale` (`shoal scale`).
//!
//! An instance row joins the placement of a slot (which node should run it) with the status
//! record its node wrote (state, readiness, restarts, address). A slot without a placement is
//! `pending`; a placed slot its node has not reported yet is `assigned`; an instance reported by
//! a node that no longer holds the slot shows with `assigned: false` until that node stops it.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use shoal_membership::state::record::InstanceStatus;
use shoal_membership::state::{NodeId, RecordKey, Value};

use crate::api::ApiState;
use crate::api_services::{authorize, error};
use crate::cluster::{Cluster, unix_ms};
use crate::orchestrator::parse_instance_id;

/// One row of `shoal ps`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct InstanceJson {
    pub(crate) service: String,
    pub(crate) slot: u32,
    /// Node name, or null while pending.
    pub(crate) node: Option<String>,
    /// `pending`, `assigned`, `starting`, `running`, `backoff`, `exited`.
    pub(crate) state: String,
    pub(crate) ready: bool,
    pub(crate) restarts: u32,
    pub(crate) version: u64,
    pub(crate) address: Option<String>,
    /// Runtime instance id (`web.3.v2`), once reported.
    pub(crate) instance: Option<String>,
    /// Whether the placement still puts this slot on this node.
    pub(crate) assigned: bool,
}

/// An instance status as reported: (origin, instance id, version, status).
type Reported = (NodeId, String, u64, InstanceStatus);

/// Every instance row, sorted by service and slot (`service` filters).
pub(crate) fn instances(c: &Cluster, service: Option<&str>) -> Vec<InstanceJson> {
    let rows = c.with_state(|s| {
        let mut placed: BTreeMap<(String, u32), NodeId> = BTreeMap::new();
        let mut reported: BTreeMap<(String, u32), Vec<Reported>> = BTreeMap::new();
        let mut specs: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        for (_, e) in s.store.services() {
            specs.insert(e.spec.name.clone(), (e.spec.replicas, e.template));
        }
        for r in s.store.records() {
            match (&r.key, &r.value) {
                (RecordKey::Placement { service, slot }, Value::Placement(n)) => {
                    placed.insert((service.clone(), *slot), *n);
                }
                (RecordKey::Instance { origin, instance }, Value::Instance(st)) => {
                    if let Some((svc, slot, version)) = parse_instance_id(instance) {
                        reported.entry((svc.to_string(), slot)).or_default().push((
                            *origin,
                            instance.clone(),
                            version,
                            st.clone(),
                        ));
                    }
                }
                _ => {}
            }
        }
        (placed, reported, specs)
    });
    let (placed, reported, specs) = rows;
    let mut out = Vec::new();
    let mut keys: Vec<(String, u32)> = placed.keys().cloned().collect();
    keys.extend(reported.keys().cloned());
    // Slots not placed (yet): as many as the replicas the placements fall short of, taking the
    // smallest free slot numbers as placement will.
    let mut unplaced: std::collections::BTreeSet<(String, u32)> = Default::default();
    for (name, (replicas, _)) in &specs {
        let have = placed.keys().filter(|k| &k.0 == name).count() as u32;
        let mut slot = 0;
        for _ in have..*replicas {
            while placed.contains_key(&(name.clone(), slot)) {
                slot += 1;
            }
            unplaced.insert((name.clone(), slot));
            slot += 1;
        }
    }
    keys.extend(unplaced.iter().cloned());
    keys.sort();
    keys.dedup();
    for key in keys {
        if service.is_some_and(|s| s != key.0) {
            continue;
        }
        let spec_version = specs.get(&key.0).map_or(0, |v| v.1);
        let owner = placed.get(&key);
        let reports = reported.get(&key).cloned().unwrap_or_default();
        let mut owner_reported = false;
        for (origin, instance, version, st) in reports {
            let assigned = owner == Some(&origin);
            owner_reported |= assigned;
            out.push(InstanceJson {
                service: key.0.clone(),
                slot: key.1,
                node: Some(c.name_of(&origin)),
                state: st.state,
                ready: st.ready,
                restarts: st.restarts,
                version,
                address: st.address,
                instance: Some(instance),
                assigned,
            });
        }
        if !owner_reported && specs.contains_key(&key.0) {
            match owner {
                Some(n) => out.push(InstanceJson {
                    service: key.0.clone(),
                    slot: key.1,
                    node: Some(c.name_of(n)),
                    state: "assigned".into(),
                    ready: false,
                    restarts: 0,
                    version: spec_version,
                    address: None,
                    instance: None,
                    assigned: true,
                }),
                None if unplaced.contains(&key) => out.push(InstanceJson {
                    service: key.0.clone(),
                    slot: key.1,
                    node: None,
                    state: "pending".into(),
                    ready: false,
                    restarts: 0,
                    version: spec_version,
                    address: None,
                    instance: None,
                    assigned: false,
                }),
                None => {}
            }
        }
    }
    out
}

async fn list_all(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(instances(&state.cluster, None))
}

async fn list_service(path: web::Path<String>, state: web::Data<ApiState>) -> HttpResponse {
    let name = path.into_inner();
    let exists = state
        .cluster
        .with_state(|s| s.store.service(&name).is_some());
    let rows = instances(&state.cluster, Some(&name));
    if !exists && rows.is_empty() {
        return error(StatusCode::NOT_FOUND, format!("no service named `{name}`"));
    }
    HttpResponse::Ok().json(rows)
}

#[derive(Deserialize)]
struct ScaleBody {
    replicas: i64,
}

async fn scale(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<ApiState>,
) -> HttpResponse {
    let c = &state.cluster;
    if let Err(resp) = authorize(&req, c) {
        return *resp;
    }
    let name = path.into_inner();
    let replicas = match serde_json::from_slice::<ScaleBody>(&body) {
        Ok(b) if (0..=i64::from(shoal_config::MAX_REPLICAS)).contains(&b.replicas) => {
            b.replicas as u32
        }
        Ok(b) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "replicas must be between 0 and {}, not {}",
                    shoal_config::MAX_REPLICAS,
                    b.replicas
                ),
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"replicas\": N}}: {e}"),
            );
        }
    };
    let Some(mut spec) = c.with_state(|s| s.store.service(&name).map(|e| e.spec.clone())) else {
        return error(StatusCode::NOT_FOUND, format!("no service named `{name}`"));
    };
    spec.replicas = replicas;
    let problems = shoal_config::validate_service(&spec);
    if !problems.is_empty() {
        let errors: Vec<String> = problems
            .iter()
            .map(|v| format!("{}: {}", v.path, v.message))
            .collect();
        return HttpResponse::BadRequest().json(serde_json::json!({ "errors": errors }));
    }
    match c.with_state(|s| s.put_service(spec, unix_ms())) {
        Ok(record) => {
            c.disseminate(&record);
            c.event(
                "scaled",
                format!("service {name} scaled to {replicas} replicas"),
            );
            let version = c.with_state(|s| s.store.service(&name).map_or(0, |e| e.version));
            HttpResponse::Ok()
                .json(serde_json::json!({ "name": name, "replicas": replicas, "version": version }))
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store the change: {e}"),
        ),
    }
}

/// Registers the routes.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/instances", web::get().to(list_all))
        .route("/v1/services/{name}/instances", web::get().to(list_service))
        .route("/v1/services/{name}/scale", web::post().to(scale));
}

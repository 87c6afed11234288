//! HTTP mode: an HTTP/1.1 reverse proxy (hyper). Each request on a client connection is
//! balanced on its own over pooled keep-alive connections to the instances, so weights apply
//! per request; a request whose upstream connect fails is tried on another instance (the
//! request has not been sent yet, so this is always safe); requests, status classes and
//! latency (to the response head) are counted per instance.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Active, Endpoint, Proxy, ProxyError, Upstream, inc, lock};

type Body = BoxBody<Bytes, hyper::Error>;
type Pool = Arc<Mutex<Vec<SendRequest<Incoming>>>>;

/// Idle upstream connections per (service, instance).
#[derive(Debug, Default)]
pub(crate) struct Pools {
    map: Mutex<HashMap<(String, String), Pool>>,
}

impl Pools {
    fn pool(&self, service: &str, instance: &str) -> Pool {
        lock(&self.map)
            .entry((service.to_string(), instance.to_string()))
            .or_default()
            .clone()
    }
}

/// A ready idle connection from `pool`; closed ones are dropped on the way.
fn take_ready(pool: &Mutex<Vec<SendRequest<Incoming>>>) -> Option<SendRequest<Incoming>> {
    let mut p = lock(pool);
    p.retain(|s| !s.is_closed());
    let i = p.iter().position(|s| s.is_ready())?;
    Some(p.swap_remove(i))
}

fn error_response(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(code.canonical_reason().unwrap_or("error")))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r
}

/// Serves one client connection of a published HTTP port.
pub(crate) async fn serve_connection(
    proxy: Arc<Proxy>,
    port: u16,
    s: TcpStream,
    _peer: SocketAddr,
) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let p = proxy.clone();
        async move { Ok::<_, Infallible>(p.forward(port, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(s), svc)
        .await
    {
        tracing::debug!("http client connection on port {port}: {e}");
    }
}

impl Proxy {
    async fn upstream_conn(&self, ep: &Endpoint) -> Result<SendRequest<Incoming>, ProxyError> {
        let (sender, conn_task): (SendRequest<Incoming>, _) = match self.connect(ep).await? {
            Upstream::Local(s) => {
                let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .map_err(|e| ProxyError::Io(std::io::Error::other(e)))?;
                (
                    tx,
                    tokio::spawn(async move {
                        let _ = conn.await;
                    }),
                )
            }
            Upstream::Remote(t) => {
                let (a, b) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let _ = t.relay(Box::new(a), Vec::new()).await;
                });
                let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(b))
                    .await
                    .map_err(|e| ProxyError::Io(std::io::Error::other(e)))?;
                (
                    tx,
                    tokio::spawn(async move {
                        let _ = conn.await;
                    }),
                )
            }
        };
        drop(conn_task);
        Ok(sender)
    }

    /// Balances and forwards one request.
    async fn forward(&self, port: u16, req: Request<Incoming>) -> Response<Body> {
        let Some(route) = self.table.load().routes.get(&port).cloned() else {
            return error_response(StatusCode::SERVICE_UNAVAILABLE);
        };
        inc(&route.service.accepted);
        let mut tried = Vec::new();
        let mut req = Some(req);
        for attempt in 0..self.opts.max_connect_attempts {
            let Some(i) = route.pick(&tried) else { break };
            if attempt > 0 {
                inc(&route.service.retries);
            }
            let ep = &route.route.endpoints[i];
            let st = route.stats[i].clone();
            let _active = Active::new(&st);
            let pool = self.pools.pool(&route.route.service, &ep.instance);
            let sender = match take_ready(&pool) {
                Some(s) => s,
                None => match self.upstream_conn(ep).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!("connect to {} failed: {e}", ep.instance);
                        inc(&st.connect_errors);
                        tried.push(i);
                        continue;
                    }
                },
            };
            let mut sender = sender;
            let Some(r) = req.take() else { break };
            inc(&st.total);
            let start = Instant::now();
            let res = sender.send_request(r).await;
            match res {
                Ok(resp) => {
                    st.latency.observe(start.elapsed());
                    let class = (resp.status().as_u16() / 100).clamp(1, 5) as usize - 1;
                    inc(&st.status[class]);
                    {
                        let mut p = lock(&pool);
                        if p.len() < self.opts.http_pool_per_endpoint {
                            p.push(sender);
                        }
                    }
                    return resp.map(|b| b.boxed());
                }
                Err(e) => {
                    tracing::debug!("request to {} failed: {e}", ep.instance);
                    inc(&st.relay_errors);
                    inc(&st.status[4]);
                    return error_response(StatusCode::BAD_GATEWAY);
                }
            }
        }
        inc(&route.service.no_endpoint);
        error_response(StatusCode::SERVICE_UNAVAILABLE)
    }
}

//! Helpers shared by the runtime integration tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use shoal_runtime::{ContainerRuntime, LogOptions, RuntimeEvent};
use tokio::sync::broadcast;

/// Polls `cond` every 100 ms until it is true or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One HTTP/1.0 GET on loopback; `(status, body)` or `None` if nothing answered.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Polls until `addr` answers a GET of `path` with 200, returning the body.
pub async fn wait_for_http(addr: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = path.to_string();
        if let Ok(Some((200, body))) = tokio::task::spawn_blocking(move || http_get(addr, &p)).await
        {
            return Some(body);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for an event matching `pred` on `rx`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<RuntimeEvent>,
    timeout: Duration,
    pred: impl Fn(&RuntimeEvent) -> bool,
) -> Option<RuntimeEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(ev)) if pred(&ev) => return Some(ev),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
        }
    }
}

/// All log lines currently available (not following).
pub async fn log_lines(rt: &dyn ContainerRuntime, id: &str, tail: Option<usize>) -> Vec<String> {
    let s = rt
        .logs(
            id,
            LogOptions {
                tail,
                follow: false,
            },
        )
        .await
        .expect("logs");
    s.map(|l| l.expect("log line").line).collect().await
}

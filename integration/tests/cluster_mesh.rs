//! The routing mesh with real agents: three `shoal agent` processes (process runtime), a service
//! of six `busybox httpd` instances answering their own instance id, and 600 requests to one
//! node's published port. Each agent of `TestCluster` has its own loopback address
//! (127.0.0.1, .2, .3) and serves the published port there; the requests one node receives must
//! reach the instances on every node, through the Noise data plane for the remote ones.
//! Tests serialise on a static mutex; needs `busybox` on the PATH.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use shoal_integration::agents::{Runtime, TestCluster, serial, wait_until};

const PUBLISHED: u16 = 26_390;

fn web() -> String {
    // `$VAR`s are expanded by the process runtime before `sh` runs; the working directory is the
    // instance's own directory (inside the cluster's temporary directory).
    format!(
        "name = \"web\"\n\
         command = [\"sh\", \"-c\", \"mkdir -p www; printf %s $SHOAL_INSTANCE > www/index.html; exec busybox httpd -f -p $PORT -h www\"]\n\
         replicas = 6\nstop_grace = \"1s\"\n\
         [[ports]]\nname = \"http\"\ncontainer = 8080\npublished = {PUBLISHED}\n"
    )
}

/// One HTTP/1.0 request; the body, or `None` on any failure.
fn get(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).to_string();
    if !text.starts_with("HTTP/1.") || !text.contains(" 200 ") {
        return None;
    }
    Some(text.split_once("\r\n\r\n")?.1.trim().to_string())
}

fn tally(addr: SocketAddr, n: usize) -> (BTreeMap<String, usize>, usize) {
    let mut m = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match get(addr) {
            Some(id) => *m.entry(id).or_default() += 1,
            None => failed += 1,
        }
    }
    (m, failed)
}

#[test]
fn six_replicas_on_three_agents_share_600_requests_to_one_published_port_within_ten_percent() {
    let _g = serial();
    let mut c = TestCluster::plain("m", 3, 26_300, Runtime::Process);
    c.start();
    c.deploy("web", &web());
    let entry: SocketAddr = ([127, 0, 0, 2], PUBLISHED).into();
    // every node runs two and the serving node's table has all six ready
    let ok = wait_until(Duration::from_secs(90), || {
        let (m, _) = tally(entry, 30);
        m.len() == 6
    });
    let rows = c.ps("web");
    assert!(
        ok,
        "the mesh never reached six instances; ps: {rows:?}\n{}",
        c.logs()
    );
    let nodes: std::collections::BTreeSet<_> = rows
        .iter()
        .filter_map(|r| r["node"].as_str().map(str::to_string))
        .collect();
    assert_eq!(nodes.len(), 3, "instances on every node: {rows:?}");
    let (m, failed) = tally(entry, 600);
    eprintln!("600 requests: {m:?}, failed {failed}");
    assert_eq!(failed, 0);
    assert_eq!(m.len(), 6, "{m:?}");
    for (id, n) in &m {
        assert!((90..=110).contains(n), "{id} got {n}: {m:?}");
    }
    // The serving node counts what it routed, per instance, on /metrics.
    let (status, text) =
        shoal_integration::agents::http(c.agents[1].api, "GET", "/metrics", None, "")
            .expect("metrics");
    assert_eq!(status, 200);
    let routed: u64 = text
        .lines()
        .filter(|l| l.starts_with("shoal_proxy_connections_total{service=\"web\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        routed >= 600,
        "the proxy counted {routed} connections:\n{text}"
    );
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    // Every node serves the published port on its own address.
    for ip in 1..=3u8 {
        let addr: SocketAddr = ([127, 0, 0, ip], PUBLISHED).into();
        assert!(
            get(addr).is_some(),
            "{addr} does not serve the published port"
        );
    }
}

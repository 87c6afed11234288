//! Links over real loopback sockets: two nodes talking, refused certificates, and datagrams
//! captured from the wire, tampered with and replayed. Tests serialize on one mutex.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_membership::MembershipError;
use shoal_membership::cert::{
    CertRejection, CertificateAuthority, IssueOptions, NodeCredentials, unix_now,
};
use shoal_membership::link::{
    LinkMetrics, LinkMetricsSnapshot, LinkOptions, Links, NoiseListener, NoiseStream, NoiseUdp,
    Plane,
};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DEADLINE: Duration = Duration::from_secs(20);

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Node {
    udp: Arc<NoiseUdp>,
    listener: NoiseListener,
    metrics: Arc<LinkMetrics>,
    creds: Arc<NodeCredentials>,
    /// Datagrams that came out of `recv`: (sender name, payload).
    inbox: mpsc::Receiver<(String, Vec<u8>)>,
    recv_task: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start(creds: NodeCredentials) -> Node {
        Self::start_with(creds, LinkOptions::default()).await
    }

    async fn start_with(creds: NodeCredentials, opts: LinkOptions) -> Node {
        let creds = Arc::new(creds);
        let metrics = Arc::new(LinkMetrics::default());
        let (udp, listener) = Links::bind_with(localhost(), creds.clone(), metrics.clone(), opts)
            .await
            .unwrap();
        let udp = Arc::new(udp);
        let (tx, inbox) = mpsc::channel(1024);
        let u = udp.clone();
        let recv_task = tokio::spawn(async move {
            while let Ok((cert, _from, data)) = u.recv().await {
                if tx.send((cert.name.clone(), data)).await.is_err() {
                    break;
                }
            }
        });
        Node {
            udp,
            listener,
            metrics,
            creds,
            inbox,
            recv_task,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.udp.local_addr()
    }

    fn m(&self) -> LinkMetricsSnapshot {
        self.metrics.snapshot()
    }

    async fn next(&mut self) -> (String, Vec<u8>) {
        tokio::time::timeout(DEADLINE, self.inbox.recv())
            .await
            .expect("a datagram in time")
            .expect("recv task alive")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.recv_task.abort();
    }
}

fn good(ca: &CertificateAuthority, name: &str) -> NodeCredentials {
    ca.issue(
        name,
        &BTreeMap::new(),
        Duration::from_secs(3600),
        unix_now(),
    )
    .unwrap()
}

fn expired(ca: &CertificateAuthority, name: &str) -> NodeCredentials {
    let now = unix_now();
    let opts = IssueOptions {
        not_before: Some(now - 7200),
        not_after: Some(now - 3600),
        ..Default::default()
    };
    ca.issue_with(name, &BTreeMap::new(), Duration::from_secs(60), now, &opts)
        .unwrap()
}

fn wrong_key(ca: &CertificateAuthority, name: &str) -> NodeCredentials {
    let opts = IssueOptions {
        certify_other_key: true,
        ..Default::default()
    };
    ca.issue_with(
        name,
        &BTreeMap::new(),
        Duration::from_secs(3600),
        unix_now(),
        &opts,
    )
    .unwrap()
}

#[tokio::test]
async fn two_nodes_exchange_datagrams_and_stream_frames() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let mut a = Node::start(good(&ca, "a")).await;
    let mut b = Node::start(good(&ca, "b")).await;

    // The first datagram waits for the session; the rest use it.
    for i in 0..5u8 {
        a.udp.send_to(b.addr(), &[i; 100]).await.unwrap();
    }
    for i in 0..5u8 {
        assert_eq!(b.next().await, ("a".to_string(), vec![i; 100]));
    }
    // The reverse direction reuses the session a set up.
    b.udp.send_to(a.addr(), b"pong").await.unwrap();
    assert_eq!(a.next().await, ("b".to_string(), b"pong".to_vec()));
    assert_eq!(a.m().handshakes_completed, 1);
    assert_eq!(b.m().handshakes_completed, 1);
    assert_eq!(b.m().datagrams_in, 5);
    assert_eq!(b.m().bytes_in, 5 * (100 + NoiseUdp::OVERHEAD as u64));

    // Streams of a plane, both ways, with a frame larger than one Noise message.
    let (mut s, peer) =
        NoiseStream::connect(b.addr(), Plane::Data, a.creds.clone(), a.metrics.clone())
            .await
            .unwrap();
    assert_eq!(peer.name, "b");
    let (mut r, peer, plane) = tokio::time::timeout(DEADLINE, b.listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((peer.name.as_str(), plane), ("a", Plane::Data));
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    s.send_frame(b"hello").await.unwrap();
    s.send_frame(&big).await.unwrap();
    assert_eq!(r.recv_frame().await.unwrap(), b"hello");
    assert_eq!(r.recv_frame().await.unwrap(), big);
    r.send_frame(b"bye").await.unwrap();
    assert_eq!(s.recv_frame().await.unwrap(), b"bye");
    drop(r);
    assert!(matches!(
        s.recv_frame().await,
        Err(MembershipError::LinkClosed)
    ));
}

/// A bad node dials a good one over gossip and over a stream; nothing reaches the good node.
async fn dial_and_expect_refusal(bad: &Node, good: &mut Node) {
    bad.udp.send_to(good.addr(), b"let me in").await.unwrap();
    // The bad node drops its queued datagram once its handshake failed.
    wait_until("the bad node gave up", || {
        bad.m().send_dropped_no_session >= 1
    })
    .await;
    let err = NoiseStream::connect(
        good.addr(),
        Plane::Control,
        bad.creds.clone(),
        bad.metrics.clone(),
    )
    .await;
    assert!(err.is_err(), "a stream from a refused node was accepted");
    assert_eq!(good.m().handshakes_completed, 0);
    assert_eq!(good.m().datagrams_in, 0);
    assert!(
        good.inbox.try_recv().is_err(),
        "a datagram from a refused node came out of recv"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), good.listener.accept())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_node_with_a_certificate_from_another_ca_is_refused_and_counted() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let other = CertificateAuthority::generate(unix_now()).unwrap();
    let mut g = Node::start(good(&ca, "good")).await;
    let mut x = Node::start(good(&other, "stranger")).await;

    // The stranger dials: it refuses the cluster's certificate before showing its own.
    dial_and_expect_refusal(&x, &mut g).await;
    assert_eq!(x.m().handshakes_rejected_unknown_ca, 2);
    wait_until("the good node saw the aborted handshakes", || {
        g.m().handshakes_failed_io >= 2
    })
    .await;

    // The good node dials the stranger: the good node refuses and counts unknown_ca.
    g.udp.send_to(x.addr(), b"hello?").await.unwrap();
    wait_until("unknown_ca counted by the good node", || {
        g.m().handshakes_rejected_unknown_ca == 1
    })
    .await;
    let err = NoiseStream::connect(x.addr(), Plane::Data, g.creds.clone(), g.metrics.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, MembershipError::CertRejected(CertRejection::UnknownCa)),
        "{err}"
    );
    assert_eq!(g.m().handshakes_rejected_unknown_ca, 2);
    assert_eq!(x.m().datagrams_in, 0);
    assert!(x.inbox.try_recv().is_err());
}

#[tokio::test]
async fn a_node_with_an_expired_certificate_is_refused_and_counted() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let mut g = Node::start(good(&ca, "good")).await;
    let x = Node::start(expired(&ca, "old")).await;
    dial_and_expect_refusal(&x, &mut g).await;
    assert_eq!(g.m().handshakes_rejected_expired, 2);
    assert_eq!(
        g.m().handshakes_rejected_key_mismatch + g.m().handshakes_rejected_unknown_ca,
        0
    );
    // The good node dialing the expired one refuses it too.
    let err = NoiseStream::connect(x.addr(), Plane::Data, g.creds.clone(), g.metrics.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, MembershipError::CertRejected(CertRejection::Expired)),
        "{err}"
    );
    assert_eq!(g.m().handshakes_rejected_expired, 3);
}

#[tokio::test]
async fn a_node_whose_certificate_names_another_key_is_refused_and_counted() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let mut g = Node::start(good(&ca, "good")).await;
    let x = Node::start(wrong_key(&ca, "thief")).await;
    dial_and_expect_refusal(&x, &mut g).await;
    assert_eq!(g.m().handshakes_rejected_key_mismatch, 2);
    assert_eq!(
        g.m().handshakes_rejected_expired + g.m().handshakes_rejected_unknown_ca,
        0
    );
    let err = NoiseStream::connect(x.addr(), Plane::Data, g.creds.clone(), g.metrics.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            MembershipError::CertRejected(CertRejection::KeyMismatch)
        ),
        "{err}"
    );
}

/// A man in the middle on the wire: UDP and TCP on one port. TCP is forwarded to `target`
/// untouched; UDP datagrams are handed to the test, which decides what to forward.
struct Wiretap {
    udp: UdpSocket,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Wiretap {
    async fn start(target: SocketAddr) -> Wiretap {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind(localhost()).await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Wiretap { udp, addr, task }
    }

    async fn capture(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(DEADLINE, self.udp.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        buf.truncate(n);
        buf
    }
}

impl Drop for Wiretap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_replayed_datagram_from_the_wire_is_dropped_and_counted() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let a = Node::start(good(&ca, "a")).await;
    let mut b = Node::start(good(&ca, "b")).await;
    let tap = Wiretap::start(b.addr()).await;
    let raw = UdpSocket::bind(localhost()).await.unwrap();

    a.udp.send_to(tap.addr, b"one").await.unwrap();
    let one = tap.capture().await;
    raw.send_to(&one, b.addr()).await.unwrap();
    assert_eq!(b.next().await, ("a".to_string(), b"one".to_vec()));

    raw.send_to(&one, b.addr()).await.unwrap();
    wait_until("the replay is counted", || b.m().dropped_replay == 1).await;

    // Reordering within the window is fine, and the window still refuses the old one.
    a.udp.send_to(tap.addr, b"two").await.unwrap();
    a.udp.send_to(tap.addr, b"three").await.unwrap();
    let two = tap.capture().await;
    let three = tap.capture().await;
    raw.send_to(&three, b.addr()).await.unwrap();
    raw.send_to(&two, b.addr()).await.unwrap();
    raw.send_to(&three, b.addr()).await.unwrap();
    assert_eq!(b.next().await.1, b"three");
    assert_eq!(b.next().await.1, b"two");
    wait_until("the second replay is counted", || b.m().dropped_replay == 2).await;
    assert_eq!(b.m().datagrams_in, 3);
    assert!(b.inbox.try_recv().is_err());
}

#[tokio::test]
async fn a_tampered_datagram_from_the_wire_is_dropped_and_counted() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let a = Node::start(good(&ca, "a")).await;
    let mut b = Node::start(good(&ca, "b")).await;
    let tap = Wiretap::start(b.addr()).await;
    let raw = UdpSocket::bind(localhost()).await.unwrap();

    a.udp.send_to(tap.addr, b"pay alice 10").await.unwrap();
    let original = tap.capture().await;
    // Flip one bit in the ciphertext, in the tag, and in the counter.
    for pos in [20, original.len() - 1, 11] {
        let mut t = original.clone();
        t[pos] ^= 0x01;
        raw.send_to(&t, b.addr()).await.unwrap();
    }
    wait_until("three tampered datagrams counted", || {
        b.m().dropped_auth == 3
    })
    .await;
    // The genuine one still goes through: the forgeries did not move the replay window.
    raw.send_to(&original, b.addr()).await.unwrap();
    assert_eq!(b.next().await, ("a".to_string(), b"pay alice 10".to_vec()));

    // Garbage, an unknown session and an oversized datagram are each counted by reason.
    raw.send_to(b"garbage", b.addr()).await.unwrap();
    let mut unknown = original.clone();
    unknown[1..5].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    raw.send_to(&unknown, b.addr()).await.unwrap();
    raw.send_to(&vec![1u8; 1600], b.addr()).await.unwrap();
    wait_until("garbage, unknown session, oversize counted", || {
        let m = b.m();
        m.dropped_auth == 4 && m.dropped_unknown_session == 1 && m.dropped_oversize == 1
    })
    .await;
    assert_eq!(b.m().datagrams_in, 1);
    assert!(b.inbox.try_recv().is_err());
}

#[tokio::test]
async fn a_restarted_peer_gets_a_new_session_by_itself() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let a = Node::start(good(&ca, "a")).await;
    let b_creds = good(&ca, "b");
    let mut b = Node::start(b_creds.clone()).await;
    a.udp.send_to(b.addr(), b"before").await.unwrap();
    assert_eq!(b.next().await.1, b"before");

    // b restarts on the same port with the same certificate; a still holds the old session.
    let port = b.addr();
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics = Arc::new(LinkMetrics::default());
    let (udp, _l) = Links::bind(port, Arc::new(b_creds), metrics.clone())
        .await
        .unwrap();
    // a's datagrams on the stale session are dropped as unknown_session, and b dials a back.
    let mut got = None;
    let start = Instant::now();
    while got.is_none() {
        assert!(start.elapsed() < DEADLINE, "no datagram after the restart");
        a.udp.send_to(port, b"after").await.unwrap();
        if let Ok(Ok((cert, _, data))) =
            tokio::time::timeout(Duration::from_millis(200), udp.recv()).await
        {
            got = Some((cert.name.clone(), data));
        }
    }
    assert_eq!(got, Some(("a".to_string(), b"after".to_vec())));
    assert!(metrics.snapshot().dropped_unknown_session >= 1);
}

#[tokio::test]
async fn stalled_and_excess_handshakes_are_cut_and_counted() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let opts = LinkOptions {
        handshake_timeout: Duration::from_secs(2),
        max_pending_handshakes: 2,
        ..Default::default()
    };
    let g = Node::start_with(good(&ca, "good"), opts).await;
    // Two silent connections fill the pending slots (accepted in order); the third is closed
    // at once.
    let _s1 = TcpStream::connect(g.addr()).await.unwrap();
    let _s2 = TcpStream::connect(g.addr()).await.unwrap();
    let _s3 = TcpStream::connect(g.addr()).await.unwrap();
    wait_until("the excess connection is refused", || {
        g.m().handshakes_rejected_busy >= 1
    })
    .await;
    wait_until("the stalled ones time out", || {
        g.m().handshakes_rejected_timeout == 2
    })
    .await;
    // Once they are gone a real peer gets through.
    let x = good(&ca, "x");
    let (_s, peer) = NoiseStream::connect(
        g.addr(),
        Plane::Control,
        Arc::new(x),
        Arc::new(LinkMetrics::default()),
    )
    .await
    .unwrap();
    assert_eq!(peer.name, "good");
}

#[tokio::test]
async fn a_node_bound_to_every_interface_is_answered_at_the_address_it_dialed_from() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let metrics = Arc::new(LinkMetrics::default());
    let (a, _la) = Links::bind(
        "0.0.0.0:0".parse().unwrap(),
        Arc::new(good(&ca, "a")),
        metrics,
    )
    .await
    .unwrap();
    let mut b = Node::start(good(&ca, "b")).await;
    a.send_to(b.addr(), b"hi").await.unwrap();
    assert_eq!(b.next().await, ("a".to_string(), b"hi".to_vec()));
    // b answers over the session a set up, toward 127.0.0.1:<a's port>.
    let a_loopback = SocketAddr::new("127.0.0.1".parse().unwrap(), a.local_addr().port());
    b.udp.send_to(a_loopback, b"hello").await.unwrap();
    let (cert, _, data) = tokio::time::timeout(DEADLINE, a.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((cert.name.as_str(), data.as_slice()), ("b", &b"hello"[..]));
    assert_eq!(
        b.m().handshakes_completed,
        1,
        "b reused a's session instead of dialing"
    );
}

#[tokio::test]
async fn sessions_are_rekeyed_in_the_background_without_losing_datagrams() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let opts = LinkOptions {
        rekey_after: Duration::from_millis(300),
        reject_after: Duration::from_secs(10),
        ..Default::default()
    };
    let a = Node::start_with(good(&ca, "a"), opts.clone()).await;
    let mut b = Node::start_with(good(&ca, "b"), opts).await;
    let mut sent = 0u32;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        a.udp.send_to(b.addr(), &sent.to_be_bytes()).await.unwrap();
        b.udp.send_to(a.addr(), b"ack").await.unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut got = Vec::new();
    for _ in 0..sent {
        let (_, data) = b.next().await;
        got.push(u32::from_be_bytes(data.try_into().unwrap()));
    }
    got.sort_unstable();
    assert_eq!(
        got,
        (0..sent).collect::<Vec<_>>(),
        "datagrams lost or duplicated across rekeys"
    );
    let rekeys = a.m().handshakes_completed;
    assert!(
        rekeys >= 3,
        "only {rekeys} handshakes in 1.5 s with a 300 ms rekey period"
    );
    assert_eq!(
        b.m().dropped_unknown_session + b.m().dropped_auth + b.m().dropped_replay,
        0
    );
    assert_eq!(a.m().send_dropped_no_session, 0);
}

#[tokio::test]
async fn junk_on_the_handshake_port_is_refused_and_counted_and_real_peers_still_get_in() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let g = Node::start(good(&ca, "good")).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A wrong preamble.
    let mut t = TcpStream::connect(g.addr()).await.unwrap();
    t.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    // A right preamble, a random "ephemeral key", then a garbage msg3.
    let mut t2 = TcpStream::connect(g.addr()).await.unwrap();
    let mut hello = b"SHL1\x01\x00\x20".to_vec();
    hello.extend_from_slice(&[0x42; 32]);
    t2.write_all(&hello).await.unwrap();
    let mut len = [0u8; 2];
    t2.read_exact(&mut len).await.unwrap();
    let mut msg2 = vec![0u8; u16::from_be_bytes(len) as usize];
    t2.read_exact(&mut msg2).await.unwrap();
    let mut junk = 200u16.to_be_bytes().to_vec();
    junk.extend_from_slice(&[0x17; 200]);
    t2.write_all(&junk).await.unwrap();
    // An announced length of zero.
    let mut t3 = TcpStream::connect(g.addr()).await.unwrap();
    t3.write_all(b"SHL1\x00\x00\x00").await.unwrap();
    wait_until("three malformed handshakes", || {
        g.m().handshakes_rejected_malformed == 3
    })
    .await;
    let (_s, peer) = NoiseStream::connect(
        g.addr(),
        Plane::Management,
        Arc::new(good(&ca, "x")),
        Arc::new(LinkMetrics::default()),
    )
    .await
    .unwrap();
    assert_eq!(peer.name, "good");
    let (_, peer, plane) = tokio::time::timeout(DEADLINE, g.listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((peer.name.as_str(), plane), ("x", Plane::Management));
}

#[tokio::test]
async fn a_stream_to_a_node_that_accepts_no_streams_fails_to_connect() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let metrics = Arc::new(LinkMetrics::default());
    // Gossip only: the stream half is dropped at once.
    let udp = NoiseUdp::bind(
        localhost(),
        Arc::new(good(&ca, "gossip-only")),
        metrics.clone(),
    )
    .await
    .unwrap();
    let err = NoiseStream::connect(
        udp.local_addr(),
        Plane::Control,
        Arc::new(good(&ca, "x")),
        Arc::new(LinkMetrics::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MembershipError::Handshake { .. }), "{err}");
    wait_until("the refusal is counted", || {
        metrics.snapshot().handshakes_rejected_busy == 1
    })
    .await;
    assert_eq!(metrics.snapshot().handshakes_completed, 0);
}

#[tokio::test]
async fn a_stream_ends_when_the_peer_certificate_expires() {
    let _g = SERIAL.lock().await;
    let ca = CertificateAuthority::generate(unix_now()).unwrap();
    let g = Node::start(good(&ca, "good")).await;
    // Valid for a few more seconds only (the 60 s skew included).
    let now = unix_now();
    let skew = shoal_membership::cert::CLOCK_SKEW_SECS;
    let opts = IssueOptions {
        not_before: Some(now - 3600),
        not_after: Some(now + 4 - skew),
        ..Default::default()
    };
    let short = Arc::new(
        ca.issue_with(
            "short",
            &BTreeMap::new(),
            Duration::from_secs(60),
            now,
            &opts,
        )
        .unwrap(),
    );
    let (mut s, _) = NoiseStream::connect(
        g.addr(),
        Plane::Control,
        short,
        Arc::new(LinkMetrics::default()),
    )
    .await
    .unwrap();
    let (mut r, _, _) = tokio::time::timeout(DEADLINE, g.listener.accept())
        .await
        .unwrap()
        .unwrap();
    s.send_frame(b"still valid").await.unwrap();
    assert_eq!(r.recv_frame().await.unwrap(), b"still valid");
    // Keep talking; once the certificate is past its end the good side refuses the stream.
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < DEADLINE,
            "the stream outlived the peer certificate"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let _ = s.send_frame(b"tick").await;
        match r.recv_frame().await {
            Ok(_) => continue,
            Err(MembershipError::CertRejected(CertRejection::Expired)) => break,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(
        unix_now() > now + 4,
        "the stream ended before the certificate expired"
    );
}

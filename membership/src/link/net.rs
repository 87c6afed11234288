//! The tokio shell: sockets, tasks and deadlines around the sans-I/O link core.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::cert::{CLOCK_SKEW_SECS, CertRejection, Certificate, NodeCredentials, unix_now};
use crate::error::MembershipError;
use crate::link::frame::{DEFAULT_MAX_FRAME, LEN_PREFIX, StreamCodec, prefix};
use crate::link::handshake::{
    HandshakeError, Initiator, LinkKind, MAX_NOISE_MSG, MSG1_LEN, PREAMBLE_LEN, Plane, Responder,
    datagram_confirmation, stream_confirmation,
};
use crate::link::session::{self, DropReason, SealError, SessionTable};
use crate::link::{LinkMetrics, add, inc};

/// Tunables of the links.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// The gossip address announced in handshakes (default: the bound address).
    pub advertise: Option<SocketAddr>,
    /// Deadline of a whole handshake, connect included.
    pub handshake_timeout: Duration,
    /// Handshakes being answered at once; more connections are closed at once.
    pub max_pending_handshakes: usize,
    /// Gossip handshakes being dialed at once.
    pub max_outgoing_handshakes: usize,
    /// Cap on one stream frame.
    pub max_frame: usize,
    /// Datagrams queued per peer while its session is set up.
    pub queue_per_peer: usize,
    /// After a failed gossip handshake, datagrams to that peer are dropped for this long.
    pub retry_after: Duration,
    /// Accepted streams waiting for [`NoiseListener::accept`].
    pub accept_queue: usize,
    /// A datagram session is re-handshaken (in the background) once this old.
    pub rekey_after: Duration,
    /// A datagram session is no longer used once this old.
    pub reject_after: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            advertise: None,
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 64,
            max_outgoing_handshakes: 64,
            max_frame: DEFAULT_MAX_FRAME,
            queue_per_peer: 32,
            retry_after: Duration::from_secs(1),
            accept_queue: 64,
            rekey_after: session::REKEY_AFTER,
            reject_after: session::REJECT_AFTER,
        }
    }
}

/// How long an unknown-session datagram from an address suppresses another re-handshake to it.
const RETRIGGER_AFTER: Duration = Duration::from_secs(2);
/// Most peers tracked in the handshake bookkeeping maps.
const MAX_TRACKED_PEERS: usize = 4096;
/// How often stale sessions are purged.
const PURGE_EVERY: Duration = Duration::from_secs(10);

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if SystemRandom::new().fill(&mut b).is_ok() {
        return u32::from_be_bytes(b);
    }
    // The OS generator failed (it does not in practice): indexes need only be unique, not
    // secret, so fall back to a counter mixed with the clock rather than loop forever.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .wrapping_mul(2_654_435_761)
        ^ nanos
}

#[derive(Default)]
struct Control {
    queues: HashMap<SocketAddr, VecDeque<Vec<u8>>>,
    in_flight: HashSet<SocketAddr>,
    retry_at: HashMap<SocketAddr, Instant>,
    triggered: HashMap<SocketAddr, Instant>,
    last_purge: Option<Instant>,
}

struct UdpPart {
    socket: UdpSocket,
    table: SessionTable,
    advertise: SocketAddr,
    ctl: Mutex<Control>,
}

struct Shared {
    creds: Arc<NodeCredentials>,
    metrics: Arc<LinkMetrics>,
    opts: LinkOptions,
    udp: Option<UdpPart>,
    streams: mpsc::Sender<(NoiseStream, Arc<Certificate>, Plane)>,
    pending: Arc<Semaphore>,
}

/// Aborts the accept task when the last handle goes.
struct TaskGuard(JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Failure {
    Handshake(HandshakeError),
    Io(String),
    Timeout,
    /// Too many pending handshakes, or no room in the accept queue.
    Busy,
}

impl Failure {
    fn count(&self, m: &LinkMetrics) {
        match self {
            Failure::Handshake(HandshakeError::Rejected(r)) => m.count_rejection(*r),
            Failure::Handshake(HandshakeError::Protocol(_)) => {
                inc(&m.handshakes_rejected_malformed)
            }
            Failure::Io(_) => inc(&m.handshakes_failed_io),
            Failure::Timeout => inc(&m.handshakes_rejected_timeout),
            Failure::Busy => inc(&m.handshakes_rejected_busy),
        }
    }

    fn into_error(self, peer: SocketAddr) -> MembershipError {
        match self {
            Failure::Handshake(HandshakeError::Rejected(r)) => MembershipError::CertRejected(r),
            Failure::Handshake(HandshakeError::Protocol(reason)) | Failure::Io(reason) => {
                MembershipError::Handshake {
                    peer: peer.to_string(),
                    reason,
                }
            }
            Failure::Timeout => MembershipError::Handshake {
                peer: peer.to_string(),
                reason: "deadline passed".into(),
            },
            Failure::Busy => MembershipError::Handshake {
                peer: peer.to_string(),
                reason: "too busy to accept the stream".into(),
            },
        }
    }
}

impl From<HandshakeError> for Failure {
    fn from(e: HandshakeError) -> Self {
        Failure::Handshake(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Failure::Io("the peer closed the connection during the handshake".into())
        } else {
            Failure::Io(e.to_string())
        }
    }
}

impl From<MembershipError> for Failure {
    fn from(e: MembershipError) -> Self {
        Failure::Handshake(HandshakeError::Protocol(e.to_string()))
    }
}

async fn write_msg(tcp: &mut TcpStream, head: &[u8], msg: &[u8]) -> Result<(), Failure> {
    let mut out = Vec::with_capacity(head.len() + LEN_PREFIX + msg.len());
    out.extend_from_slice(head);
    prefix(msg, &mut out);
    tcp.write_all(&out).await?;
    Ok(())
}

async fn read_msg(tcp: &mut TcpStream, min: usize, max: usize) -> Result<Vec<u8>, Failure> {
    let mut len = [0u8; LEN_PREFIX];
    tcp.read_exact(&mut len).await?;
    let len = u16::from_be_bytes(len) as usize;
    if len < min || len > max {
        return Err(Failure::Handshake(HandshakeError::Protocol(format!(
            "handshake message of {len} bytes outside {min}..={max}"
        ))));
    }
    let mut msg = vec![0u8; len];
    tcp.read_exact(&mut msg).await?;
    Ok(msg)
}

/// Dials `to` and runs the initiator side up to msg3 (returned, not yet sent).
async fn dial(
    to: SocketAddr,
    kind: LinkKind,
    creds: &Arc<NodeCredentials>,
    local_index: u32,
    udp_addr: Option<SocketAddr>,
) -> Result<(TcpStream, crate::link::handshake::PendingConfirm, Vec<u8>), Failure> {
    let mut tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    let (init, msg1) = Initiator::start(kind, creds.clone(), local_index, udp_addr)?;
    write_msg(&mut tcp, &kind.preamble(), &msg1).await?;
    let msg2 = read_msg(&mut tcp, 32, MAX_NOISE_MSG).await?;
    let (msg3, pending) = init.on_msg2(&msg2, unix_now())?;
    Ok((tcp, pending, msg3))
}

/// Sends msg3 and reads the responder's confirmation.
async fn finish(tcp: &mut TcpStream, msg3: &[u8]) -> Result<Vec<u8>, Failure> {
    write_msg(tcp, &[], msg3).await?;
    read_msg(tcp, 16, 256).await
}

/// One bind gives both halves of a node's links on one port number.
#[derive(Debug)]
pub struct Links;

impl Links {
    /// Binds UDP and TCP on `bind` (the same port number for both; port 0 picks a free one).
    pub async fn bind(
        bind: SocketAddr,
        creds: Arc<NodeCredentials>,
        metrics: Arc<LinkMetrics>,
    ) -> Result<(NoiseUdp, NoiseListener), MembershipError> {
        Self::bind_with(bind, creds, metrics, LinkOptions::default()).await
    }

    /// [`Links::bind`] with options.
    pub async fn bind_with(
        bind: SocketAddr,
        creds: Arc<NodeCredentials>,
        metrics: Arc<LinkMetrics>,
        opts: LinkOptions,
    ) -> Result<(NoiseUdp, NoiseListener), MembershipError> {
        let mut attempts = 0;
        let (socket, listener) = loop {
            let socket = UdpSocket::bind(bind).await?;
            let addr = socket.local_addr()?;
            match TcpListener::bind(addr).await {
                Ok(l) => break (socket, l),
                Err(e) if bind.port() == 0 && attempts < 20 => {
                    attempts += 1;
                    tracing::debug!("TCP port {} busy ({e}); picking another", addr.port());
                }
                Err(e) => return Err(e.into()),
            }
        };
        let local = socket.local_addr()?;
        let udp = UdpPart {
            socket,
            table: SessionTable::with_lifetimes(opts.rekey_after, opts.reject_after),
            advertise: opts.advertise.unwrap_or(local),
            ctl: Mutex::new(Control::default()),
        };
        let (shared, listener, guard) = start(listener, creds, metrics, opts, Some(udp))?;
        Ok((
            NoiseUdp {
                shared,
                local,
                _guard: guard.clone(),
            },
            listener_handle(listener, local, guard),
        ))
    }
}

fn listener_handle(
    rx: mpsc::Receiver<(NoiseStream, Arc<Certificate>, Plane)>,
    local: SocketAddr,
    guard: Arc<TaskGuard>,
) -> NoiseListener {
    NoiseListener {
        rx: tokio::sync::Mutex::new(rx),
        local,
        _guard: guard,
    }
}

type StartResult = (
    Arc<Shared>,
    mpsc::Receiver<(NoiseStream, Arc<Certificate>, Plane)>,
    Arc<TaskGuard>,
);

fn start(
    listener: TcpListener,
    creds: Arc<NodeCredentials>,
    metrics: Arc<LinkMetrics>,
    opts: LinkOptions,
    udp: Option<UdpPart>,
) -> Result<StartResult, MembershipError> {
    let (tx, rx) = mpsc::channel(opts.accept_queue.max(1));
    let shared = Arc::new(Shared {
        pending: Arc::new(Semaphore::new(opts.max_pending_handshakes.max(1))),
        creds,
        metrics,
        opts,
        udp,
        streams: tx,
    });
    let task = tokio::spawn(accept_loop(listener, shared.clone()));
    Ok((shared, rx, Arc::new(TaskGuard(task))))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.pending.clone().try_acquire_owned() else {
            inc(&shared.metrics.handshakes_rejected_busy);
            drop(tcp);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let deadline = shared.opts.handshake_timeout;
            // The connection outlives `respond` when it fails, so a refusal is counted before
            // the peer sees the connection close.
            let mut conn = Some(tcp);
            let result = match tokio::time::timeout(deadline, respond(&mut conn, &shared)).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Timeout),
            };
            if let Err(f) = result {
                f.count(&shared.metrics);
                tracing::debug!("handshake from {from} failed: {}", f.into_error(from));
            }
            drop(conn);
        });
    }
}

async fn respond(conn: &mut Option<TcpStream>, shared: &Arc<Shared>) -> Result<(), Failure> {
    let Some(tcp) = conn.as_mut() else {
        return Err(Failure::Io("connection already taken".into()));
    };
    tcp.set_nodelay(true)?;
    let remote = tcp.peer_addr()?;
    let mut pre = [0u8; PREAMBLE_LEN];
    tcp.read_exact(&mut pre).await?;
    let kind = LinkKind::parse_preamble(&pre)?;
    let local_index = match (&shared.udp, kind) {
        (Some(udp), LinkKind::Gossip) => udp.table.allocate_index(random_u32),
        (None, LinkKind::Gossip) => {
            return Err(Failure::Handshake(HandshakeError::Protocol(
                "no gossip socket on this port".into(),
            )));
        }
        _ => 0,
    };
    let mut resp = Responder::new(kind, shared.creds.clone(), local_index)?;
    let msg1 = read_msg(tcp, MSG1_LEN, MSG1_LEN).await?;
    let msg2 = resp.on_msg1(&msg1)?;
    write_msg(tcp, &[], &msg2).await?;
    let msg3 = read_msg(tcp, 32, MAX_NOISE_MSG).await?;
    let est = resp.on_msg3(&msg3, unix_now())?;
    let info = est.info.clone();
    match (kind, &shared.udp) {
        (LinkKind::Gossip, Some(udp)) => {
            let announced = info.peer_udp_addr.ok_or_else(|| {
                Failure::Handshake(HandshakeError::Protocol("no gossip address".into()))
            })?;
            // A peer bound to 0.0.0.0 without an advertised address announces an unspecified
            // IP: use the IP it connected from.
            let peer_addr = if announced.ip().is_unspecified() {
                SocketAddr::new(remote.ip(), announced.port())
            } else {
                announced
            };
            let keys = est.into_stateless()?;
            let confirm = datagram_confirmation(&keys)?;
            udp.table.install(&info, peer_addr, keys, Instant::now());
            write_msg(tcp, &[], &confirm).await?;
            inc(&shared.metrics.handshakes_completed);
            flush(shared, udp, peer_addr).await;
            Ok(())
        }
        (LinkKind::Stream(plane), _) => {
            // Take a place in the accept queue before confirming, so that a dialer is never
            // told "connected" for a stream nobody will accept.
            let Ok(slot) = shared.streams.try_reserve() else {
                return Err(Failure::Busy);
            };
            let mut ts = est.into_transport()?;
            let confirm = stream_confirmation(&mut ts)?;
            write_msg(tcp, &[], &confirm).await?;
            inc(&shared.metrics.handshakes_completed);
            let Some(tcp) = conn.take() else {
                return Err(Failure::Io("connection already taken".into()));
            };
            let stream = NoiseStream::new(
                tcp,
                ts,
                info.peer.clone(),
                remote,
                shared.metrics.clone(),
                shared.opts.max_frame,
            );
            slot.send((stream, info.peer, plane));
            Ok(())
        }
        (LinkKind::Gossip, None) => Err(Failure::Handshake(HandshakeError::Protocol(
            "no gossip socket".into(),
        ))),
    }
}

/// Sends what was queued for `to` once its session exists.
async fn flush(shared: &Shared, udp: &UdpPart, to: SocketAddr) {
    let queued = lock(&udp.ctl).queues.remove(&to).unwrap_or_default();
    for pt in queued {
        match udp.table.seal(to, &pt, Instant::now(), unix_now()) {
            Ok(s) => send_sealed(shared, udp, to, &s.bytes).await,
            Err(_) => inc(&shared.metrics.send_dropped_no_session),
        }
    }
}

async fn send_sealed(shared: &Shared, udp: &UdpPart, to: SocketAddr, bytes: &[u8]) {
    match udp.socket.send_to(bytes, to).await {
        Ok(_) => {
            inc(&shared.metrics.datagrams_out);
            add(&shared.metrics.bytes_out, bytes.len());
        }
        Err(e) => tracing::debug!("send to {to} failed: {e}"),
    }
}

fn lock(m: &Mutex<Control>) -> MutexGuard<'_, Control> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts a gossip handshake to `to` unless one is running, the peer is in its retry delay, or
/// too many are running.
fn start_handshake(shared: &Arc<Shared>, to: SocketAddr) {
    let Some(udp) = &shared.udp else { return };
    {
        let mut ctl = lock(&udp.ctl);
        let now = Instant::now();
        if ctl.in_flight.contains(&to)
            || ctl.retry_at.get(&to).is_some_and(|t| *t > now)
            || ctl.in_flight.len() >= shared.opts.max_outgoing_handshakes
        {
            return;
        }
        ctl.in_flight.insert(to);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let Some(udp) = &shared.udp else { return };
        let index = udp.table.allocate_index(random_u32);
        let attempt = async {
            let (mut tcp, pending, msg3) = dial(
                to,
                LinkKind::Gossip,
                &shared.creds,
                index,
                Some(udp.advertise),
            )
            .await?;
            // Receive on the session before the responder can send on it.
            let (info, keys) = pending.into_datagram()?;
            udp.table.install_receiving(&info, to, keys, Instant::now());
            let confirm = finish(&mut tcp, &msg3).await?;
            if !udp.table.confirm(index, &confirm) {
                return Err(Failure::Handshake(HandshakeError::Protocol(
                    "bad session confirmation".into(),
                )));
            }
            Ok::<(), Failure>(())
        };
        let result = match tokio::time::timeout(shared.opts.handshake_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        };
        match result {
            Ok(()) => {
                inc(&shared.metrics.handshakes_completed);
                lock(&udp.ctl).in_flight.remove(&to);
                flush(&shared, udp, to).await;
            }
            Err(f) => {
                udp.table.remove(index);
                f.count(&shared.metrics);
                tracing::debug!("gossip handshake to {to} failed: {}", f.into_error(to));
                let mut ctl = lock(&udp.ctl);
                ctl.in_flight.remove(&to);
                if ctl.retry_at.len() >= MAX_TRACKED_PEERS {
                    let now = Instant::now();
                    ctl.retry_at.retain(|_, t| *t > now);
                }
                ctl.retry_at
                    .insert(to, Instant::now() + shared.opts.retry_after);
                let dropped = ctl.queues.remove(&to).map_or(0, |q| q.len());
                add(&shared.metrics.send_dropped_no_session, dropped);
            }
        }
    });
}

/// The gossip socket: Noise-sealed datagrams on UDP port `P`, sessions set up over TCP `P`.
pub struct NoiseUdp {
    shared: Arc<Shared>,
    local: SocketAddr,
    _guard: Arc<TaskGuard>,
}

impl std::fmt::Debug for NoiseUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseUdp")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl NoiseUdp {
    /// Bytes added per sealed datagram (lower foca's `max_packet_size` by this).
    pub const OVERHEAD: usize = session::OVERHEAD;
    /// The largest plaintext [`NoiseUdp::send_to`] accepts.
    pub const MAX_PLAINTEXT: usize = session::MAX_PLAINTEXT;

    /// Binds the gossip socket (UDP and TCP on `bind`); streams of other planes arriving on
    /// the TCP port are refused. Use [`Links::bind`] to accept them too.
    pub async fn bind(
        bind: SocketAddr,
        creds: Arc<NodeCredentials>,
        metrics: Arc<LinkMetrics>,
    ) -> Result<Self, MembershipError> {
        Ok(Links::bind(bind, creds, metrics).await?.0)
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Seals and sends `plaintext` to the node whose gossip address is `to`. Never waits on
    /// the network for a handshake: with no session it queues the datagram (bounded) and
    /// sets the session up in the background; beyond the queue, or while a failed peer is in
    /// its retry delay, datagrams are dropped and counted (`send_dropped_no_session`).
    pub async fn send_to(&self, to: SocketAddr, plaintext: &[u8]) -> Result<(), MembershipError> {
        let Some(udp) = &self.shared.udp else {
            return Err(MembershipError::LinkClosed);
        };
        let now = Instant::now();
        self.maybe_purge(udp, now);
        match udp.table.seal(to, plaintext, now, unix_now()) {
            Ok(sealed) => {
                if sealed.rekey {
                    start_handshake(&self.shared, to);
                }
                send_sealed(&self.shared, udp, to, &sealed.bytes).await;
                Ok(())
            }
            Err(SealError::TooLarge) => Err(MembershipError::FrameTooLarge {
                len: plaintext.len(),
                max: session::MAX_PLAINTEXT,
            }),
            Err(SealError::NoSession) => {
                {
                    let mut ctl = lock(&udp.ctl);
                    let in_retry = ctl.retry_at.get(&to).is_some_and(|t| *t > now);
                    let full =
                        ctl.queues.len() >= MAX_TRACKED_PEERS && !ctl.queues.contains_key(&to);
                    let q = ctl.queues.entry(to).or_default();
                    if in_retry || full || q.len() >= self.shared.opts.queue_per_peer {
                        inc(&self.shared.metrics.send_dropped_no_session);
                        if q.is_empty() {
                            ctl.queues.remove(&to);
                        }
                        return Ok(());
                    }
                    q.push_back(plaintext.to_vec());
                }
                start_handshake(&self.shared, to);
                // The session may have been installed by the peer's handshake meanwhile.
                if udp.table.has_session(to, now, unix_now())
                    && !lock(&udp.ctl).in_flight.contains(&to)
                {
                    flush(&self.shared, udp, to).await;
                }
                Ok(())
            }
        }
    }

    fn maybe_purge(&self, udp: &UdpPart, now: Instant) {
        let mut ctl = lock(&udp.ctl);
        if ctl
            .last_purge
            .is_none_or(|t| now.saturating_duration_since(t) >= PURGE_EVERY)
        {
            ctl.last_purge = Some(now);
            drop(ctl);
            udp.table.purge(now, unix_now());
        }
    }

    /// The next authenticated, decrypted, non-replayed datagram: the sender's certificate, its
    /// source address and the plaintext. Everything else is dropped and counted by reason.
    pub async fn recv(&self) -> Result<(Arc<Certificate>, SocketAddr, Vec<u8>), MembershipError> {
        let Some(udp) = &self.shared.udp else {
            return Err(MembershipError::LinkClosed);
        };
        let mut buf = vec![0u8; session::MAX_DATAGRAM + 1];
        loop {
            let (n, from) = match udp.socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match udp.table.open(&buf[..n], Instant::now(), unix_now()) {
                Ok(opened) => {
                    inc(&self.shared.metrics.datagrams_in);
                    add(&self.shared.metrics.bytes_in, n);
                    return Ok((opened.peer, from, opened.plaintext));
                }
                Err(reason) => {
                    self.shared.metrics.count_drop(reason);
                    if reason == DropReason::UnknownSession {
                        self.retrigger(udp, from);
                    }
                }
            }
        }
    }

    /// A peer sends with a session we do not know (we restarted, or evicted it): set up a new
    /// one toward its address, at most once per [`RETRIGGER_AFTER`].
    fn retrigger(&self, udp: &UdpPart, from: SocketAddr) {
        let now = Instant::now();
        {
            let mut ctl = lock(&udp.ctl);
            if ctl
                .triggered
                .get(&from)
                .is_some_and(|t| now.saturating_duration_since(*t) < RETRIGGER_AFTER)
            {
                return;
            }
            if ctl.triggered.len() >= MAX_TRACKED_PEERS {
                ctl.triggered
                    .retain(|_, t| now.saturating_duration_since(*t) < RETRIGGER_AFTER);
                if ctl.triggered.len() >= MAX_TRACKED_PEERS {
                    return;
                }
            }
            ctl.triggered.insert(from, now);
        }
        start_handshake(&self.shared, from);
    }

    /// Number of live datagram sessions.
    pub fn session_count(&self) -> usize {
        self.shared.udp.as_ref().map_or(0, |u| u.table.len())
    }
}

/// Accepts the streams of every plane on TCP port `P`.
pub struct NoiseListener {
    rx: tokio::sync::Mutex<mpsc::Receiver<(NoiseStream, Arc<Certificate>, Plane)>>,
    local: SocketAddr,
    _guard: Arc<TaskGuard>,
}

impl std::fmt::Debug for NoiseListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl NoiseListener {
    /// Binds a TCP listener for streams only (no gossip sessions on this port).
    pub async fn bind(
        addr: SocketAddr,
        creds: Arc<NodeCredentials>,
        metrics: Arc<LinkMetrics>,
    ) -> Result<Self, MembershipError> {
        Self::bind_with(addr, creds, metrics, LinkOptions::default()).await
    }

    /// [`NoiseListener::bind`] with options.
    pub async fn bind_with(
        addr: SocketAddr,
        creds: Arc<NodeCredentials>,
        metrics: Arc<LinkMetrics>,
        opts: LinkOptions,
    ) -> Result<Self, MembershipError> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let (_shared, rx, guard) = start(listener, creds, metrics, opts, None)?;
        Ok(listener_handle(rx, local, guard))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next authenticated stream, its peer's certificate and its plane.
    pub async fn accept(&self) -> Result<(NoiseStream, Arc<Certificate>, Plane), MembershipError> {
        self.rx
            .lock()
            .await
            .recv()
            .await
            .ok_or(MembershipError::LinkClosed)
    }
}

/// An encrypted stream of length-prefixed frames over TCP (Noise XX).
pub struct NoiseStream {
    tcp: TcpStream,
    codec: StreamCodec,
    peer: Arc<Certificate>,
    remote: SocketAddr,
    metrics: Arc<LinkMetrics>,
}

impl std::fmt::Debug for NoiseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseStream")
            .field("peer", &self.peer.name)
            .field("remote", &self.remote)
            .finish()
    }
}

impl NoiseStream {
    fn new(
        tcp: TcpStream,
        ts: snow::TransportState,
        peer: Arc<Certificate>,
        remote: SocketAddr,
        metrics: Arc<LinkMetrics>,
        max_frame: usize,
    ) -> Self {
        NoiseStream {
            tcp,
            codec: StreamCodec::new(ts, max_frame),
            peer,
            remote,
            metrics,
        }
    }

    /// Dials `to` for `plane`; returns once the peer accepted this node's certificate.
    pub async fn connect(
        to: SocketAddr,
        plane: Plane,
        creds: Arc<NodeCredentials>,
        metrics: Arc<LinkMetrics>,
    ) -> Result<(Self, Arc<Certificate>), MembershipError> {
        Self::connect_with(to, plane, creds, metrics, &LinkOptions::default()).await
    }

    /// [`NoiseStream::connect`] with options (deadline, frame cap).
    pub async fn connect_with(
        to: SocketAddr,
        plane: Plane,
        creds: Arc<NodeCredentials>,
        metrics: Arc<LinkMetrics>,
        opts: &LinkOptions,
    ) -> Result<(Self, Arc<Certificate>), MembershipError> {
        let attempt = async {
            let (mut tcp, pending, msg3) =
                dial(to, LinkKind::Stream(plane), &creds, 0, None).await?;
            let confirm = finish(&mut tcp, &msg3).await?;
            let (info, ts) = pending.confirm_stream(&confirm)?;
            Ok::<_, Failure>((tcp, info, ts))
        };
        let result = match tokio::time::timeout(opts.handshake_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        };
        match result {
            Ok((tcp, info, ts)) => {
                inc(&metrics.handshakes_completed);
                let peer = info.peer.clone();
                Ok((
                    Self::new(tcp, ts, info.peer, to, metrics, opts.max_frame),
                    peer,
                ))
            }
            Err(f) => {
                f.count(&metrics);
                Err(f.into_error(to))
            }
        }
    }

    /// The peer's certificate.
    pub fn peer(&self) -> &Arc<Certificate> {
        &self.peer
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// A stream ends when its peer's certificate expires (with the usual clock skew).
    fn check_peer_valid(&self) -> Result<(), MembershipError> {
        if unix_now() > self.peer.not_after.saturating_add(CLOCK_SKEW_SECS) {
            return Err(MembershipError::CertRejected(CertRejection::Expired));
        }
        Ok(())
    }

    /// Sends one frame (up to the frame cap). Not cancel-safe: a cancelled send may leave a
    /// partial frame, after which the peer closes the stream.
    pub async fn send_frame(&mut self, bytes: &[u8]) -> Result<(), MembershipError> {
        self.check_peer_valid()?;
        let wire = self.codec.seal_frame(bytes)?;
        self.tcp.write_all(&wire).await?;
        inc(&self.metrics.frames_out);
        Ok(())
    }

    /// Receives one frame. Cancel-safe: bytes already read stay buffered.
    pub async fn recv_frame(&mut self) -> Result<Vec<u8>, MembershipError> {
        loop {
            if let Some(frame) = self.codec.next_frame()? {
                self.check_peer_valid()?;
                inc(&self.metrics.frames_in);
                return Ok(frame);
            }
            let n = self.tcp.read_buf(self.codec.read_buffer()).await?;
            if n == 0 {
                return Err(MembershipError::LinkClosed);
            }
        }
    }
}

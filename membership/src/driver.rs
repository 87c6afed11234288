//! The tokio shell around [`MembershipCore`]: one task owns the core, one ordered timer task
//! delivers every timer it asked for (none is ever dropped), one task reads the transport.
//!
//! The transport is a trait ([`Transport`]) with an in-memory implementation here
//! ([`MemNetwork`]) and the Noise UDP one from [`crate::link`] in the agent.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::core::{Input, MembershipCore, PeerMeta, TimerEvent};
use crate::error::MembershipError;
use crate::handle::{MembershipHandle, Snapshot};
use crate::identity::NodeIdBytes;
use crate::link::NoiseUdp;

/// One authenticated datagram out of a transport.
#[derive(Debug, Clone)]
pub struct Received {
    /// The sender's node id, proven by its certificate.
    pub node_id: NodeIdBytes,
    /// The sender's name and labels, when the transport has not reported them before (or they
    /// changed). `None` means "unchanged".
    pub meta: Option<PeerMeta>,
    /// The UDP source address.
    pub from: SocketAddr,
    /// The decrypted SWIM packet.
    pub bytes: Vec<u8>,
}

/// A datagram transport that only ever yields authenticated datagrams.
pub trait Transport: Send + Sync + 'static {
    /// Sends one datagram; never waits for the network (may drop and count instead).
    fn send_to(
        &self,
        to: SocketAddr,
        bytes: &[u8],
    ) -> impl Future<Output = Result<(), MembershipError>> + Send;
    /// The next authenticated datagram.
    fn recv(&self) -> impl Future<Output = Result<Received, MembershipError>> + Send;
}

type MemInbox = mpsc::Sender<Received>;

/// An in-memory datagram network for tests: endpoints by address, no authentication (each
/// endpoint states its node id), optional cut links.
#[derive(Clone, Default)]
pub struct MemNetwork {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    endpoints: HashMap<SocketAddr, MemInbox>,
}

impl MemNetwork {
    /// A new, empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches an endpoint at `addr` for node `node_id`.
    pub fn endpoint(&self, addr: SocketAddr, node_id: NodeIdBytes, meta: PeerMeta) -> MemTransport {
        let (tx, rx) = mpsc::channel(1024);
        self.lock().endpoints.insert(addr, tx);
        MemTransport {
            net: self.clone(),
            addr,
            node_id,
            meta,
            rx: tokio::sync::Mutex::new(rx),
        }
    }

    /// Detaches the endpoint at `addr`: datagrams to it are lost (a crashed node).
    pub fn detach(&self, addr: SocketAddr) {
        self.lock().endpoints.remove(&addr);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One endpoint of a [`MemNetwork`].
pub struct MemTransport {
    net: MemNetwork,
    addr: SocketAddr,
    node_id: NodeIdBytes,
    meta: PeerMeta,
    rx: tokio::sync::Mutex<mpsc::Receiver<Received>>,
}

impl Transport for MemTransport {
    async fn send_to(&self, to: SocketAddr, bytes: &[u8]) -> Result<(), MembershipError> {
        let inbox = self.net.lock().endpoints.get(&to).cloned();
        if let Some(inbox) = inbox {
            // A full inbox loses the datagram, like a full socket buffer.
            let _ = inbox.try_send(Received {
                node_id: self.node_id,
                meta: Some(self.meta.clone()),
                from: self.addr,
                bytes: bytes.to_vec(),
            });
        }
        Ok(())
    }

    async fn recv(&self) -> Result<Received, MembershipError> {
        self.rx
            .lock()
            .await
            .recv()
            .await
            .ok_or(MembershipError::Stopped)
    }
}

/// The real transport: [`NoiseUdp`] (only authenticated, decrypted, non-replayed datagrams come
/// out). Reports a peer's name and labels the first time it sees a certificate serial.
pub struct NoiseTransport {
    udp: NoiseUdp,
    seen: Mutex<HashMap<NodeIdBytes, u64>>,
}

impl NoiseTransport {
    /// Wraps a bound gossip socket.
    pub fn new(udp: NoiseUdp) -> Self {
        Self {
            udp,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.udp.local_addr()
    }

    /// The largest SWIM packet that fits a 1400-byte sealed datagram.
    pub const MAX_SWIM_PACKET: usize = 1400 - NoiseUdp::OVERHEAD;
}

impl Transport for NoiseTransport {
    async fn send_to(&self, to: SocketAddr, bytes: &[u8]) -> Result<(), MembershipError> {
        self.udp.send_to(to, bytes).await
    }

    async fn recv(&self) -> Result<Received, MembershipError> {
        let (cert, from, bytes) = self.udp.recv().await?;
        let fresh = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded by the number of distinct authenticated node ids.
            seen.insert(cert.node_id, cert.serial) != Some(cert.serial)
        };
        Ok(Received {
            node_id: cert.node_id,
            meta: fresh.then(|| PeerMeta {
                name: cert.name.clone(),
                labels: cert.labels.clone(),
            }),
            from,
            bytes,
        })
    }
}

/// The ordered timer queue shared by the owner task (push) and the timer task (pop).
#[derive(Default)]
struct TimerQueue {
    heap: Mutex<BinaryHeap<Reverse<(Instant, u64, TimerEvent)>>>,
    seq: std::sync::atomic::AtomicU64,
    wake: Notify,
}

impl TimerQueue {
    fn push(&self, at: Instant, ev: TimerEvent) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.heap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Reverse((at, seq, ev)));
        self.wake.notify_one();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.heap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .peek()
            .map(|Reverse((at, _, _))| *at)
    }

    fn pop_due(&self, now: Instant) -> Vec<TimerEvent> {
        let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        while let Some(Reverse((at, _, _))) = heap.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, _, ev))) = heap.pop() {
                due.push(ev);
            }
        }
        // Several due at once (a lagging runtime): foca's order (indirect probe before the
        // next probe, ...); the sort is stable so equal kinds keep their deadline order.
        due.sort();
        due
    }
}

async fn timer_task(queue: Arc<TimerQueue>, out: mpsc::Sender<TimerEvent>) {
    loop {
        let notified = queue.wake.notified();
        match queue.next_deadline() {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
        for ev in queue.pop_due(Instant::now()) {
            // Waits for room: a timer is never dropped.
            if out.send(ev).await.is_err() {
                return;
            }
        }
    }
}

async fn reader_task<T: Transport>(transport: Arc<T>, out: mpsc::Sender<Received>) {
    loop {
        match transport.recv().await {
            Ok(r) => {
                if out.send(r).await.is_err() {
                    return;
                }
            }
            Err(MembershipError::Stopped) | Err(MembershipError::LinkClosed) => return,
            Err(e) => {
                tracing::debug!(error = %e, "membership transport");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

pub(crate) enum Control {
    Shutdown(oneshot::Sender<()>),
    /// A cluster-state delta to disseminate.
    Broadcast(Vec<u8>),
}

struct Owner<T: Transport> {
    core: MembershipCore,
    transport: Arc<T>,
    timers: Arc<TimerQueue>,
    origin: Instant,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl<T: Transport> Owner<T> {
    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }

    async fn apply(&mut self, fx: crate::core::Effects) -> bool {
        let now = Instant::now();
        for (delay, ev) in fx.timers {
            self.timers.push(now + delay, ev);
        }
        for (to, bytes) in fx.sends {
            if let Err(e) = self.transport.send_to(to, &bytes).await {
                tracing::debug!(error = %e, %to, "membership send");
            }
        }
        for ev in &fx.events {
            tracing::info!(event = ?ev, "membership");
        }
        !fx.events.is_empty()
    }

    fn publish(&self) {
        let snap = Snapshot {
            identity: *self.core.identity(),
            members: self.core.members(),
            counters: self.core.counters(),
        };
        self.snapshot.send_replace(Arc::new(snap));
    }
}

/// Starts the membership tasks on the current tokio runtime and returns the handle.
pub fn spawn<T: Transport>(core: MembershipCore, transport: Arc<T>) -> MembershipHandle {
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(256);
    let (timer_tx, mut timer_rx) = mpsc::channel::<TimerEvent>(256);
    let (data_tx, mut data_rx) = mpsc::channel::<Received>(1024);
    let timers = Arc::new(TimerQueue::default());
    let initial = Snapshot {
        identity: *core.identity(),
        members: core.members(),
        counters: core.counters(),
    };
    let (snap_tx, snap_rx) = watch::channel(Arc::new(initial));

    let timer_join = tokio::spawn(timer_task(timers.clone(), timer_tx));
    let reader_join = tokio::spawn(reader_task(transport.clone(), data_tx));

    let mut owner = Owner {
        core,
        transport,
        timers,
        origin: Instant::now(),
        snapshot: snap_tx,
    };
    let task = tokio::spawn(async move {
        let fx = owner.core.start(owner.now());
        owner.apply(fx).await;
        owner.publish();
        let mut refresh = tokio::time::interval(Duration::from_millis(200));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                ctl = control_rx.recv() => {
                    if let Some(Control::Broadcast(bytes)) = &ctl {
                        let now = owner.now();
                        let fx = owner.core.handle(Input::Broadcast(bytes), now);
                        owner.apply(fx).await;
                        continue;
                    }
                    let Some(Control::Shutdown(done)) = ctl else { break };
                    let now = owner.now();
                    let fx = owner.core.handle(Input::Leave, now);
                    owner.apply(fx).await;
                    owner.publish();
                    let _ = done.send(());
                    break;
                }
                Some(ev) = timer_rx.recv() => {
                    let now = owner.now();
                    let fx = owner.core.handle(Input::Timer(ev), now);
                    if owner.apply(fx).await {
                        owner.publish();
                    }
                }
                Some(r) = data_rx.recv() => {
                    if crate::sync::filter::blocked(&r.node_id) {
                        continue;
                    }
                    if let Some(meta) = r.meta {
                        owner.core.learn_peer(r.node_id, meta);
                    }
                    let now = owner.now();
                    let fx = owner.core.handle(
                        Input::Datagram { from: Some(r.node_id), bytes: &r.bytes },
                        now,
                    );
                    if owner.apply(fx).await {
                        owner.publish();
                    }
                }
                _ = refresh.tick() => owner.publish(),
            }
        }
        timer_join.abort();
        reader_join.abort();
    });
    MembershipHandle::new(snap_rx, control_tx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{CoreConfig, MemberState};
    use crate::identity::NodeIdentity;

    fn addr(port: u16) -> SocketAddr {
        format!("127.0.0.1:{port}").parse().unwrap()
    }

    fn node(net: &MemNetwork, i: u8, seeds: Vec<SocketAddr>) -> MembershipHandle {
        let a = addr(10_000 + i as u16);
        let id = NodeIdentity::new([i; 16], a, 1);
        let meta = PeerMeta {
            name: format!("n{i}"),
            labels: Default::default(),
        };
        let core = MembershipCore::new(id, CoreConfig::fast(), seeds, i as u64, meta.clone());
        spawn(core, Arc::new(net.endpoint(a, [i; 16], meta)))
    }

    async fn wait_until(mut cond: impl FnMut() -> bool, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cond()
    }

    fn alive(h: &MembershipHandle) -> usize {
        h.members()
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .count()
    }

    #[test]
    fn due_timers_come_out_in_deadline_order_and_in_foca_order_when_simultaneous() {
        use foca::Timer;
        let q = TimerQueue::default();
        let t0 = Instant::now();
        let probe = TimerEvent::Swim(Timer::ProbeRandomMember(0));
        let indirect = TimerEvent::Swim(Timer::SendIndirectProbe {
            probed_id: NodeIdentity::new([1; 16], addr(1), 1),
            token: 0,
        });
        let seed = TimerEvent::SeedAnnounce { generation: 1 };
        q.push(t0 + Duration::from_millis(30), seed.clone());
        q.push(t0 + Duration::from_millis(10), probe.clone());
        q.push(t0 + Duration::from_millis(10), indirect.clone());
        q.push(t0 + Duration::from_secs(60), probe.clone());
        assert!(q.pop_due(t0).is_empty());
        assert_eq!(
            q.pop_due(t0 + Duration::from_millis(40)),
            vec![indirect, probe.clone(), seed]
        );
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_secs(60)));
        assert_eq!(q.pop_due(t0 + Duration::from_secs(61)), vec![probe]);
    }

    #[tokio::test]
    async fn the_timer_task_delivers_every_timer_even_when_its_output_is_full() {
        let q = Arc::new(TimerQueue::default());
        let (tx, mut rx) = mpsc::channel(2);
        let task = tokio::spawn(timer_task(q.clone(), tx));
        let now = Instant::now();
        for i in 0..100u64 {
            q.push(
                now + Duration::from_millis(i % 7),
                TimerEvent::SeedAnnounce { generation: i },
            );
        }
        let mut got = Vec::new();
        while got.len() < 100 {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(TimerEvent::SeedAnnounce { generation })) => got.push(generation),
                other => panic!("timer lost after {} delivered: {other:?}", got.len()),
            }
        }
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        task.abort();
    }

    #[tokio::test]
    async fn three_drivers_on_a_memory_network_see_each_other_and_a_leave() {
        let net = MemNetwork::new();
        let a = node(&net, 1, vec![]);
        let b = node(&net, 2, vec![addr(10_001)]);
        let c = node(&net, 3, vec![addr(10_001)]);
        assert!(wait_until(|| [&a, &b, &c].iter().all(|h| alive(h) == 3), 20).await);
        let names: Vec<_> = b
            .members()
            .iter()
            .map(|m| m.meta.as_ref().map(|x| x.name.clone()))
            .collect();
        assert!(
            wait_until(|| c.members().iter().all(|m| m.meta.is_some()), 20).await,
            "names learned: {names:?}"
        );
        c.shutdown().await;
        net.detach(addr(10_003));
        let down = |h: &MembershipHandle| {
            h.members()
                .iter()
                .any(|m| m.identity.node_id == [3; 16] && m.state == MemberState::Down)
        };
        assert!(wait_until(|| down(&a) && down(&b), 20).await);
        a.shutdown().await;
        b.shutdown().await;
    }
}

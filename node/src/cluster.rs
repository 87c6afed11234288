//! The agent's cluster-state shell: the durable store (redb in the data dir), deltas over foca
//! custom broadcasts, anti-entropy and lease requests over Noise control streams, the lease
//! loop, events and the state metrics. The logic lives in `shoal_membership::{state, sync,
//! lease}`; this file moves bytes and reads clocks.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use shoal_membership::cert::NodeCredentials;
use shoal_membership::core::MemberState;
use shoal_membership::handle::MembershipHandle;
use shoal_membership::identity::node_id_hex;
use shoal_membership::lease::{
    Candidate, LeaseConfig, LeaseEvent, LeaseReply, LeaseRequest, Voter, VoterDurable, quorum,
};
use shoal_membership::link::{LinkMetrics, NoiseListener, NoiseStream, Plane};
use shoal_membership::state::codec;
use shoal_membership::state::record::{LeaseInfo, NodeInfo};
use shoal_membership::state::{
    Class, DurableState, MergeOutcome, NodeId, Record, RecordKey, RedbBackend, Stamp, Value,
};
use shoal_membership::sync::gossip::Delta;
use shoal_membership::sync::protocol::{ControlMsg, frames, plan_reply, push_back};
use shoal_membership::sync::{DeltaBroadcasts, DeltaSink};
use tokio::sync::mpsc;

/// How often a node runs anti-entropy with a random peer.
const ANTI_ENTROPY_EVERY: Duration = Duration::from_secs(1);
/// Deadline for one control-stream exchange.
const STREAM_DEADLINE: Duration = Duration::from_secs(5);
/// Events kept for `/v1/events`.
const MAX_EVENTS: usize = 500;
const META_VOTER: &str = "lease_voter";

/// One entry of `/v1/events`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct EventJson {
    pub(crate) seq: u64,
    pub(crate) time_ms: u64,
    pub(crate) kind: String,
    pub(crate) message: String,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub(crate) struct StateMetrics {
    pub(crate) sync_rounds: AtomicU64,
    pub(crate) sync_failures: AtomicU64,
    pub(crate) sync_bytes_sent: AtomicU64,
    pub(crate) sync_bytes_received: AtomicU64,
    pub(crate) deltas_applied: AtomicU64,
    pub(crate) deltas_sent: AtomicU64,
    pub(crate) deltas_dropped: AtomicU64,
    pub(crate) lag_ms_sum: AtomicU64,
    pub(crate) lag_count: AtomicU64,
    pub(crate) lag_ms_max: AtomicU64,
    pub(crate) lease_requests: AtomicU64,
    pub(crate) lease_grants: AtomicU64,
    pub(crate) flush_failures: AtomicU64,
    pub(crate) placements_pushed: AtomicU64,
    pub(crate) push_failures: AtomicU64,
}

struct LeaseShell {
    voter: Voter,
    cand: Candidate,
    was_leading: bool,
    renewals: u64,
    /// The last lease record learned from the state and when (local).
    seen: Option<(LeaseInfo, u64, Instant)>,
}

/// What `/v1/leader` says.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LeaderJson {
    pub(crate) leader: Option<String>,
    pub(crate) node_id: Option<String>,
    pub(crate) epoch: u64,
    pub(crate) is_self: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    pub(crate) voters: usize,
    pub(crate) voters_reachable: usize,
}

/// The cluster-state side of one agent.
pub(crate) struct Cluster {
    pub(crate) node_id: NodeId,
    pub(crate) name: String,
    creds: Arc<NodeCredentials>,
    links: Arc<LinkMetrics>,
    membership: OnceLock<MembershipHandle>,
    /// The routing mesh's proxy: serves `Plane::Data` streams from other nodes.
    pub(crate) data_plane: OnceLock<Arc<shoal_actors::proxy::Proxy>>,
    state: Mutex<DurableState>,
    lease: Mutex<LeaseShell>,
    events: Mutex<(u64, VecDeque<EventJson>)>,
    pub(crate) metrics: StateMetrics,
    origin: Instant,
    pub(crate) lease_cfg: LeaseConfig,
    sync_tx: mpsc::Sender<NodeId>,
    sync_rx: Mutex<Option<mpsc::Receiver<NodeId>>>,
    push_tx: mpsc::Sender<(NodeId, Record)>,
    push_rx: Mutex<Option<mpsc::Receiver<(NodeId, Record)>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn roster_hash(roster: &[NodeId]) -> u64 {
    let mut bytes = Vec::with_capacity(roster.len() * 16);
    for id in roster {
        bytes.extend_from_slice(id);
    }
    shoal_membership::state::record::fnv1a(&bytes)
}

impl Cluster {
    /// Opens the state in `data_dir/state.redb`.
    pub(crate) fn open(
        data_dir: &Path,
        name: String,
        creds: Arc<NodeCredentials>,
        links: Arc<LinkMetrics>,
        lease_cfg: LeaseConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let node_id = creds.cert.node_id;
        let path = data_dir.join("state.redb");
        let backend = RedbBackend::open(&path)
            .with_context(|| format!("opening the state database {}", path.display()))?;
        let durable = DurableState::open(node_id, Box::new(backend))?;
        if durable.skipped_at_load > 0 {
            tracing::warn!(
                skipped = durable.skipped_at_load,
                "unreadable state records skipped"
            );
        }
        let voter_durable: VoterDurable = durable
            .meta
            .get(META_VOTER)
            .and_then(|b| codec::decode(b).ok())
            .unwrap_or_default();
        let epoch_seen = durable.store.max_epoch().max(voter_durable.max_epoch);
        let origin = Instant::now();
        let lease = LeaseShell {
            voter: Voter::new(node_id, lease_cfg, voter_durable, Duration::ZERO),
            cand: Candidate::new(node_id, lease_cfg, epoch_seen),
            was_leading: false,
            renewals: 0,
            seen: None,
        };
        let (sync_tx, sync_rx) = mpsc::channel(64);
        let (push_tx, push_rx) = mpsc::channel(8192);
        tracing::info!(
            services = durable.store.services().count(),
            records = durable.store.len(),
            "cluster state loaded"
        );
        Ok(Arc::new(Self {
            node_id,
            name,
            creds,
            links,
            membership: OnceLock::new(),
            data_plane: OnceLock::new(),
            state: Mutex::new(durable),
            lease: Mutex::new(lease),
            events: Mutex::new((0, VecDeque::new())),
            metrics: StateMetrics::default(),
            origin,
            lease_cfg,
            sync_tx,
            sync_rx: Mutex::new(Some(sync_rx)),
            push_tx,
            push_rx: Mutex::new(Some(push_rx)),
        }))
    }

    /// Checks an admin token against the cluster CA.
    pub(crate) fn check_admin(&self, token: &str) -> Result<(), String> {
        shoal_membership::cert::verify_admin_token(
            &self.creds.ca,
            token,
            shoal_membership::cert::unix_now(),
        )
        .map_err(|e| e.to_string())
    }

    /// The foca broadcast handler feeding this store.
    pub(crate) fn broadcasts(self: &Arc<Self>) -> DeltaBroadcasts {
        DeltaBroadcasts::new(Arc::new(Sink(self.clone())))
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn membership(&self) -> Option<&MembershipHandle> {
        self.membership.get()
    }

    /// Records an event.
    pub(crate) fn event(&self, kind: &str, message: String) {
        tracing::info!(kind, "{message}");
        let mut g = lock(&self.events);
        g.0 += 1;
        let seq = g.0;
        g.1.push_back(EventJson {
            seq,
            time_ms: unix_ms(),
            kind: kind.to_string(),
            message,
        });
        while g.1.len() > MAX_EVENTS {
            g.1.pop_front();
        }
    }

    /// Recent events, oldest first.
    pub(crate) fn events(&self) -> Vec<EventJson> {
        lock(&self.events).1.iter().cloned().collect()
    }

    /// Runs `f` on the state.
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&mut DurableState) -> R) -> R {
        f(&mut lock(&self.state))
    }

    /// Disseminates a record this node wrote. A placement written while this node leads is
    /// also pushed straight to the node it names (batched, over a control stream), so the
    /// worker does not wait for gossip.
    pub(crate) fn disseminate(&self, record: &Record) {
        if let (RecordKey::Placement { .. }, Value::Placement(target)) =
            (&record.key, &record.value)
            && *target != self.node_id
            && lock(&self.lease).cand.leading(self.now()).is_some()
            && self.push_tx.try_send((*target, record.clone())).is_err()
        {
            self.metrics.push_failures.fetch_add(1, Ordering::Relaxed);
        }
        let Some(m) = self.membership() else { return };
        match Delta::for_record(record, self.node_id) {
            Ok(bytes) => {
                if m.broadcast(bytes) {
                    self.metrics.deltas_sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.metrics.deltas_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode a delta"),
        }
    }

    /// The display name of a node id.
    pub(crate) fn name_of(&self, id: &NodeId) -> String {
        if *id == self.node_id {
            return self.name.clone();
        }
        if let Some(Value::Node(info)) = lock(&self.state)
            .store
            .get(&RecordKey::Node(*id))
            .map(|r| r.value.clone())
        {
            return info.name;
        }
        node_id_hex(id)
    }

    /// Publishes this node's info (its own per-origin record), so every node learns the voter
    /// roster.
    fn publish_node_info(&self, labels: BTreeMap<String, String>) {
        let version = unix_ms();
        let record = Record {
            key: RecordKey::Node(self.node_id),
            stamp: Stamp::version(version),
            written_ms: version,
            value: Value::Node(NodeInfo {
                name: self.name.clone(),
                labels,
                cpu: 0.0,
                memory: 0,
                load: 0,
            }),
        };
        let mut g = lock(&self.state);
        g.store.merge(record.clone());
        if let Err(e) = g.flush() {
            tracing::warn!(error = %e, "cannot persist node info");
        }
        drop(g);
        self.disseminate(&record);
    }

    /// The voters: every node that has published its node info (and this node), sorted.
    pub(crate) fn roster(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = lock(&self.state).store.node_ids();
        if !v.contains(&self.node_id) {
            v.push(self.node_id);
        }
        v.sort_unstable();
        v
    }

    /// Every member this node knows of (down ones too), by node id: anti-entropy also tries
    /// members SWIM thinks are down, so state converges as soon as a partition heals.
    pub(crate) fn known_addrs(&self) -> BTreeMap<NodeId, SocketAddr> {
        let mut out = BTreeMap::new();
        if let Some(m) = self.membership() {
            for mv in m.members() {
                if mv.identity.node_id != self.node_id {
                    out.insert(mv.identity.node_id, mv.identity.addr);
                }
            }
        }
        out
    }

    fn alive_addrs(&self) -> BTreeMap<NodeId, SocketAddr> {
        let mut out = BTreeMap::new();
        if let Some(m) = self.membership() {
            for mv in m.members() {
                if matches!(mv.state, MemberState::Alive | MemberState::Suspect) {
                    out.insert(mv.identity.node_id, mv.identity.addr);
                }
            }
        }
        out.insert(self.node_id, SocketAddr::from(([0, 0, 0, 0], 0)));
        out
    }

    /// Starts the background tasks.
    pub(crate) fn start(
        self: &Arc<Self>,
        membership: MembershipHandle,
        listener: NoiseListener,
        labels: BTreeMap<String, String>,
    ) {
        let _ = self.membership.set(membership);
        self.publish_node_info(labels);
        let me = self.clone();
        tokio::spawn(async move { me.accept_loop(listener).await });
        let me = self.clone();
        tokio::spawn(async move { me.anti_entropy_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.lease_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.housekeeping_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.push_loop().await });
    }

    async fn accept_loop(self: Arc<Self>, listener: NoiseListener) {
        loop {
            match listener.accept().await {
                Ok((_, peer, _)) if shoal_membership::sync::filter::blocked(&peer.node_id) => {}
                Ok((stream, _peer, Plane::Control)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.serve_control(stream).await {
                            tracing::debug!(error = %e, "control stream");
                        }
                    });
                }
                Ok((stream, _peer, Plane::Data)) => {
                    if let Some(proxy) = self.data_plane.get() {
                        let proxy = proxy.clone();
                        tokio::spawn(async move {
                            let r = shoal_actors::proxy::remote::serve_noise_stream(proxy, stream);
                            if let Err(e) = r.await {
                                tracing::debug!(error = %e, "data stream");
                            }
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn recv(&self, s: &mut NoiseStream) -> anyhow::Result<ControlMsg> {
        let bytes = tokio::time::timeout(STREAM_DEADLINE, s.recv_frame())
            .await
            .context("control stream timed out")??;
        self.metrics
            .sync_bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(ControlMsg::decode(&bytes)?)
    }

    async fn send(&self, s: &mut NoiseStream, msg: &ControlMsg) -> anyhow::Result<()> {
        let bytes = msg.encode()?;
        self.metrics
            .sync_bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        tokio::time::timeout(STREAM_DEADLINE, s.send_frame(&bytes))
            .await
            .context("control stream timed out")??;
        Ok(())
    }

    fn merge_batch(&self, records: Vec<Record>, received: &mut HashSet<(RecordKey, u64)>) {
        let wall = unix_ms();
        let mut applied = Vec::new();
        {
            let mut g = lock(&self.state);
            for r in records {
                received.insert((r.key.clone(), r.fingerprint()));
                if let Ok(MergeOutcome::Applied) = g.merge_remote(r.clone(), wall) {
                    applied.push(r);
                }
            }
        }
        for r in &applied {
            self.after_remote_apply(r, wall);
        }
        // A few records learned by anti-entropy (e.g. after a partition healed) are passed on
        // by gossip too, so the rest of this side learns them within a gossip round or two.
        if applied.len() <= 64 {
            for r in &applied {
                self.disseminate(r);
            }
        }
    }

    /// Bookkeeping after a record from a peer was applied: events, lag, lease observations.
    fn after_remote_apply(&self, r: &Record, wall: u64) {
        match (&r.key, &r.value) {
            (RecordKey::Service(name), Value::Service(e)) => {
                let lag = wall.saturating_sub(r.written_ms);
                self.metrics.lag_ms_sum.fetch_add(lag, Ordering::Relaxed);
                self.metrics.lag_count.fetch_add(1, Ordering::Relaxed);
                self.metrics.lag_ms_max.fetch_max(lag, Ordering::Relaxed);
                self.event(
                    "service_updated",
                    format!(
                        "service {name} version {} ({} replicas) learned from a peer",
                        e.version, e.spec.replicas
                    ),
                );
            }
            (RecordKey::Service(name), Value::Tombstone) => {
                self.event(
                    "service_removed",
                    format!("service {name} removed (learned from a peer)"),
                );
            }
            (RecordKey::Lease, Value::Lease(info)) => {
                let mut l = lock(&self.lease);
                l.cand.observe_epoch(info.epoch);
                let changed = l.seen.map(|(old, _, _)| old != *info).unwrap_or(true);
                l.seen = Some((*info, r.stamp.minor, Instant::now()));
                drop(l);
                if changed && info.holder != self.node_id {
                    let name = self.name_of(&info.holder);
                    self.event("leader", format!("{name} leads at epoch {}", info.epoch));
                }
            }
            _ => {}
        }
    }

    async fn serve_control(&self, mut s: NoiseStream) -> anyhow::Result<()> {
        match self.recv(&mut s).await? {
            ControlMsg::SyncDigest(d) => {
                let plan = plan_reply(&lock(&self.state).store, &d);
                self.send(&mut s, &ControlMsg::SyncWant(plan.want.clone()))
                    .await?;
                for f in frames(plan.records, plan.full) {
                    self.send(&mut s, &f).await?;
                }
                let mut received = HashSet::new();
                loop {
                    match self.recv(&mut s).await? {
                        ControlMsg::SyncRecords { records, last, .. } => {
                            self.merge_batch(records, &mut received);
                            if last {
                                break;
                            }
                        }
                        other => bail!("unexpected {other:?} in a sync"),
                    }
                }
                self.metrics.sync_rounds.fetch_add(1, Ordering::Relaxed);
            }
            ControlMsg::LeaseRequest { req, roster } => {
                let reply = self.vote(&req, roster);
                self.send(&mut s, &ControlMsg::LeaseReply(reply)).await?;
            }
            ControlMsg::SyncRecords { records, last, .. } => {
                let mut received = HashSet::new();
                self.merge_batch(records, &mut received);
                if !last {
                    loop {
                        if let ControlMsg::SyncRecords { records, last, .. } =
                            self.recv(&mut s).await?
                        {
                            self.merge_batch(records, &mut received);
                            if last {
                                break;
                            }
                        }
                    }
                }
            }
            other => bail!("unexpected first frame {other:?}"),
        }
        Ok(())
    }

    /// This node's voter answers a lease request (persisting its promise first).
    fn vote(&self, req: &LeaseRequest, roster: u64) -> LeaseReply {
        let now = self.now();
        let mine = roster_hash(&self.roster());
        let mut l = lock(&self.lease);
        if roster != mine {
            // Candidate and voter disagree on who votes: no grant until the rosters converge.
            return LeaseReply {
                voter: self.node_id,
                round: req.round,
                granted: false,
                max_epoch: l.voter.durable().max_epoch,
                promised_to: None,
            };
        }
        let before = l.voter.durable();
        let reply = l.voter.handle(req, now);
        let after = l.voter.durable();
        drop(l);
        if after != before {
            let bytes = codec::encode(&after).unwrap_or_default();
            let mut g = lock(&self.state);
            g.set_meta(META_VOTER, bytes);
            if let Err(e) = g.flush() {
                tracing::warn!(error = %e, "cannot persist the lease promise; refusing");
                return LeaseReply {
                    granted: false,
                    ..reply
                };
            }
        }
        reply
    }

    async fn connect(&self, addr: SocketAddr) -> anyhow::Result<NoiseStream> {
        let (s, _peer) = tokio::time::timeout(
            STREAM_DEADLINE,
            NoiseStream::connect(addr, Plane::Control, self.creds.clone(), self.links.clone()),
        )
        .await
        .context("connect timed out")??;
        Ok(s)
    }

    /// One anti-entropy exchange with the node at `addr` (this node initiates).
    pub(crate) async fn sync_with(&self, addr: SocketAddr) -> anyhow::Result<()> {
        let mut s = self.connect(addr).await?;
        let digest = lock(&self.state).store.digest();
        self.send(&mut s, &ControlMsg::SyncDigest(digest)).await?;
        let want = match self.recv(&mut s).await? {
            ControlMsg::SyncWant(w) => w,
            other => bail!("expected SyncWant, got {other:?}"),
        };
        let mut received = HashSet::new();
        loop {
            match self.recv(&mut s).await? {
                ControlMsg::SyncRecords { records, last, .. } => {
                    self.merge_batch(records, &mut received);
                    if last {
                        break;
                    }
                }
                other => bail!("unexpected {other:?} in a sync"),
            }
        }
        let back = push_back(&lock(&self.state).store, &want, &received);
        for f in frames(back, false) {
            self.send(&mut s, &f).await?;
        }
        self.metrics.sync_rounds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn anti_entropy_loop(self: Arc<Self>) {
        let Some(mut rx) = lock(&self.sync_rx).take() else {
            return;
        };
        let mut known: HashSet<NodeId> = HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut next_random = Instant::now() + Duration::from_millis(500);
        let mut salt = u64::from(self.node_id[0]);
        loop {
            let target: Option<NodeId> = tokio::select! {
                Some(id) = rx.recv() => Some(id),
                _ = tick.tick() => {
                    let alive = self.alive_addrs();
                    // A member seen alive again (a join, a rejoin, a healed partition): sync now.
                    let fresh = alive.keys().find(|id| **id != self.node_id && !known.contains(*id)).copied();
                    known = alive.keys().copied().collect();
                    if fresh.is_some() {
                        fresh
                    } else if Instant::now() >= next_random {
                        next_random = Instant::now() + ANTI_ENTROPY_EVERY;
                        let peers: Vec<NodeId> = self.known_addrs().keys().copied().collect();
                        salt = salt.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        (!peers.is_empty()).then(|| peers[(salt >> 33) as usize % peers.len()])
                    } else {
                        None
                    }
                }
            };
            let Some(id) = target else { continue };
            let Some(addr) = self.known_addrs().get(&id).copied() else {
                continue;
            };
            if shoal_membership::sync::filter::blocked(&id) {
                continue;
            }
            if id == self.node_id {
                continue;
            }
            if let Err(e) = self.sync_with(addr).await {
                self.metrics.sync_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %addr, error = %e, "anti-entropy failed");
            }
        }
    }

    /// Sends queued placements to the nodes they name, one stream per node per batch.
    async fn push_loop(self: Arc<Self>) {
        let Some(mut rx) = lock(&self.push_rx).take() else {
            return;
        };
        while let Some(first) = rx.recv().await {
            // Let a scheduling pass finish queueing, then take everything queued.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut batch: BTreeMap<NodeId, Vec<Record>> = BTreeMap::new();
            batch.entry(first.0).or_default().push(first.1);
            while let Ok((node, r)) = rx.try_recv() {
                batch.entry(node).or_default().push(r);
            }
            for (node, records) in batch {
                let Some(addr) = self.known_addrs().get(&node).copied() else {
                    continue;
                };
                let n = records.len() as u64;
                let r = async {
                    let mut s = self.connect(addr).await?;
                    for f in frames(records, false) {
                        self.send(&mut s, &f).await?;
                    }
                    anyhow::Ok(())
                };
                match r.await {
                    Ok(()) => {
                        self.metrics
                            .placements_pushed
                            .fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.metrics.push_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = %addr, error = %e, "placement push failed");
                    }
                }
            }
        }
    }

    async fn housekeeping_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut last_gc = Instant::now();
        loop {
            tick.tick().await;
            let mut g = lock(&self.state);
            if last_gc.elapsed() > Duration::from_secs(600) {
                last_gc = Instant::now();
                let n = g.store.collect_tombstones(
                    unix_ms(),
                    shoal_membership::state::store::DEFAULT_TOMBSTONE_HORIZON_MS,
                );
                if n > 0 {
                    tracing::info!(collected = n, "tombstones collected");
                }
            }
            if g.store.has_changes() && g.flush().is_err() {
                self.metrics.flush_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn lease_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let roster = self.roster();
            let alive = self.alive_addrs();
            // The candidate: the lowest alive voter, skipping a holder whose lease record has
            // not been renewed for a lease duration (crashed or cut off, even if SWIM has not
            // said so yet); nobody but the holder tries while a fresh lease is seen.
            let (fresh_other, stale_holder) = {
                let l = lock(&self.lease);
                match l.seen {
                    Some((info, _, at)) if info.holder != self.node_id => {
                        let fresh = at.elapsed() < self.lease_cfg.duration;
                        (
                            fresh.then_some(info.holder),
                            (!fresh).then_some(info.holder),
                        )
                    }
                    _ => (None, None),
                }
            };
            let lowest_alive = roster
                .iter()
                .find(|id| alive.contains_key(*id) && Some(**id) != stale_holder)
                .copied();
            let should_try = lowest_alive == Some(self.node_id)
                && fresh_other.is_none_or(|h| !alive.contains_key(&h));
            let now = self.now();
            let (req, lost) = {
                let mut l = lock(&self.lease);
                let leading = l.cand.leading(now).is_some();
                let lost = l.was_leading && !leading;
                l.was_leading = leading;
                (l.cand.tick(now, should_try, roster.len()), lost)
            };
            if lost {
                self.event(
                    "leader_lost",
                    format!("{} lost its lease (no quorum renewed it)", self.name),
                );
            }
            let Some(req) = req else { continue };
            self.metrics.lease_requests.fetch_add(1, Ordering::Relaxed);
            let rh = roster_hash(&roster);
            for voter in roster {
                if voter == self.node_id {
                    let reply = self.vote(&req, rh);
                    self.on_lease_reply(reply);
                    continue;
                }
                let Some(addr) = alive.get(&voter).copied() else {
                    continue;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    let r = async {
                        let mut s = me.connect(addr).await?;
                        me.send(&mut s, &ControlMsg::LeaseRequest { req, roster: rh })
                            .await?;
                        match me.recv(&mut s).await? {
                            ControlMsg::LeaseReply(reply) => Ok(reply),
                            other => bail!("expected a lease reply, got {other:?}"),
                        }
                    };
                    match tokio::time::timeout(me.lease_cfg.renew_every(), r).await {
                        Ok(Ok(reply)) => me.on_lease_reply(reply),
                        Ok(Err(e)) => tracing::debug!(voter = %addr, error = %e, "lease request"),
                        Err(_) => tracing::debug!(voter = %addr, "lease request timed out"),
                    }
                });
            }
        }
    }

    fn on_lease_reply(&self, reply: LeaseReply) {
        let now = self.now();
        let ev = {
            let mut l = lock(&self.lease);
            let ev = l.cand.on_reply(&reply, now);
            if ev.is_some() {
                l.renewals += 1;
            }
            ev.map(|e| (e, l.renewals))
        };
        let Some((LeaseEvent::Acquired { epoch, renewal, .. }, renewals)) = ev else {
            return;
        };
        self.metrics.lease_grants.fetch_add(1, Ordering::Relaxed);
        let record = Record {
            key: RecordKey::Lease,
            stamp: Stamp {
                major: epoch,
                minor: renewals,
                node: self.node_id,
            },
            written_ms: unix_ms(),
            value: Value::Lease(LeaseInfo {
                holder: self.node_id,
                epoch,
            }),
        };
        {
            let mut g = lock(&self.state);
            g.store.observe_epoch(epoch);
            g.store.merge(record.clone());
        }
        {
            let mut l = lock(&self.lease);
            l.seen = Some((
                LeaseInfo {
                    holder: self.node_id,
                    epoch,
                },
                renewals,
                Instant::now(),
            ));
        }
        self.disseminate(&record);
        if !renewal {
            self.event("leader", format!("{} leads at epoch {epoch}", self.name));
        }
    }

    /// What `/v1/leader` answers.
    pub(crate) fn leader(&self) -> LeaderJson {
        let now = self.now();
        let roster = self.roster();
        let alive = self.alive_addrs();
        let reachable = roster.iter().filter(|id| alive.contains_key(*id)).count();
        let (leading, seen, epoch_seen) = {
            let l = lock(&self.lease);
            (l.cand.leading(now), l.seen, l.cand.epoch_seen())
        };
        let base = LeaderJson {
            leader: None,
            node_id: None,
            epoch: epoch_seen,
            is_self: false,
            reason: None,
            voters: roster.len(),
            voters_reachable: reachable,
        };
        if let Some(epoch) = leading {
            return LeaderJson {
                leader: Some(self.name.clone()),
                node_id: Some(node_id_hex(&self.node_id)),
                epoch,
                is_self: true,
                ..base
            };
        }
        if reachable < quorum(roster.len()) {
            return LeaderJson {
                reason: Some(format!(
                    "no quorum: {reachable} of {} voters reachable, {} needed",
                    roster.len(),
                    quorum(roster.len())
                )),
                ..base
            };
        }
        // Someone else: trust a lease record renewed recently whose holder is alive.
        if let Some((info, _, at)) = seen {
            let fresh = at.elapsed() < self.lease_cfg.duration;
            if fresh && info.holder != self.node_id && alive.contains_key(&info.holder) {
                return LeaderJson {
                    leader: Some(self.name_of(&info.holder)),
                    node_id: Some(node_id_hex(&info.holder)),
                    epoch: info.epoch,
                    ..base
                };
            }
        }
        LeaderJson {
            reason: Some("no valid lease: an election is in progress".into()),
            ..base
        }
    }

    /// Records by class, for `/metrics`.
    pub(crate) fn counts(&self) -> Vec<(&'static str, usize)> {
        let c = lock(&self.state).store.counts();
        Class::ALL
            .iter()
            .map(|k| (k.as_str(), c[k.index()]))
            .collect()
    }

    /// The state digest hash (for tests: identical state on every node).
    pub(crate) fn state_hash(&self) -> u64 {
        lock(&self.state).store.digest().state_hash()
    }
}

/// The broadcast handler's view of the cluster.
struct Sink(Arc<Cluster>);

impl DeltaSink for Sink {
    fn apply(&self, record: Record) -> bool {
        let wall = unix_ms();
        let out = lock(&self.0.state).merge_remote(record.clone(), wall);
        match out {
            Ok(MergeOutcome::Applied) => {
                self.0
                    .metrics
                    .deltas_applied
                    .fetch_add(1, Ordering::Relaxed);
                self.0.after_remote_apply(&record, wall);
                true
            }
            _ => false,
        }
    }

    fn hint(&self, key: &RecordKey, stamp: Stamp, origin: NodeId) -> bool {
        let lacking = lock(&self.0.state)
            .store
            .get(key)
            .is_none_or(|r| r.stamp < stamp);
        if lacking {
            let _ = self.0.sync_tx.try_send(origin);
        }
        lacking
    }
}

/// The lease parameters: T = 3 s and ρ = 5 % unless `SHOAL_LEASE_MS` sets T (tests use it).
pub(crate) fn lease_config_from_env() -> LeaseConfig {
    let mut cfg = LeaseConfig::default();
    if let Some(ms) = std::env::var("SHOAL_LEASE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| (300..=600_000).contains(ms))
    {
        cfg.duration = Duration::from_millis(ms);
    }
    cfg
}

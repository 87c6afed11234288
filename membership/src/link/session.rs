//! Datagram sessions: sealing and opening gossip datagrams (sans-I/O).
//!
//! A sealed datagram is `type u8 = 1 | receiver index u32 | counter u64 | ciphertext + tag`.
//! The receiver finds the session by index, checks the counter against the session's replay
//! window, decrypts with the counter as the nonce, and only then records the counter.
//! Sessions come only from completed handshakes, never from datagrams. Every call takes `now`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use snow::StatelessTransportState;

use crate::cert::{CLOCK_SKEW_SECS, Certificate};
use crate::link::handshake::{PeerInfo, TAG_LEN};
use crate::link::replay::ReplayWindow;

/// The type byte of a sealed datagram.
pub const DATAGRAM_TYPE: u8 = 1;
/// Clear header: type, receiver index, counter.
pub const HEADER_LEN: usize = 1 + 4 + 8;
/// Bytes a sealed datagram adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The largest sealed datagram sent or accepted (an IPv4 UDP payload on a 1500-byte MTU).
pub const MAX_DATAGRAM: usize = 1472;
/// The largest plaintext that fits.
pub const MAX_PLAINTEXT: usize = MAX_DATAGRAM - OVERHEAD;
/// A session older than this is replaced by a new handshake when used for sending.
pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// A session older than this is no longer used either way.
pub const REJECT_AFTER: Duration = Duration::from_secs(180);
/// Messages after which a session is replaced (far below the nonce space).
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// Sessions kept per peer address (the newest sends; older ones still receive, so datagrams
/// in flight during a rekey, even when both sides rekey at once, are not lost).
pub const SESSIONS_PER_PEER: usize = 3;
/// Sessions kept in all.
pub const MAX_SESSIONS: usize = 4096;

/// Why a received datagram was dropped; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Too short, wrong type, or the ciphertext does not authenticate.
    Auth,
    /// The counter was already seen or is older than the window.
    Replay,
    /// No session has that index (unknown, expired or evicted).
    UnknownSession,
    /// Larger than [`MAX_DATAGRAM`].
    Oversize,
}

/// Why a datagram could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// No usable session with that peer: a handshake is needed.
    NoSession,
    /// The plaintext exceeds [`MAX_PLAINTEXT`].
    TooLarge,
}

/// A sealed datagram, and whether its session is due for a new handshake.
#[derive(Debug)]
pub struct Sealed {
    /// The bytes to send.
    pub bytes: Vec<u8>,
    /// The session is older than [`REKEY_AFTER`]: start a new handshake in the background.
    pub rekey: bool,
}

/// An authenticated datagram.
#[derive(Debug)]
pub struct Opened {
    /// The sender's certificate.
    pub peer: Arc<Certificate>,
    /// The decrypted bytes.
    pub plaintext: Vec<u8>,
}

struct Session {
    local_index: u32,
    peer_index: u32,
    peer_addr: SocketAddr,
    peer: Arc<Certificate>,
    keys: StatelessTransportState,
    next_counter: u64,
    window: ReplayWindow,
    established: Instant,
}

#[derive(Default)]
struct Tables {
    by_index: HashMap<u32, Session>,
    by_peer: HashMap<SocketAddr, VecDeque<u32>>,
}

impl Tables {
    fn remove(&mut self, index: u32) {
        if let Some(s) = self.by_index.remove(&index)
            && let Some(q) = self.by_peer.get_mut(&s.peer_addr)
        {
            q.retain(|i| *i != index);
            if q.is_empty() {
                self.by_peer.remove(&s.peer_addr);
            }
        }
    }
}

fn usable(s: &Session, now: Instant, now_unix: u64, reject_after: Duration) -> bool {
    now.saturating_duration_since(s.established) < reject_after
        && now_unix <= s.peer.not_after.saturating_add(CLOCK_SKEW_SECS)
        && s.next_counter < REKEY_AFTER_MESSAGES
}

/// All datagram sessions of one node.
pub struct SessionTable {
    inner: Mutex<Tables>,
    rekey_after: Duration,
    reject_after: Duration,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::with_lifetimes(REKEY_AFTER, REJECT_AFTER)
    }
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("sessions", &self.lock().by_index.len())
            .finish()
    }
}

impl SessionTable {
    /// An empty table with the default lifetimes ([`REKEY_AFTER`], [`REJECT_AFTER`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table whose sessions ask for a new handshake after `rekey_after` and stop
    /// working after `reject_after`.
    pub fn with_lifetimes(rekey_after: Duration, reject_after: Duration) -> Self {
        SessionTable {
            inner: Mutex::new(Tables::default()),
            rekey_after,
            reject_after: reject_after.max(rekey_after),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A random index not in use (0 is never used).
    pub fn allocate_index(&self, random: impl Fn() -> u32) -> u32 {
        let t = self.lock();
        loop {
            let i = random();
            if i != 0 && !t.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// Adds the session of a completed handshake; `peer_addr` is the peer's gossip address.
    /// It becomes the one used to send to that address.
    pub fn install(
        &self,
        info: &PeerInfo,
        peer_addr: SocketAddr,
        keys: StatelessTransportState,
        now: Instant,
    ) {
        self.install_receiving(info, peer_addr, keys, now);
        self.promote(info.local_session_index);
    }

    /// Adds a session that receives but does not send yet: the initiator's side between
    /// writing msg3 and reading the responder's confirmation, so that datagrams the responder
    /// sends right after confirming are not dropped. [`SessionTable::confirm`] promotes it.
    pub fn install_receiving(
        &self,
        info: &PeerInfo,
        peer_addr: SocketAddr,
        keys: StatelessTransportState,
        now: Instant,
    ) {
        let mut t = self.lock();
        t.remove(info.local_session_index);
        while t.by_index.len() >= MAX_SESSIONS {
            let oldest = t
                .by_index
                .values()
                .min_by_key(|s| s.established)
                .map(|s| s.local_index);
            match oldest {
                Some(i) => t.remove(i),
                None => break,
            }
        }
        t.by_index.insert(
            info.local_session_index,
            Session {
                local_index: info.local_session_index,
                peer_index: info.peer_session_index,
                peer_addr,
                peer: info.peer.clone(),
                keys,
                // Nonce 0 carried the handshake confirmation.
                next_counter: 1,
                window: ReplayWindow::new(),
                established: now,
            },
        );
    }

    /// Checks the responder's confirmation (sealed with nonce 0) for a receiving session and,
    /// if it opens, makes the session the one used to send to its peer. Returns whether it did.
    pub fn confirm(&self, local_index: u32, confirmation: &[u8]) -> bool {
        let ok = {
            let t = self.lock();
            let Some(s) = t.by_index.get(&local_index) else {
                return false;
            };
            crate::link::handshake::open_datagram_confirmation(&s.keys, confirmation)
        };
        if ok {
            self.promote(local_index);
        }
        ok
    }

    /// Makes a session the newest one of its peer (used for sending), keeping at most
    /// [`SESSIONS_PER_PEER`] per peer.
    fn promote(&self, local_index: u32) {
        let mut t = self.lock();
        let Some(peer_addr) = t.by_index.get(&local_index).map(|s| s.peer_addr) else {
            return;
        };
        let mut q = t.by_peer.remove(&peer_addr).unwrap_or_default();
        q.retain(|i| *i != local_index);
        while q.len() >= SESSIONS_PER_PEER {
            if let Some(i) = q.pop_front() {
                t.by_index.remove(&i);
            }
        }
        q.push_back(local_index);
        t.by_peer.insert(peer_addr, q);
    }

    /// Removes a session (a handshake that failed after [`SessionTable::install_receiving`]).
    pub fn remove(&self, local_index: u32) {
        self.lock().remove(local_index);
    }

    /// Whether a usable session to `peer_addr` exists.
    pub fn has_session(&self, peer_addr: SocketAddr, now: Instant, now_unix: u64) -> bool {
        let t = self.lock();
        t.by_peer
            .get(&peer_addr)
            .and_then(|q| q.back())
            .and_then(|i| t.by_index.get(i))
            .is_some_and(|s| usable(s, now, now_unix, self.reject_after))
    }

    /// Seals `plaintext` for `peer_addr` with the newest session to it.
    pub fn seal(
        &self,
        peer_addr: SocketAddr,
        plaintext: &[u8],
        now: Instant,
        now_unix: u64,
    ) -> Result<Sealed, SealError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(SealError::TooLarge);
        }
        let mut t = self.lock();
        let Some(index) = t.by_peer.get(&peer_addr).and_then(|q| q.back().copied()) else {
            return Err(SealError::NoSession);
        };
        let Some(s) = t.by_index.get_mut(&index) else {
            return Err(SealError::NoSession);
        };
        if !usable(s, now, now_unix, self.reject_after) {
            t.remove(index);
            return Err(SealError::NoSession);
        }
        let counter = s.next_counter;
        s.next_counter += 1;
        let mut bytes = vec![0u8; HEADER_LEN + plaintext.len() + TAG_LEN];
        bytes[0] = DATAGRAM_TYPE;
        bytes[1..5].copy_from_slice(&s.peer_index.to_be_bytes());
        bytes[5..13].copy_from_slice(&counter.to_be_bytes());
        let n = s
            .keys
            .write_message(counter, plaintext, &mut bytes[HEADER_LEN..])
            .map_err(|_| SealError::NoSession)?;
        bytes.truncate(HEADER_LEN + n);
        let rekey = now.saturating_duration_since(s.established) >= self.rekey_after;
        Ok(Sealed { bytes, rekey })
    }

    /// Opens a received datagram: index lookup, replay check, decryption, then window update.
    pub fn open(&self, datagram: &[u8], now: Instant, now_unix: u64) -> Result<Opened, DropReason> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversize);
        }
        if datagram.len() < OVERHEAD || datagram[0] != DATAGRAM_TYPE {
            return Err(DropReason::Auth);
        }
        let index = u32::from_be_bytes([datagram[1], datagram[2], datagram[3], datagram[4]]);
        let mut counter_bytes = [0u8; 8];
        counter_bytes.copy_from_slice(&datagram[5..13]);
        let counter = u64::from_be_bytes(counter_bytes);
        let mut t = self.lock();
        let Some(s) = t.by_index.get_mut(&index) else {
            return Err(DropReason::UnknownSession);
        };
        if !usable(s, now, now_unix, self.reject_after) {
            t.remove(index);
            return Err(DropReason::UnknownSession);
        }
        // Nonce 0 is the handshake confirmation and never a datagram.
        if counter == 0 || s.window.check(counter).is_err() {
            return Err(DropReason::Replay);
        }
        let mut plaintext = vec![0u8; datagram.len() - HEADER_LEN];
        let n = s
            .keys
            .read_message(counter, &datagram[HEADER_LEN..], &mut plaintext)
            .map_err(|_| DropReason::Auth)?;
        plaintext.truncate(n);
        // Only an authenticated datagram moves the window.
        s.window.update(counter).map_err(|_| DropReason::Replay)?;
        Ok(Opened {
            peer: s.peer.clone(),
            plaintext,
        })
    }

    /// Drops sessions that are too old or whose peer certificate expired.
    pub fn purge(&self, now: Instant, now_unix: u64) {
        let mut t = self.lock();
        let dead: Vec<u32> = t
            .by_index
            .values()
            .filter(|s| !usable(s, now, now_unix, self.reject_after))
            .map(|s| s.local_index)
            .collect();
        for i in dead {
            t.remove(i);
        }
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.lock().by_index.len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{CertificateAuthority, NodeCredentials};
    use crate::link::handshake::{Initiator, LinkKind, Responder, datagram_confirmation};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const NOW: u64 = 3_000_000;

    /// Two tables with one session between them; returns (a, b, a's address as b sees it,
    /// b's address as a sees it).
    fn linked() -> (SessionTable, SessionTable, SocketAddr, SocketAddr) {
        let ca = CertificateAuthority::generate(NOW).unwrap();
        let issue = |n: &str| -> Arc<NodeCredentials> {
            Arc::new(
                ca.issue(n, &BTreeMap::new(), Duration::from_secs(3600), NOW)
                    .unwrap(),
            )
        };
        let (a_addr, b_addr): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let (ta, tb) = (SessionTable::new(), SessionTable::new());
        let (ia, ib) = (ta.allocate_index(|| 11), tb.allocate_index(|| 22));
        let (init, m1) = Initiator::start(LinkKind::Gossip, issue("a"), ia, Some(a_addr)).unwrap();
        let mut resp = Responder::new(LinkKind::Gossip, issue("b"), ib).unwrap();
        let m2 = resp.on_msg1(&m1).unwrap();
        let (m3, pending) = init.on_msg2(&m2, NOW).unwrap();
        let est = resp.on_msg3(&m3, NOW).unwrap();
        let info_b = est.info.clone();
        let keys_b = est.into_stateless().unwrap();
        let confirm = datagram_confirmation(&keys_b).unwrap();
        let (info_a, keys_a) = pending.confirm_datagram(&confirm).unwrap();
        let now = Instant::now();
        tb.install(&info_b, info_b.peer_udp_addr.unwrap(), keys_b, now);
        ta.install(&info_a, b_addr, keys_a, now);
        (ta, tb, a_addr, b_addr)
    }

    #[test]
    fn a_sealed_datagram_opens_once() {
        let (a, b, a_addr, b_addr) = linked();
        let now = Instant::now();
        let s = a.seal(b_addr, b"ping", now, NOW).unwrap();
        assert_eq!(s.bytes.len(), 4 + OVERHEAD);
        let o = b.open(&s.bytes, now, NOW).unwrap();
        assert_eq!(o.plaintext, b"ping");
        assert_eq!(o.peer.name, "a");
        assert_eq!(b.open(&s.bytes, now, NOW).unwrap_err(), DropReason::Replay);
        let back = b.seal(a_addr, b"pong", now, NOW).unwrap();
        assert_eq!(a.open(&back.bytes, now, NOW).unwrap().plaintext, b"pong");
    }

    #[test]
    fn a_tampered_datagram_does_not_move_the_window() {
        let (a, b, _, b_addr) = linked();
        let now = Instant::now();
        let s1 = a.seal(b_addr, b"one", now, NOW).unwrap();
        let s2 = a.seal(b_addr, b"two", now, NOW).unwrap();
        // Each flipped byte is dropped (index bytes give unknown_session, others auth/replay).
        for i in 0..s2.bytes.len() {
            let mut t = s2.bytes.clone();
            t[i] ^= 0x20;
            assert!(b.open(&t, now, NOW).is_err(), "byte {i}");
        }
        // A forged high counter with garbage ciphertext fails auth and leaves s1/s2 acceptable.
        let mut forged = s2.bytes.clone();
        forged[5..13].copy_from_slice(&1_000_000u64.to_be_bytes());
        assert_eq!(b.open(&forged, now, NOW).unwrap_err(), DropReason::Auth);
        assert_eq!(b.open(&s2.bytes, now, NOW).unwrap().plaintext, b"two");
        assert_eq!(b.open(&s1.bytes, now, NOW).unwrap().plaintext, b"one");
    }

    #[test]
    fn old_sessions_ask_for_a_rekey_then_stop_working() {
        let (a, b, _, b_addr) = linked();
        let t0 = Instant::now();
        assert!(!a.seal(b_addr, b"x", t0, NOW).unwrap().rekey);
        assert!(a.seal(b_addr, b"x", t0 + REKEY_AFTER, NOW).unwrap().rekey);
        let late = a.seal(b_addr, b"x", t0 + REKEY_AFTER, NOW).unwrap();
        assert_eq!(
            b.open(&late.bytes, t0 + REJECT_AFTER, NOW).unwrap_err(),
            DropReason::UnknownSession
        );
        assert_eq!(
            a.seal(b_addr, b"x", t0 + REJECT_AFTER, NOW).unwrap_err(),
            SealError::NoSession
        );
    }

    #[test]
    fn an_initiator_receives_before_the_confirmation_and_sends_only_after_it() {
        let ca = CertificateAuthority::generate(NOW).unwrap();
        let issue = |n: &str| -> Arc<NodeCredentials> {
            Arc::new(
                ca.issue(n, &BTreeMap::new(), Duration::from_secs(3600), NOW)
                    .unwrap(),
            )
        };
        let a_addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b_addr: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let (ta, tb) = (SessionTable::new(), SessionTable::new());
        let (init, m1) = Initiator::start(LinkKind::Gossip, issue("a"), 11, Some(a_addr)).unwrap();
        let mut resp = Responder::new(LinkKind::Gossip, issue("b"), 22).unwrap();
        let m2 = resp.on_msg1(&m1).unwrap();
        let (m3, pending) = init.on_msg2(&m2, NOW).unwrap();
        let (info_a, keys_a) = pending.into_datagram().unwrap();
        let now = Instant::now();
        ta.install_receiving(&info_a, b_addr, keys_a, now);
        assert_eq!(
            ta.seal(b_addr, b"x", now, NOW).unwrap_err(),
            SealError::NoSession
        );
        let est = resp.on_msg3(&m3, NOW).unwrap();
        let info_b = est.info.clone();
        let keys_b = est.into_stateless().unwrap();
        let confirm = datagram_confirmation(&keys_b).unwrap();
        tb.install(&info_b, a_addr, keys_b, now);
        // The responder sends at once; the initiator already receives on the session.
        let early = tb.seal(a_addr, b"early", now, NOW).unwrap();
        assert_eq!(ta.open(&early.bytes, now, NOW).unwrap().plaintext, b"early");
        assert!(!ta.confirm(11, b"not the confirmation at all"));
        assert!(ta.confirm(11, &confirm));
        let s = ta.seal(b_addr, b"now", now, NOW).unwrap();
        assert_eq!(tb.open(&s.bytes, now, NOW).unwrap().plaintext, b"now");
    }

    #[test]
    fn oversize_and_unknown_datagrams_are_classified() {
        let (_, b, _, _) = linked();
        let now = Instant::now();
        assert_eq!(
            b.open(&[1u8; MAX_DATAGRAM + 1], now, NOW).unwrap_err(),
            DropReason::Oversize
        );
        let mut unknown = vec![0u8; 64];
        unknown[0] = DATAGRAM_TYPE;
        unknown[1..5].copy_from_slice(&999u32.to_be_bytes());
        assert_eq!(
            b.open(&unknown, now, NOW).unwrap_err(),
            DropReason::UnknownSession
        );
        assert_eq!(b.open(&[1, 2, 3], now, NOW).unwrap_err(), DropReason::Auth);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_datagram_opener(
            bytes in proptest::collection::vec(any::<u8>(), 0..1600),
            use_real_index in any::<bool>(),
        ) {
            let (_, b, _, _) = linked();
            let mut d = bytes;
            if use_real_index && d.len() >= HEADER_LEN {
                d[0] = DATAGRAM_TYPE;
                d[1..5].copy_from_slice(&22u32.to_be_bytes());
            }
            let r = b.open(&d, Instant::now(), NOW);
            prop_assert!(r.is_err());
        }
    }
}

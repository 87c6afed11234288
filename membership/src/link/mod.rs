//! Noise-encrypted links between nodes.
//!
//! One port number `P` per node serves everything: UDP `P` carries the sealed gossip datagrams
//! ([`NoiseUdp`]) and TCP `P` carries Noise XX handshakes, both the ones that set up datagram
//! sessions and the streams of the control, data and management planes ([`NoiseStream`],
//! accepted by [`NoiseListener`]). [`Links::bind`] gives both halves.
//!
//! The crypto is sans-I/O: [`handshake`] (XX with certificates), [`session`] (datagram
//! sessions, replay windows), [`frame`] (stream frames) and [`replay`] take bytes and `now` and
//! return bytes; [`net`] is the tokio shell around them.

pub mod frame;
pub mod handshake;
pub mod net;
pub mod replay;
pub mod session;

use std::sync::atomic::{AtomicU64, Ordering};

pub use handshake::{LinkKind, Plane};
pub use net::{LinkOptions, Links, NoiseListener, NoiseStream, NoiseUdp};
pub use session::DropReason;

use crate::cert::CertRejection;

/// Counters of the links, shared by every socket of a node (exported by `/metrics`).
#[derive(Debug, Default)]
pub struct LinkMetrics {
    /// Handshakes that completed (both sides count).
    pub handshakes_completed: AtomicU64,
    /// Peer certificate not signed by our CA.
    pub handshakes_rejected_unknown_ca: AtomicU64,
    /// Peer certificate expired.
    pub handshakes_rejected_expired: AtomicU64,
    /// Peer certificate not yet valid.
    pub handshakes_rejected_not_yet_valid: AtomicU64,
    /// Peer certificate names another key than the peer's Noise static key.
    pub handshakes_rejected_key_mismatch: AtomicU64,
    /// Peer certificate or handshake messages malformed, or the Noise messages did not
    /// authenticate (wrong plane, garbage).
    pub handshakes_rejected_malformed: AtomicU64,
    /// The handshake missed its deadline.
    pub handshakes_rejected_timeout: AtomicU64,
    /// Too many handshakes were pending (the connection was closed at once), or no room was
    /// left in the stream accept queue (the stream was refused before its confirmation).
    pub handshakes_rejected_busy: AtomicU64,
    /// The peer closed the connection or was unreachable before the handshake completed
    /// (this is what a responder sees when the initiator refused the responder's certificate).
    pub handshakes_failed_io: AtomicU64,
    /// Sealed datagrams received and accepted.
    pub datagrams_in: AtomicU64,
    /// Sealed datagrams sent.
    pub datagrams_out: AtomicU64,
    /// Bytes of accepted datagrams (on the wire).
    pub bytes_in: AtomicU64,
    /// Bytes of sent datagrams (on the wire).
    pub bytes_out: AtomicU64,
    /// Datagrams dropped: did not authenticate (tampered, garbage, too short).
    pub dropped_auth: AtomicU64,
    /// Datagrams dropped: counter replayed or too old.
    pub dropped_replay: AtomicU64,
    /// Datagrams dropped: no session with that index.
    pub dropped_unknown_session: AtomicU64,
    /// Datagrams dropped: larger than the cap.
    pub dropped_oversize: AtomicU64,
    /// Outgoing datagrams dropped because no session could be set up in time (queue full or
    /// handshake failed).
    pub send_dropped_no_session: AtomicU64,
    /// Stream frames sent.
    pub frames_out: AtomicU64,
    /// Stream frames received.
    pub frames_in: AtomicU64,
}

/// A plain copy of [`LinkMetrics`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct LinkMetricsSnapshot {
    pub handshakes_completed: u64,
    pub handshakes_rejected_unknown_ca: u64,
    pub handshakes_rejected_expired: u64,
    pub handshakes_rejected_not_yet_valid: u64,
    pub handshakes_rejected_key_mismatch: u64,
    pub handshakes_rejected_malformed: u64,
    pub handshakes_rejected_timeout: u64,
    pub handshakes_rejected_busy: u64,
    pub handshakes_failed_io: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_auth: u64,
    pub dropped_replay: u64,
    pub dropped_unknown_session: u64,
    pub dropped_oversize: u64,
    pub send_dropped_no_session: u64,
    pub frames_out: u64,
    pub frames_in: u64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

impl LinkMetrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> LinkMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LinkMetricsSnapshot {
            handshakes_completed: g(&self.handshakes_completed),
            handshakes_rejected_unknown_ca: g(&self.handshakes_rejected_unknown_ca),
            handshakes_rejected_expired: g(&self.handshakes_rejected_expired),
            handshakes_rejected_not_yet_valid: g(&self.handshakes_rejected_not_yet_valid),
            handshakes_rejected_key_mismatch: g(&self.handshakes_rejected_key_mismatch),
            handshakes_rejected_malformed: g(&self.handshakes_rejected_malformed),
            handshakes_rejected_timeout: g(&self.handshakes_rejected_timeout),
            handshakes_rejected_busy: g(&self.handshakes_rejected_busy),
            handshakes_failed_io: g(&self.handshakes_failed_io),
            datagrams_in: g(&self.datagrams_in),
            datagrams_out: g(&self.datagrams_out),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
            dropped_auth: g(&self.dropped_auth),
            dropped_replay: g(&self.dropped_replay),
            dropped_unknown_session: g(&self.dropped_unknown_session),
            dropped_oversize: g(&self.dropped_oversize),
            send_dropped_no_session: g(&self.send_dropped_no_session),
            frames_out: g(&self.frames_out),
            frames_in: g(&self.frames_in),
        }
    }

    /// Counts a refused certificate by reason.
    pub fn count_rejection(&self, r: CertRejection) {
        inc(match r {
            CertRejection::UnknownCa => &self.handshakes_rejected_unknown_ca,
            CertRejection::Expired => &self.handshakes_rejected_expired,
            CertRejection::NotYetValid => &self.handshakes_rejected_not_yet_valid,
            CertRejection::KeyMismatch => &self.handshakes_rejected_key_mismatch,
            CertRejection::Malformed => &self.handshakes_rejected_malformed,
        });
    }

    /// Counts a dropped datagram by reason.
    pub fn count_drop(&self, r: DropReason) {
        inc(match r {
            DropReason::Auth => &self.dropped_auth,
            DropReason::Replay => &self.dropped_replay,
            DropReason::UnknownSession => &self.dropped_unknown_session,
            DropReason::Oversize => &self.dropped_oversize,
        });
    }
}

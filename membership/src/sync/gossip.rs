//! Deltas as foca custom broadcasts: every local change (and every change learned by gossip
//! that was news) is one small item `{record}`; a record too large for a datagram travels as a
//! hint `{key, stamp}` and receivers that lack it pull it by anti-entropy from the sender.
//! A newer stamp for a key invalidates queued older items, so superseded updates stop
//! circulating.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::MembershipError;
use crate::identity::NodeIdentity;
use crate::state::codec;
use crate::state::{NodeId, Record, RecordKey, Stamp};

/// The largest encoded delta item sent whole; larger records travel as hints.
pub const MAX_DELTA_BYTES: usize = 900;

/// One gossiped item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Delta {
    /// A whole record.
    Record(Record),
    /// A record exists at `origin` with this stamp; pull it if yours is older.
    Hint {
        /// Its key.
        key: RecordKey,
        /// Its stamp.
        stamp: Stamp,
        /// The node that has it.
        origin: NodeId,
    },
}

impl Delta {
    /// The item for `record`, sent by `origin`: the record itself when small enough.
    pub fn for_record(record: &Record, origin: NodeId) -> Result<Vec<u8>, MembershipError> {
        let whole = codec::encode(&Delta::Record(record.clone()))?;
        if whole.len() <= MAX_DELTA_BYTES {
            return Ok(whole);
        }
        codec::encode(&Delta::Hint {
            key: record.key.clone(),
            stamp: record.stamp,
            origin,
        })
    }

    /// Decodes an item (bounded, checked).
    pub fn decode(bytes: &[u8]) -> Result<Self, MembershipError> {
        if bytes.len() > 4 * MAX_DELTA_BYTES {
            return Err(MembershipError::FrameTooLarge {
                len: bytes.len(),
                max: 4 * MAX_DELTA_BYTES,
            });
        }
        let d: Delta = codec::decode(bytes)?;
        if let Delta::Record(r) = &d {
            r.check()?;
        }
        Ok(d)
    }

    fn key(&self) -> DeltaKey {
        match self {
            Delta::Record(r) => DeltaKey {
                key: r.key.clone(),
                stamp: r.stamp,
            },
            Delta::Hint { key, stamp, .. } => DeltaKey {
                key: key.clone(),
                stamp: *stamp,
            },
        }
    }
}

/// What a node does with gossiped deltas (implemented by the agent over its store).
pub trait DeltaSink: Send + Sync {
    /// Merges a record received by gossip; true if it was news (keep disseminating it).
    fn apply(&self, record: Record) -> bool;
    /// A record is at `origin` with `stamp`: true if this node lacks it (it should pull it,
    /// and keep disseminating the hint).
    fn hint(&self, key: &RecordKey, stamp: Stamp, origin: NodeId) -> bool;
}

/// The identity of a queued item: newer stamps for the same key replace older ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaKey {
    key: RecordKey,
    stamp: Stamp,
}

impl foca::Invalidates for DeltaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.key == other.key && self.stamp > other.stamp
    }
}

/// Counters of the broadcast handler.
#[derive(Debug, Default)]
pub struct DeltaCounters {
    /// Items received from peers.
    pub received: AtomicU64,
    /// Of those, items that were news.
    pub applied: AtomicU64,
    /// Items that did not decode or check.
    pub malformed: AtomicU64,
}

/// foca's custom-broadcast handler for state deltas. [`DeltaBroadcasts::disabled`] ignores
/// everything received (for nodes and tests without a state store).
#[derive(Clone, Default)]
pub struct DeltaBroadcasts {
    sink: Option<Arc<dyn DeltaSink>>,
    counters: Arc<DeltaCounters>,
}

impl DeltaBroadcasts {
    /// A handler that drops what it receives.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A handler feeding `sink`.
    pub fn new(sink: Arc<dyn DeltaSink>) -> Self {
        Self {
            sink: Some(sink),
            counters: Arc::default(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> Arc<DeltaCounters> {
        self.counters.clone()
    }
}

impl foca::BroadcastHandler<NodeIdentity> for DeltaBroadcasts {
    type Key = DeltaKey;
    type Error = MembershipError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeIdentity>,
    ) -> Result<Option<DeltaKey>, MembershipError> {
        let Ok(delta) = Delta::decode(data) else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let key = delta.key();
        if sender.is_none() {
            // Added locally: the store already holds it; disseminate.
            return Ok(Some(key));
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let Some(sink) = &self.sink else {
            return Ok(None);
        };
        let news = match delta {
            Delta::Record(r) => sink.apply(r),
            Delta::Hint { key, stamp, origin } => sink.hint(&key, stamp, origin),
        };
        if news {
            self.counters.applied.fetch_add(1, Ordering::Relaxed);
            Ok(Some(key))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HlcTimestamp;
    use crate::state::record::tests::spec;
    use foca::{BroadcastHandler, Invalidates};
    use std::sync::Mutex;

    struct Sink(Mutex<crate::state::StateStore>);
    impl DeltaSink for Sink {
        fn apply(&self, r: Record) -> bool {
            self.0.lock().unwrap().merge(r) == crate::state::MergeOutcome::Applied
        }
        fn hint(&self, key: &RecordKey, stamp: Stamp, _o: NodeId) -> bool {
            self.0
                .lock()
                .unwrap()
                .get(key)
                .is_none_or(|r| r.stamp < stamp)
        }
    }

    fn ident() -> NodeIdentity {
        NodeIdentity::new([3; 16], "127.0.0.1:1".parse().unwrap(), 1)
    }

    #[test]
    fn a_delta_is_disseminated_once_and_a_repeat_is_not() {
        let sink = Arc::new(Sink(Mutex::new(crate::state::StateStore::new())));
        let mut h = DeltaBroadcasts::new(sink.clone());
        let r = Record::service(spec("web", 2), 1, HlcTimestamp::new(5, 0), [1; 16]);
        let item = Delta::for_record(&r, [1; 16]).unwrap();
        assert!(h.receive_item(&item, Some(&ident())).unwrap().is_some());
        assert!(h.receive_item(&item, Some(&ident())).unwrap().is_none());
        assert_eq!(
            sink.0.lock().unwrap().service("web").unwrap().spec.replicas,
            2
        );
        assert!(
            h.receive_item(&[1, 2, 3], Some(&ident()))
                .unwrap()
                .is_none()
        );
        assert_eq!(h.counters().malformed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_newer_stamp_invalidates_an_older_one_for_the_same_key_only() {
        let k = |name: &str, t| DeltaKey {
            key: RecordKey::Service(name.into()),
            stamp: Stamp::version(t),
        };
        assert!(k("a", 2).invalidates(&k("a", 1)));
        assert!(!k("a", 1).invalidates(&k("a", 2)));
        assert!(!k("b", 3).invalidates(&k("a", 1)));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic_the_broadcast_handler(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let sink = Arc::new(Sink(Mutex::new(crate::state::StateStore::new())));
            let mut h = DeltaBroadcasts::new(sink);
            let _ = Delta::decode(&bytes);
            proptest::prop_assert!(h.receive_item(&bytes, Some(&ident())).is_ok());
        }
    }

    #[test]
    fn a_record_too_big_for_a_datagram_travels_as_a_hint() {
        let mut s = spec("web", 1);
        s.command = Some(vec!["x".repeat(2000)]);
        let r = Record::service(s, 1, HlcTimestamp::new(5, 0), [1; 16]);
        let item = Delta::for_record(&r, [1; 16]).unwrap();
        assert!(item.len() <= MAX_DELTA_BYTES);
        assert!(matches!(Delta::decode(&item).unwrap(), Delta::Hint { .. }));
    }
}

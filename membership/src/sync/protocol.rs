//! The control-stream protocol: anti-entropy sync and lease requests, as pure functions over a
//! [`StateStore`] plus a bounded codec. The shell (the agent) moves the frames over a Noise
//! stream (`Plane::Control`).
//!
//! Anti-entropy, initiator A and responder B (three steps, whatever the size of the state):
//! 1. A → B `SyncDigest(digest of A)`.
//! 2. B compares with its own digest. If A's is empty or more than half of B's buckets differ
//!    (a new or far-behind node), B sends a full snapshot; otherwise the records of the
//!    differing buckets. B → A `SyncWant(differing buckets)` then `SyncRecords` chunks (the
//!    last one marked).
//! 3. A merges, then A → B `SyncRecords` with its records in the wanted buckets (after the
//!    merge, so they are the union), except those it just received; B merges. Both now agree
//!    on every bucket that differed.

use serde::{Deserialize, Serialize};

use crate::MembershipError;
use crate::lease::{LeaseReply, LeaseRequest};
use crate::state::Record;
use crate::state::codec;
use crate::state::store::{BucketId, Digest, StateStore};

/// Records per `SyncRecords` frame (keeps every frame far below the stream frame cap).
pub const RECORDS_PER_FRAME: usize = 512;

/// The largest number of buckets a `SyncWant` may name (every bucket of every class).
pub const MAX_WANT: usize = 7 * crate::state::store::BUCKETS;

/// A frame on a control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// Anti-entropy step 1: the initiator's digest.
    SyncDigest(Digest),
    /// Anti-entropy step 2: the buckets the responder wants back.
    SyncWant(Vec<BucketId>),
    /// Records (anti-entropy steps 2 and 3, or a leader's direct push).
    SyncRecords {
        /// The records.
        records: Vec<Record>,
        /// Whether this is the last frame of the batch.
        last: bool,
        /// Whether the batch is a full snapshot.
        full: bool,
    },
    /// A lease request, with a hash of the candidate's voter roster (a voter whose roster
    /// differs refuses).
    LeaseRequest {
        /// The request.
        req: LeaseRequest,
        /// FNV-1a of the sorted voter ids.
        roster: u64,
    },
    /// A lease reply.
    LeaseReply(LeaseReply),
}

impl ControlMsg {
    /// Encodes the frame.
    pub fn encode(&self) -> Result<Vec<u8>, MembershipError> {
        codec::encode(self)
    }

    /// Decodes a frame (bounded; trailing bytes refused; record shapes checked).
    pub fn decode(bytes: &[u8]) -> Result<Self, MembershipError> {
        let msg: ControlMsg = codec::decode(bytes)?;
        match &msg {
            ControlMsg::SyncWant(w) if w.len() > MAX_WANT => {
                return Err(MembershipError::State("too many buckets wanted".into()));
            }
            ControlMsg::SyncDigest(d) if d.buckets.len() > MAX_WANT => {
                return Err(MembershipError::State("digest too large".into()));
            }
            ControlMsg::SyncRecords { records, .. } => {
                if records.len() > RECORDS_PER_FRAME {
                    return Err(MembershipError::State("too many records in a frame".into()));
                }
                for r in records {
                    r.check()?;
                }
            }
            _ => {}
        }
        Ok(msg)
    }
}

/// What the responder sends back.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncPlan {
    /// Buckets the responder wants from the initiator.
    pub want: Vec<BucketId>,
    /// Records for the initiator.
    pub records: Vec<Record>,
    /// Whether `records` is a full snapshot.
    pub full: bool,
}

/// Step 2: the responder's answer to `peer`'s digest.
pub fn plan_reply(store: &StateStore, peer: &Digest) -> SyncPlan {
    let mine = store.digest();
    let want = mine.differing(peer);
    let behind = peer.is_empty() || want.len() * 2 > mine.buckets.len().max(1);
    if behind && !mine.is_empty() {
        return SyncPlan {
            want,
            records: store.snapshot(),
            full: true,
        };
    }
    SyncPlan {
        records: store.records_in(&want),
        want,
        full: false,
    }
}

/// Splits records into `SyncRecords` frames (at least one, the last marked).
pub fn frames(records: Vec<Record>, full: bool) -> Vec<ControlMsg> {
    if records.is_empty() {
        return vec![ControlMsg::SyncRecords {
            records,
            last: true,
            full,
        }];
    }
    let n = records.len().div_ceil(RECORDS_PER_FRAME);
    let mut out = Vec::with_capacity(n);
    let mut it = records.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<Record> = it.by_ref().take(RECORDS_PER_FRAME).collect();
        out.push(ControlMsg::SyncRecords {
            records: chunk,
            last: it.peek().is_none(),
            full,
        });
    }
    out
}

/// Step 3: the initiator's records in the wanted buckets, minus those it just received from
/// the responder (same key and fingerprint: the responder has exactly those).
pub fn push_back(
    store: &StateStore,
    want: &[BucketId],
    received: &std::collections::HashSet<(crate::state::RecordKey, u64)>,
) -> Vec<Record> {
    store
        .records_in(want)
        .into_iter()
        .filter(|r| !received.contains(&(r.key.clone(), r.fingerprint())))
        .collect()
}

/// One whole anti-entropy exchange between two in-memory stores, as the stream shell runs it
/// (used by the simulation and the tests). Returns the encoded bytes moved in each direction.
pub fn sync_pair(initiator: &mut StateStore, responder: &mut StateStore) -> (usize, usize) {
    let mut a_to_b = 0;
    let mut b_to_a = 0;
    let digest = ControlMsg::SyncDigest(initiator.digest());
    a_to_b += digest.encode().map(|b| b.len()).unwrap_or(0);
    let ControlMsg::SyncDigest(d) = digest else {
        return (a_to_b, b_to_a);
    };
    let plan = plan_reply(responder, &d);
    let want = ControlMsg::SyncWant(plan.want.clone());
    b_to_a += want.encode().map(|b| b.len()).unwrap_or(0);
    let mut received = std::collections::HashSet::new();
    for f in frames(plan.records, plan.full) {
        b_to_a += f.encode().map(|b| b.len()).unwrap_or(0);
        if let ControlMsg::SyncRecords { records, .. } = f {
            for r in records {
                received.insert((r.key.clone(), r.fingerprint()));
                initiator.merge(r);
            }
        }
    }
    for f in frames(push_back(initiator, &plan.want, &received), false) {
        a_to_b += f.encode().map(|b| b.len()).unwrap_or(0);
        if let ControlMsg::SyncRecords { records, .. } = f {
            for r in records {
                responder.merge(r);
            }
        }
    }
    (a_to_b, b_to_a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HlcTimestamp;
    use crate::state::record::tests::{arb_record, spec};
    use proptest::prelude::*;

    #[test]
    fn a_new_node_gets_a_full_snapshot() {
        let mut a = StateStore::new();
        for i in 0..100 {
            a.merge(Record::service(
                spec(&format!("s{i}"), 1),
                1,
                HlcTimestamp::new(1, 0),
                [1; 16],
            ));
        }
        let plan = plan_reply(&a, &StateStore::new().digest());
        assert!(plan.full);
        assert_eq!(plan.records.len(), 100);
        assert_eq!(frames(plan.records, true).len(), 1);
    }

    #[test]
    fn a_small_difference_moves_only_its_bucket() {
        let mut a = StateStore::new();
        for i in 0..2000 {
            a.merge(Record::service(
                spec(&format!("s{i}"), 1),
                1,
                HlcTimestamp::new(1, 0),
                [1; 16],
            ));
        }
        let mut b = StateStore::new();
        for r in a.snapshot() {
            b.merge(r);
        }
        b.merge(Record::service(
            spec("s7", 3),
            2,
            HlcTimestamp::new(2, 0),
            [2; 16],
        ));
        let (up, down) = sync_pair(&mut a, &mut b);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.service("s7").unwrap().spec.replicas, 3);
        let full = frames(a.snapshot(), true)
            .iter()
            .map(|f| f.encode().unwrap().len())
            .sum::<usize>();
        assert!(
            up + down < full / 10,
            "moved {} bytes, a snapshot is {full}",
            up + down
        );
    }

    #[test]
    fn big_batches_are_split_into_bounded_frames() {
        let mut a = StateStore::new();
        for i in 0..1200 {
            a.merge(Record::service(
                spec(&format!("s{i}"), 1),
                1,
                HlcTimestamp::new(1, 0),
                [1; 16],
            ));
        }
        let f = frames(a.snapshot(), true);
        assert_eq!(f.len(), 3);
        for m in &f {
            assert!(ControlMsg::decode(&m.encode().unwrap()).is_ok());
        }
        assert!(matches!(
            f.last(),
            Some(ControlMsg::SyncRecords { last: true, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn one_exchange_makes_two_stores_identical(
            x in proptest::collection::vec(arb_record(), 0..25),
            y in proptest::collection::vec(arb_record(), 0..25),
        ) {
            let mut a = StateStore::new();
            for r in &x { a.merge(r.clone()); }
            let mut b = StateStore::new();
            for r in &y { b.merge(r.clone()); }
            let mut u = StateStore::new();
            for r in x.iter().chain(y.iter()) { u.merge(r.clone()); }
            sync_pair(&mut a, &mut b);
            prop_assert_eq!(a.digest(), b.digest());
            prop_assert_eq!(a.snapshot(), u.snapshot());
        }

        #[test]
        fn random_bytes_never_panic_the_control_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = ControlMsg::decode(&bytes);
        }
    }
}

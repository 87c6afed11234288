//! The in-memory cluster state: one winning record per key, kept with per-bucket fingerprints
//! so two nodes can tell which parts of their state differ by exchanging a small digest.
//!
//! Merging is a pure join: [`StateStore::merge`] keeps, for every key, the record that
//! [`Record::wins_over`] the other, so applying any set of records in any order, any number of
//! times, gives the same state (property-tested below). The store never reads a clock: the
//! caller passes wall time to [`StateStore::collect_tombstones`].
//!
//! Digest: the keys of every class are hashed into [`BUCKETS`] buckets; a bucket's summary is
//! its record count and the XOR of its records' fingerprints (updated in O(1) per merge). Two
//! stores hold the same records in a bucket iff the summaries match (up to 64-bit hash
//! collisions). This is a version vector over hash buckets rather than over origins: deltas
//! travel by gossip in any order, so a per-origin "highest version seen" would not prove that
//! every lower version arrived.
//!
//! Tombstones (deleted services, placements and instances) are kept for a horizon
//! ([`DEFAULT_TOMBSTONE_HORIZON_MS`], 48 h: longer than any partition expected to heal by
//! itself) and then collected. After a collection the store refuses unknown records older than
//! the horizon's watermark, so a node that was away longer than the horizon cannot resurrect a
//! deleted service; such a node must be wiped and re-synced (a full snapshot).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::codec;
use super::record::{Class, LeaseInfo, NodeId, Record, RecordKey, ServiceEntry, Value, fnv1a};
use crate::MembershipError;

/// Buckets per class in the digest.
pub const BUCKETS: usize = 64;

/// How long tombstones are kept: 48 hours.
pub const DEFAULT_TOMBSTONE_HORIZON_MS: u64 = 48 * 3600 * 1000;

/// A bucket: (class, bucket index).
pub type BucketId = (Class, u8);

/// The summary of one bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSum {
    /// Records in the bucket.
    pub count: u32,
    /// XOR of their fingerprints.
    pub fp: u64,
}

/// A store's digest: the summary of every non-empty bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Non-empty buckets, sorted.
    pub buckets: Vec<(Class, u8, BucketSum)>,
}

impl Digest {
    /// The buckets whose summaries differ between `self` and `other` (present on one side only
    /// included).
    pub fn differing(&self, other: &Digest) -> Vec<BucketId> {
        let a: BTreeMap<BucketId, BucketSum> = self
            .buckets
            .iter()
            .map(|(c, b, s)| ((*c, *b), *s))
            .collect();
        let b: BTreeMap<BucketId, BucketSum> = other
            .buckets
            .iter()
            .map(|(c, b, s)| ((*c, *b), *s))
            .collect();
        let keys: BTreeSet<BucketId> = a.keys().chain(b.keys()).copied().collect();
        keys.into_iter().filter(|k| a.get(k) != b.get(k)).collect()
    }

    /// Whether the digest describes an empty store.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// One 64-bit hash of the whole digest: two stores with equal state hashes hold the same
    /// records.
    pub fn state_hash(&self) -> u64 {
        let bytes = codec::encode(self).unwrap_or_default();
        fnv1a(&bytes)
    }
}

/// What a merge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The record was new or newer and replaced what the store had.
    Applied,
    /// The store already had this record or a winner over it.
    Stale,
    /// The record was refused (older than the tombstone watermark and unknown here).
    Refused,
}

struct Entry {
    record: Record,
    fp: u64,
}

/// The cluster state held by one node.
pub struct StateStore {
    records: BTreeMap<RecordKey, Entry>,
    sums: Vec<BucketSum>,
    counts: [usize; Class::ALL.len()],
    gc_watermark_ms: u64,
    max_epoch: u64,
    dirty: BTreeSet<RecordKey>,
    removed: BTreeSet<RecordKey>,
}

impl Default for StateStore {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket_of(key: &RecordKey) -> BucketId {
    let bytes = codec::encode(key).unwrap_or_default();
    (key.class(), (fnv1a(&bytes) % BUCKETS as u64) as u8)
}

fn sum_index((class, bucket): BucketId) -> usize {
    class.index() * BUCKETS + bucket as usize
}

impl StateStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            records: BTreeMap::new(),
            sums: vec![BucketSum::default(); Class::ALL.len() * BUCKETS],
            counts: [0; Class::ALL.len()],
            gc_watermark_ms: 0,
            max_epoch: 0,
            dirty: BTreeSet::new(),
            removed: BTreeSet::new(),
        }
    }

    /// A store holding `records` (e.g. loaded from disk); malformed ones are skipped and counted.
    pub fn from_records(records: impl IntoIterator<Item = Record>) -> (Self, usize) {
        let mut s = Self::new();
        let mut bad = 0;
        for r in records {
            if r.check().is_err() {
                bad += 1;
                continue;
            }
            s.merge(r);
        }
        s.dirty.clear();
        (s, bad)
    }

    /// Merges one record (already checked with [`Record::check`]).
    pub fn merge(&mut self, record: Record) -> MergeOutcome {
        self.note_epoch(&record);
        match self.records.get(&record.key) {
            Some(old) => {
                if !record.wins_over(&old.record) {
                    return MergeOutcome::Stale;
                }
            }
            None => {
                let collectable = matches!(
                    record.key.class(),
                    Class::Service | Class::Placement | Class::Instance
                );
                if collectable && record.written_ms < self.gc_watermark_ms {
                    return MergeOutcome::Refused;
                }
            }
        }
        let fp = record.fingerprint();
        let bucket = sum_index(bucket_of(&record.key));
        let key = record.key.clone();
        let class = key.class().index();
        match self.records.insert(key.clone(), Entry { record, fp }) {
            Some(old) => self.sums[bucket].fp ^= old.fp,
            None => {
                self.sums[bucket].count += 1;
                self.counts[class] += 1;
            }
        }
        self.sums[bucket].fp ^= fp;
        self.removed.remove(&key);
        self.dirty.insert(key);
        MergeOutcome::Applied
    }

    fn note_epoch(&mut self, r: &Record) {
        if matches!(r.key, RecordKey::Lease | RecordKey::Placement { .. }) {
            self.max_epoch = self.max_epoch.max(r.stamp.major);
        }
    }

    /// The highest lease epoch seen in lease and placement records (the fencing epoch).
    pub fn max_epoch(&self) -> u64 {
        self.max_epoch
    }

    /// Raises the fencing epoch (e.g. from the persisted value at start or a lease grant).
    pub fn observe_epoch(&mut self, epoch: u64) {
        self.max_epoch = self.max_epoch.max(epoch);
    }

    /// The record for `key`, tombstones included.
    pub fn get(&self, key: &RecordKey) -> Option<&Record> {
        self.records.get(key).map(|e| &e.record)
    }

    /// Every record, in key order.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values().map(|e| &e.record)
    }

    /// Number of records (tombstones included).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records per class, in [`Class::ALL`] order.
    pub fn counts(&self) -> [usize; Class::ALL.len()] {
        self.counts
    }

    /// The live service specs, by name.
    pub fn services(&self) -> impl Iterator<Item = (&Record, &ServiceEntry)> {
        self.records
            .range(RecordKey::Service(String::new())..)
            .take_while(|(k, _)| matches!(k, RecordKey::Service(_)))
            .filter_map(|(_, e)| match &e.record.value {
                Value::Service(s) => Some((&e.record, &**s)),
                _ => None,
            })
    }

    /// The ids of the nodes that published node info, in order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.records
            .range(RecordKey::Node([0; 16])..RecordKey::Lease)
            .filter_map(|(k, _)| match k {
                RecordKey::Node(id) => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// The live spec of `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceEntry> {
        match self
            .get(&RecordKey::Service(name.to_string()))
            .map(|r| &r.value)
        {
            Some(Value::Service(s)) => Some(&**s),
            _ => None,
        }
    }

    /// The effective placement of a slot: the placed node, unless the placement was made under
    /// a lower epoch than the highest seen (a stale leader's placement is ignored).
    pub fn effective_placement(&self, service: &str, slot: u32) -> Option<[u8; 16]> {
        let key = RecordKey::Placement {
            service: service.to_string(),
            slot,
        };
        match self.get(&key) {
            Some(r) if r.stamp.major >= self.max_epoch => match r.value {
                Value::Placement(n) => Some(n),
                _ => None,
            },
            _ => None,
        }
    }

    /// The lease record, if any.
    pub fn lease(&self) -> Option<(LeaseInfo, u64)> {
        match self.get(&RecordKey::Lease) {
            Some(Record {
                value: Value::Lease(l),
                stamp,
                ..
            }) => Some((*l, stamp.minor)),
            _ => None,
        }
    }

    /// The digest.
    pub fn digest(&self) -> Digest {
        let mut buckets = Vec::new();
        for class in Class::ALL {
            for b in 0..BUCKETS {
                let s = self.sums[class.index() * BUCKETS + b];
                if s.count > 0 {
                    buckets.push((class, b as u8, s));
                }
            }
        }
        Digest { buckets }
    }

    /// The records in the given buckets.
    pub fn records_in(&self, buckets: &[BucketId]) -> Vec<Record> {
        let wanted: BTreeSet<BucketId> = buckets.iter().copied().collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        self.records
            .iter()
            .filter(|(k, _)| wanted.contains(&bucket_of(k)))
            .map(|(_, e)| e.record.clone())
            .collect()
    }

    /// Every record (a full snapshot).
    pub fn snapshot(&self) -> Vec<Record> {
        self.records().cloned().collect()
    }

    /// Collects tombstones written more than `horizon_ms` before `now_ms`; returns how many.
    pub fn collect_tombstones(&mut self, now_ms: u64, horizon_ms: u64) -> usize {
        let watermark = now_ms.saturating_sub(horizon_ms);
        let old: Vec<RecordKey> = self
            .records
            .iter()
            .filter(|(_, e)| e.record.is_tombstone() && e.record.written_ms < watermark)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            if let Some(e) = self.records.remove(k) {
                let i = sum_index(bucket_of(k));
                self.sums[i].fp ^= e.fp;
                self.sums[i].count -= 1;
                self.counts[k.class().index()] -= 1;
                self.dirty.remove(k);
                self.removed.insert(k.clone());
            }
        }
        self.gc_watermark_ms = self.gc_watermark_ms.max(watermark);
        old.len()
    }

    /// The tombstone watermark (unix ms): unknown collectable records older than it are refused.
    pub fn gc_watermark_ms(&self) -> u64 {
        self.gc_watermark_ms
    }

    /// Restores the watermark (from disk).
    pub fn set_gc_watermark_ms(&mut self, ms: u64) {
        self.gc_watermark_ms = self.gc_watermark_ms.max(ms);
    }

    /// Whether there are changes not yet handed to [`StateStore::take_changes`].
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.removed.is_empty()
    }

    /// The records changed and the keys removed since the last call (for persistence).
    pub fn take_changes(&mut self) -> (Vec<Record>, Vec<RecordKey>) {
        let dirty = std::mem::take(&mut self.dirty);
        let removed = std::mem::take(&mut self.removed);
        let puts = dirty
            .into_iter()
            .filter_map(|k| self.records.get(&k).map(|e| e.record.clone()))
            .collect();
        (puts, removed.into_iter().collect())
    }

    /// An estimate of the heap memory the records take (encoded size × 2 for the map and the
    /// decoded form); the benchmark reports it beside the allocator's figure.
    pub fn approx_bytes(&self) -> usize {
        self.records
            .values()
            .map(|e| codec::encode(&e.record).map(|b| b.len()).unwrap_or(0) * 2 + 64)
            .sum()
    }

    /// Decodes and checks a record from bytes (persistence and tests).
    pub fn decode_record(bytes: &[u8]) -> Result<Record, MembershipError> {
        let r: Record = codec::decode(bytes)?;
        r.check()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::super::hlc::HlcTimestamp;
    use super::super::record::tests::{arb_record, spec};
    use super::*;
    use proptest::prelude::*;

    fn store_of(records: &[Record]) -> StateStore {
        let mut s = StateStore::new();
        for r in records {
            s.merge(r.clone());
        }
        s
    }

    #[test]
    fn a_delete_hides_the_service_and_a_later_put_brings_it_back() {
        let mut s = StateStore::new();
        let w = [1; 16];
        s.merge(Record::service(
            spec("web", 2),
            1,
            HlcTimestamp::new(10, 0),
            w,
        ));
        assert_eq!(s.services().count(), 1);
        s.merge(Record::service_tombstone(
            "web",
            HlcTimestamp::new(11, 0),
            w,
        ));
        assert_eq!(s.services().count(), 0);
        assert_eq!(
            s.merge(Record::service(
                spec("web", 3),
                2,
                HlcTimestamp::new(10, 5),
                w
            )),
            MergeOutcome::Stale
        );
        s.merge(Record::service(
            spec("web", 3),
            2,
            HlcTimestamp::new(12, 0),
            w,
        ));
        assert_eq!(s.service("web").unwrap().spec.replicas, 3);
    }

    #[test]
    fn tombstones_are_collected_after_the_horizon_and_cannot_be_resurrected() {
        let mut s = StateStore::new();
        let w = [1; 16];
        let put = Record::service(spec("web", 2), 1, HlcTimestamp::new(1_000, 0), w);
        s.merge(put.clone());
        s.merge(Record::service_tombstone(
            "web",
            HlcTimestamp::new(2_000, 0),
            w,
        ));
        assert_eq!(s.collect_tombstones(2_500, 1_000), 0);
        assert_eq!(s.len(), 1);
        assert_eq!(s.collect_tombstones(3_500, 1_000), 1);
        assert!(s.is_empty());
        let (_, removed) = s.take_changes();
        assert_eq!(removed, vec![RecordKey::Service("web".into())]);
        // A node that was away holds the old put: it must not come back.
        assert_eq!(s.merge(put), MergeOutcome::Refused);
        assert!(s.is_empty());
    }

    #[test]
    fn a_placement_under_a_lower_epoch_than_seen_is_not_effective() {
        let mut s = StateStore::new();
        let p = |e, node| Record {
            key: RecordKey::Placement {
                service: "web".into(),
                slot: 0,
            },
            stamp: super::super::record::Stamp::placement(e, 1),
            written_ms: 0,
            value: Value::Placement(node),
        };
        s.merge(p(3, [3; 16]));
        assert_eq!(s.effective_placement("web", 0), Some([3; 16]));
        s.observe_epoch(4);
        assert_eq!(s.effective_placement("web", 0), None);
        assert_eq!(s.merge(p(2, [2; 16])), MergeOutcome::Stale);
        s.merge(p(4, [4; 16]));
        assert_eq!(s.effective_placement("web", 0), Some([4; 16]));
    }

    #[test]
    fn the_digest_names_exactly_the_buckets_that_differ() {
        let w = [1; 16];
        let mut a = StateStore::new();
        let mut b = StateStore::new();
        for i in 0..50 {
            let r = Record::service(spec(&format!("s{i}"), 1), 1, HlcTimestamp::new(5, 0), w);
            a.merge(r.clone());
            b.merge(r);
        }
        assert!(a.digest().differing(&b.digest()).is_empty());
        let extra = Record::service(spec("web", 1), 1, HlcTimestamp::new(6, 0), w);
        b.merge(extra.clone());
        let diff = a.digest().differing(&b.digest());
        assert_eq!(diff.len(), 1);
        let sent = b.records_in(&diff);
        assert!(sent.contains(&extra));
        for r in sent {
            a.merge(r);
        }
        assert_eq!(a.digest(), b.digest());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn any_order_and_any_duplication_of_merges_gives_the_same_state(
            records in proptest::collection::vec(arb_record(), 0..30),
            perm in any::<u64>()
        ) {
            let a = store_of(&records);
            let mut shuffled = records.clone();
            // A deterministic permutation from `perm`, plus duplicates.
            let n = shuffled.len();
            if n > 1 {
                let mut x = perm;
                for i in (1..n).rev() {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    shuffled.swap(i, (x % (i as u64 + 1)) as usize);
                }
            }
            let dup: Vec<Record> = shuffled.iter().chain(records.iter().take(n / 2)).cloned().collect();
            let b = store_of(&dup);
            prop_assert_eq!(a.digest(), b.digest());
            prop_assert_eq!(a.snapshot(), b.snapshot());
        }

        #[test]
        fn merging_two_stores_is_commutative_and_associative(
            x in proptest::collection::vec(arb_record(), 0..15),
            y in proptest::collection::vec(arb_record(), 0..15),
            z in proptest::collection::vec(arb_record(), 0..15),
        ) {
            let join = |l: &[Record], r: &[Record]| {
                let mut s = store_of(l);
                for rec in r { s.merge(rec.clone()); }
                s.snapshot()
            };
            prop_assert_eq!(join(&x, &y), join(&y, &x));
            let xy = join(&x, &y);
            let yz = join(&y, &z);
            prop_assert_eq!(join(&xy, &z), join(&x, &yz));
            let xx = join(&x, &x);
            prop_assert_eq!(xx, store_of(&x).snapshot());
        }

        #[test]
        fn random_bytes_never_panic_the_record_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = StateStore::decode_record(&bytes);
        }
    }
}

//! The records of the cluster state, one class per kind of writer (DESIGN.md §4), and the rule
//! that decides which of two records for the same key wins.
//!
//! | class | writer | stamp (larger wins) |
//! |---|---|---|
//! | service spec | any node (API) | (HLC, writer node id); a delete is a tombstone |
//! | placement | the leader | (lease epoch, seq) |
//! | instance status, node info | the owning node | the owner's monotonic version |
//! | lease | the lease holder | (epoch, renewal, holder) |
//! | voter roster, revocation list | leader / authority | version |
//!
//! When two records for one key carry the same stamp (which the writers never produce, but a
//! faulty or malicious peer could), the one with the larger fingerprint wins, so the choice is
//! still the same on every node and merging stays commutative.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_config::ServiceSpec;

use super::codec;
use super::hlc::HlcTimestamp;
use crate::MembershipError;

/// A node id (16 bytes from the node's certificate).
pub type NodeId = [u8; 16];

/// The record classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Class {
    /// Service specs (desired state).
    Service,
    /// Placements: (service, slot) -> node.
    Placement,
    /// Instance status, written by the node running the instance.
    Instance,
    /// Node info, written by the node itself.
    Node,
    /// The leader lease record.
    Lease,
    /// The voter roster.
    Roster,
    /// The certificate revocation list.
    Revocations,
}

impl Class {
    /// Every class, in order.
    pub const ALL: [Class; 7] = [
        Class::Service,
        Class::Placement,
        Class::Instance,
        Class::Node,
        Class::Lease,
        Class::Roster,
        Class::Revocations,
    ];

    /// The class's index in [`Class::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short lowercase name (metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Service => "service",
            Class::Placement => "placement",
            Class::Instance => "instance",
            Class::Node => "node",
            Class::Lease => "lease",
            Class::Roster => "roster",
            Class::Revocations => "revocations",
        }
    }
}

/// What a record is about; one live record per key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RecordKey {
    /// A service, by name.
    Service(String),
    /// One replica slot of a service.
    Placement {
        /// The service name.
        service: String,
        /// The slot (0-based replica index).
        slot: u32,
    },
    /// One instance, owned by `origin`.
    Instance {
        /// The node running it.
        origin: NodeId,
        /// The instance id (unique on that node).
        instance: String,
    },
    /// A node's own info.
    Node(NodeId),
    /// The leader lease (one per cluster).
    Lease,
    /// The voter roster (one per cluster).
    Roster,
    /// The revocation list (one per cluster).
    Revocations,
}

impl RecordKey {
    /// The key's class.
    pub fn class(&self) -> Class {
        match self {
            RecordKey::Service(_) => Class::Service,
            RecordKey::Placement { .. } => Class::Placement,
            RecordKey::Instance { .. } => Class::Instance,
            RecordKey::Node(_) => Class::Node,
            RecordKey::Lease => Class::Lease,
            RecordKey::Roster => Class::Roster,
            RecordKey::Revocations => Class::Revocations,
        }
    }
}

/// The ordering stamp of a record: compared as a tuple, larger wins. Its meaning depends on the
/// class (see the module docs); unused parts are zero.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Stamp {
    /// HLC (services), lease epoch (placements, lease) or version (the rest).
    pub major: u64,
    /// Placement seq, lease renewal count; zero otherwise.
    pub minor: u64,
    /// The writer's node id (services, lease holder, roster writer); zero otherwise.
    pub node: NodeId,
}

impl Stamp {
    /// The stamp of a service write.
    pub fn service(hlc: HlcTimestamp, writer: NodeId) -> Self {
        Self {
            major: hlc.0,
            minor: 0,
            node: writer,
        }
    }

    /// The stamp of a placement.
    pub fn placement(epoch: u64, seq: u64) -> Self {
        Self {
            major: epoch,
            minor: seq,
            node: [0; 16],
        }
    }

    /// The stamp of a per-origin record (instance status, node info) or a versioned singleton.
    pub fn version(version: u64) -> Self {
        Self {
            major: version,
            minor: 0,
            node: [0; 16],
        }
    }
}

/// A service spec as stored: the validated spec and a version counter (one more than the
/// version it replaced on the node that wrote it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// The spec.
    pub spec: ServiceSpec,
    /// 1 for a new service, +1 for every update seen by the writer.
    pub version: u64,
    /// The version at which the instance template (everything but `replicas` and `autoscale`)
    /// last changed: instances run this version, so scaling restarts nothing.
    pub template: u64,
}

impl ServiceEntry {
    /// Whether two specs describe the same instances (they differ at most in `replicas` and
    /// `autoscale`).
    pub fn same_template(a: &ServiceSpec, b: &ServiceSpec) -> bool {
        let strip = |s: &ServiceSpec| {
            let mut s = s.clone();
            s.replicas = 0;
            s.autoscale = None;
            s
        };
        strip(a) == strip(b)
    }
}

/// The status of one instance, as reported by the node running it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The service it belongs to.
    pub service: String,
    /// Runtime state (`starting`, `running`, `exited`, ...).
    pub state: String,
    /// Whether its readiness probe passes.
    pub ready: bool,
    /// Where it can be reached (`ip:port`), if anywhere.
    pub address: Option<String>,
    /// Restarts so far.
    pub restarts: u32,
}

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// CPU cores offered.
    pub cpu: f64,
    /// Memory offered, bytes.
    pub memory: u64,
    /// Instances running.
    pub load: u32,
}

/// The lease record the holder gossips so every node knows who leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The holder.
    pub holder: NodeId,
    /// The lease epoch.
    pub epoch: u64,
}

/// A record's value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// Deleted (services, placements, instances).
    Tombstone,
    /// A service spec.
    Service(Box<ServiceEntry>),
    /// A placement: the node that should run the slot.
    Placement(NodeId),
    /// An instance's status.
    Instance(InstanceStatus),
    /// A node's info.
    Node(NodeInfo),
    /// The lease.
    Lease(LeaseInfo),
    /// The voters.
    Roster(Vec<NodeId>),
    /// Revoked certificate serials.
    Revocations(Vec<u64>),
}

/// One record of the cluster state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What it is about.
    pub key: RecordKey,
    /// Its ordering stamp.
    pub stamp: Stamp,
    /// Wall time of the write at the writer (unix ms): used only to collect tombstones.
    pub written_ms: u64,
    /// The value.
    pub value: Value,
}

/// The largest number of voters or revoked serials a record may carry.
pub const MAX_LIST: usize = 4096;

impl Record {
    /// A service write.
    pub fn service(spec: ServiceSpec, version: u64, hlc: HlcTimestamp, writer: NodeId) -> Self {
        Self {
            key: RecordKey::Service(spec.name.clone()),
            stamp: Stamp::service(hlc, writer),
            written_ms: hlc.wall_ms(),
            value: Value::Service(Box::new(ServiceEntry {
                spec,
                version,
                template: version,
            })),
        }
    }

    /// A service delete.
    pub fn service_tombstone(name: &str, hlc: HlcTimestamp, writer: NodeId) -> Self {
        Self {
            key: RecordKey::Service(name.to_string()),
            stamp: Stamp::service(hlc, writer),
            written_ms: hlc.wall_ms(),
            value: Value::Tombstone,
        }
    }

    /// Whether this is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        matches!(self.value, Value::Tombstone)
    }

    /// A 64-bit fingerprint of the whole record (stable across nodes and versions of the
    /// binary: FNV-1a over the canonical encoding).
    pub fn fingerprint(&self) -> u64 {
        fnv1a(&codec::encode(self).unwrap_or_default())
    }

    /// Whether `self` wins over `other` (a record for the same key). Total and deterministic:
    /// larger stamp, then larger fingerprint.
    pub fn wins_over(&self, other: &Record) -> bool {
        match self.stamp.cmp(&other.stamp) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self.fingerprint() > other.fingerprint(),
        }
    }

    /// Checks that the record is well formed: the value fits the key's class, a service's
    /// key is its spec's name, lists are bounded. Every record from the network goes through
    /// this before it is merged.
    pub fn check(&self) -> Result<(), MembershipError> {
        let bad = |why: &str| {
            Err(MembershipError::State(format!(
                "refused record {:?}: {why}",
                self.key
            )))
        };
        let ok = match (&self.key, &self.value) {
            (RecordKey::Service(name), Value::Service(e)) => {
                if &e.spec.name != name {
                    return bad("the spec's name differs from the key");
                }
                true
            }
            (
                RecordKey::Service(_) | RecordKey::Placement { .. } | RecordKey::Instance { .. },
                Value::Tombstone,
            ) => true,
            (RecordKey::Placement { .. }, Value::Placement(_)) => true,
            (RecordKey::Instance { .. }, Value::Instance(_)) => true,
            (RecordKey::Node(_), Value::Node(_)) => true,
            (RecordKey::Lease, Value::Lease(l)) => {
                if l.epoch != self.stamp.major || l.holder != self.stamp.node {
                    return bad("the lease stamp differs from its value");
                }
                true
            }
            (RecordKey::Roster, Value::Roster(v)) => v.len() <= MAX_LIST,
            (RecordKey::Revocations, Value::Revocations(v)) => v.len() <= MAX_LIST,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            bad("the value does not fit the key's class")
        }
    }
}

/// Returns the winner of two records for the same key (the merge of a single register).
pub fn merge(a: Record, b: Record) -> Record {
    if b.wins_over(&a) { b } else { a }
}

/// FNV-1a, 64 bits: a small stable hash for fingerprints and bucket choice (not a defence
/// against an adversary — peers are authenticated members).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn spec(name: &str, replicas: u32) -> ServiceSpec {
        let text =
            format!("name = \"{name}\"\ncommand = [\"sleep\", \"60\"]\nreplicas = {replicas}\n");
        shoal_config::load_service_str("t.toml", &text).expect("valid spec")
    }

    /// Records of class `c` (0..4) for a handful of keys (one key when `fixed`), with random
    /// stamps and values (including equal stamps with different values, which the tie-break
    /// must order).
    pub(crate) fn arb_in_class(c: u8, fixed: bool) -> BoxedStrategy<Record> {
        let name = if fixed {
            Just("web").boxed()
        } else {
            prop_oneof![Just("web"), Just("db"), Just("api")].boxed()
        };
        let k = if fixed { 1u8 } else { 2u8 };
        match c {
            0 => (name, 0u64..4, 0u8..3, 1u32..4, any::<bool>())
                .prop_map(|(n, t, w, r, del)| {
                    let hlc = HlcTimestamp::new(1_000 + t, 0);
                    if del {
                        Record::service_tombstone(n, hlc, [w; 16])
                    } else {
                        Record::service(spec(n, r), 1, hlc, [w; 16])
                    }
                })
                .boxed(),
            1 => (name, 0u32..k as u32, 0u64..3, 0u64..3, 0u8..3)
                .prop_map(|(n, slot, e, s, node)| Record {
                    key: RecordKey::Placement {
                        service: n.to_string(),
                        slot,
                    },
                    stamp: Stamp::placement(e, s),
                    written_ms: 5,
                    value: if node == 0 {
                        Value::Tombstone
                    } else {
                        Value::Placement([node; 16])
                    },
                })
                .boxed(),
            2 => (0u8..k, 0u64..3, 0u32..3)
                .prop_map(|(o, v, restarts)| Record {
                    key: RecordKey::Instance {
                        origin: [o; 16],
                        instance: "i1".into(),
                    },
                    stamp: Stamp::version(v),
                    written_ms: 5,
                    value: Value::Instance(InstanceStatus {
                        service: "web".into(),
                        state: "running".into(),
                        ready: true,
                        address: None,
                        restarts,
                    }),
                })
                .boxed(),
            _ => (0u64..3, 0u8..2)
                .prop_map(|(e, h)| Record {
                    key: RecordKey::Lease,
                    stamp: Stamp {
                        major: e,
                        minor: 0,
                        node: [h; 16],
                    },
                    written_ms: 1,
                    value: Value::Lease(LeaseInfo {
                        holder: [h; 16],
                        epoch: e,
                    }),
                })
                .boxed(),
        }
    }

    /// Any record over a handful of keys.
    pub(crate) fn arb_record() -> BoxedStrategy<Record> {
        (0u8..4).prop_flat_map(|c| arb_in_class(c, false)).boxed()
    }

    fn same_key_triple() -> impl Strategy<Value = (Record, Record, Record)> {
        (0u8..4).prop_flat_map(|c| {
            (
                arb_in_class(c, true),
                arb_in_class(c, true),
                arb_in_class(c, true),
            )
        })
    }

    #[test]
    fn a_later_hlc_wins_and_an_equal_hlc_goes_to_the_larger_node_id() {
        let a = Record::service(spec("web", 1), 1, HlcTimestamp::new(10, 0), [1; 16]);
        let b = Record::service(spec("web", 2), 1, HlcTimestamp::new(11, 0), [0; 16]);
        assert_eq!(merge(a.clone(), b.clone()), b);
        let c = Record::service_tombstone("web", HlcTimestamp::new(10, 0), [2; 16]);
        assert_eq!(merge(a.clone(), c.clone()), c);
    }

    #[test]
    fn a_record_whose_value_does_not_fit_its_key_is_refused() {
        let mut r = Record::service(spec("web", 1), 1, HlcTimestamp::new(1, 0), [1; 16]);
        r.key = RecordKey::Service("other".into());
        assert!(r.check().is_err());
        r.key = RecordKey::Node([1; 16]);
        assert!(r.check().is_err());
        r.key = RecordKey::Node([1; 16]);
        r.value = Value::Tombstone;
        assert!(r.check().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
        #[test]
        fn merging_two_records_is_commutative((a, b, _c) in same_key_triple()) {
            prop_assert_eq!(merge(a.clone(), b.clone()), merge(b, a));
        }

        #[test]
        fn merging_three_records_is_associative((a, b, c) in same_key_triple()) {
            let left = merge(merge(a.clone(), b.clone()), c.clone());
            let right = merge(a, merge(b, c));
            prop_assert_eq!(left, right);
        }

        #[test]
        fn merging_a_record_with_itself_changes_nothing(a in arb_record()) {
            prop_assert_eq!(merge(a.clone(), a.clone()), a);
        }
    }
}

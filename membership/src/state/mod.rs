//! The replicated cluster state: records split by writer class, a hybrid logical clock, the
//! merge rules, the digest used by anti-entropy, and crash-safe persistence (redb).

pub mod codec;
pub mod hlc;
pub mod persist;
pub mod record;
pub mod store;

pub use hlc::{HlcClock, HlcTimestamp};
pub use persist::{DurableState, MemBackend, RedbBackend, StateBackend};
pub use record::{Class, NodeId, Record, RecordKey, Stamp, Value};
pub use store::{Digest, MergeOutcome, StateStore};

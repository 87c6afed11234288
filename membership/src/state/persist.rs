//! Crash-safe persistence of the cluster state, and the durable wrapper the agent uses.
//!
//! [`StateBackend`] is the I/O boundary: [`RedbBackend`] keeps records and a few counters in a
//! redb database in the data dir (every commit is an fsynced ACID transaction), [`MemBackend`]
//! keeps them in memory and can be cloned to simulate a restart. [`DurableState`] puts a
//! [`StateStore`], its hybrid logical clock and a backend together: a local write is persisted
//! before it is acknowledged, records learned from peers are persisted by [`DurableState::flush`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use shoal_config::ServiceSpec;

use super::codec;
use super::hlc::{DEFAULT_MAX_SKEW_MS, HlcClock, HlcTimestamp};
use super::record::{NodeId, Record, RecordKey, ServiceEntry, Value};
use super::store::{MergeOutcome, StateStore};
use crate::MembershipError;

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// What a backend holds.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// The records.
    pub records: Vec<Record>,
    /// Small named values (clock, epochs, the voter's promise).
    pub meta: BTreeMap<String, Vec<u8>>,
    /// Stored records that did not decode or check (skipped, never fatal).
    pub skipped: usize,
}

/// Where the state is kept between runs.
pub trait StateBackend: Send {
    /// Everything stored.
    fn load(&self) -> Result<Loaded, MembershipError>;
    /// Stores `puts`, removes `deletes` and sets `meta`, atomically and durably.
    fn commit(
        &mut self,
        puts: &[Record],
        deletes: &[RecordKey],
        meta: &[(&str, Vec<u8>)],
    ) -> Result<(), MembershipError>;
}

fn storage(e: impl std::fmt::Display) -> MembershipError {
    MembershipError::Storage(e.to_string())
}

/// The state in a redb database file.
pub struct RedbBackend {
    db: redb::Database,
}

impl RedbBackend {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, MembershipError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| MembershipError::Storage(format!("{}: {e}", dir.display())))?;
        }
        let db = redb::Database::create(path)
            .map_err(|e| MembershipError::Storage(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(storage)?;
        tx.open_table(RECORDS).map_err(storage)?;
        tx.open_table(META).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(Self { db })
    }
}

impl StateBackend for RedbBackend {
    fn load(&self) -> Result<Loaded, MembershipError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let mut out = Loaded::default();
        let records = tx.open_table(RECORDS).map_err(storage)?;
        for item in records.iter().map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            match StateStore::decode_record(v.value()) {
                Ok(r) => out.records.push(r),
                Err(_) => out.skipped += 1,
            }
        }
        let meta = tx.open_table(META).map_err(storage)?;
        for item in meta.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            out.meta.insert(k.value().to_string(), v.value().to_vec());
        }
        Ok(out)
    }

    fn commit(
        &mut self,
        puts: &[Record],
        deletes: &[RecordKey],
        meta: &[(&str, Vec<u8>)],
    ) -> Result<(), MembershipError> {
        let tx = self.db.begin_write().map_err(storage)?;
        {
            let mut records = tx.open_table(RECORDS).map_err(storage)?;
            for r in puts {
                let k = codec::encode(&r.key)?;
                let v = codec::encode(r)?;
                records
                    .insert(k.as_slice(), v.as_slice())
                    .map_err(storage)?;
            }
            for key in deletes {
                let k = codec::encode(key)?;
                records.remove(k.as_slice()).map_err(storage)?;
            }
            let mut m = tx.open_table(META).map_err(storage)?;
            for (k, v) in meta {
                m.insert(*k, v.as_slice()).map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)
    }
}

/// Records by encoded key, and the meta table.
type MemTables = (BTreeMap<Vec<u8>, Vec<u8>>, BTreeMap<String, Vec<u8>>);

/// The state in memory; clones share it (a "restart" is a new [`DurableState`] over a clone).
#[derive(Clone, Default)]
pub struct MemBackend {
    inner: Arc<Mutex<MemTables>>,
}

impl StateBackend for MemBackend {
    fn load(&self) -> Result<Loaded, MembershipError> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Loaded::default();
        for v in g.0.values() {
            match StateStore::decode_record(v) {
                Ok(r) => out.records.push(r),
                Err(_) => out.skipped += 1,
            }
        }
        out.meta = g.1.clone();
        Ok(out)
    }

    fn commit(
        &mut self,
        puts: &[Record],
        deletes: &[RecordKey],
        meta: &[(&str, Vec<u8>)],
    ) -> Result<(), MembershipError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for r in puts {
            g.0.insert(codec::encode(&r.key)?, codec::encode(r)?);
        }
        for k in deletes {
            g.0.remove(&codec::encode(k)?);
        }
        for (k, v) in meta {
            g.1.insert((*k).to_string(), v.clone());
        }
        Ok(())
    }
}

const META_HLC: &str = "hlc";
const META_EPOCH: &str = "max_epoch";
const META_GC: &str = "gc_watermark_ms";

fn u64_of(meta: &BTreeMap<String, Vec<u8>>, key: &str) -> u64 {
    meta.get(key)
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// A store, its clock and its backend.
pub struct DurableState {
    /// The records.
    pub store: StateStore,
    /// This node's hybrid logical clock.
    pub clock: HlcClock,
    /// This node's id (the writer id of its service writes).
    pub node_id: NodeId,
    backend: Box<dyn StateBackend>,
    /// Other persisted values (e.g. the lease voter's promise), read at open.
    pub meta: BTreeMap<String, Vec<u8>>,
    extra_meta: Vec<(&'static str, Vec<u8>)>,
    /// Stored records skipped at load because they did not decode.
    pub skipped_at_load: usize,
}

impl DurableState {
    /// Loads the state from `backend`.
    pub fn open(node_id: NodeId, backend: Box<dyn StateBackend>) -> Result<Self, MembershipError> {
        let loaded = backend.load()?;
        let (mut store, bad) = StateStore::from_records(loaded.records);
        store.observe_epoch(u64_of(&loaded.meta, META_EPOCH));
        store.set_gc_watermark_ms(u64_of(&loaded.meta, META_GC));
        let clock = HlcClock::resume(
            HlcTimestamp(u64_of(&loaded.meta, META_HLC)),
            DEFAULT_MAX_SKEW_MS,
        );
        Ok(Self {
            store,
            clock,
            node_id,
            backend,
            meta: loaded.meta,
            extra_meta: Vec::new(),
            skipped_at_load: loaded.skipped + bad,
        })
    }

    /// Queues a named value to persist with the next flush.
    pub fn set_meta(&mut self, key: &'static str, value: Vec<u8>) {
        self.meta.insert(key.to_string(), value.clone());
        self.extra_meta.push((key, value));
    }

    /// Writes every change since the last flush (records, clock, epoch, watermark).
    pub fn flush(&mut self) -> Result<(), MembershipError> {
        let (puts, deletes) = self.store.take_changes();
        let mut meta = std::mem::take(&mut self.extra_meta);
        meta.push((META_HLC, self.clock.last().0.to_le_bytes().to_vec()));
        meta.push((META_EPOCH, self.store.max_epoch().to_le_bytes().to_vec()));
        meta.push((META_GC, self.store.gc_watermark_ms().to_le_bytes().to_vec()));
        self.backend.commit(&puts, &deletes, &meta)
    }

    /// Creates or replaces a service (already validated) at wall time `wall_ms`; persisted
    /// before it returns. Returns the record to disseminate.
    pub fn put_service(
        &mut self,
        spec: ServiceSpec,
        wall_ms: u64,
    ) -> Result<Record, MembershipError> {
        let prev = self.store.service(&spec.name);
        let version = prev.map(|s| s.version).unwrap_or(0) + 1;
        let template = match prev {
            Some(p) if ServiceEntry::same_template(&p.spec, &spec) => p.template,
            _ => version,
        };
        let hlc = self.write_stamp(&RecordKey::Service(spec.name.clone()), wall_ms);
        let mut record = Record::service(spec, version, hlc, self.node_id);
        if let Value::Service(entry) = &mut record.value {
            entry.template = template;
        }
        self.store.merge(record.clone());
        self.flush()?;
        Ok(record)
    }

    /// Deletes a service; `None` if there is no live service of that name.
    pub fn delete_service(
        &mut self,
        name: &str,
        wall_ms: u64,
    ) -> Result<Option<Record>, MembershipError> {
        if self.store.service(name).is_none() {
            return Ok(None);
        }
        let hlc = self.write_stamp(&RecordKey::Service(name.to_string()), wall_ms);
        let record = Record::service_tombstone(name, hlc, self.node_id);
        self.store.merge(record.clone());
        self.flush()?;
        Ok(Some(record))
    }

    /// A fresh HLC stamp for a write to `key`, larger than the key's current stamp (so a local
    /// write always wins over what this node has seen, even from a peer with a faster clock).
    fn write_stamp(&mut self, key: &RecordKey, wall_ms: u64) -> HlcTimestamp {
        if let Some(r) = self.store.get(key) {
            let _ = self
                .clock
                .observe(HlcTimestamp(r.stamp.major), u64::MAX / 2);
        }
        self.clock.now(wall_ms)
    }

    /// Merges a record received from a peer (checked first; its HLC observed). Not persisted
    /// until the next [`DurableState::flush`].
    pub fn merge_remote(
        &mut self,
        record: Record,
        wall_ms: u64,
    ) -> Result<MergeOutcome, MembershipError> {
        record.check()?;
        if let (RecordKey::Service(_), true) = (
            &record.key,
            matches!(record.value, Value::Service(_) | Value::Tombstone),
        ) {
            self.clock
                .observe(HlcTimestamp(record.stamp.major), wall_ms)?;
        }
        Ok(self.store.merge(record))
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::tests::spec;
    use super::*;

    fn reopen_redb(path: &Path) -> DurableState {
        DurableState::open([7; 16], Box::new(RedbBackend::open(path).unwrap())).unwrap()
    }

    #[test]
    fn specs_written_to_redb_are_all_there_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let last_hlc;
        {
            let mut s = reopen_redb(&path);
            for i in 0..20 {
                s.put_service(spec(&format!("svc{i}"), 2), 1_000 + i)
                    .unwrap();
            }
            s.delete_service("svc3", 2_000).unwrap();
            s.merge_remote(
                Record::service(spec("remote", 1), 1, HlcTimestamp::new(1_500, 0), [9; 16]),
                2_000,
            )
            .unwrap();
            s.store.observe_epoch(42);
            s.flush().unwrap();
            last_hlc = s.clock.last();
        }
        let mut s = reopen_redb(&path);
        assert_eq!(s.store.services().count(), 20);
        assert!(s.store.service("svc3").is_none());
        assert!(s.store.service("remote").is_some());
        assert_eq!(s.store.max_epoch(), 42);
        assert!(
            s.clock.now(0) > last_hlc,
            "the clock resumes after the persisted stamp"
        );
        assert_eq!(s.skipped_at_load, 0);
    }

    #[test]
    fn a_second_write_of_a_service_bumps_its_version() {
        let mut s = DurableState::open([1; 16], Box::new(MemBackend::default())).unwrap();
        s.put_service(spec("web", 1), 10).unwrap();
        s.put_service(spec("web", 4), 5).unwrap();
        let e = s.store.service("web").unwrap();
        assert_eq!((e.version, e.spec.replicas), (2, 4));
    }

    #[test]
    fn a_local_write_wins_over_a_peer_write_stamped_by_a_faster_clock() {
        let mut s = DurableState::open([1; 16], Box::new(MemBackend::default())).unwrap();
        s.merge_remote(
            Record::service(spec("web", 9), 1, HlcTimestamp::new(50_000, 0), [9; 16]),
            10_000,
        )
        .unwrap();
        s.put_service(spec("web", 2), 10_000).unwrap();
        assert_eq!(s.store.service("web").unwrap().spec.replicas, 2);
    }

    #[test]
    fn garbage_in_the_database_is_skipped_not_fatal() {
        let mut b = MemBackend::default();
        b.commit(&[], &[], &[]).unwrap();
        b.inner
            .lock()
            .unwrap()
            .0
            .insert(vec![1, 2, 3], vec![0xff, 0xff, 0xff]);
        let s = DurableState::open([1; 16], Box::new(b)).unwrap();
        assert_eq!(s.skipped_at_load, 1);
    }
}

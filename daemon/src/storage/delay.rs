//! A storage wrapper that delays chosen operations, so tests of behaviour
//! that depends on timing (a persist still running when the next snapshot
//! arrives) are deterministic instead of racing the real disk.
//!
//! [`DelayedStorage`] delegates everything to the storage it wraps; before
//! an operation a [`DelaySpec`] names, the calling thread sleeps for the
//! spec's delay, then the operation runs unchanged. A spec can be limited to
//! the first N snapshots: for operations on data files, N counts the data
//! files this storage created (each snapshot creates one) or opened for
//! reading (each restore from disk opens one); for the namespace operations
//! it counts their calls. Every delay served is counted
//! ([`DelayedStorage::delays_applied`]), so a test can check that the delay
//! it meant really happened.
//!
//! [`DelaySpec`] deserializes from a config table, e.g. TOML
//! `{ op = "sync_data", delay_ms = 2000, first_n = 1 }`: the first
//! snapshot's fdatasync takes two seconds longer.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    BackendKind, Completion, DataFile, DirEntry, IoOp, Metadata, OpKind, Storage, StorageError,
};

/// An operation a [`DelaySpec`] can delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DelayedOp {
    /// `create_data_file` (create and reserve); counted per data file created.
    CreateDataFile,
    /// Each write submitted to a data file; counted per data file created.
    DataWrite,
    /// A created data file's fdatasync; counted per data file created.
    SyncData,
    /// Each read submitted to a data file opened for reading; counted per
    /// data file opened.
    DataRead,
    /// `write_file_synced` (a manifest, an OWNER file); counted per call.
    WriteFileSynced,
    /// A directory fsync; counted per call.
    SyncDir,
    /// A rename; counted per call.
    Rename,
}

/// One delay: `op` takes `delay_ms` longer, for the first `first_n`
/// snapshots (see the module doc for what is counted), or always when
/// `first_n` is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelaySpec {
    pub op: DelayedOp,
    pub delay_ms: u64,
    #[serde(default)]
    pub first_n: Option<u64>,
}

impl DelaySpec {
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms)
    }

    /// Whether this spec delays the `ordinal`-th (0-based) counted `op`.
    fn applies(&self, op: DelayedOp, ordinal: u64) -> bool {
        self.op == op && self.first_n.is_none_or(|n| ordinal < n)
    }
}

/// Counters shared by a [`DelayedStorage`], its clones and its data files.
#[derive(Debug, Default)]
struct Counters {
    files_created: AtomicU64,
    files_opened: AtomicU64,
    write_file_synced: AtomicU64,
    sync_dir: AtomicU64,
    rename: AtomicU64,
    delays_applied: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    specs: Vec<DelaySpec>,
    counters: Counters,
}

impl Shared {
    /// The total delay the specs give the `ordinal`-th `op`.
    fn delay_of(&self, op: DelayedOp, ordinal: u64) -> Duration {
        self.specs
            .iter()
            .filter(|s| s.applies(op, ordinal))
            .map(DelaySpec::delay)
            .sum()
    }

    /// Sleeps for `delay` (if any) and counts it.
    fn serve(&self, delay: Duration) {
        if !delay.is_zero() {
            self.counters.delays_applied.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(delay);
        }
    }

    /// Counts one call of a per-call `op` and serves its delay.
    fn per_call(&self, op: DelayedOp, counter: &AtomicU64) {
        let ordinal = counter.fetch_add(1, Ordering::SeqCst);
        self.serve(self.delay_of(op, ordinal));
    }
}

/// Wraps a storage and delays the operations of its [`DelaySpec`]s. Clones
/// share the specs and the counters.
#[derive(Debug, Clone)]
pub struct DelayedStorage {
    inner: Arc<dyn Storage>,
    shared: Arc<Shared>,
}

impl DelayedStorage {
    pub fn new(inner: Arc<dyn Storage>, specs: Vec<DelaySpec>) -> Self {
        DelayedStorage {
            inner,
            shared: Arc::new(Shared {
                specs,
                counters: Counters::default(),
            }),
        }
    }

    /// The specs in force.
    pub fn specs(&self) -> &[DelaySpec] {
        &self.shared.specs
    }

    /// Delays served so far (one per delayed operation).
    pub fn delays_applied(&self) -> u64 {
        self.shared.counters.delays_applied.load(Ordering::SeqCst)
    }
}

impl Storage for DelayedStorage {
    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }

    fn create_dir(&self, path: &Path) -> Result<(), StorageError> {
        self.inner.create_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> Result<(), StorageError> {
        self.shared
            .per_call(DelayedOp::SyncDir, &self.shared.counters.sync_dir);
        self.inner.sync_dir(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        self.shared
            .per_call(DelayedOp::Rename, &self.shared.counters.rename);
        self.inner.rename(from, to)
    }

    fn remove_dir_all(&self, path: &Path) -> Result<(), StorageError> {
        self.inner.remove_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> Result<Vec<DirEntry>, StorageError> {
        self.inner.read_dir(path)
    }

    fn metadata(&self, path: &Path) -> Result<Option<Metadata>, StorageError> {
        self.inner.metadata(path)
    }

    fn create_data_file(
        &self,
        path: &Path,
        len_bytes: u64,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError> {
        let shared = &self.shared;
        let ordinal = shared.counters.files_created.fetch_add(1, Ordering::SeqCst);
        shared.serve(shared.delay_of(DelayedOp::CreateDataFile, ordinal));
        let inner = self.inner.create_data_file(path, len_bytes, queue_depth)?;
        Ok(Box::new(DelayedDataFile {
            inner,
            shared: Arc::clone(shared),
            write_delay: shared.delay_of(DelayedOp::DataWrite, ordinal),
            read_delay: Duration::ZERO,
            sync_delay: shared.delay_of(DelayedOp::SyncData, ordinal),
        }))
    }

    fn open_data_file(
        &self,
        path: &Path,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError> {
        let shared = &self.shared;
        let ordinal = shared.counters.files_opened.fetch_add(1, Ordering::SeqCst);
        let inner = self.inner.open_data_file(path, queue_depth)?;
        Ok(Box::new(DelayedDataFile {
            inner,
            shared: Arc::clone(shared),
            write_delay: Duration::ZERO,
            read_delay: shared.delay_of(DelayedOp::DataRead, ordinal),
            sync_delay: Duration::ZERO,
        }))
    }

    fn write_file_synced(&self, path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
        self.shared.per_call(
            DelayedOp::WriteFileSynced,
            &self.shared.counters.write_file_synced,
        );
        self.inner.write_file_synced(path, bytes)
    }

    fn read_file_limited(&self, path: &Path, limit_bytes: u64) -> Result<Vec<u8>, StorageError> {
        self.inner.read_file_limited(path, limit_bytes)
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.inner.read_at(path, offset, len)
    }
}

/// A data file of a [`DelayedStorage`], with its delays decided when it was
/// created or opened.
struct DelayedDataFile {
    inner: Box<dyn DataFile>,
    shared: Arc<Shared>,
    write_delay: Duration,
    read_delay: Duration,
    sync_delay: Duration,
}

impl std::fmt::Debug for DelayedDataFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayedDataFile")
            .field("backend", &self.inner.backend())
            .field("in_flight", &self.inner.in_flight())
            .field("write_delay", &self.write_delay)
            .field("read_delay", &self.read_delay)
            .field("sync_delay", &self.sync_delay)
            .finish_non_exhaustive()
    }
}

impl DataFile for DelayedDataFile {
    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn submit(&mut self, op: IoOp) {
        self.shared.serve(match op.kind {
            OpKind::Write => self.write_delay,
            OpKind::Read => self.read_delay,
        });
        self.inner.submit(op);
    }

    fn reap(&mut self, at_least: usize) -> Result<Vec<Completion>, StorageError> {
        self.inner.reap(at_least)
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        self.inner.set_len(len)
    }

    fn sync_data(&mut self) -> Result<(), StorageError> {
        self.shared.serve(self.sync_delay);
        self.inner.sync_data()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use std::path::PathBuf;
    use std::time::Instant;

    use super::*;
    use crate::buffer_pool::BufferPool;
    use crate::storage::IoBuf;
    use crate::storage::os::tests::soon;
    use crate::storage::sim::SimStorage;

    const DELAY: Duration = Duration::from_millis(150);

    fn root() -> PathBuf {
        PathBuf::from("/store")
    }

    fn delayed(specs: Vec<DelaySpec>) -> DelayedStorage {
        DelayedStorage::new(Arc::new(SimStorage::new(&root())), specs)
    }

    fn spec(op: DelayedOp, first_n: Option<u64>) -> DelaySpec {
        DelaySpec {
            op,
            delay_ms: u64::try_from(DELAY.as_millis()).expect("ms"),
            first_n,
        }
    }

    /// Creates data file `name`, writes one block and syncs it; returns how
    /// long the write and the sync took.
    fn snapshot(storage: &DelayedStorage, pool: &BufferPool, name: &str) -> (Duration, Duration) {
        let mut file = storage
            .create_data_file(&root().join(name), 4096, 2)
            .expect("create");
        let started = Instant::now();
        file.submit(IoOp {
            kind: OpKind::Write,
            offset: 0,
            len: 4096,
            buf: IoBuf::Pooled(pool.lease(1, soon()).expect("lease").take().expect("buf")),
            tag: 0,
        });
        let done = file.reap(1).expect("reap");
        assert!(done.iter().all(|c| c.result.is_ok()));
        let wrote = started.elapsed();
        let started = Instant::now();
        file.sync_data().expect("fdatasync");
        (wrote, started.elapsed())
    }

    #[test]
    fn data_writes_of_the_first_snapshot_only_are_delayed() {
        let storage = delayed(vec![spec(DelayedOp::DataWrite, Some(1))]);
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        let (wrote, _) = snapshot(&storage, &pool, "a");
        assert!(wrote >= DELAY, "{wrote:?}");
        assert_eq!(storage.delays_applied(), 1);
        snapshot(&storage, &pool, "b");
        assert_eq!(
            storage.delays_applied(),
            1,
            "the second snapshot is not delayed"
        );
    }

    #[test]
    fn fdatasync_of_the_first_two_snapshots_is_delayed_and_others_run_at_once() {
        let storage = delayed(vec![spec(DelayedOp::SyncData, Some(2))]);
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        for (n, name) in ["a", "b"].into_iter().enumerate() {
            let (_, synced) = snapshot(&storage, &pool, name);
            assert!(synced >= DELAY, "{name}: {synced:?}");
            assert_eq!(storage.delays_applied(), u64::try_from(n + 1).expect("n"));
        }
        snapshot(&storage, &pool, "c");
        assert_eq!(storage.delays_applied(), 2);
        // The data went through unchanged.
        assert_eq!(
            storage
                .read_file_limited(&root().join("c"), 8192)
                .expect("read")
                .len(),
            4096
        );
    }

    #[test]
    fn per_call_operations_count_their_calls_and_delays_add_up() {
        let storage = delayed(vec![
            spec(DelayedOp::Rename, Some(1)),
            spec(DelayedOp::Rename, None),
            spec(DelayedOp::SyncDir, None),
        ]);
        storage.create_dir(&root().join("a")).expect("mkdir");
        let started = Instant::now();
        storage
            .rename(&root().join("a"), &root().join("b"))
            .expect("rename");
        assert!(started.elapsed() >= 2 * DELAY, "both rename specs apply");
        assert_eq!(storage.delays_applied(), 1, "one delay per operation");
        storage
            .rename(&root().join("b"), &root().join("c"))
            .expect("rename");
        assert_eq!(storage.delays_applied(), 2);
        storage.sync_dir(&root()).expect("fsync");
        assert_eq!(storage.delays_applied(), 3);
        // Operations no spec names are never delayed.
        storage
            .write_file_synced(&root().join("m"), b"m")
            .expect("write");
        storage.metadata(&root().join("m")).expect("stat");
        assert_eq!(storage.delays_applied(), 3);
        assert_eq!(storage.backend(), BackendKind::Buffered);
    }

    #[test]
    fn reads_are_delayed_per_file_opened() {
        let storage = delayed(vec![spec(DelayedOp::DataRead, Some(1))]);
        storage
            .write_file_synced(&root().join("m"), &[1; 100])
            .expect("write");
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        for expected in [1, 1] {
            let mut file = storage.open_data_file(&root().join("m"), 1).expect("open");
            file.submit(IoOp {
                kind: OpKind::Read,
                offset: 0,
                len: 4096,
                buf: IoBuf::Pooled(pool.lease(1, soon()).expect("lease").take().expect("buf")),
                tag: 0,
            });
            let done = file.reap(1).expect("reap");
            assert_eq!(done[0].result.as_ref().expect("read"), &100);
            assert_eq!(storage.delays_applied(), expected);
        }
    }

    #[test]
    fn specs_come_from_a_config_table() {
        #[derive(Deserialize)]
        struct Table {
            delay: Vec<DelaySpec>,
        }
        let table: Table = toml::from_str(
            r#"
            delay = [
                { op = "sync_data", delay_ms = 2000, first_n = 1 },
                { op = "data_write", delay_ms = 5 },
            ]
            "#,
        )
        .expect("parse");
        assert_eq!(
            table.delay,
            [
                DelaySpec {
                    op: DelayedOp::SyncData,
                    delay_ms: 2000,
                    first_n: Some(1)
                },
                DelaySpec {
                    op: DelayedOp::DataWrite,
                    delay_ms: 5,
                    first_n: None
                },
            ]
        );
        assert_eq!(table.delay[0].delay(), Duration::from_secs(2));
        for bad in [
            r#"delay = [{ op = "sync_data", delay_ms = 1, extra = 2 }]"#,
            r#"delay = [{ op = "fsync_everything", delay_ms = 1 }]"#,
            r#"delay = [{ op = "sync_data" }]"#,
        ] {
            assert!(toml::from_str::<Table>(bad).is_err(), "{bad}");
        }
    }
}

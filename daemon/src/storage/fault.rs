//! A storage wrapper that fails chosen operations, for testing how the store
//! handles ENOSPC, EIO and friends.
//!
//! [`FaultyStorage`] delegates everything to the storage it wraps except the
//! operations its [`FaultPlan`] names, which fail with the planned errno and
//! have no effect. Every injected failure is counted
//! ([`FaultyStorage::faults_fired`]) so a test can check that the fault it
//! meant to exercise really fired.
//!
//! An injected write or read failure keeps the buffer-ownership rule: the op
//! is parked with its error on an internal queue, counts as in flight, and
//! comes back (buffer and all) from the next `reap`, merged with the inner
//! file's completions. An injected reap failure returns the error and
//! leaves everything in flight where it is: the inner file's own `Drop`
//! waits for it when the data file is dropped.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{
    BackendKind, Completion, DataFile, DirEntry, IoOp, Metadata, OpKind, Storage, StorageError,
};

/// Which operations fail, and with which errno. `Default` fails nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// `(n, errno)`: the n-th (0-based) write submitted to any data file of
    /// this storage completes with `errno` without being performed; later
    /// writes proceed normally.
    pub fail_write_at: Option<(u64, i32)>,
    /// `n`: the n-th (0-based) write submitted to any data file of this
    /// storage (counted with `fail_write_at`) completes reporting half its
    /// bytes moved, without being performed: a short write.
    pub short_write_at: Option<u64>,
    /// `(n, errno)`: the n-th (0-based) read submitted to any data file of
    /// this storage completes with `errno` without being performed.
    pub fail_read_at: Option<(u64, i32)>,
    /// Every `DataFile::reap` fails with this errno, as a ring whose
    /// `io_uring_enter` keeps failing would.
    pub fail_reap: Option<i32>,
    /// Every `DataFile::sync_data` (fdatasync) fails with this errno.
    pub fail_sync_data: Option<i32>,
    /// Every `write_file_synced` (the manifest write) fails with this errno.
    pub fail_write_file_synced: Option<i32>,
    /// Every `create_data_file` (open + fallocate) fails with this errno.
    pub fail_create_data_file: Option<i32>,
    /// Every `rename` fails with this errno.
    pub fail_rename: Option<i32>,
    /// Every `sync_dir` (directory fsync) fails with this errno.
    pub fail_sync_dir: Option<i32>,
}

/// State shared by a [`FaultyStorage`], its clones and its data files.
#[derive(Debug, Default)]
struct Shared {
    plan: Mutex<FaultPlan>,
    /// Writes submitted since the plan was set.
    writes_submitted: AtomicU64,
    /// Reads submitted since the plan was set.
    reads_submitted: AtomicU64,
    faults_fired: AtomicU64,
}

impl Shared {
    fn plan(&self) -> FaultPlan {
        self.plan
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// If `errno` is planned, counts the fault and returns its error.
    fn fire(&self, op: &'static str, path: &Path, errno: Option<i32>) -> Result<(), StorageError> {
        match errno {
            Some(code) => {
                self.faults_fired.fetch_add(1, Ordering::SeqCst);
                tracing::debug!(op, path = %path.display(), code, "injected storage fault");
                Err(StorageError::io(
                    op,
                    path,
                    io::Error::from_raw_os_error(code),
                ))
            }
            None => Ok(()),
        }
    }
}

/// Wraps a storage and fails the operations of a [`FaultPlan`]. Clones share
/// the plan and the counters.
#[derive(Debug, Clone)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    shared: Arc<Shared>,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn Storage>, plan: FaultPlan) -> Self {
        FaultyStorage {
            inner,
            shared: Arc::new(Shared {
                plan: Mutex::new(plan),
                ..Shared::default()
            }),
        }
    }

    /// Replaces the plan (for this storage, its clones and data files already
    /// open) and restarts the write and read counts, so `fail_write_at` and
    /// `fail_read_at` count from now. The count of faults fired is kept.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut current = self
            .shared
            .plan
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *current = plan;
        self.shared.writes_submitted.store(0, Ordering::SeqCst);
        self.shared.reads_submitted.store(0, Ordering::SeqCst);
    }

    /// The plan in force.
    pub fn plan(&self) -> FaultPlan {
        self.shared.plan()
    }

    /// Failures injected so far.
    pub fn faults_fired(&self) -> u64 {
        self.shared.faults_fired.load(Ordering::SeqCst)
    }

    /// Writes submitted to data files of this storage since the plan was set
    /// (injected failures included).
    pub fn writes_submitted(&self) -> u64 {
        self.shared.writes_submitted.load(Ordering::SeqCst)
    }

    fn wrap(&self, inner: Box<dyn DataFile>, path: &Path) -> Box<dyn DataFile> {
        Box::new(FaultyDataFile {
            inner,
            shared: Arc::clone(&self.shared),
            path: path.to_path_buf(),
            injected: VecDeque::new(),
        })
    }
}

impl Storage for FaultyStorage {
    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }

    fn create_dir(&self, path: &Path) -> Result<(), StorageError> {
        self.inner.create_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> Result<(), StorageError> {
        let plan = self.shared.plan();
        self.shared
            .fire("fsync directory", path, plan.fail_sync_dir)?;
        self.inner.sync_dir(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        let plan = self.shared.plan();
        self.shared.fire("rename", from, plan.fail_rename)?;
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
        let plan = self.shared.plan();
        self.shared
            .fire("create data file", path, plan.fail_create_data_file)?;
        let file = self.inner.create_data_file(path, len_bytes, queue_depth)?;
        Ok(self.wrap(file, path))
    }

    fn open_data_file(
        &self,
        path: &Path,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError> {
        let file = self.inner.open_data_file(path, queue_depth)?;
        Ok(self.wrap(file, path))
    }

    fn write_file_synced(&self, path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
        let plan = self.shared.plan();
        self.shared
            .fire("write synced file", path, plan.fail_write_file_synced)?;
        self.inner.write_file_synced(path, bytes)
    }

    fn read_file_limited(&self, path: &Path, limit_bytes: u64) -> Result<Vec<u8>, StorageError> {
        self.inner.read_file_limited(path, limit_bytes)
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StorageError> {
        self.inner.read_at(path, offset, len)
    }
}

/// A data file of a [`FaultyStorage`]: the inner file plus the completions
/// of writes failed here, waiting for `reap`.
struct FaultyDataFile {
    inner: Box<dyn DataFile>,
    shared: Arc<Shared>,
    path: PathBuf,
    injected: VecDeque<Completion>,
}

impl std::fmt::Debug for FaultyDataFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyDataFile")
            .field("backend", &self.inner.backend())
            .field("path", &self.path)
            .field("inner_in_flight", &self.inner.in_flight())
            .field("injected", &self.injected.len())
            .finish()
    }
}

impl DataFile for FaultyDataFile {
    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.injected.len()
    }

    fn submit(&mut self, op: IoOp) {
        let plan = self.shared.plan();
        let (count, planned) = match op.kind {
            OpKind::Write => (&self.shared.writes_submitted, plan.fail_write_at),
            OpKind::Read => (&self.shared.reads_submitted, plan.fail_read_at),
        };
        let n = count.fetch_add(1, Ordering::SeqCst);
        if op.kind == OpKind::Write && plan.short_write_at == Some(n) {
            self.shared.faults_fired.fetch_add(1, Ordering::SeqCst);
            tracing::debug!(path = %self.path.display(), n, "injected short write");
            let half = op.len / 2;
            self.injected.push_back(Completion {
                op,
                result: Ok(half),
            });
            return;
        }
        if let Some((at, code)) = planned
            && at == n
        {
            self.shared.faults_fired.fetch_add(1, Ordering::SeqCst);
            tracing::debug!(
                path = %self.path.display(),
                kind = ?op.kind,
                n,
                code,
                "injected transfer failure"
            );
            self.injected.push_back(Completion {
                op,
                result: Err(io::Error::from_raw_os_error(code)),
            });
            return;
        }
        self.inner.submit(op);
    }

    fn reap(&mut self, at_least: usize) -> Result<Vec<Completion>, StorageError> {
        let plan = self.shared.plan();
        self.shared.fire("reap", &self.path, plan.fail_reap)?;
        let mut done: Vec<Completion> = self.injected.drain(..).collect();
        let wanted = at_least.saturating_sub(done.len());
        match self.inner.reap(wanted) {
            Ok(more) => done.extend(more),
            Err(e) => {
                // Keep what was reaped for the next call.
                self.injected.extend(done);
                return Err(e);
            }
        }
        Ok(done)
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        self.inner.set_len(len)
    }

    fn sync_data(&mut self) -> Result<(), StorageError> {
        let plan = self.shared.plan();
        self.shared
            .fire("fdatasync", &self.path, plan.fail_sync_data)?;
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
    use super::*;
    use crate::buffer_pool::{BufferPool, PoolBuf};
    use crate::storage::IoBuf;
    use crate::storage::os::tests::soon;
    use crate::storage::sim::SimStorage;

    fn root() -> PathBuf {
        PathBuf::from("/store")
    }

    fn setup(plan: FaultPlan) -> (SimStorage, FaultyStorage) {
        let sim = SimStorage::new(&root());
        let faulty = FaultyStorage::new(Arc::new(sim.clone()), plan);
        (sim, faulty)
    }

    fn errno_of<T>(r: Result<T, StorageError>) -> Option<i32> {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.raw_os_error(),
        }
    }

    fn write_op(mut buf: PoolBuf, fill: u8, block: u64) -> IoOp {
        buf.space_mut().fill(fill);
        IoOp {
            kind: OpKind::Write,
            offset: block * 4096,
            len: 4096,
            buf: IoBuf::Pooled(buf),
            tag: block,
        }
    }

    fn into_pool_buf(c: Completion) -> PoolBuf {
        match c.op.buf {
            IoBuf::Pooled(b) => b,
            IoBuf::Borrowed(_) => panic!("pool buffer did not come back"),
        }
    }

    #[test]
    fn default_plan_fails_nothing_and_delegates() {
        let (sim, faulty) = setup(FaultPlan::default());
        assert_eq!(faulty.backend(), BackendKind::Buffered);
        let dir = root().join("d");
        faulty.create_dir(&dir).expect("mkdir");
        faulty
            .write_file_synced(&dir.join("m"), b"m")
            .expect("write");
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        let mut lease = pool.lease(1, soon()).expect("lease");
        let mut file = faulty
            .create_data_file(&dir.join("data"), 4096, 2)
            .expect("create");
        assert_eq!(file.backend(), BackendKind::Buffered);
        assert_eq!(file.queue_depth(), 2);
        file.submit(write_op(lease.take().expect("buf"), 5, 0));
        let done = file.reap(1).expect("reap");
        assert_eq!(done.len(), 1);
        assert!(done.iter().all(|c| c.result.is_ok()));
        file.sync_data().expect("fdatasync");
        faulty.sync_dir(&dir).expect("fsync");
        faulty.rename(&dir, &root().join("e")).expect("rename");
        faulty.sync_dir(&root()).expect("fsync");
        assert_eq!(faulty.faults_fired(), 0);
        assert_eq!(faulty.writes_submitted(), 1);
        let image = sim.durable_image();
        assert_eq!(
            image
                .read_file_limited(&root().join("e/data"), 8192)
                .expect("read"),
            vec![5; 4096]
        );
        assert!(
            faulty
                .metadata(&root().join("e/m"))
                .expect("stat")
                .is_some()
        );
        assert_eq!(faulty.read_dir(&root()).expect("read_dir").len(), 1);
    }

    #[test]
    fn nth_write_across_files_fails_once_and_returns_its_buffer() {
        let (sim, faulty) = setup(FaultPlan {
            fail_write_at: Some((2, libc::ENOSPC)),
            ..FaultPlan::default()
        });
        let pool = BufferPool::new(4 * 4096, 4096).expect("pool");
        let mut lease = pool.lease(2, soon()).expect("lease");
        let mut a = faulty
            .create_data_file(&root().join("a"), 0, 2)
            .expect("create a");
        let mut b = faulty
            .create_data_file(&root().join("b"), 0, 2)
            .expect("create b");

        // Writes 0 and 1 go to `a` and succeed.
        for block in 0..2 {
            a.submit(write_op(lease.take().expect("buf"), 1, block));
        }
        for c in a.reap(2).expect("reap") {
            assert_eq!(c.result.as_ref().expect("write"), &4096);
            lease.put_back(into_pool_buf(c));
        }
        // Write 2 (the first to `b`) fails; write 3 succeeds.
        b.submit(write_op(lease.take().expect("buf"), 2, 0));
        b.submit(write_op(lease.take().expect("buf"), 3, 1));
        assert_eq!(b.in_flight(), 2);
        assert_eq!(faulty.faults_fired(), 1);
        let mut done = b.reap(2).expect("reap");
        assert_eq!(b.in_flight(), 0);
        assert_eq!(done.len(), 2);
        done.sort_by_key(|c| c.op.tag);
        let [failed, ok] = [done.remove(0), done.remove(0)];
        assert_eq!(failed.op.tag, 0);
        assert_eq!(
            failed.result.as_ref().expect_err("injected").raw_os_error(),
            Some(libc::ENOSPC)
        );
        assert_eq!(ok.result.as_ref().expect("write 3"), &4096);
        // The failed write was not performed: block 0 of `b` is zeros.
        assert_eq!(
            sim.read_at(&root().join("b"), 0, 4096).expect("read"),
            vec![0; 4096]
        );
        assert_eq!(sim.read_at(&root().join("b"), 4096, 1).expect("read"), [3]);
        lease.put_back(into_pool_buf(failed));
        lease.put_back(into_pool_buf(ok));
        assert_eq!(lease.len(), 2);
        assert_eq!(faulty.writes_submitted(), 4);
        assert_eq!(faulty.faults_fired(), 1);
    }

    #[test]
    fn nth_read_fails_once_and_a_failing_reap_keeps_everything_in_flight() {
        let (sim, faulty) = setup(FaultPlan {
            fail_read_at: Some((1, libc::EIO)),
            ..FaultPlan::default()
        });
        sim.write_file_synced(&root().join("m"), &[7; 8192])
            .expect("write");
        let pool = BufferPool::new(4 * 4096, 4096).expect("pool");
        let mut lease = pool.lease(2, soon()).expect("lease");
        let mut file = faulty.open_data_file(&root().join("m"), 2).expect("open");
        for block in 0..2 {
            file.submit(IoOp {
                kind: OpKind::Read,
                offset: block * 4096,
                len: 4096,
                buf: IoBuf::Pooled(lease.take().expect("buf")),
                tag: block,
            });
        }
        assert_eq!(faulty.faults_fired(), 1);
        faulty.set_plan(FaultPlan {
            fail_reap: Some(libc::EIO),
            ..FaultPlan::default()
        });
        let err = file.reap(2).expect_err("reap fails");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(file.in_flight(), 2, "nothing was returned");
        faulty.set_plan(FaultPlan::default());
        let mut done = file.reap(2).expect("reap");
        done.sort_by_key(|c| c.op.tag);
        assert_eq!(done[0].result.as_ref().expect("read 0"), &4096);
        assert_eq!(
            done[1].result.as_ref().expect_err("read 1").raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(faulty.faults_fired(), 2);
    }

    #[test]
    fn reads_are_not_counted_as_writes() {
        let (sim, faulty) = setup(FaultPlan {
            fail_write_at: Some((0, libc::EIO)),
            ..FaultPlan::default()
        });
        sim.write_file_synced(&root().join("m"), b"abc")
            .expect("write");
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        let mut lease = pool.lease(1, soon()).expect("lease");
        let mut file = faulty.open_data_file(&root().join("m"), 1).expect("open");
        file.submit(IoOp {
            kind: OpKind::Read,
            offset: 0,
            len: 4096,
            buf: IoBuf::Pooled(lease.take().expect("buf")),
            tag: 9,
        });
        let mut done = file.reap(1).expect("reap");
        let c = done.pop().expect("completion");
        assert_eq!(c.result.as_ref().expect("read"), &3);
        assert_eq!(&into_pool_buf(c).space_mut()[..3], b"abc");
        assert_eq!(faulty.faults_fired(), 0);
        assert_eq!(faulty.writes_submitted(), 0);
    }

    #[test]
    fn sync_data_fails_every_time_and_nothing_becomes_durable() {
        let (sim, faulty) = setup(FaultPlan {
            fail_sync_data: Some(libc::EIO),
            ..FaultPlan::default()
        });
        let path = root().join("f");
        let mut file = faulty.create_data_file(&path, 4096, 1).expect("create");
        faulty.sync_dir(&root()).expect("fsync");
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        let mut lease = pool.lease(1, soon()).expect("lease");
        file.submit(write_op(lease.take().expect("buf"), 7, 0));
        assert!(file.reap(1).expect("reap").iter().all(|c| c.result.is_ok()));
        assert_eq!(errno_of(file.sync_data()), Some(libc::EIO));
        assert_eq!(errno_of(file.sync_data()), Some(libc::EIO));
        assert_eq!(faulty.faults_fired(), 2);
        let image = sim.durable_image();
        assert_eq!(image.read_file_limited(&path, 8192).expect("read"), b"");
    }

    #[test]
    fn namespace_faults_fire_count_and_change_nothing() {
        let (sim, faulty) = setup(FaultPlan {
            fail_write_file_synced: Some(libc::ENOSPC),
            fail_create_data_file: Some(libc::ENOSPC),
            fail_rename: Some(libc::EIO),
            fail_sync_dir: Some(libc::EIO),
            ..FaultPlan::default()
        });
        let dir = root().join("d");
        faulty
            .create_dir(&dir)
            .expect("mkdir is not planned to fail");
        assert_eq!(
            errno_of(faulty.write_file_synced(&dir.join("m"), b"x")),
            Some(libc::ENOSPC)
        );
        assert_eq!(
            errno_of(faulty.create_data_file(&dir.join("data"), 1 << 20, 4)),
            Some(libc::ENOSPC)
        );
        assert_eq!(errno_of(faulty.sync_dir(&dir)), Some(libc::EIO));
        assert_eq!(
            errno_of(faulty.rename(&dir, &root().join("e"))),
            Some(libc::EIO)
        );
        assert_eq!(faulty.faults_fired(), 4);
        assert!(sim.read_dir(&dir).expect("read_dir").is_empty());
        assert!(sim.metadata(&dir).expect("stat").is_some());
        assert_eq!(sim.metadata(&root().join("e")).expect("stat"), None);
        // The sim never saw the failed ops.
        assert_eq!(sim.ops_count(), 1);

        faulty.set_plan(FaultPlan::default());
        faulty
            .sync_dir(&root())
            .expect("fsync once the plan is cleared");
        assert_eq!(faulty.faults_fired(), 4);
        assert_eq!(faulty.plan(), FaultPlan::default());
    }

    #[test]
    fn set_plan_restarts_the_write_count() {
        let (_sim, faulty) = setup(FaultPlan::default());
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        let mut lease = pool.lease(1, soon()).expect("lease");
        let mut file = faulty
            .create_data_file(&root().join("f"), 0, 1)
            .expect("create");
        let mut buf = lease.take().expect("buf");
        for block in 0..3 {
            file.submit(write_op(buf, 1, block));
            let c = file.reap(1).expect("reap").pop().expect("completion");
            assert!(c.result.is_ok());
            buf = into_pool_buf(c);
        }
        faulty.set_plan(FaultPlan {
            fail_write_at: Some((0, libc::EIO)),
            ..FaultPlan::default()
        });
        file.submit(write_op(buf, 1, 3));
        let c = file.reap(1).expect("reap").pop().expect("completion");
        assert_eq!(
            c.result.expect_err("injected").raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(faulty.faults_fired(), 1);
    }
}

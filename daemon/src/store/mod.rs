//! Snapshots on disk.
//!
//! ```text
//! <root>/<job>/<rank>/step-<N>/          committed (renamed into place last)
//!     state.safetensors                  every tensor; any safetensors loader reads it
//!     MANIFEST.json                      sizes, tensor table, CRC32 per chunk, format version
//! <root>/<job>/<rank>/step-<N>.partial/  being written; removed at start-up, never read
//! ```
//!
//! Invariants:
//! * Nothing is listed or read whose manifest does not parse, obey every
//!   rule, and match its data file's length and header.
//! * No byte of a chunk is handed out before the chunk's CRC32 matches.
//! * A committed snapshot is never overwritten; retention never removes the
//!   newest listed snapshot of a (job, rank).
//! * Memory use is the I/O buffer pool, whatever the snapshot's size.
//! * Chunk CRCs are computed and checked only through the store's
//!   [`ChunkChecksum`] ([`Store::checksum`]; the CPU CRC32 by default), the
//!   seam where a GPU checksum kernel plugs in.
//! * Memory another process writes ([`Source::Shared`],
//!   [`Store::read_into_shared`]) is reached only through its
//!   [`SharedBytes`](crate::shared_memory::SharedBytes) handle, never as a
//!   Rust reference.
//!
//! The write path: the safetensors header and a data section's padded tail
//! go through pool buffers; the rest of a `Memory` or `Shared` source is
//! written with O_DIRECT straight from its memory (no copy), its CRC
//! computed meanwhile (over the slice for private memory, through the
//! handle's small bounce buffer for shared memory); a `Stream` source fills
//! pool buffers. The read path: chunks through pool buffers, checked before
//! they are handed out ([`Store::read`]), or O_DIRECT straight into the
//! destination, every chunk checked before Ok ([`Store::read_into`],
//! [`Store::read_into_shared`]).

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

mod catalog;
mod commit;
pub mod error;
pub mod layout;
pub mod manifest;
pub mod paths;
mod pipeline;
mod read;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gpusnap_kernels::{ChunkChecksum, CpuCrc32};
use gpusnap_proto::TensorSpec;
use serde::{Deserialize, Serialize};

use crate::buffer_pool::{BufferPool, IO_ALIGN_BYTES, Lease};
use crate::storage::Storage;
use crate::storage::os::OsStorage;
use crate::storage::probe::BackendChoice;

pub use catalog::{Invalid, Listing, RankStep};
pub use commit::{Committed, Source};
pub use error::{DirectReadBlocker, Fill, Sink, SourceError, StoreError};
pub use layout::{Layout, TensorEntry};
pub use manifest::{FormatVersion, Manifest};
pub use paths::SnapshotId;
pub use read::{Snapshot, VerifyReport};

/// The store's settings (the `[store]` table of the daemon's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory holding every job's snapshots.
    pub root: PathBuf,
    /// Committed snapshots kept per (job, rank); at least 1.
    pub keep_snapshots: usize,
    /// `auto` (io_uring, else pwrite, else buffered), or one forced.
    pub io_backend: BackendChoice,
    /// Transfers in flight per file.
    pub queue_depth: usize,
    /// Size of one I/O buffer, one transfer and one CRC32 chunk; a multiple
    /// of 4096.
    pub io_buffer_bytes: usize,
    /// Memory for all I/O buffers together (headers, padded tails, streamed
    /// sources, reads).
    pub io_pool_bytes: usize,
}

/// Longest a snapshot or a read waits for its I/O buffers while other
/// snapshots and reads hold them, before it fails with
/// [`PoolError::Timeout`](crate::buffer_pool::PoolError::Timeout): long
/// enough for another lane to finish a large snapshot, short of forever.
pub const POOL_WAIT_MAX: Duration = Duration::from_secs(300);

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            root: PathBuf::from("/var/lib/gpusnap"),
            keep_snapshots: 3,
            io_backend: BackendChoice::Auto,
            queue_depth: 32,
            io_buffer_bytes: 1 << 20,
            io_pool_bytes: 64 << 20,
        }
    }
}

impl StoreConfig {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |key: &str, why: String| Err(StoreError::Config(format!("store.{key}: {why}")));
        if self.keep_snapshots == 0 {
            return bad("keep_snapshots", "must be at least 1".into());
        }
        if !(1..=4096).contains(&self.queue_depth) {
            return bad(
                "queue_depth",
                format!("{} is not in 1..=4096", self.queue_depth),
            );
        }
        if self.io_buffer_bytes == 0
            || !self.io_buffer_bytes.is_multiple_of(IO_ALIGN_BYTES)
            || self.io_buffer_bytes > (64 << 20)
        {
            return bad(
                "io_buffer_bytes",
                format!(
                    "{} is not a multiple of 4096 between 4096 and 64 MiB",
                    self.io_buffer_bytes
                ),
            );
        }
        if self.io_pool_bytes / self.io_buffer_bytes < 4 || self.io_pool_bytes > (1 << 30) {
            return bad(
                "io_pool_bytes",
                format!(
                    "{} must hold at least 4 I/O buffers and be at most 1 GiB",
                    self.io_pool_bytes
                ),
            );
        }
        if !self.root.is_absolute() {
            return bad(
                "root",
                format!("{} is not an absolute path", self.root.display()),
            );
        }
        Ok(())
    }
}

/// A step of the commit protocol, reported to the stop-point hook (tests use
/// it to kill a writer at each step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommitStep {
    PartialCreated,
    DataWritten,
    DataSynced,
    ManifestSynced,
    PartialDirSynced,
    Renamed,
    Committed,
}

impl CommitStep {
    pub const ALL: [CommitStep; 7] = [
        CommitStep::PartialCreated,
        CommitStep::DataWritten,
        CommitStep::DataSynced,
        CommitStep::ManifestSynced,
        CommitStep::PartialDirSynced,
        CommitStep::Renamed,
        CommitStep::Committed,
    ];
}

/// Who makes job directories (`<root>/<job>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobDirs {
    /// A commit makes a missing job directory itself (benchmarks, tests,
    /// stores written without the daemon's ownership claims). The default.
    MadeByCommits,
    /// Only an ownership claim makes one (the daemon: `crate::owners`, which
    /// puts the OWNER inside first). A commit whose job directory is missing
    /// fails with [`StoreError::JobMissing`] instead of making a job without
    /// an owner, which everyone would then be refused.
    Claimed,
}

/// Called at each commit step; `None` in production.
pub type StopPoint = Arc<dyn Fn(&SnapshotId, CommitStep) + Send + Sync>;

/// The snapshot store of one root directory.
pub struct Store {
    config: StoreConfig,
    storage: Arc<dyn Storage>,
    pool: BufferPool,
    stop_point: Option<StopPoint>,
    writing: Mutex<HashSet<SnapshotId>>,
    format: FormatVersion,
    checksum: Arc<dyn ChunkChecksum>,
    pool_wait: Duration,
    job_dirs: JobDirs,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.config.root)
            .field("backend", &self.storage.backend())
            .field("format", &self.format)
            .field("checksum", &self.checksum.name())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store on the real file system: makes the root if missing,
    /// chooses the I/O backend (logged with its reason), and runs start-up
    /// recovery.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        Store::open_wrapped(config, |real| real)
    }

    /// As [`Store::open`], with the real storage wrapped by `wrap` (the
    /// daemon's test-only latency backend:
    /// `|s| Arc::new(DelayedStorage::new(s, specs))`).
    pub fn open_wrapped(
        config: StoreConfig,
        wrap: impl FnOnce(Arc<dyn Storage>) -> Arc<dyn Storage>,
    ) -> Result<Store, StoreError> {
        config.validate()?;
        let pool = BufferPool::new(config.io_pool_bytes, config.io_buffer_bytes)?;
        let storage = OsStorage::open(&config.root, config.io_backend, pool.clone())?;
        Store::with_storage(config, wrap(Arc::new(storage)), pool)
    }

    /// Opens the store for reading only (the CLI's `inspect` and `verify`):
    /// no recovery, nothing written, buffered reads (no probe file is made).
    pub fn open_read_only(mut config: StoreConfig) -> Result<Store, StoreError> {
        config.io_backend = BackendChoice::Buffered;
        config.validate()?;
        let pool = BufferPool::new(config.io_pool_bytes, config.io_buffer_bytes)?;
        let storage = OsStorage::open(&config.root, config.io_backend, pool.clone())?;
        Ok(Store::assemble(config, Arc::new(storage), pool))
    }

    /// Opens the store over any storage (tests: faults, power loss), and
    /// runs start-up recovery.
    pub fn with_storage(
        config: StoreConfig,
        storage: Arc<dyn Storage>,
        pool: BufferPool,
    ) -> Result<Store, StoreError> {
        config.validate()?;
        if pool.buf_bytes() != config.io_buffer_bytes {
            return Err(StoreError::Config(format!(
                "store.io_buffer_bytes: {} but the pool's buffers are {}",
                config.io_buffer_bytes,
                pool.buf_bytes()
            )));
        }
        let store = Store::assemble(config, storage, pool);
        store.recover()?;
        Ok(store)
    }

    fn assemble(config: StoreConfig, storage: Arc<dyn Storage>, pool: BufferPool) -> Store {
        Store {
            config,
            storage,
            pool,
            stop_point: None,
            writing: Mutex::new(HashSet::new()),
            format: FormatVersion::CURRENT,
            checksum: Arc::new(CpuCrc32),
            pool_wait: POOL_WAIT_MAX,
            job_dirs: JobDirs::MadeByCommits,
        }
    }

    /// Installs a hook called at each commit step.
    pub fn set_stop_point(&mut self, hook: StopPoint) {
        self.stop_point = Some(hook);
    }

    /// The manifest versions this store reads and the one it writes.
    pub fn format(&self) -> FormatVersion {
        self.format
    }

    /// Makes this store read and write as a build of `format` would (tests
    /// simulate a format bump with it; production keeps
    /// [`FormatVersion::CURRENT`]).
    pub fn set_format(&mut self, format: FormatVersion) {
        self.format = format;
    }

    /// The chunk checksum every commit and read goes through; the hot tier
    /// uses the same.
    pub fn checksum(&self) -> &Arc<dyn ChunkChecksum> {
        &self.checksum
    }

    /// Sets who makes job directories ([`JobDirs::MadeByCommits`] unless
    /// set; the daemon sets [`JobDirs::Claimed`]).
    pub fn set_job_dirs(&mut self, job_dirs: JobDirs) {
        self.job_dirs = job_dirs;
    }

    pub fn job_dirs(&self) -> JobDirs {
        self.job_dirs
    }

    /// Sets how long a snapshot or a read waits for pool buffers
    /// ([`POOL_WAIT_MAX`] unless set).
    pub fn set_pool_wait(&mut self, wait: Duration) {
        self.pool_wait = wait;
    }

    /// Replaces the chunk checksum (a GPU kernel, or a test's counting
    /// one). It must compute exactly the CRC32 of
    /// `gpusnap_kernels::reference`, or every snapshot reads as corrupt.
    pub fn set_checksum(&mut self, checksum: Arc<dyn ChunkChecksum>) {
        self.checksum = checksum;
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// Writes, commits and applies retention to one snapshot of `tensors`
    /// whose bytes come from `source`. Returns once the snapshot is durable.
    pub fn write_snapshot(
        &self,
        id: &SnapshotId,
        tensors: &[TensorSpec],
        world_size: u32,
        source: Source<'_>,
    ) -> Result<Committed, StoreError> {
        paths::validate_job(&id.job)?;
        let layout = Layout::plan(tensors)?;
        self.write_laid_out(id, &layout, world_size, source)
    }

    /// As [`Store::write_snapshot`], for a layout planned once and reused
    /// (a staging area is laid out at registration).
    pub fn write_laid_out(
        &self,
        id: &SnapshotId,
        layout: &Layout,
        world_size: u32,
        source: Source<'_>,
    ) -> Result<Committed, StoreError> {
        let committed = self.commit_laid_out(id, layout, world_size, source)?;
        self.apply_retention(&id.job, id.rank);
        Ok(committed)
    }

    /// Writes and commits one snapshot, as [`Store::write_laid_out`], but
    /// applies no retention: the caller runs [`Store::apply_retention`]
    /// when it suits it (the persist engine: once the commit is reported
    /// and its write permit is back).
    pub fn commit_laid_out(
        &self,
        id: &SnapshotId,
        layout: &Layout,
        world_size: u32,
        source: Source<'_>,
    ) -> Result<Committed, StoreError> {
        let _writing = WritingGuard::claim(self, id)?;
        self.commit_snapshot(id, layout, world_size, source)
    }

    /// Retention for (job, rank) ([`Store::prune`]: the newest
    /// `keep_snapshots` listed snapshots stay, so the newest listed one is
    /// never removed); a failure is logged, and what it left stays until
    /// the next commit's retention.
    pub fn apply_retention(&self, job: &str, rank: u32) {
        if let Err(e) = self.prune(job, rank) {
            tracing::error!(job, rank, error = %e, "retention failed; older snapshots stay until the next commit");
        }
    }

    fn stop_point(&self, id: &SnapshotId, step: CommitStep) {
        if let Some(hook) = &self.stop_point {
            hook(id, step);
        }
    }

    /// `count` pool buffers, waiting at most the pool wait for them.
    pub(crate) fn lease(&self, count: usize) -> Result<Lease, StoreError> {
        Ok(self.pool.lease(count, Instant::now() + self.pool_wait)?)
    }
}

/// Marks a snapshot id as being written, so two writers never share a
/// partial directory.
struct WritingGuard<'s> {
    store: &'s Store,
    id: SnapshotId,
}

impl<'s> WritingGuard<'s> {
    fn claim(store: &'s Store, id: &SnapshotId) -> Result<Self, StoreError> {
        let mut writing = store.writing.lock().unwrap_or_else(PoisonError::into_inner);
        if !writing.insert(id.clone()) {
            return Err(StoreError::InProgress { id: id.clone() });
        }
        Ok(WritingGuard {
            store,
            id: id.clone(),
        })
    }
}

impl Drop for WritingGuard<'_> {
    fn drop(&mut self) {
        self.store
            .writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests;

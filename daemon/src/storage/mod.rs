//! The narrow storage interface the snapshot store is written against.
//!
//! [`Storage`] is the file system as the store uses it: directories, renames,
//! directory fsyncs, small whole files (manifests) and [`DataFile`]s, which
//! move big aligned blocks with many operations in flight. Backends:
//!
//! * [`os::OsStorage`]: the real file system; data files through io_uring
//!   (`uring`), or through one bounded pool of `pwrite`/`pread` worker
//!   threads per storage (`threaded`), with O_DIRECT, or with buffered I/O
//!   where O_DIRECT is refused. `probe` chooses, with a logged reason.
//! * [`fault::FaultyStorage`]: wraps any storage and fails chosen operations
//!   (ENOSPC mid-write, EIO on write, read, fdatasync, a short write, a reap
//!   that keeps failing, ...).
//! * [`sim::SimStorage`]: in memory, with a durable image beside the live one
//!   that only fsync/fdatasync move data into; cut at any operation to test
//!   power loss.
//! * [`delay::DelayedStorage`]: wraps any storage and delays chosen
//!   operations (the data writes or the fdatasync of the first N snapshots),
//!   so tests of timing-dependent behaviour are deterministic.
//!
//! Buffer ownership: an [`IoOp`] carries its buffer into the backend and the
//! [`Completion`] carries it back, so a buffer is never reused while the
//! kernel may still touch it.
//!
//! Every wait is bounded. [`DataFile::reap`] returns an error when no
//! completion arrives for [`IO_STALL_MAX`] or the backend cannot wait at
//! all (a failing `io_uring_enter`, workers gone); the store then fails the
//! snapshot. A data file's `Drop` waits for its operations in flight, at most
//! [`IO_STALL_MAX`] without progress; operations still running after that
//! are abandoned (`abandon_in_flight`): pool buffers are leaked, never
//! reused. If any of them is on borrowed memory ([`IoBuf::Borrowed`]: a
//! write from a staging slot or a caller's slice, a read into a restore
//! destination), the kernel or a worker may still read or write memory whose
//! owner takes it back (and may free or unmap it) as soon as the data file
//! is gone, so the process aborts: the one bounded answer that keeps that
//! memory sound. Whoever lends memory to a data file can therefore rely on
//! this: once the data file is dropped, no operation touches the memory
//! any more, or the process is gone.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod beneath;
pub mod delay;
pub mod fault;
pub mod os;
pub mod probe;
pub mod root;
pub mod sim;
pub mod threaded;
pub mod uring;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::buffer_pool::PoolBuf;

/// Longest a data file waits for a completion before its `reap` fails, and
/// longest its `Drop` waits without progress for its operations in flight.
pub const IO_STALL_MAX: Duration = Duration::from_secs(60);

/// How a data file's bytes reach the disk. Recorded in every manifest, so
/// only real backends are values here: the test file systems report the
/// backend they imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// io_uring, O_DIRECT, registered file and pool buffers.
    IoUring,
    /// The storage's pool of `pwrite`/`pread` worker threads, with O_DIRECT.
    Pwrite,
    /// The same pool through the page cache, then fdatasync.
    Buffered,
}

impl BackendKind {
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::IoUring => "io_uring",
            BackendKind::Pwrite => "pwrite",
            BackendKind::Buffered => "buffered",
        }
    }

    /// Whether data files bypass the page cache (O_DIRECT).
    pub const fn is_direct(self) -> bool {
        matches!(self, BackendKind::IoUring | BackendKind::Pwrite)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the storage layer. Each names the operation and the path; an
/// OS error is kept as it came (its errno intact), with the context beside
/// it as fields.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {}{}{}: {source}", path.display(), at_offset(*.offset), to_other(.other.as_deref()))]
    Io {
        op: &'static str,
        path: PathBuf,
        /// The file offset of a positioned transfer.
        offset: Option<u64>,
        /// The second path of a two-path operation (a rename's target).
        other: Option<PathBuf>,
        #[source]
        source: io::Error,
    },
    #[error("{path} is {len} bytes, more than the {limit_bytes}-byte limit for this file")]
    TooLarge {
        path: PathBuf,
        len: u64,
        limit_bytes: u64,
    },
    #[error(
        "{path}: the file is dead after an earlier failed write or sync; it is never written again"
    )]
    Dead { path: PathBuf },
    #[error("I/O backend {backend} is not available here: {reason}")]
    BackendUnavailable {
        backend: BackendKind,
        reason: String,
    },
    #[error(
        "{path}: no completion for {waited:?} with {in_flight} operation(s) in flight; the file is given up"
    )]
    Stalled {
        path: PathBuf,
        in_flight: usize,
        waited: Duration,
    },
    #[error("{path}: the I/O worker threads are gone with {in_flight} operation(s) in flight")]
    WorkersGone { path: PathBuf, in_flight: usize },
    /// A path resolved beneath the store root ([`beneath`]): a refusal (a
    /// symbolic link in the way, a path leaving the root), a kernel without
    /// `openat2`, or the OS error of the operation.
    #[error(transparent)]
    Beneath(#[from] beneath::BeneathError),
    /// The store root was removed from under the running daemon
    /// ([`root`]): nothing is at its path now (`ENOENT`), or what is there
    /// cannot be opened. Never "not found": the path asked about is not
    /// known to be absent, the whole store is.
    #[error(transparent)]
    Root(#[from] root::RootError),
}

fn at_offset(offset: Option<u64>) -> String {
    offset.map_or_else(String::new, |o| format!(" at offset {o}"))
}

fn to_other(other: Option<&Path>) -> String {
    other.map_or_else(String::new, |p| format!(" to {}", p.display()))
}

impl StorageError {
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.to_path_buf(),
            offset: None,
            other: None,
            source,
        }
    }

    /// An error of a positioned transfer at `offset` of `path`.
    pub fn io_at(op: &'static str, path: &Path, offset: u64, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.to_path_buf(),
            offset: Some(offset),
            other: None,
            source,
        }
    }

    /// An error of an operation on two paths (rename `from` to `to`).
    pub fn io_between(op: &'static str, from: &Path, to: &Path, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: from.to_path_buf(),
            offset: None,
            other: Some(to.to_path_buf()),
            source,
        }
    }

    /// The OS error behind this one, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error(),
            StorageError::TooLarge { .. }
            | StorageError::Dead { .. }
            | StorageError::BackendUnavailable { .. }
            | StorageError::Stalled { .. }
            | StorageError::WorkersGone { .. } => None,
            StorageError::Beneath(e) => e.raw_os_error(),
            StorageError::Root(e) => e.raw_os_error(),
        }
    }

    /// Whether the path operated on does not exist (the operation's own
    /// `ENOENT`), which callers read as "nothing there" (an empty listing,
    /// nothing to remove). A removed store root ([`StorageError::Root`]) is
    /// not that, though its errno is `ENOENT`: it fails the operation.
    pub fn is_not_found(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            StorageError::Beneath(e) => e.is_not_found(),
            StorageError::Root(_)
            | StorageError::TooLarge { .. }
            | StorageError::Dead { .. }
            | StorageError::BackendUnavailable { .. }
            | StorageError::Stalled { .. }
            | StorageError::WorkersGone { .. } => false,
        }
    }
}

/// ftruncate of an open data file, the error naming the path.
pub(crate) fn set_file_len(
    file: &std::fs::File,
    path: &Path,
    len: u64,
) -> Result<(), StorageError> {
    file.set_len(len)
        .map_err(|e| StorageError::io("ftruncate", path, e))
}

/// fdatasync of an open data file, the error naming the path. Never retried:
/// after a failure the caller treats the file as dead.
pub(crate) fn sync_file_data(file: &std::fs::File, path: &Path) -> Result<(), StorageError> {
    file.sync_data()
        .map_err(|e| StorageError::io("fdatasync", path, e))
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
}

/// What the store needs to know of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    pub is_dir: bool,
    pub len: u64,
}

/// Memory the caller owns and guarantees to keep alive (and, for writes,
/// readable; for reads, writable and otherwise untouched) until the
/// operation using it completes. A write's memory need not hold still:
/// `Source::Shared` writes a staging slot the trainer may write meanwhile,
/// on purpose (the chunk CRCs expose a torn write).
#[derive(Debug)]
pub struct RawRegion {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a RawRegion is only an address range; whoever builds one promises
// (see `RawRegion::new`) that the memory stays valid until the operation using
// it completes, whichever thread performs that operation.
unsafe impl Send for RawRegion {}

impl RawRegion {
    /// # Safety
    /// `ptr..ptr+len` must stay valid for the whole operation this region is
    /// given to (until its `Completion` is returned or the data file is
    /// dropped): readable for writes, writable and not otherwise accessed for
    /// reads.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        RawRegion { ptr, len }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Logs, and gives up on, the operations of a data file that are still in
/// flight after its `Drop` waited as long as it may. Their pool buffers are
/// never freed or reused (the caller leaks them). If `borrowed` of them use
/// borrowed memory (a read into it or a write from it), the kernel (or a
/// worker) may still touch memory its owner takes back, frees or unmaps
/// once the data file is gone, and no bounded wait makes that sound: the
/// process aborts, and the supervisor restarts the daemon.
pub(crate) fn abandon_in_flight(path: &Path, in_flight: usize, borrowed: usize) {
    tracing::error!(
        path = %path.display(),
        in_flight,
        borrowed,
        "I/O operations did not complete within the bound; leaking their buffers"
    );
    if must_abort(borrowed) {
        tracing::error!(
            path = %path.display(),
            borrowed,
            "an operation on borrowed memory may still run after its owner frees that memory; aborting"
        );
        std::process::abort();
    }
}

/// Whether abandoning operations of which `borrowed` use borrowed memory
/// must abort the process: any one of them does, read or write.
const fn must_abort(borrowed: usize) -> bool {
    borrowed > 0
}

/// The memory an operation reads from (write) or fills (read).
#[derive(Debug)]
pub enum IoBuf {
    /// A pool buffer; the operation covers its first `len` bytes.
    Pooled(PoolBuf),
    /// Caller memory (a staging mapping, a restore destination).
    Borrowed(RawRegion),
}

impl IoBuf {
    pub fn as_ptr(&self) -> *const u8 {
        match self {
            IoBuf::Pooled(b) => b.as_ptr(),
            IoBuf::Borrowed(r) => r.as_ptr().cast_const(),
        }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            IoBuf::Pooled(b) => b.as_mut_ptr(),
            IoBuf::Borrowed(r) => r.as_ptr(),
        }
    }

    /// Bytes available at the pointer.
    pub fn capacity(&self) -> usize {
        match self {
            IoBuf::Pooled(b) => b.buf_bytes(),
            IoBuf::Borrowed(r) => r.len(),
        }
    }

    pub fn is_borrowed(&self) -> bool {
        matches!(self, IoBuf::Borrowed(_))
    }
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Write,
    Read,
}

/// One positioned transfer of `len` bytes between `buf` and the file at
/// `offset`. On data files opened with O_DIRECT, `offset`, `len` and the
/// buffer address are multiples of [`crate::buffer_pool::IO_ALIGN_BYTES`]
/// (the store asserts all three for every transfer, whatever the backend).
#[derive(Debug)]
pub struct IoOp {
    pub kind: OpKind,
    pub offset: u64,
    pub len: usize,
    pub buf: IoBuf,
    /// The caller's own label, returned unchanged in the completion.
    pub tag: u64,
}

impl IoOp {
    /// Whether the operation uses borrowed memory (read into or written
    /// from): memory its owner takes back once the data file is gone, which
    /// an abandoned operation must never outlive (see `abandon_in_flight`).
    pub fn borrows_memory(&self) -> bool {
        self.buf.is_borrowed()
    }
}

/// A finished operation, with its buffer back.
#[derive(Debug)]
pub struct Completion {
    pub op: IoOp,
    /// Bytes transferred (a read may stop short at the end of the file), or
    /// the error.
    pub result: io::Result<usize>,
}

/// A big file moved in aligned blocks, many operations in flight.
pub trait DataFile: Send {
    /// The backend doing the I/O.
    fn backend(&self) -> BackendKind;

    /// Most operations in flight at once.
    fn queue_depth(&self) -> usize;

    /// Operations submitted and not yet returned by `reap`.
    fn in_flight(&self) -> usize;

    /// Starts `op`. The caller keeps `in_flight() < queue_depth()`. A failure
    /// to start comes back as a completion with an error, like any other.
    fn submit(&mut self, op: IoOp);

    /// Returns finished operations, waiting until at least
    /// `min(at_least, in_flight())` are there. An error means the file
    /// cannot wait for its operations any more (no completion for
    /// [`IO_STALL_MAX`], a failing `io_uring_enter`, workers gone): the caller
    /// treats the file as dead and drops it, whose `Drop` deals with what is
    /// still in flight. Completions drained before an error are kept for the
    /// next call.
    fn reap(&mut self, at_least: usize) -> Result<Vec<Completion>, StorageError>;

    /// Sets the file's length (the store trims the padded tail this way).
    fn set_len(&mut self, len: u64) -> Result<(), StorageError>;

    /// fdatasync: the data and the length are durable when this returns Ok.
    fn sync_data(&mut self) -> Result<(), StorageError>;
}

/// The file system as the store uses it.
pub trait Storage: Send + Sync + fmt::Debug {
    /// The backend new data files get.
    fn backend(&self) -> BackendKind;

    /// Creates one directory; fails if it exists.
    fn create_dir(&self, path: &Path) -> Result<(), StorageError>;

    /// fsync of a directory: its entries (creations, renames, removals) are
    /// durable when this returns Ok.
    fn sync_dir(&self, path: &Path) -> Result<(), StorageError>;

    /// rename(2).
    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError>;

    /// Removes a directory and everything below it.
    fn remove_dir_all(&self, path: &Path) -> Result<(), StorageError>;

    /// Entries of a directory, in no particular order.
    fn read_dir(&self, path: &Path) -> Result<Vec<DirEntry>, StorageError>;

    /// `None` if nothing is at `path`.
    fn metadata(&self, path: &Path) -> Result<Option<Metadata>, StorageError>;

    /// Creates a new file (failing if it exists), with `len_bytes` of space
    /// reserved (fallocate), for writing.
    fn create_data_file(
        &self,
        path: &Path,
        len_bytes: u64,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError>;

    /// Opens an existing file for reading.
    fn open_data_file(
        &self,
        path: &Path,
        queue_depth: usize,
    ) -> Result<Box<dyn DataFile>, StorageError>;

    /// Creates a new small file holding `bytes`, fdatasync'ed.
    fn write_file_synced(&self, path: &Path, bytes: &[u8]) -> Result<(), StorageError>;

    /// Reads a whole small file, refusing one longer than `limit_bytes`
    /// before allocating for it.
    fn read_file_limited(&self, path: &Path, limit_bytes: u64) -> Result<Vec<u8>, StorageError>;

    /// Reads up to `len` bytes at `offset` of a file (headers, spot checks).
    fn read_at(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StorageError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The regression: abandoned writes from borrowed memory (a staging
    /// slot through `Source::Shared`, a caller's slice through
    /// `Source::Memory`) were let go while the kernel could still read
    /// memory the slot's owner then unmapped; only borrowed reads aborted.
    #[test]
    fn an_abandoned_operation_on_borrowed_memory_aborts_whether_read_or_write() {
        let mut memory = [0u8; 16];
        for kind in [OpKind::Write, OpKind::Read] {
            // SAFETY: the op is never submitted; the region is only looked at.
            let region = unsafe { RawRegion::new(memory.as_mut_ptr(), memory.len()) };
            let op = IoOp {
                kind,
                offset: 0,
                len: 16,
                buf: IoBuf::Borrowed(region),
                tag: 0,
            };
            assert!(op.borrows_memory(), "{kind:?}");
        }
        assert!(must_abort(1));
        assert!(!must_abort(0), "pool buffers alone are leaked, not fatal");
    }
}

//! The narrow storage interface the snapshot store is written against.
//!
//! [`Storage`] is the file system as the store uses it: directories, renames,
//! directory fsyncs, small whole files (manifests) and [`DataFile`]s, which
//! move big aligned blocks with many operations in flight. Backends:
//!
//! * [`os::OsStorage`]: the real file system; data files through io_uring
//!   (`uring`), a `pwrite`/`pread` thread pool with O_DIRECT (`threaded`), or
//!   the same pool with buffered I/O where O_DIRECT is refused. `probe`
//!   chooses, with a logged reason.
//! * [`fault::FaultyStorage`]: wraps any storage and fails chosen operations
//!   (ENOSPC mid-write, EIO on write or fdatasync, ...).
//! * [`sim::SimStorage`]: in memory, with a durable image beside the live one
//!   that only fsync/fdatasync move data into; cut at any operation to test
//!   power loss.
//!
//! Buffer ownership: an [`IoOp`] carries its buffer into the backend and the
//! [`Completion`] carries it back, so a buffer is never reused while the
//! kernel may still touch it. A data file's `Drop` waits for everything in
//! flight.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod fault;
pub mod os;
pub mod probe;
pub mod sim;
pub mod threaded;
pub mod uring;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::buffer_pool::PoolBuf;

/// How a data file's bytes reach the disk. Recorded in every manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// io_uring, O_DIRECT, registered file and pool buffers.
    IoUring,
    /// A thread pool of `pwrite`/`pread` with O_DIRECT.
    Pwrite,
    /// A thread pool of `pwrite`/`pread` through the page cache, then fdatasync.
    Buffered,
    /// The in-memory test file system.
    Simulated,
}

impl BackendKind {
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::IoUring => "io_uring",
            BackendKind::Pwrite => "pwrite",
            BackendKind::Buffered => "buffered",
            BackendKind::Simulated => "simulated",
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

/// Errors of the storage layer. Each names the operation and the path.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
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
}

impl StorageError {
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The OS error behind this one, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
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
/// unchanged) until the operation using it completes.
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

/// The memory an operation reads from (write) or fills (read).
#[derive(Debug)]
pub enum IoBuf {
    /// A pool buffer; the operation covers its first `len` bytes.
    Pooled(PoolBuf),
    /// Caller memory (a staging mapping, a restore destination).
    Borrowed(RawRegion),
}

impl IoBuf {
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
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Write,
    Read,
}

/// One positioned transfer of `len` bytes between `buf` and the file at
/// `offset`. On data files opened with O_DIRECT, `offset`, `len` and the
/// buffer address are multiples of [`crate::buffer_pool::IO_ALIGN_BYTES`].
#[derive(Debug)]
pub struct IoOp {
    pub kind: OpKind,
    pub offset: u64,
    pub len: usize,
    pub buf: IoBuf,
    /// The caller's own label, returned unchanged in the completion.
    pub tag: u64,
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
    /// `min(at_least, in_flight())` are there.
    fn reap(&mut self, at_least: usize) -> Vec<Completion>;

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

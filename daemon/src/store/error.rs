//! The store's error type.

use std::path::PathBuf;

use crate::buffer_pool::PoolError;
use crate::shared_memory::OutOfRange;
use crate::storage::StorageError;
use crate::store::layout::LayoutError;
use crate::store::manifest::ManifestError;
use crate::store::paths::{NameError, SnapshotId};

/// An error from the source that fills a streamed snapshot.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed source: `fill(data_offset, buf)` writes data bytes
/// `data_offset..data_offset + buf.len()` into `buf`, in order.
pub type Fill<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), SourceError> + 'a;

/// A consumer of verified chunks: `sink(data_offset, bytes)`, in order.
pub type Sink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), SourceError> + 'a;

/// Everything that can go wrong in the store. Every variant says which
/// snapshot, file or byte range it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("snapshot layout: {0}")]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("I/O buffers: {0}")]
    Pool(#[from] PoolError),
    #[error("{dir}: {source}")]
    Manifest {
        dir: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("{dir}: no manifest, so this is not a snapshot")]
    ManifestMissing { dir: PathBuf },
    #[error("snapshot {id} is already committed; committed snapshots are never overwritten")]
    AlreadyCommitted { id: SnapshotId },
    #[error("snapshot {id} is being written by another writer")]
    InProgress { id: SnapshotId },
    /// No committed snapshot of (job, rank) at `step`, or at all when
    /// `step` is `None` (the newest was asked for).
    #[error("{}", not_found(.job, *.rank, *.step))]
    NotFound {
        job: String,
        rank: u32,
        step: Option<u64>,
    },
    #[error(
        "job {job:?}: its directory {} is missing (it was claimed, then removed); the snapshot is not written, and registering the job again claims it anew",
        .dir.display()
    )]
    JobMissing { job: String, dir: PathBuf },
    #[error("snapshot {id}: rank {} is not below world size {world_size}", .id.rank)]
    RankOutsideWorld { id: SnapshotId, world_size: u32 },
    #[error("source holds {actual} bytes but the tensors need {expected}")]
    SourceLength { expected: u64, actual: u64 },
    #[error("source memory at {addr:#x} is not 4096-byte aligned")]
    SourceAlignment { addr: usize },
    #[error("shared memory: {0}")]
    SharedRange(#[from] OutOfRange),
    #[error("snapshot {id}: the source failed at data offset {offset}: {source}")]
    Source {
        id: SnapshotId,
        offset: u64,
        #[source]
        source: SourceError,
    },
    #[error("{path}: {op} at offset {offset} moved {done} of {expected} bytes")]
    ShortTransfer {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        expected: usize,
        done: usize,
    },
    #[error("{path}: file is {actual} bytes, the manifest says {expected}")]
    LengthMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: safetensors header (bytes 0..{header_len}) does not match the manifest")]
    HeaderCorrupt { path: PathBuf, header_len: u64 },
    #[error(
        "{path}: chunk {chunk} (data bytes {start}..{end}) fails its CRC32 (expected {expected:#010x}, found {found:#010x}); tensors: {}",
        tensor_list(.tensors)
    )]
    ChunkCorrupt {
        path: PathBuf,
        chunk: u64,
        start: u64,
        end: u64,
        expected: u32,
        found: u32,
        tensors: Vec<String>,
    },
    #[error(
        "{path}: chunk size {chunk_bytes} is larger than the {buf_bytes}-byte I/O buffers; raise io_buffer_bytes"
    )]
    ChunkLargerThanBuffer {
        path: PathBuf,
        chunk_bytes: u64,
        buf_bytes: usize,
    },
    #[error("reading {path} stopped at the consumer's request: {source}")]
    Sink {
        path: PathBuf,
        #[source]
        source: SourceError,
    },
    #[error("{path}: a direct read is not possible here ({why}); read through the store's buffers")]
    DirectReadUnsupported {
        path: PathBuf,
        why: DirectReadBlocker,
    },
    #[error("bad store configuration: {0}")]
    Config(String),
}

/// Why a snapshot cannot be read straight into a destination (O_DIRECT
/// into the caller's memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DirectReadBlocker {
    #[error("the destination at {addr:#x} is not 4096-byte aligned")]
    UnalignedDestination { addr: usize },
    #[error("the destination holds {len} bytes, the padded data section needs {needed}")]
    DestinationTooSmall { len: usize, needed: u64 },
    #[error("chunks of {chunk_bytes} bytes are not 4096-byte multiples")]
    UnalignedChunks { chunk_bytes: u64 },
    #[error("the data section is empty")]
    EmptyDataSection,
}

fn not_found(job: &str, rank: u32, step: Option<u64>) -> String {
    match step {
        Some(step) => format!("snapshot {job}/{rank}/step-{step} not found"),
        None => format!("no snapshot of {job}/{rank} found"),
    }
}

impl StoreError {
    /// The operating system's error behind this one (ENOSPC, EIO...), if
    /// the failure came from a system call.
    pub fn raw_os_error(&self) -> Option<i32> {
        // Every variant listed: one added with an OS error behind it does
        // not compile until it says so here.
        match self {
            StoreError::Storage(e) => e.raw_os_error(),
            StoreError::Pool(e) => e.raw_os_error(),
            StoreError::Name(_)
            | StoreError::Layout(_)
            | StoreError::Manifest { .. }
            | StoreError::ManifestMissing { .. }
            | StoreError::AlreadyCommitted { .. }
            | StoreError::InProgress { .. }
            | StoreError::NotFound { .. }
            | StoreError::RankOutsideWorld { .. }
            | StoreError::JobMissing { .. }
            | StoreError::SourceLength { .. }
            | StoreError::SourceAlignment { .. }
            | StoreError::SharedRange(_)
            | StoreError::Source { .. }
            | StoreError::ShortTransfer { .. }
            | StoreError::LengthMismatch { .. }
            | StoreError::HeaderCorrupt { .. }
            | StoreError::ChunkCorrupt { .. }
            | StoreError::ChunkLargerThanBuffer { .. }
            | StoreError::Sink { .. }
            | StoreError::DirectReadUnsupported { .. }
            | StoreError::Config(_) => None,
        }
    }
}

fn tensor_list(tensors: &[String]) -> String {
    const SHOWN: usize = 8;
    if tensors.is_empty() {
        return "(none)".to_owned();
    }
    let mut out = tensors
        .iter()
        .take(SHOWN)
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if tensors.len() > SHOWN {
        out.push_str(&format!(" and {} more", tensors.len() - SHOWN));
    }
    out
}

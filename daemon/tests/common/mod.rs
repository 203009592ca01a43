//! Helpers shared by the store's integration tests.
#![allow(dead_code, reason = "each test file uses a different part")]

use std::path::Path;
use std::sync::Arc;

use gpusnap::{Dtype, TensorSpec};
use gpusnapd::buffer_pool::BufferPool;
use gpusnapd::storage::Storage;
use gpusnapd::storage::os::OsStorage;
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::{
    Layout, Snapshot, SnapshotId, Source, SourceError, Store, StoreConfig, StoreError,
};

pub const BACKENDS: [BackendChoice; 3] = [
    BackendChoice::IoUring,
    BackendChoice::Pwrite,
    BackendChoice::Buffered,
];

/// A scratch directory on the real disk (not tmpfs: O_DIRECT must work).
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
    tempfile::Builder::new()
        .prefix("gpusnap-test-")
        .tempdir_in(base)
        .expect("scratch dir")
}

pub fn config(root: &Path, backend: BackendChoice) -> StoreConfig {
    StoreConfig {
        root: root.to_path_buf(),
        io_backend: backend,
        keep_snapshots: 3,
        queue_depth: 8,
        io_buffer_bytes: 64 << 10,
        io_pool_bytes: 2 << 20,
    }
}

pub fn open(root: &Path, backend: BackendChoice) -> Store {
    Store::open(config(root, backend)).expect("open store")
}

/// The real storage of `config`, for wrapping (faults).
pub fn os_storage(cfg: &StoreConfig) -> (Arc<dyn Storage>, BufferPool) {
    let pool = BufferPool::new(cfg.io_pool_bytes, cfg.io_buffer_bytes).expect("pool");
    let storage = OsStorage::open(&cfg.root, cfg.io_backend, pool.clone()).expect("os storage");
    (Arc::new(storage), pool)
}

/// 4096-aligned, zeroed heap memory standing in for a staging mapping.
pub struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation of {len} bytes failed");
        Aligned { ptr, len }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of at least len bytes, zero-initialised.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(1), 4096).expect("layout");
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Byte `i` of the data section of snapshot `seed`.
pub fn pattern_byte(seed: u64, i: u64) -> u8 {
    let x = (i ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 56) as u8
}

pub fn fill_pattern(seed: u64, offset: u64, dst: &mut [u8]) {
    for (i, b) in dst.iter_mut().enumerate() {
        *b = pattern_byte(seed, offset + i as u64);
    }
}

/// A data section for `tensors` in aligned memory, filled with `seed`'s pattern.
pub fn staged(tensors: &[TensorSpec], seed: u64) -> (Layout, Aligned) {
    let layout = Layout::plan(tensors).expect("layout");
    let mut mem = Aligned::new(usize::try_from(layout.data_len).expect("fits"));
    fill_pattern(seed, 0, mem.bytes_mut());
    (layout, mem)
}

pub fn mixed_tensors() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("model.w", Dtype::F32, [300, 517]),
        TensorSpec::new("model.b", Dtype::BF16, [517]),
        TensorSpec::new("opt.m", Dtype::F32, [300, 517]),
        TensorSpec::new("empty", Dtype::F16, [0, 3]),
        TensorSpec::new("step", Dtype::I64, []),
        TensorSpec::new("mask", Dtype::Bool, [4099]),
    ]
}

/// Writes snapshot `step` of `tensors` from aligned memory with `seed`'s pattern.
pub fn write_memory(
    store: &Store,
    job: &str,
    step: u64,
    tensors: &[TensorSpec],
    seed: u64,
) -> Result<(), StoreError> {
    let (layout, mem) = staged(tensors, seed);
    let id = SnapshotId::new(job, 0, step).expect("id");
    store
        .write_laid_out(&id, &layout, 1, Source::Memory(mem.bytes()))
        .map(|_| ())
}

/// Writes snapshot `step` through a streamed source with `seed`'s pattern.
pub fn write_stream(
    store: &Store,
    job: &str,
    step: u64,
    tensors: &[TensorSpec],
    seed: u64,
) -> Result<(), StoreError> {
    let mut fill = |offset: u64, dst: &mut [u8]| -> Result<(), SourceError> {
        fill_pattern(seed, offset, dst);
        Ok(())
    };
    let id = SnapshotId::new(job, 0, step).expect("id");
    store
        .write_snapshot(&id, tensors, 1, Source::Stream(&mut fill))
        .map(|_| ())
}

/// Reads a snapshot back and checks every byte against `seed`'s pattern.
pub fn check_pattern(store: &Store, snapshot: &Snapshot, seed: u64) -> Result<(), StoreError> {
    let mut next = 0u64;
    store.read(snapshot, &mut |offset, bytes| {
        assert_eq!(offset, next, "chunks in order");
        for (i, b) in bytes.iter().enumerate() {
            let at = offset + i as u64;
            if *b != pattern_byte(seed, at) {
                return Err(format!("byte {at} differs").into());
            }
        }
        next += bytes.len() as u64;
        Ok(())
    })?;
    assert_eq!(next, snapshot.layout.data_len, "every byte read");
    Ok(())
}

/// The bytes of tensor `t` within a data section, as a slice range.
pub fn byte_range(t: &gpusnapd::store::TensorEntry) -> std::ops::Range<usize> {
    let start = usize::try_from(t.offset).expect("fits");
    start..start + usize::try_from(t.len).expect("fits")
}

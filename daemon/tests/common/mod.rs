//! Helpers shared by the store's integration tests.
#![allow(dead_code, reason = "each test file uses a different part")]

use std::path::Path;
use std::sync::Arc;

use gpusnap::{Dtype, TensorSpec};
use gpusnapd::buffer_pool::BufferPool;
use gpusnapd::shared_memory::SharedBytes;
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

/// A memfd mapped `MAP_SHARED`, as staging memory is: reached only through
/// its [`SharedBytes`] handle.
pub struct SharedMemfd {
    _fd: std::os::fd::OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl SharedMemfd {
    pub fn new(len: usize) -> Self {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let map_len = len.max(1);
        // SAFETY: the name is a NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(c"gpusnap-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(map_len).expect("size");
        // SAFETY: a valid descriptor; the result is checked.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
        assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh shared mapping of our memfd at an address the
        // kernel picks; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        SharedMemfd {
            _fd: fd,
            ptr: ptr.cast(),
            len,
        }
    }

    pub fn handle(&self) -> SharedBytes<'_> {
        // SAFETY: the mapping lives as long as `self`, readable and
        // writable; this test reaches it only through handles.
        unsafe { SharedBytes::new(self.ptr, self.len) }
    }
}

impl Drop for SharedMemfd {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; no handle outlives
        // `self` (they borrow it).
        let rc = unsafe { libc::munmap(self.ptr.cast(), self.len.max(1)) };
        assert_eq!(rc, 0, "munmap");
    }
}

/// A data section for `tensors` in a memfd mapping, filled with `seed`'s
/// pattern.
pub fn staged_shared(tensors: &[TensorSpec], seed: u64) -> (Layout, SharedMemfd) {
    let layout = Layout::plan(tensors).expect("layout");
    let len = usize::try_from(layout.data_len).expect("fits");
    let mem = SharedMemfd::new(len);
    let mut bytes = vec![0; len];
    fill_pattern(seed, 0, &mut bytes);
    mem.handle().copy_from(0, &bytes).expect("in range");
    (layout, mem)
}

/// Writes snapshot `step` of `tensors` from a memfd mapping with `seed`'s
/// pattern (`Source::Shared`).
pub fn write_shared(
    store: &Store,
    job: &str,
    step: u64,
    tensors: &[TensorSpec],
    seed: u64,
) -> Result<(), StoreError> {
    let (layout, mem) = staged_shared(tensors, seed);
    let id = SnapshotId::new(job, 0, step).expect("id");
    store
        .write_laid_out(&id, &layout, 1, Source::Shared(mem.handle()))
        .map(|_| ())
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

//! A bounded pool of 4096-aligned I/O buffers carved out of one `mmap`.
//!
//! Everything the store reads or writes that is not the caller's own memory
//! (safetensors header, the padded tail chunk, chunks of a streamed source,
//! reads) goes through these buffers, so the store's memory use is the pool's
//! size whatever the snapshot's size. The pool is one anonymous mapping so
//! the io_uring backend can register all of it with each ring it builds (as
//! fixed buffers of at most 1 GiB each).
//!
//! A job takes a [`Lease`] of several buffers at once (waiting until that
//! many are free, or until its deadline: [`PoolError::Timeout`]), so jobs
//! never deadlock on each other while holding part of what they need, and
//! never wait without bound; each [`PoolBuf`] returns to the pool when
//! dropped.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Alignment of every buffer, file offset and O_DIRECT length in the store.
pub const IO_ALIGN_BYTES: usize = 4096;

/// Why the pool could not be made or could not lend.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("I/O buffer size {buf_bytes} must be a positive multiple of {IO_ALIGN_BYTES}")]
    BadBufferSize { buf_bytes: usize },
    #[error(
        "I/O buffer pool of {pool_bytes} bytes holds fewer than 2 buffers of {buf_bytes} bytes"
    )]
    PoolTooSmall { pool_bytes: usize, buf_bytes: usize },
    #[error("asked for {wanted} I/O buffers, but the pool has only {capacity}")]
    LeaseTooLarge { wanted: usize, capacity: usize },
    #[error(
        "waited {waited:?} for {wanted} free I/O buffers ({free} free of {capacity}); the pool stayed busy"
    )]
    Timeout {
        wanted: usize,
        free: usize,
        capacity: usize,
        waited: Duration,
    },
    #[error("mmap of a {bytes}-byte I/O buffer pool failed: {source}")]
    Map {
        bytes: usize,
        source: std::io::Error,
    },
}

impl PoolError {
    /// The operating system's error behind this one, if a system call
    /// failed.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            PoolError::Map { source, .. } => source.raw_os_error(),
            PoolError::BadBufferSize { .. }
            | PoolError::PoolTooSmall { .. }
            | PoolError::LeaseTooLarge { .. }
            | PoolError::Timeout { .. } => None,
        }
    }
}

/// An anonymous, page-aligned mapping; unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access to its
// bytes is handed out only through `PoolBuf`s, each covering a disjoint range.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself exposes no interior mutability.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Result<Self, PoolError> {
        // SAFETY: an anonymous private mapping with no address hint touches no
        // existing memory; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PoolError::Map {
                bytes: len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(PoolError::Map {
            bytes: len,
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; every PoolBuf
        // holds an Arc to the pool, so no buffer outlives the mapping.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of the I/O pool failed");
    }
}

#[derive(Debug)]
struct Shared {
    mapping: Mapping,
    buf_bytes: usize,
    capacity: usize,
    free: Mutex<Vec<usize>>,
    returned: Condvar,
}

/// The pool. Cheap to clone (an `Arc`).
#[derive(Debug, Clone)]
pub struct BufferPool {
    shared: Arc<Shared>,
}

impl BufferPool {
    /// A pool of `pool_bytes / buf_bytes` buffers of `buf_bytes` each.
    pub fn new(pool_bytes: usize, buf_bytes: usize) -> Result<Self, PoolError> {
        if buf_bytes == 0 || !buf_bytes.is_multiple_of(IO_ALIGN_BYTES) {
            return Err(PoolError::BadBufferSize { buf_bytes });
        }
        let capacity = pool_bytes / buf_bytes;
        if capacity < 2 {
            return Err(PoolError::PoolTooSmall {
                pool_bytes,
                buf_bytes,
            });
        }
        let mapping = Mapping::new(capacity * buf_bytes)?;
        Ok(BufferPool {
            shared: Arc::new(Shared {
                mapping,
                buf_bytes,
                capacity,
                free: Mutex::new((0..capacity).rev().collect()),
                returned: Condvar::new(),
            }),
        })
    }

    /// Bytes per buffer.
    pub fn buf_bytes(&self) -> usize {
        self.shared.buf_bytes
    }

    /// Number of buffers.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Buffers not lent out right now.
    pub fn free_count(&self) -> usize {
        self.lock_free().len()
    }

    /// The whole pool region, for registering it with the kernel (io_uring
    /// fixed buffers, once per ring). Every `PoolBuf` lies inside it.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.shared.mapping.ptr.as_ptr(), self.shared.mapping.len)
    }

    /// Takes `count` buffers at once, waiting until that many are free, or
    /// until `deadline` ([`PoolError::Timeout`]).
    pub fn lease(&self, count: usize, deadline: Instant) -> Result<Lease, PoolError> {
        if count > self.shared.capacity {
            return Err(PoolError::LeaseTooLarge {
                wanted: count,
                capacity: self.shared.capacity,
            });
        }
        let started = Instant::now();
        let mut free = self.lock_free();
        while free.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PoolError::Timeout {
                    wanted: count,
                    free: free.len(),
                    capacity: self.shared.capacity,
                    waited: started.elapsed(),
                });
            }
            free = self
                .shared
                .returned
                .wait_timeout(free, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let at = free.len() - count;
        let indices: Vec<usize> = free.split_off(at);
        drop(free);
        let bufs = indices
            .into_iter()
            .map(|index| PoolBuf {
                shared: Arc::clone(&self.shared),
                index,
                filled: 0,
            })
            .collect();
        Ok(Lease { bufs })
    }

    fn lock_free(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.shared
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Buffers taken together; take them out with [`Lease::take`].
#[derive(Debug)]
pub struct Lease {
    bufs: Vec<PoolBuf>,
}

impl Lease {
    /// A lease of no buffer, for work whose transfers all use borrowed
    /// memory (a direct read into the caller's destination): it waits for
    /// no one holding the pool.
    pub fn empty() -> Lease {
        Lease { bufs: Vec::new() }
    }

    pub fn take(&mut self) -> Option<PoolBuf> {
        self.bufs.pop()
    }

    pub fn put_back(&mut self, buf: PoolBuf) {
        self.bufs.push(buf);
    }

    pub fn len(&self) -> usize {
        self.bufs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }
}

/// One aligned buffer of the pool, with a count of the bytes that hold data.
/// Returns to the pool on drop.
#[derive(Debug)]
pub struct PoolBuf {
    shared: Arc<Shared>,
    index: usize,
    filled: usize,
}

impl PoolBuf {
    /// Size in bytes (the pool's buffer size).
    pub fn buf_bytes(&self) -> usize {
        self.shared.buf_bytes
    }

    /// Bytes marked as holding data.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Marks the first `len` bytes as holding data.
    pub fn set_filled(&mut self, len: usize) {
        assert!(len <= self.buf_bytes(), "filled {len} > capacity");
        self.filled = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.start()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.start()
    }

    /// The filled bytes.
    pub fn data(&self) -> &[u8] {
        // SAFETY: the range [start, start + filled) lies inside the mapping,
        // belongs to this buffer alone while it is lent, and was initialised
        // by the mapping (anonymous mappings are zero-filled).
        unsafe { std::slice::from_raw_parts(self.start(), self.filled) }
    }

    /// The whole buffer, for filling.
    pub fn space_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data`, for the whole buffer; `&mut self` makes the
        // borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.start(), self.buf_bytes()) }
    }

    fn start(&self) -> *mut u8 {
        let offset = self.index * self.shared.buf_bytes;
        debug_assert!(offset + self.shared.buf_bytes <= self.shared.mapping.len);
        // SAFETY: index < capacity, so the offset stays inside the mapping.
        unsafe { self.shared.mapping.ptr.as_ptr().add(offset) }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let mut free = self
            .shared
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        debug_assert!(!free.contains(&self.index), "buffer returned twice");
        free.push(self.index);
        drop(free);
        self.shared.returned.notify_all();
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

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[test]
    fn buffers_are_aligned_disjoint_and_return_on_drop() {
        let pool = BufferPool::new(8 * 4096, 4096).expect("pool");
        assert_eq!(pool.capacity(), 8);
        let mut lease = pool.lease(8, soon()).expect("lease");
        assert_eq!(pool.free_count(), 0);
        let mut starts = Vec::new();
        while let Some(mut b) = lease.take() {
            assert_eq!(b.as_ptr() as usize % IO_ALIGN_BYTES, 0);
            b.space_mut().fill(7);
            starts.push(b.as_ptr() as usize);
        }
        starts.sort_unstable();
        starts.dedup();
        assert_eq!(starts.len(), 8);
        assert_eq!(pool.free_count(), 8);
    }

    #[test]
    fn bad_sizes_and_oversized_leases_are_refused() {
        assert!(matches!(
            BufferPool::new(1 << 20, 1000),
            Err(PoolError::BadBufferSize { .. })
        ));
        assert!(matches!(
            BufferPool::new(4096, 4096),
            Err(PoolError::PoolTooSmall { .. })
        ));
        let pool = BufferPool::new(4 * 4096, 4096).expect("pool");
        assert!(matches!(
            pool.lease(5, soon()),
            Err(PoolError::LeaseTooLarge { .. })
        ));
    }

    #[test]
    fn lease_waits_for_returned_buffers() {
        let pool = BufferPool::new(2 * 4096, 4096).expect("pool");
        let held = pool.lease(2, soon()).expect("lease");
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.lease(2, soon()).map(|l| l.len()))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.join().expect("join").expect("lease"), 2);
    }

    #[test]
    fn lease_gives_up_at_its_deadline_with_a_timeout() {
        let pool = BufferPool::new(3 * 4096, 4096).expect("pool");
        let _held = pool.lease(2, soon()).expect("lease");
        let started = Instant::now();
        let err = pool
            .lease(2, Instant::now() + Duration::from_millis(100))
            .expect_err("only one buffer is free");
        let waited = started.elapsed();
        assert!(
            matches!(
                err,
                PoolError::Timeout {
                    wanted: 2,
                    free: 1,
                    capacity: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        // A deadline already past still takes what is free now.
        assert_eq!(pool.lease(1, Instant::now()).expect("free now").len(), 1);
    }
}

//! Data files moved through io_uring, with O_DIRECT.
//!
//! A [`Ring`] registers the whole buffer pool as fixed buffers (one per GiB,
//! the kernel's limit per buffer) and a one-slot sparse file table. The pool
//! is registered once per ring, not once per daemon: building a ring pins
//! the whole pool (and counts it against RLIMIT_MEMLOCK without
//! CAP_IPC_LOCK), so each thread that does I/O keeps one ring cached and
//! there are as many registrations as such threads (lanes, streams, blocking
//! pool threads). A [`UringFile`] takes its thread's ring (or builds one),
//! puts its file in slot 0, and on `Drop` waits for everything in flight,
//! empties the slot and gives the ring back. The cached ring holds a clone of
//! the pool, so the registered pages can never be unmapped and replaced by
//! another mapping at the same address.
//!
//! Each operation is parked in a slot table, indexed by `user_data`, until its
//! completion arrives: the buffer lives as long as the kernel may touch it.
//! Pool buffers go through `WriteFixed`/`ReadFixed`; borrowed memory through
//! plain `Write`/`Read` on the registered file.
//!
//! Waits are bounded: every `io_uring_enter` that waits carries a timeout
//! (`IORING_FEAT_EXT_ARG`, Linux 5.11, which a ring is refused without), and
//! `reap` fails after [`IO_STALL_MAX`] without a completion or at the first
//! error that is not EINTR/EAGAIN/EBUSY, instead of spinning.

use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, opcode, squeue, types};

use super::threaded::check_op;
use super::{
    BackendKind, Completion, DataFile, IO_STALL_MAX, IoBuf, IoOp, OpKind, StorageError,
    abandon_in_flight,
};
use crate::buffer_pool::BufferPool;

/// The kernel refuses a registered buffer larger than this.
const FIXED_BUF_BYTES_MAX: usize = 1 << 30;

/// The file table slot every data file uses.
const FILE_SLOT: types::Fixed = types::Fixed(0);

thread_local! {
    static CACHED_RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// Drops this thread's cached ring, unpinning the pool it registered.
#[cfg(test)]
pub(crate) fn release_thread_ring() {
    let ring = CACHED_RING
        .try_with(|c| c.borrow_mut().take())
        .ok()
        .flatten();
    drop(ring);
}

/// A ring with the pool registered and an empty one-slot file table.
pub struct Ring {
    ring: IoUring,
    sq_entries: usize,
    /// Keeps the registered region mapped as long as the registration lives.
    pool: BufferPool,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("sq_entries", &self.sq_entries)
            .field("pool_region", &self.pool.region())
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Sets up a ring of at least `queue_depth` entries, checks the kernel has
    /// the operations used here, registers `pool` and a sparse file slot.
    pub fn build(pool: &BufferPool, queue_depth: usize) -> io::Result<Ring> {
        let entries = u32::try_from(queue_depth.max(1).next_power_of_two())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "queue depth too large"))?;
        let ring = IoUring::new(entries)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's io_uring lacks IORING_FEAT_EXT_ARG (Linux 5.11), needed to bound its waits",
            ));
        }
        check_opcodes(&ring)?;
        let (base, len) = pool.region();
        let iovecs: Vec<libc::iovec> = (0..len)
            .step_by(FIXED_BUF_BYTES_MAX)
            .map(|at| libc::iovec {
                iov_base: base.wrapping_add(at).cast(),
                iov_len: (len - at).min(FIXED_BUF_BYTES_MAX),
            })
            .collect();
        // SAFETY: the iovecs cover exactly the pool's mapping, which stays
        // mapped as long as the registration: the ring keeps a clone of the
        // pool, and the registration ends when the ring is dropped, before
        // that clone.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        ring.submitter().register_files_sparse(1)?;
        let sq_entries = usize::try_from(ring.params().sq_entries())
            .map_err(|_| io::Error::other("ring size does not fit usize"))?;
        Ok(Ring {
            ring,
            sq_entries,
            pool: pool.clone(),
        })
    }

    fn serves(&self, pool: &BufferPool, queue_depth: usize) -> bool {
        self.pool.region() == pool.region() && self.sq_entries >= queue_depth
    }

    /// The fixed buffer holding `ptr..ptr+len`, if one does.
    fn fixed_index(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let (base, region_len) = self.pool.region();
        let at = (ptr as usize).checked_sub(base as usize)?;
        let end = at.checked_add(len)?;
        let index = at / FIXED_BUF_BYTES_MAX;
        if len == 0 || end > region_len || (end - 1) / FIXED_BUF_BYTES_MAX != index {
            return None;
        }
        u16::try_from(index).ok()
    }

    /// Submits what is queued and waits for `want` completions, at most
    /// [`IO_STALL_MAX`] (the wait carries a timeout, ETIME when it expires).
    /// Retries EINTR and rides out EAGAIN/EBUSY (kernel short of memory,
    /// completion queue full) while no completion is there to drain, until
    /// the same deadline; any other error is returned at once.
    fn enter(&mut self, want: usize) -> io::Result<()> {
        let deadline = Instant::now() + IO_STALL_MAX;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from_raw_os_error(libc::ETIME));
            }
            let entered = if want == 0 {
                self.ring.submit()
            } else {
                let timeout = types::Timespec::from(left);
                let args = types::SubmitArgs::new().timespec(&timeout);
                self.ring.submitter().submit_with_args(want, &args)
            };
            let Err(e) = entered else {
                return Ok(());
            };
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ETIME) if !self.ring.completion().is_empty() => return Ok(()),
                Some(libc::EAGAIN | libc::EBUSY) => {
                    if want == 0 || !self.ring.completion().is_empty() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => return Err(e),
            }
        }
    }
}

fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        (opcode::Write::CODE, "WRITE"),
        (opcode::Read::CODE, "READ"),
        (opcode::WriteFixed::CODE, "WRITE_FIXED"),
        (opcode::ReadFixed::CODE, "READ_FIXED"),
    ];
    match needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
        Some((_, name)) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the kernel's io_uring lacks IORING_OP_{name}"),
        )),
        None => Ok(()),
    }
}

/// A [`DataFile`] on io_uring.
#[derive(Debug)]
pub struct UringFile {
    /// `None` only while dropping.
    ring: Option<Ring>,
    /// Give the ring to the thread's cache on drop (not for probes).
    cache_ring: bool,
    file: File,
    path: PathBuf,
    queue_depth: usize,
    /// Operations the kernel owns, by `user_data`.
    slots: Vec<Option<IoOp>>,
    free_slots: Vec<usize>,
    /// Submitted and not yet returned by `reap`, `refused` included.
    in_flight: usize,
    /// Operations refused before reaching the kernel.
    refused: Vec<Completion>,
}

impl UringFile {
    /// Serves `file` (opened with O_DIRECT by the caller) with the thread's
    /// cached ring, or a new one if that is missing, too small or registered
    /// for another pool.
    pub fn new(
        file: File,
        path: &Path,
        pool: &BufferPool,
        queue_depth: usize,
    ) -> Result<Self, StorageError> {
        let cached = CACHED_RING
            .try_with(|c| c.borrow_mut().take())
            .ok()
            .flatten();
        let ring = match cached.filter(|r| r.serves(pool, queue_depth.max(1))) {
            Some(ring) => ring,
            None => Ring::build(pool, queue_depth)
                .map_err(|e| StorageError::io("io_uring setup for", path, e))?,
        };
        Self::with_ring(ring, true, file, path, queue_depth)
    }

    /// Serves `file` with `ring`, dropped with the file unless `cache_ring`.
    pub fn with_ring(
        ring: Ring,
        cache_ring: bool,
        file: File,
        path: &Path,
        queue_depth: usize,
    ) -> Result<Self, StorageError> {
        let queue_depth = queue_depth.max(1);
        ring.ring
            .submitter()
            .register_files_update(0, &[file.as_raw_fd()])
            .map_err(|e| StorageError::io("io_uring register file", path, e))?;
        Ok(UringFile {
            ring: Some(ring),
            cache_ring,
            file,
            path: path.to_path_buf(),
            queue_depth,
            slots: (0..queue_depth).map(|_| None).collect(),
            free_slots: (0..queue_depth).rev().collect(),
            in_flight: 0,
            refused: Vec::new(),
        })
    }

    fn refuse(&mut self, op: IoOp, err: io::Error) {
        self.refused.push(Completion {
            op,
            result: Err(err),
        });
    }

    /// Moves every available completion into `out`.
    fn drain(&mut self, out: &mut Vec<Completion>) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        for cqe in ring.ring.completion() {
            let slot = usize::try_from(cqe.user_data()).ok();
            let op = slot
                .and_then(|s| self.slots.get_mut(s))
                .and_then(Option::take);
            let (Some(slot), Some(op)) = (slot, op) else {
                tracing::error!(user_data = cqe.user_data(), "completion for no operation");
                continue;
            };
            self.free_slots.push(slot);
            let res = cqe.result();
            let result = usize::try_from(res)
                .map_err(|_| io::Error::from_raw_os_error(res.saturating_neg()));
            out.push(Completion { op, result });
        }
    }
}

fn entry_for(ring: &Ring, op: &mut IoOp, slot: usize) -> io::Result<squeue::Entry> {
    check_op(op)?;
    let len = u32::try_from(op.len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "transfer over 4 GiB"))?;
    let ptr = op.buf.as_mut_ptr();
    let fixed = match op.buf {
        IoBuf::Pooled(_) => ring.fixed_index(ptr, op.len),
        IoBuf::Borrowed(_) => None,
    };
    let entry = match (op.kind, fixed) {
        (OpKind::Write, Some(i)) => opcode::WriteFixed::new(FILE_SLOT, ptr, len, i)
            .offset(op.offset)
            .build(),
        (OpKind::Write, None) => opcode::Write::new(FILE_SLOT, ptr, len)
            .offset(op.offset)
            .build(),
        (OpKind::Read, Some(i)) => opcode::ReadFixed::new(FILE_SLOT, ptr, len, i)
            .offset(op.offset)
            .build(),
        (OpKind::Read, None) => opcode::Read::new(FILE_SLOT, ptr, len)
            .offset(op.offset)
            .build(),
    };
    let user_data = u64::try_from(slot).map_err(io::Error::other)?;
    Ok(entry.user_data(user_data))
}

impl DataFile for UringFile {
    fn backend(&self) -> BackendKind {
        BackendKind::IoUring
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, mut op: IoOp) {
        assert!(self.in_flight < self.queue_depth, "queue depth exceeded");
        self.in_flight += 1;
        let (Some(ring), Some(slot)) = (self.ring.as_mut(), self.free_slots.pop()) else {
            return self.refuse(op, io::Error::other("queue depth exceeded"));
        };
        let entry = match entry_for(ring, &mut op, slot) {
            Ok(entry) => entry,
            Err(e) => {
                self.free_slots.push(slot);
                return self.refuse(op, e);
            }
        };
        // Park the op before the kernel can see its buffer.
        let Some(parked) = self.slots.get_mut(slot) else {
            return self.refuse(op, io::Error::other("slot table out of range"));
        };
        *parked = Some(op);
        // SAFETY: the entry points at the parked op's buffer (a pool buffer or
        // a RawRegion promised valid until completion), which stays in the
        // slot table until its completion is drained; `Drop` waits for every
        // completion before the table goes.
        let mut pushed = unsafe { ring.ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // The queue holds entries the kernel has not taken yet.
            let _ = ring.enter(0);
            // SAFETY: as above.
            pushed = unsafe { ring.ring.submission().push(&entry) }.is_ok();
        }
        if !pushed && let Some(op) = self.slots.get_mut(slot).and_then(Option::take) {
            self.free_slots.push(slot);
            return self.refuse(op, io::Error::other("io_uring submission queue full"));
        }
        // Start the op now; an error here leaves it queued for `reap`.
        if let Err(e) = ring.enter(0) {
            tracing::warn!(path = %self.path.display(), "io_uring submit: {e}");
        }
    }

    fn reap(&mut self, at_least: usize) -> Result<Vec<Completion>, StorageError> {
        let want = at_least.min(self.in_flight);
        let mut out = std::mem::take(&mut self.refused);
        let mut progress_at = Instant::now();
        loop {
            let before = out.len();
            self.drain(&mut out);
            if out.len() > before {
                progress_at = Instant::now();
            }
            if out.len() >= want {
                break;
            }
            let waited = progress_at.elapsed();
            let entered = match self.ring.as_mut() {
                None => Err(io::Error::other("the ring is gone")),
                Some(_) if waited >= IO_STALL_MAX => {
                    let error = StorageError::Stalled {
                        path: self.path.clone(),
                        in_flight: self.in_flight,
                        waited,
                    };
                    // Returned by the next call; still counted in flight.
                    self.refused = out;
                    return Err(error);
                }
                Some(ring) => ring.enter(want - out.len()),
            };
            if let Err(e) = entered {
                self.drain(&mut out);
                self.refused = out;
                if e.raw_os_error() == Some(libc::ETIME) {
                    return Err(StorageError::Stalled {
                        path: self.path.clone(),
                        in_flight: self.in_flight,
                        waited: progress_at.elapsed(),
                    });
                }
                return Err(StorageError::io("io_uring_enter", &self.path, e));
            }
        }
        assert!(
            out.len() <= self.in_flight,
            "more completions than operations"
        );
        self.in_flight -= out.len();
        Ok(out)
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        super::set_file_len(&self.file, &self.path, len)
    }

    fn sync_data(&mut self) -> Result<(), StorageError> {
        super::sync_file_data(&self.file, &self.path)
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        // The completions (and their buffers) drop here, after the kernel
        // has finished with them.
        if let Err(e) = self.reap(usize::MAX) {
            tracing::error!(path = %self.path.display(), error = %e, "waiting for io_uring operations at close");
        }
        let parked: Vec<&IoOp> = self.slots.iter().flatten().collect();
        if !parked.is_empty() {
            // The kernel may still touch parked buffers: never free them, and
            // leak the ring rather than reuse it.
            let borrowed = parked.iter().filter(|op| op.borrows_memory()).count();
            abandon_in_flight(&self.path, parked.len(), borrowed);
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(self.ring.take());
            return;
        }
        let Some(ring) = self.ring.take() else {
            return;
        };
        let emptied = ring.ring.submitter().register_files_update(0, &[-1]);
        if self.cache_ring && emptied.is_ok() {
            give_back(ring);
        }
    }
}

/// Caches `ring` for this thread unless a ring at least as big is there.
fn give_back(ring: Ring) {
    let _ = CACHED_RING.try_with(|c| {
        let mut cached = c.borrow_mut();
        let keep_old = cached
            .as_ref()
            .is_some_and(|old| old.sq_entries >= ring.sq_entries);
        if !keep_old {
            *cached = Some(ring);
        }
    });
}

/// Whether this thread has a cached ring (tests).
#[cfg(test)]
pub(crate) fn thread_has_ring() -> bool {
    CACHED_RING.with(|c| c.borrow().is_some())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use super::*;
    use crate::storage::Storage;
    use crate::storage::os::OsStorage;
    use crate::storage::os::tests::{drop_with_ops_in_flight, round_trip};
    use crate::storage::probe::BackendChoice;

    fn storage() -> (tempfile::TempDir, BufferPool, OsStorage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = BufferPool::new(16 * 65536, 65536).expect("pool");
        let storage =
            OsStorage::open(dir.path(), BackendChoice::IoUring, pool.clone()).expect("storage");
        (dir, pool, storage)
    }

    #[test]
    fn ring_waits_carry_a_timeout() {
        let pool = BufferPool::new(4 * 4096, 4096).expect("pool");
        let mut ring = Ring::build(&pool, 2).expect("ring");
        assert!(ring.ring.params().is_feature_ext_arg());
        // Nothing in flight: asking for a completion times out, it does not
        // hang. (The real bound is IO_STALL_MAX; here the kernel answers
        // at once that nothing can complete, or the timeout fires.)
        let started = Instant::now();
        let timeout = types::Timespec::from(Duration::from_millis(20));
        let args = types::SubmitArgs::new().timespec(&timeout);
        let err = ring
            .ring
            .submitter()
            .submit_with_args(1, &args)
            .expect_err("no completion can arrive");
        assert_eq!(err.raw_os_error(), Some(libc::ETIME), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        ring.enter(0).expect("submitting nothing");
    }

    #[test]
    fn uring_round_trip_at_depth_4_and_32() {
        let (_dir, pool, storage) = storage();
        assert_eq!(storage.backend(), BackendKind::IoUring);
        round_trip(&storage, &pool, 4);
        round_trip(&storage, &pool, 32);
    }

    #[test]
    fn uring_drop_with_ops_in_flight_waits_for_them() {
        let (_dir, pool, storage) = storage();
        drop_with_ops_in_flight(&storage, &pool);
    }

    #[test]
    fn only_spans_inside_one_registered_buffer_are_fixed() {
        let pool = BufferPool::new(4 * 4096, 4096).expect("pool");
        let ring = Ring::build(&pool, 2).expect("ring");
        let (base, len) = pool.region();
        let base = base.cast_const();
        assert_eq!(ring.fixed_index(base, 4096), Some(0));
        assert_eq!(
            ring.fixed_index(base.wrapping_add(len - 4096), 4096),
            Some(0)
        );
        assert_eq!(ring.fixed_index(base.wrapping_add(len - 4096), 4097), None);
        assert_eq!(ring.fixed_index(base.wrapping_sub(4096), 4096), None);
        assert_eq!(ring.fixed_index(base, 0), None);
    }

    #[test]
    fn ring_is_cached_per_thread_and_rebuilt_for_another_pool() {
        let (dir, pool, storage) = storage();
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(!thread_has_ring());
                let f = storage
                    .create_data_file(&dir.path().join("a"), 4096, 4)
                    .expect("create");
                assert!(!thread_has_ring(), "the file holds the ring");
                drop(f);
                assert!(thread_has_ring());
                let region = CACHED_RING.with(|c| c.borrow().as_ref().map(|r| r.pool.region()));
                assert_eq!(region, Some(pool.region()));
                let other = BufferPool::new(4 * 4096, 4096).expect("pool");
                let file = File::open(dir.path().join("a")).expect("open");
                let f = UringFile::new(file, &dir.path().join("a"), &other, 2).expect("uring");
                drop(f);
                let region = CACHED_RING.with(|c| c.borrow().as_ref().map(|r| r.pool.region()));
                assert_eq!(region, Some(other.region()));
                release_thread_ring();
                assert!(!thread_has_ring());
            });
        });
    }
}

//! Data files moved by one bounded pool of `pwrite`/`pread` worker threads.
//!
//! Used for [`BackendKind::Pwrite`] (the file is opened with O_DIRECT) and
//! [`BackendKind::Buffered`] (through the page cache, where O_DIRECT is
//! refused). As in foyer's engines, the threads are shared: one
//! [`IoWorkers`] pool of [`IO_WORKERS`] threads per storage (started the
//! first time it opens a threaded data file, never per file), fed by one
//! bounded job channel ([`JOBS_QUEUED_MAX`]). A job carries its operation,
//! its file and the sender of its data file's completion channel. Each data
//! file's completion channel is bounded by its queue depth, and a file never
//! has more operations in flight than that, so a worker never blocks handing
//! back a completion.
//!
//! Every wait is bounded: handing a job to the pool waits at most
//! [`IO_STALL_MAX`] for room, `reap` at most that long for a completion.
//! `Drop` waits for the file's own operations in flight (at most
//! [`IO_STALL_MAX`] without progress), so no operation of a dropped file
//! touches its memory afterwards; what is still running after that is
//! abandoned as the storage module describes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use super::{
    BackendKind, Completion, DataFile, IO_STALL_MAX, IoOp, OpKind, StorageError, abandon_in_flight,
};

/// Worker threads of one storage's pool.
pub const IO_WORKERS: usize = 16;
/// Jobs queued for the pool at most (operations of every open data file
/// together, beyond those the workers are running).
pub const JOBS_QUEUED_MAX: usize = 1024;

/// One operation for the pool.
struct Job {
    file: Arc<File>,
    op: IoOp,
    done: Sender<Completion>,
}

/// The worker threads shared by every threaded data file of a storage.
/// The threads exit once every handle is gone and the queue is empty.
#[derive(Debug)]
pub struct IoWorkers {
    jobs: Sender<Job>,
    /// Threads still running (a panicking worker counts itself out too).
    alive: Arc<AtomicUsize>,
}

/// Counts a worker out when its thread ends, however it ends.
struct AliveGuard(Arc<AtomicUsize>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl IoWorkers {
    /// Starts `count` worker threads.
    pub fn start(count: usize) -> io::Result<Arc<IoWorkers>> {
        assert!(count > 0, "a worker pool needs a worker");
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(JOBS_QUEUED_MAX);
        let alive = Arc::new(AtomicUsize::new(0));
        for n in 0..count {
            let queue = queue.clone();
            alive.fetch_add(1, Ordering::SeqCst);
            let guard = AliveGuard(Arc::clone(&alive));
            // On an error the threads started so far see the channel close
            // (`jobs` drops) and exit.
            std::thread::Builder::new()
                .name(format!("gpusnap-io-{n}"))
                .spawn(move || {
                    let _alive = guard;
                    worker_loop(&queue);
                })?;
        }
        Ok(Arc::new(IoWorkers { jobs, alive }))
    }

    /// Worker threads still running.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    /// Queues `job`, waiting at most [`IO_STALL_MAX`] for room; gives it
    /// back with the error that kept it out.
    fn send(&self, job: Job) -> Result<(), (Job, io::Error)> {
        match self.jobs.send_timeout(job, IO_STALL_MAX) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(job)) => Err((
                job,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the I/O worker queue stayed full for {IO_STALL_MAX:?}"),
                ),
            )),
            Err(SendTimeoutError::Disconnected(job)) => {
                Err((job, io::Error::other("the I/O worker threads are gone")))
            }
        }
    }
}

fn worker_loop(queue: &Receiver<Job>) {
    // `recv` fails once every sender is gone and the queue is empty, so
    // every queued operation runs before the worker exits.
    while let Ok(Job { file, mut op, done }) = queue.recv() {
        let result = transfer(&file, &mut op);
        // Fails only when the data file is gone (it gave up waiting): the
        // completion, and the buffer in it, drop here, after the transfer.
        let _ = done.send(Completion { op, result });
    }
}

/// A [`DataFile`] served by the storage's [`IoWorkers`].
#[derive(Debug)]
pub struct ThreadedFile {
    backend: BackendKind,
    path: PathBuf,
    file: Arc<File>,
    queue_depth: usize,
    /// Submitted and not yet returned by `reap`, `failed` included.
    in_flight: usize,
    /// Of those, operations on borrowed memory (see `abandon_in_flight`).
    borrowed: usize,
    workers: Arc<IoWorkers>,
    done_tx: Sender<Completion>,
    done: Receiver<Completion>,
    /// Operations that could not be handed to a worker, returned by `reap`
    /// (and completions kept after a failed `reap`).
    failed: Vec<Completion>,
}

impl ThreadedFile {
    /// Serves `file` (opened by the caller, with O_DIRECT for
    /// [`BackendKind::Pwrite`]) with up to `queue_depth` operations in
    /// flight on `workers`.
    pub fn new(
        file: File,
        path: &Path,
        backend: BackendKind,
        queue_depth: usize,
        workers: Arc<IoWorkers>,
    ) -> Self {
        let queue_depth = queue_depth.max(1);
        let (done_tx, done) = crossbeam_channel::bounded::<Completion>(queue_depth);
        ThreadedFile {
            backend,
            path: path.to_path_buf(),
            file: Arc::new(file),
            queue_depth,
            in_flight: 0,
            borrowed: 0,
            workers,
            done_tx,
            done,
            failed: Vec::new(),
        }
    }

    /// Counts returned completions out of the in-flight numbers.
    fn returned(&mut self, out: &[Completion]) {
        assert!(
            out.len() <= self.in_flight,
            "more completions than operations"
        );
        self.in_flight -= out.len();
        self.borrowed -= out.iter().filter(|c| c.op.borrows_memory()).count();
    }
}

/// Checks what every backend relies on before handing an op's memory to the
/// kernel: the transfer fits in its buffer and its offset fits in `off_t`.
pub(crate) fn check_op(op: &IoOp) -> io::Result<libc::off_t> {
    if op.len > op.buf.capacity() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "transfer of {} bytes exceeds its {}-byte buffer",
                op.len,
                op.buf.capacity()
            ),
        ));
    }
    libc::off_t::try_from(op.offset).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {} exceeds off_t", op.offset),
        )
    })
}

/// One `pwrite` or `pread` of the whole op, retried on EINTR. A short
/// transfer is returned as it is; the caller decides.
fn transfer(file: &File, op: &mut IoOp) -> io::Result<usize> {
    let offset = check_op(op)?;
    let fd = file.as_raw_fd();
    let ptr = op.buf.as_mut_ptr();
    loop {
        let n = match op.kind {
            // SAFETY: `check_op` showed `op.len` fits in the buffer, which is
            // a lent pool buffer or a RawRegion whose maker promised it stays
            // readable until this op completes; the op (and so the buffer) is
            // owned by this worker for the whole call.
            OpKind::Write => unsafe { libc::pwrite(fd, ptr.cast_const().cast(), op.len, offset) },
            // SAFETY: as above, and a RawRegion given for a read is writable
            // and not otherwise accessed until the op completes.
            OpKind::Read => unsafe { libc::pread(fd, ptr.cast(), op.len, offset) },
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let err = io::Error::last_os_error();
                // EINTR comes only from a signal handler interrupting the
                // call; each retry is a new call, not a spin on one state.
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

impl DataFile for ThreadedFile {
    fn backend(&self) -> BackendKind {
        self.backend
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, op: IoOp) {
        assert!(self.in_flight < self.queue_depth, "queue depth exceeded");
        self.in_flight += 1;
        if op.borrows_memory() {
            self.borrowed += 1;
        }
        let job = Job {
            file: Arc::clone(&self.file),
            op,
            done: self.done_tx.clone(),
        };
        if let Err((job, error)) = self.workers.send(job) {
            self.failed.push(Completion {
                op: job.op,
                result: Err(error),
            });
        }
    }

    fn reap(&mut self, at_least: usize) -> Result<Vec<Completion>, StorageError> {
        let want = at_least.min(self.in_flight);
        let mut out = std::mem::take(&mut self.failed);
        while out.len() < want {
            match self.done.recv_timeout(IO_STALL_MAX) {
                Ok(c) => out.push(c),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    let in_flight = self.in_flight;
                    let gone = self.workers.alive() == 0;
                    // Returned by the next call; still counted in flight.
                    self.failed = out;
                    return Err(if gone {
                        StorageError::WorkersGone {
                            path: self.path.clone(),
                            in_flight,
                        }
                    } else {
                        StorageError::Stalled {
                            path: self.path.clone(),
                            in_flight,
                            waited: IO_STALL_MAX,
                        }
                    });
                }
            }
        }
        out.extend(self.done.try_iter());
        self.returned(&out);
        Ok(out)
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        super::set_file_len(&self.file, &self.path, len)
    }

    fn sync_data(&mut self) -> Result<(), StorageError> {
        super::sync_file_data(&self.file, &self.path)
    }
}

impl Drop for ThreadedFile {
    fn drop(&mut self) {
        // Wait for this file's own operations (never the pool's others), so
        // none touches its memory after the file is gone.
        let failed = std::mem::take(&mut self.failed);
        self.returned(&failed);
        drop(failed);
        while self.in_flight > 0 {
            match self.done.recv_timeout(IO_STALL_MAX) {
                Ok(c) => self.returned(std::slice::from_ref(&c)),
                Err(_) => {
                    abandon_in_flight(&self.path, self.in_flight, self.borrowed);
                    return;
                }
            }
        }
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
    use crate::buffer_pool::BufferPool;
    use crate::storage::Storage;
    use crate::storage::os::OsStorage;
    use crate::storage::os::tests::{drop_with_ops_in_flight, round_trip, soon};
    use crate::storage::probe::BackendChoice;

    fn storage(choice: BackendChoice) -> (tempfile::TempDir, BufferPool, OsStorage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = BufferPool::new(16 * 65536, 65536).expect("pool");
        let storage = OsStorage::open(dir.path(), choice, pool.clone()).expect("open storage");
        (dir, pool, storage)
    }

    #[test]
    fn pwrite_round_trip_at_depth_4_and_32() {
        let (_dir, pool, storage) = storage(BackendChoice::Pwrite);
        assert_eq!(storage.backend(), BackendKind::Pwrite);
        round_trip(&storage, &pool, 4);
        round_trip(&storage, &pool, 32);
    }

    #[test]
    fn buffered_round_trip_at_depth_4_and_32() {
        let (_dir, pool, storage) = storage(BackendChoice::Buffered);
        assert_eq!(storage.backend(), BackendKind::Buffered);
        round_trip(&storage, &pool, 4);
        round_trip(&storage, &pool, 32);
    }

    #[test]
    fn drop_with_ops_in_flight_waits_for_them() {
        for choice in [BackendChoice::Pwrite, BackendChoice::Buffered] {
            let (_dir, pool, storage) = storage(choice);
            drop_with_ops_in_flight(&storage, &pool);
        }
    }

    /// Every threaded file of a storage runs on the storage's one pool: no
    /// thread is started per file, and the pool outlives none of them.
    #[test]
    fn files_share_one_bounded_pool_of_workers() {
        let (dir, pool, storage) = storage(BackendChoice::Pwrite);
        let mut files = Vec::new();
        for n in 0..12 {
            let mut f = storage
                .create_data_file(&dir.path().join(format!("f{n}")), 65536, 4)
                .expect("create");
            let mut buf = pool.lease(1, soon()).expect("lease").take().expect("buf");
            buf.space_mut().fill(u8::try_from(n).expect("small"));
            f.submit(IoOp {
                kind: OpKind::Write,
                offset: 0,
                len: 65536,
                buf: crate::storage::IoBuf::Pooled(buf),
                tag: n,
            });
            files.push(f);
        }
        let workers = storage.workers(dir.path()).expect("the pool");
        assert_eq!(workers.alive(), IO_WORKERS, "one pool, not one per file");
        // The storage, each file and this test hold the one pool.
        assert_eq!(Arc::strong_count(&workers), 12 + 2);
        for mut f in files.drain(..) {
            let done = f.reap(1).expect("reap");
            assert!(done.iter().all(|c| c.result.is_ok()));
        }
        assert_eq!(Arc::strong_count(&workers), 2);
        for n in 0..12u8 {
            let back = std::fs::read(dir.path().join(format!("f{n}"))).expect("read");
            assert!(back.iter().all(|&b| b == n));
        }
    }

    /// A write from borrowed memory counts as borrowed as a read into it
    /// does: an abandoned one aborts the process (`abandon_in_flight`)
    /// instead of letting a worker read memory its owner has freed.
    #[test]
    fn writes_from_borrowed_memory_count_as_borrowed_until_reaped() {
        let (dir, pool, storage) = storage(BackendChoice::Buffered);
        let mut memory = crate::hot_tier::HotBuffer::new(8192).expect("aligned memory");
        memory.fill(7);
        let workers = storage.workers(dir.path()).expect("the pool");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .expect("create");
        let mut f = ThreadedFile::new(
            file,
            &dir.path().join("f"),
            BackendKind::Buffered,
            4,
            workers,
        );
        for (kind, tag) in [(OpKind::Write, 1), (OpKind::Read, 2)] {
            // SAFETY: `memory` outlives `f`, which reaps the op below; the
            // test touches the memory only after that.
            let region = unsafe { crate::storage::RawRegion::new(memory.as_mut_ptr(), 4096) };
            f.submit(IoOp {
                kind,
                offset: 0,
                len: 4096,
                buf: crate::storage::IoBuf::Borrowed(region),
                tag,
            });
            assert_eq!(f.borrowed, 1, "{kind:?} from borrowed memory");
            let done = f.reap(1).expect("reap");
            assert!(done.iter().all(|c| c.result.is_ok()), "{kind:?}");
            assert_eq!(f.borrowed, 0, "{kind:?} reaped");
        }
        let mut buf = pool.lease(1, soon()).expect("lease").take().expect("buf");
        buf.space_mut().fill(1);
        f.submit(IoOp {
            kind: OpKind::Write,
            offset: 4096,
            len: 4096,
            buf: crate::storage::IoBuf::Pooled(buf),
            tag: 3,
        });
        assert_eq!(f.borrowed, 0, "a pool buffer is not borrowed");
        f.reap(1).expect("reap");
    }

    #[test]
    fn oversized_op_is_refused_not_run() {
        let (dir, pool, storage) = storage(BackendChoice::Buffered);
        let mut f = storage
            .create_data_file(&dir.path().join("f"), 0, 2)
            .expect("create");
        let buf = pool.lease(1, soon()).expect("lease").take().expect("buf");
        f.submit(IoOp {
            kind: OpKind::Write,
            offset: 0,
            len: buf.buf_bytes() + 1,
            buf: crate::storage::IoBuf::Pooled(buf),
            tag: 9,
        });
        let done = f.reap(1).expect("reap");
        assert_eq!(done.len(), 1);
        assert!(done.iter().all(|c| c.op.tag == 9 && c.result.is_err()));
    }
}

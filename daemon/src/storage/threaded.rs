//! Data files moved by a small pool of threads doing `pwrite`/`pread`.
//!
//! Used for [`BackendKind::Pwrite`] (the file is opened with O_DIRECT) and
//! [`BackendKind::Buffered`] (through the page cache, where O_DIRECT is
//! refused). Operations go to the workers through a bounded channel and come
//! back through another; both are sized to the queue depth, so a worker never
//! blocks handing back a completion. `Drop` closes the op channel and joins
//! the workers, which first finish everything queued: no memory an operation
//! borrowed is touched after the data file is gone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::{BackendKind, Completion, DataFile, IoOp, OpKind, StorageError};

/// Most worker threads per data file.
const WORKERS_MAX: usize = 8;

/// A [`DataFile`] served by `min(queue_depth, 8)` `pwrite`/`pread` threads.
#[derive(Debug)]
pub struct ThreadedFile {
    backend: BackendKind,
    path: PathBuf,
    file: Arc<File>,
    queue_depth: usize,
    in_flight: usize,
    /// `None` only while dropping.
    ops: Option<Sender<IoOp>>,
    done: Receiver<Completion>,
    /// Operations that could not be handed to a worker, returned by `reap`.
    failed: Vec<Completion>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadedFile {
    /// Serves `file` (opened by the caller, with O_DIRECT for
    /// [`BackendKind::Pwrite`]) with up to `queue_depth` operations in flight.
    pub fn new(
        file: File,
        path: &Path,
        backend: BackendKind,
        queue_depth: usize,
    ) -> Result<Self, StorageError> {
        let queue_depth = queue_depth.max(1);
        let file = Arc::new(file);
        let (op_tx, op_rx) = crossbeam_channel::bounded::<IoOp>(queue_depth);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<Completion>(queue_depth);
        let mut this = ThreadedFile {
            backend,
            path: path.to_path_buf(),
            file: Arc::clone(&file),
            queue_depth,
            in_flight: 0,
            ops: Some(op_tx),
            done: done_rx,
            failed: Vec::new(),
            workers: Vec::new(),
        };
        for n in 0..queue_depth.min(WORKERS_MAX) {
            let (file, op_rx, done_tx) = (Arc::clone(&file), op_rx.clone(), done_tx.clone());
            let worker = std::thread::Builder::new()
                .name(format!("gpusnap-io-{n}"))
                .spawn(move || worker_loop(&file, &op_rx, &done_tx))
                .map_err(|e| StorageError::io("spawn I/O worker for", path, e))?;
            // On an early return `this` drops, which joins the workers so far.
            this.workers.push(worker);
        }
        Ok(this)
    }
}

fn worker_loop(file: &File, ops: &Receiver<IoOp>, done: &Sender<Completion>) {
    // `recv` fails once the sender is dropped and the queue is empty, so
    // every queued operation runs before the worker exits.
    while let Ok(mut op) = ops.recv() {
        let result = transfer(file, &mut op);
        if done.send(Completion { op, result }).is_err() {
            // Only while the owner drops: nobody waits for completions then.
            continue;
        }
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
        debug_assert!(self.in_flight < self.queue_depth, "queue depth exceeded");
        self.in_flight += 1;
        let sent = match &self.ops {
            Some(ops) => ops.send(op).map_err(|e| e.into_inner()),
            None => Err(op),
        };
        if let Err(op) = sent {
            self.failed.push(Completion {
                op,
                result: Err(io::Error::other("the I/O worker threads are gone")),
            });
        }
    }

    fn reap(&mut self, at_least: usize) -> Vec<Completion> {
        let want = at_least.min(self.in_flight);
        let mut out = std::mem::take(&mut self.failed);
        while out.len() < want {
            match self.done.recv() {
                Ok(c) => out.push(c),
                Err(_) => {
                    tracing::error!(path = %self.path.display(), "all I/O workers exited with operations in flight");
                    break;
                }
            }
        }
        out.extend(self.done.try_iter());
        self.in_flight = self.in_flight.saturating_sub(out.len());
        out
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
        // Closing the channel lets each worker finish what is queued and
        // exit; joining them means no operation still touches its memory.
        self.ops = None;
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!(path = %self.path.display(), "an I/O worker panicked");
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
    use crate::storage::os::tests::{drop_with_ops_in_flight, round_trip};
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

    #[test]
    fn oversized_op_is_refused_not_run() {
        let (dir, pool, storage) = storage(BackendChoice::Buffered);
        let mut f = storage
            .create_data_file(&dir.path().join("f"), 0, 2)
            .expect("create");
        let buf = pool.lease(1).expect("lease").take().expect("buf");
        f.submit(IoOp {
            kind: OpKind::Write,
            offset: 0,
            len: buf.buf_bytes() + 1,
            buf: crate::storage::IoBuf::Pooled(buf),
            tag: 9,
        });
        let done = f.reap(1);
        assert_eq!(done.len(), 1);
        assert!(done.iter().all(|c| c.op.tag == 9 && c.result.is_err()));
    }
}

//! Keeps a data file's queue full: submits aligned transfers, reaps
//! completions, recycles pool buffers, and stops at the first error.
//!
//! Every transfer is 4096-aligned in file offset, length and memory address
//! (asserted in [`Pipeline::submit`], whatever the backend). After the first
//! failed or short transfer, or failed `set_len`/`sync_data`, the file is
//! dead: nothing more is submitted to it, nor is it trimmed or synced (the
//! pipeline fences every operation on it, as redb's file wrapper does),
//! what is in flight is drained, and the error is returned with its OS
//! error intact (the offset beside it as a field).
//!
//! Every loop here is bounded. Each turn of a wait either gets back at least
//! one completion (so at most as many turns as operations in flight) or
//! ends with the file's first error; a failed `reap` (the backend cannot
//! wait any more: a stall, a failing `io_uring_enter`, workers gone) fails
//! the file and nothing is reaped from it again: whatever is still in
//! flight is left to the data file's own bounded `Drop`.

use std::path::{Path, PathBuf};

use crate::buffer_pool::{IO_ALIGN_BYTES, Lease, PoolBuf};
use crate::storage::{Completion, DataFile, IoBuf, IoOp, OpKind, StorageError};
use crate::store::error::StoreError;

/// A data file with a bounded number of transfers in flight.
pub(crate) struct Pipeline<'f> {
    file: &'f mut dyn DataFile,
    lease: Lease,
    /// Buffers the lease held at the start (free or in flight since); 0
    /// for a pipeline whose transfers all use borrowed memory.
    leased: usize,
    path: PathBuf,
    failed: Option<StoreError>,
    /// A reap failed: the file cannot give its operations back any more.
    wedged: bool,
    /// Completions of reads kept for the caller, in completion order.
    done_reads: Vec<Completion>,
}

impl<'f> Pipeline<'f> {
    /// A pipeline over `file` with the pool buffers of `lease`, which may
    /// be empty when every transfer uses borrowed memory
    /// ([`Lease::empty`]); [`Pipeline::take_buffer`] then must not be
    /// called.
    pub(crate) fn new(file: &'f mut dyn DataFile, lease: Lease, path: &Path) -> Self {
        Pipeline {
            file,
            leased: lease.len(),
            lease,
            path: path.to_path_buf(),
            failed: None,
            wedged: false,
            done_reads: Vec::new(),
        }
    }

    /// A free pool buffer, waiting for an in-flight transfer to return one.
    pub(crate) fn take_buffer(&mut self) -> Result<PoolBuf, StoreError> {
        assert!(
            self.leased > 0,
            "{}: a buffer asked of a pipeline leased none",
            self.path.display()
        );
        loop {
            self.check()?;
            if let Some(buf) = self.lease.take() {
                return Ok(buf);
            }
            assert!(
                self.file.in_flight() > 0,
                "every leased buffer is either free or in flight"
            );
            self.reap(1);
        }
    }

    /// A free buffer if one is there now (never waits).
    pub(crate) fn try_take_buffer(&mut self) -> Option<PoolBuf> {
        self.lease.take()
    }

    /// Gives an unused buffer back.
    pub(crate) fn put_back(&mut self, buf: PoolBuf) {
        self.lease.put_back(buf);
    }

    /// Starts a transfer of `len` bytes at `offset`, waiting for a queue slot.
    pub(crate) fn submit(
        &mut self,
        kind: OpKind,
        offset: u64,
        len: usize,
        buf: IoBuf,
        tag: u64,
    ) -> Result<(), StoreError> {
        let align = IO_ALIGN_BYTES as u64;
        assert!(
            offset.is_multiple_of(align) && len.is_multiple_of(IO_ALIGN_BYTES),
            "unaligned transfer: offset {offset} len {len}"
        );
        assert!(
            (buf.as_ptr() as usize).is_multiple_of(IO_ALIGN_BYTES),
            "transfer memory at {:p} is not {IO_ALIGN_BYTES}-byte aligned",
            buf.as_ptr()
        );
        assert!(len <= buf.capacity(), "transfer larger than its buffer");
        while self.failed.is_none() && self.file.in_flight() >= self.file.queue_depth() {
            self.reap(1);
        }
        if let Err(e) = self.check() {
            self.recycle(buf);
            return Err(e);
        }
        self.file.submit(IoOp {
            kind,
            offset,
            len,
            buf,
            tag,
        });
        Ok(())
    }

    /// Waits for everything in flight; the first error, if any.
    pub(crate) fn drain(&mut self) -> Result<(), StoreError> {
        self.wait_all();
        self.check()
    }

    /// Trims the file to `len` once everything in flight is done; refused
    /// when the file is dead, and kills it when it fails.
    pub(crate) fn set_len(&mut self, len: u64) -> Result<(), StoreError> {
        self.drain()?;
        let result = self.file.set_len(len);
        result.map_err(|e| self.dead_after(e))
    }

    /// fdatasync once everything in flight is done; refused when the file
    /// is dead, and kills it when it fails (never retried).
    pub(crate) fn sync_data(&mut self) -> Result<(), StoreError> {
        self.drain()?;
        let result = self.file.sync_data();
        result.map_err(|e| self.dead_after(e))
    }

    /// The error of a failed `set_len`/`sync_data`; the file is dead after it.
    fn dead_after(&mut self, e: StorageError) -> StoreError {
        self.failed = Some(StoreError::Storage(StorageError::Dead {
            path: self.path.clone(),
        }));
        StoreError::Storage(e)
    }

    /// Waits for at least one read to finish and returns the finished reads
    /// (buffers are the caller's to hand back with `put_back`).
    pub(crate) fn next_reads(&mut self) -> Result<Vec<Completion>, StoreError> {
        while self.done_reads.is_empty() {
            self.check()?;
            assert!(
                self.file.in_flight() > 0,
                "waiting for reads with none in flight"
            );
            self.reap(1);
        }
        self.check()?;
        Ok(std::mem::take(&mut self.done_reads))
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.file.in_flight()
    }

    fn check(&mut self) -> Result<(), StoreError> {
        match &self.failed {
            None => Ok(()),
            Some(_) => Err(self.failed_again()),
        }
    }

    /// The first error is returned once; later calls see the file as dead.
    fn failed_again(&mut self) -> StoreError {
        match self.failed.take() {
            Some(first) => {
                self.failed = Some(StoreError::Storage(StorageError::Dead {
                    path: self.path.clone(),
                }));
                first
            }
            None => StoreError::Storage(StorageError::Dead {
                path: self.path.clone(),
            }),
        }
    }

    fn fail(&mut self, e: StoreError) {
        if self.failed.is_none() {
            self.failed = Some(e);
        }
    }

    /// Reaps everything in flight (errors and all), unless the file is
    /// wedged. Each turn returns every operation asked for, or wedges.
    fn wait_all(&mut self) {
        while !self.wedged && self.file.in_flight() > 0 {
            let n = self.file.in_flight();
            self.reap(n);
        }
    }

    /// One reap of at least `at_least` completions, which always makes
    /// progress: it returns that many (the backend's contract, asserted) or
    /// fails the file for good.
    fn reap(&mut self, at_least: usize) {
        if self.wedged {
            return;
        }
        let want = at_least.min(self.file.in_flight());
        match self.file.reap(at_least) {
            Ok(done) => {
                assert!(
                    done.len() >= want,
                    "{}: reap returned {} of the {want} completions it must wait for",
                    self.path.display(),
                    done.len()
                );
                for c in done {
                    self.complete(c);
                }
            }
            Err(e) => {
                self.wedged = true;
                tracing::error!(path = %self.path.display(), error = %e, in_flight = self.file.in_flight(), "the data file cannot wait for its transfers; failing it");
                self.fail(StoreError::Storage(e));
            }
        }
    }

    fn complete(&mut self, c: Completion) {
        let Completion { op, result } = c;
        let op_name = match op.kind {
            OpKind::Write => "write",
            OpKind::Read => "read",
        };
        match result {
            Err(e) => {
                self.fail(StoreError::Storage(StorageError::io_at(
                    op_name, &self.path, op.offset, e,
                )));
                self.recycle(op.buf);
            }
            // Reads may stop short at the end of the file; the reader checks.
            Ok(n) if op.kind == OpKind::Write && n != op.len => {
                self.fail(StoreError::ShortTransfer {
                    op: op_name,
                    path: self.path.clone(),
                    offset: op.offset,
                    expected: op.len,
                    done: n,
                });
                self.recycle(op.buf);
            }
            Ok(n) if op.kind == OpKind::Read && self.failed.is_none() => {
                self.done_reads.push(Completion { op, result: Ok(n) });
            }
            Ok(_) => self.recycle(op.buf),
        }
    }

    fn recycle(&mut self, buf: IoBuf) {
        if let IoBuf::Pooled(b) = buf {
            self.lease.put_back(b);
        }
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        // Buffers and borrowed memory must not be touched after we return:
        // wait for everything (bounded: see the module doc); a wedged file's
        // own `Drop` waits for (or abandons) what is left.
        self.wait_all();
    }
}

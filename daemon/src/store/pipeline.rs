//! Keeps a data file's queue full: submits aligned transfers, reaps
//! completions, recycles pool buffers, and stops at the first error.
//!
//! After the first failed or short transfer the file is dead: nothing more is
//! submitted to it, what is in flight is drained, and the error is returned.

use std::path::{Path, PathBuf};

use crate::buffer_pool::{IO_ALIGN_BYTES, Lease, PoolBuf};
use crate::storage::{Completion, DataFile, IoBuf, IoOp, OpKind, StorageError};
use crate::store::error::StoreError;

/// A data file with a bounded number of transfers in flight.
pub(crate) struct Pipeline<'f> {
    file: &'f mut dyn DataFile,
    lease: Lease,
    path: PathBuf,
    failed: Option<StoreError>,
    /// Completions of reads kept for the caller, in completion order.
    done_reads: Vec<Completion>,
}

impl<'f> Pipeline<'f> {
    pub(crate) fn new(file: &'f mut dyn DataFile, lease: Lease, path: &Path) -> Self {
        assert!(!lease.is_empty(), "a pipeline needs at least one buffer");
        Pipeline {
            file,
            lease,
            path: path.to_path_buf(),
            failed: None,
            done_reads: Vec::new(),
        }
    }

    /// A free pool buffer, waiting for an in-flight transfer to return one.
    pub(crate) fn take_buffer(&mut self) -> Result<PoolBuf, StoreError> {
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
        assert!(
            offset.is_multiple_of(IO_ALIGN_BYTES as u64) && len.is_multiple_of(IO_ALIGN_BYTES),
            "unaligned transfer: offset {offset} len {len}"
        );
        assert!(len <= buf.capacity(), "transfer larger than its buffer");
        while self.file.in_flight() >= self.file.queue_depth() {
            self.reap(1);
        }
        if let Err(e) = self.check() {
            if let IoBuf::Pooled(b) = buf {
                self.lease.put_back(b);
            }
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
        while self.file.in_flight() > 0 {
            let n = self.file.in_flight();
            self.reap(n);
        }
        self.check()
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

    fn reap(&mut self, at_least: usize) {
        for c in self.file.reap(at_least) {
            self.complete(c);
        }
    }

    fn complete(&mut self, c: Completion) {
        let Completion { op, result } = c;
        let op_name = match op.kind {
            OpKind::Write => "write",
            OpKind::Read => "read",
        };
        let error = match &result {
            Err(e) => Some(StoreError::Storage(StorageError::io(
                op_name,
                &self.path,
                std::io::Error::new(e.kind(), format!("at offset {}: {e}", op.offset)),
            ))),
            // Reads may stop short at the end of the file; the reader checks.
            Ok(n) if op.kind == OpKind::Write && *n != op.len => Some(StoreError::ShortTransfer {
                op: op_name,
                path: self.path.clone(),
                offset: op.offset,
                expected: op.len,
                done: *n,
            }),
            Ok(_) => None,
        };
        if let Some(e) = error
            && self.failed.is_none()
        {
            self.failed = Some(e);
        }
        match op.kind {
            OpKind::Read if self.failed.is_none() => {
                self.done_reads.push(Completion { op, result })
            }
            _ => {
                if let IoBuf::Pooled(b) = op.buf {
                    self.lease.put_back(b);
                }
            }
        }
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        // Buffers and borrowed memory must not be touched after we return.
        while self.file.in_flight() > 0 {
            let n = self.file.in_flight();
            for c in self.file.reap(n) {
                drop(c);
            }
        }
    }
}

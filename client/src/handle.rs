//! Capture: `Begin`, the copies (overlapped on a worker for a slot, chunk by
//! chunk through the ring for a stream), `Captured`/`Accepted`, `Abort`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::buffer::ReadLease;
use crate::client::{CaptureInfo, Client, CommitInfo, SnapshotOutcome};
use crate::conn::Deadline;
use crate::device::{CaptureCopy, Device, Source};
use crate::error::{Error, Result};
use crate::proto::{BusyPolicy, ReplyBody, RequestBody};
use crate::session::Outcome;
use crate::staging::Staging;

/// Result of an overlapped copy: the leases back, and the copy time.
type CopyResult = (Vec<ReadLease>, Result<Duration>);

enum State {
    /// Copies run on a worker into `slot`.
    Copying(JoinHandle<CopyResult>),
    /// The data is in staging; `Captured` is still to be sent.
    Copied {
        leases: Vec<ReadLease>,
        capture: Duration,
    },
    /// Accepted or skipped.
    Done(SnapshotOutcome),
    /// Failed; the error was returned.
    Failed,
}

/// The capture a client has open: started by [`Client::snapshot_begin`] or
/// [`Client::begin_snapshot`], finished by waiting for it. A client has at
/// most one; restores, registrations and other snapshots are refused while
/// it is open ([`Error::CaptureInProgress`]).
pub(crate) struct OpenCapture {
    step: u64,
    state: State,
    /// Time the trainer was blocked so far.
    stall: Duration,
    bytes: u64,
}

impl std::fmt::Debug for OpenCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Copying(_) => "copying",
            State::Copied { .. } => "copied",
            State::Done(_) => "done",
            State::Failed => "failed",
        };
        f.debug_struct("OpenCapture")
            .field("step", &self.step)
            .field("state", &state)
            .finish()
    }
}

/// A snapshot whose capture was started by [`Client::snapshot_begin`].
///
/// The registered host tensors stay read-locked until the capture is
/// finished, so a trainer's writes wait for the copies. Dropping a handle
/// that was not waited for finishes the capture and logs any error.
pub struct SnapshotHandle<'a> {
    client: &'a mut Client,
    step: u64,
    /// What waiting came to, once it did (`Err(())`: it failed and the
    /// error was returned).
    finished: Option<Result<SnapshotOutcome, ()>>,
}

impl std::fmt::Debug for SnapshotHandle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotHandle")
            .field("step", &self.step)
            .field("finished", &self.finished)
            .finish()
    }
}

/// What `Begin` was answered with.
enum Begun {
    Slot(u32),
    Stream(u64),
    Skipped(String),
}

impl Client {
    /// Snapshots every registered buffer as `step`; returns once the data
    /// is in the daemon's staging (it persists in the background; see
    /// [`Client::wait_committed`]).
    pub fn snapshot(&mut self, step: u64) -> Result<SnapshotOutcome> {
        self.snapshot_begin(step)?.wait_captured()
    }

    /// Starts a snapshot of `step`. With a staging slot the copies run on
    /// background threads and this returns at once; with a stream (staging
    /// busy, policy `stream`) the copy goes through the ring before this
    /// returns. Either way the registered host tensors are read-locked
    /// until the handle is waited for or dropped (so a `write()` guard held
    /// by the calling thread across this call would wait forever).
    pub fn snapshot_begin(&mut self, step: u64) -> Result<SnapshotHandle<'_>> {
        self.begin_snapshot(step)?;
        Ok(SnapshotHandle {
            client: self,
            step,
            finished: None,
        })
    }

    /// [`snapshot_begin`](Client::snapshot_begin) without a handle, for
    /// callers that cannot hold a borrow (the Python bindings): the capture
    /// stays open on the client until [`finish_snapshot`](Client::finish_snapshot).
    /// Buffers must not be written until then.
    pub fn begin_snapshot(&mut self, step: u64) -> Result<()> {
        self.refuse_open_capture()?;
        let open = self.start_capture(step)?;
        self.capture = Some(open);
        Ok(())
    }

    /// The step of the open capture, if one is open.
    pub fn open_capture(&self) -> Option<u64> {
        self.capture.as_ref().map(|c| c.step)
    }

    /// Finishes the open capture: waits for the copies, tells the daemon
    /// the capture is complete and waits for it to accept. The capture is
    /// closed whatever the result. [`Error::NotFound`] when none is open.
    pub fn finish_snapshot(&mut self) -> Result<SnapshotOutcome> {
        let open = self
            .capture
            .take()
            .ok_or_else(|| Error::NotFound("no snapshot capture is open".into()))?;
        self.drive_capture(open)
    }

    /// [`Error::CaptureInProgress`] while a capture is open.
    pub(crate) fn refuse_open_capture(&self) -> Result<()> {
        match self.open_capture() {
            Some(step) => Err(Error::CaptureInProgress { step }),
            None => Ok(()),
        }
    }

    fn start_capture(&mut self, step: u64) -> Result<OpenCapture> {
        let started = Instant::now();
        let staging = self.retry("register", |c| c.registered())?;
        let leases: Vec<ReadLease> = self.tensors.iter().map(|r| r.buffer.lease_read()).collect();
        let bytes = staging.tensor_bytes_total();
        let done = |outcome: SnapshotOutcome| OpenCapture {
            step,
            state: State::Done(outcome),
            stall: started.elapsed(),
            bytes,
        };
        let begun = match self.begin(step, &staging) {
            Err(e) if self.broke(&e) => {
                tracing::warn!(step, "begin: connection broke ({e}); reconnecting");
                self.close_session();
                let outcome = self.capture_again(step, &leases, started);
                return Ok(done(outcome?));
            }
            other => other?,
        };
        let state = match begun {
            Begun::Skipped(reason) => {
                self.events.record(
                    step,
                    Outcome::Skipped {
                        reason: reason.clone(),
                    },
                );
                State::Done(SnapshotOutcome::Skipped { step, reason })
            }
            Begun::Slot(slot) => {
                match spawn_copy(Arc::clone(&self.device), Arc::clone(&staging), slot, leases) {
                    Ok(worker) => State::Copying(worker),
                    Err(e) => {
                        self.abort(step, &[], &e);
                        return Err(e);
                    }
                }
            }
            Begun::Stream(chunks) => match self.stream(step, chunks, &staging, &leases) {
                Ok(capture) => State::Copied { leases, capture },
                Err(e) if self.broke(&e) => {
                    tracing::warn!(step, "stream: connection broke ({e}); reconnecting");
                    self.close_session();
                    let outcome = self.capture_again(step, &leases, started);
                    return Ok(done(outcome?));
                }
                Err(e) => return Err(e),
            },
        };
        Ok(OpenCapture {
            step,
            state,
            stall: started.elapsed(),
            bytes,
        })
    }

    /// Runs an open capture to its end.
    fn drive_capture(&mut self, mut open: OpenCapture) -> Result<SnapshotOutcome> {
        let step = open.step;
        loop {
            match std::mem::replace(&mut open.state, State::Failed) {
                State::Done(outcome) => return Ok(outcome),
                State::Failed => {
                    return Err(Error::Internal(format!(
                        "the capture of step {step} already failed"
                    )));
                }
                State::Copying(worker) => {
                    let waited = Instant::now();
                    let joined = worker.join();
                    open.stall += waited.elapsed();
                    let Ok((leases, copied)) = joined else {
                        let e = Error::Internal("a capture copy worker panicked".into());
                        self.abort(step, &[], &e);
                        return Err(e);
                    };
                    match copied {
                        Ok(capture) => open.state = State::Copied { leases, capture },
                        Err(e) => {
                            self.abort(step, &[], &e);
                            return Err(e);
                        }
                    }
                }
                State::Copied { leases, capture } => {
                    let outcome = match self.captured(step, capture, open.stall) {
                        Ok(()) => SnapshotOutcome::Captured(CaptureInfo {
                            step,
                            bytes: open.bytes,
                            capture,
                            stall: open.stall,
                        }),
                        Err(e) if self.broke(&e) => {
                            tracing::warn!(step, "captured: connection broke ({e}); reconnecting");
                            self.close_session();
                            let started = Instant::now() - open.stall;
                            self.capture_again(step, &leases, started)?
                        }
                        Err(e) => return Err(e),
                    };
                    drop(leases);
                    return Ok(outcome);
                }
            }
        }
    }

    /// Sends `Begin` and checks the answer against the staging layout.
    fn begin(&mut self, step: u64, staging: &Staging) -> Result<Begun> {
        let info = staging.info();
        let timeout = match info.policy {
            BusyPolicy::Block => self.config.commit_timeout,
            BusyPolicy::Skip | BusyPolicy::Stream => self.config.call_timeout,
        };
        match self.call(RequestBody::Begin { step }, timeout)? {
            ReplyBody::Slot { step: s, slot } if s == step => {
                if slot >= info.slots {
                    return Err(self.protocol(format!("slot {slot} of {} slots", info.slots)));
                }
                Ok(Begun::Slot(slot))
            }
            ReplyBody::Stream { step: s, chunks } if s == step => {
                if chunks != info.chunk_count() || (chunks > 0 && info.ring_chunks == 0) {
                    return Err(self.protocol(format!(
                        "stream of {chunks} chunks; the layout has {} chunks and a ring of {}",
                        info.chunk_count(),
                        info.ring_chunks
                    )));
                }
                Ok(Begun::Stream(chunks))
            }
            ReplyBody::Skipped { step: s, reason } if s == step => Ok(Begun::Skipped(reason)),
            other => Err(self.unexpected("begin", &other)),
        }
    }

    /// Copies the data section through the ring, `ring_chunks` chunks in
    /// flight at most; returns the time it took.
    fn stream(
        &mut self,
        step: u64,
        chunks: u64,
        staging: &Staging,
        leases: &[ReadLease],
    ) -> Result<Duration> {
        let mut outstanding: VecDeque<(u64, u64)> = VecDeque::new();
        let result = self.stream_chunks(step, chunks, staging, leases, &mut outstanding);
        if result.is_err()
            && !outstanding.is_empty()
            && let Some(session) = self.session.as_mut()
        {
            // Replies to chunks still in flight would be read as replies
            // to later requests: this conversation is over.
            session.unexpected_broken();
        }
        result
    }

    fn stream_chunks(
        &mut self,
        step: u64,
        chunks: u64,
        staging: &Staging,
        leases: &[ReadLease],
        outstanding: &mut VecDeque<(u64, u64)>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let ring = u64::from(staging.info().ring_chunks);
        for seq in 0..chunks {
            if outstanding.len() as u64 >= ring
                && let Some((free, id)) = outstanding.pop_front()
            {
                self.chunk_free(step, free, id)?;
            }
            if let Err(e) = copy_chunk(&*self.device, staging, seq, leases) {
                let ids: Vec<u64> = outstanding.drain(..).map(|(_, id)| id).collect();
                self.abort(step, &ids, &e);
                return Err(e);
            }
            let deadline = Deadline::after(self.config.call_timeout);
            let id = self
                .session_mut()?
                .send(RequestBody::ChunkFilled { step, seq }, deadline)?;
            outstanding.push_back((seq, id));
        }
        while let Some((free, id)) = outstanding.pop_front() {
            self.chunk_free(step, free, id)?;
        }
        Ok(started.elapsed())
    }

    fn chunk_free(&mut self, step: u64, seq: u64, id: u64) -> Result<()> {
        let deadline = Deadline::after(self.config.call_timeout);
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| Error::Disconnected("no connection to gpusnapd".into()))?;
        match session
            .recv(id, "chunk_free", deadline, &mut self.events, false)?
            .0
        {
            ReplyBody::ChunkFree { step: s, seq: q } if s == step && q == seq => Ok(()),
            other => Err(self.unexpected("chunk_filled", &other)),
        }
    }

    /// Sends `Captured` and awaits `Accepted`.
    fn captured(&mut self, step: u64, capture: Duration, stall: Duration) -> Result<()> {
        let body = RequestBody::Captured {
            step,
            capture_ns: nanos(capture),
            stall_ns: nanos(stall),
        };
        match self.call(body, self.config.call_timeout)? {
            ReplyBody::Accepted { step: s } if s == step => {
                if let Some(session) = self.session.as_mut() {
                    session.in_flight.insert(step);
                }
                Ok(())
            }
            other => Err(self.unexpected("captured", &other)),
        }
    }

    /// Gives the slot (or ring) back after a failed copy; `pending` are ids
    /// of requests whose replies are still to be read. Errors are logged:
    /// the copy error is what the caller reports.
    fn abort(&mut self, step: u64, pending: &[u64], cause: &Error) {
        let result = (|| -> Result<()> {
            let deadline = Deadline::after(self.config.call_timeout);
            let reason = cause.to_string();
            let session = self.session_mut()?;
            let id = session.send(RequestBody::Abort { step, reason }, deadline)?;
            let session = self
                .session
                .as_mut()
                .ok_or_else(|| Error::Disconnected("no connection".into()))?;
            for &earlier in pending {
                // Replies to chunks filled before the failure.
                let _ = session.recv(earlier, "chunk_free", deadline, &mut self.events, false)?;
            }
            match session
                .recv(id, "abort", deadline, &mut self.events, false)?
                .0
            {
                ReplyBody::Aborted { step: s } if s == step => Ok(()),
                other => Err(self.unexpected("abort", &other)),
            }
        })();
        if let Err(e) = result {
            tracing::warn!(step, error = %e, "abort after a failed copy did not complete");
        }
    }

    /// The whole capture, synchronously, on a fresh connection: what a
    /// retry after a broken connection runs (the leases are still held, so
    /// the data is the same as in the first try).
    fn capture_again(
        &mut self,
        step: u64,
        leases: &[ReadLease],
        started: Instant,
    ) -> Result<SnapshotOutcome> {
        let staging = self.registered()?;
        let capture = match self.begin(step, &staging)? {
            Begun::Skipped(reason) => {
                // The first try may have reached the daemon (it refuses a
                // step it already has): let the listing decide.
                self.orphaned.insert(step);
                return Ok(SnapshotOutcome::Skipped { step, reason });
            }
            Begun::Slot(slot) => {
                let t = Instant::now();
                if let Err(e) = copy_slot(&*self.device, &staging, slot, leases) {
                    self.abort(step, &[], &e);
                    return Err(e);
                }
                t.elapsed()
            }
            Begun::Stream(chunks) => self.stream(step, chunks, &staging, leases)?,
        };
        let stall = started.elapsed();
        self.captured(step, capture, stall)?;
        Ok(SnapshotOutcome::Captured(CaptureInfo {
            step,
            bytes: staging.tensor_bytes_total(),
            capture,
            stall,
        }))
    }
}

impl SnapshotHandle<'_> {
    /// The step being captured.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Waits for the copies, tells the daemon the capture is complete and
    /// waits for it to accept; the host tensors are unlocked after this.
    pub fn wait_captured(&mut self) -> Result<SnapshotOutcome> {
        let step = self.step;
        match &self.finished {
            Some(Ok(outcome)) => return Ok(outcome.clone()),
            Some(Err(())) => {
                return Err(Error::Internal(format!(
                    "the capture of step {step} already failed"
                )));
            }
            None => {}
        }
        let result = self.client.finish_snapshot();
        self.finished = Some(result.as_ref().map(Clone::clone).map_err(drop));
        result
    }

    /// Finishes the capture and waits for the commit.
    pub fn wait_committed(mut self) -> Result<CommitInfo> {
        match self.wait_captured()? {
            SnapshotOutcome::Skipped { step, reason } => {
                self.client.events.take(step);
                Err(Error::Skipped { step, reason })
            }
            SnapshotOutcome::Captured(info) => self.client.wait_committed(info.step),
        }
    }
}

impl Drop for SnapshotHandle<'_> {
    fn drop(&mut self) {
        if self.finished.is_none()
            && let Err(e) = self.wait_captured()
        {
            tracing::error!(step = self.step, error = %e, "snapshot handle dropped: finishing the capture failed");
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Starts the copies into `slot` on a worker thread.
fn spawn_copy(
    device: Arc<dyn Device>,
    staging: Arc<Staging>,
    slot: u32,
    leases: Vec<ReadLease>,
) -> Result<JoinHandle<CopyResult>> {
    std::thread::Builder::new()
        .name("gpusnap-capture".into())
        .spawn(move || {
            let started = Instant::now();
            let result = copy_slot(&*device, &staging, slot, &leases);
            (leases, result.map(|()| started.elapsed()))
        })
        .map_err(Error::Io)
}

/// Copies every leased buffer into its place in `slot`.
fn copy_slot(
    device: &dyn Device,
    staging: &Staging,
    slot: u32,
    leases: &[ReadLease],
) -> Result<()> {
    // SAFETY: the daemon handed `slot` to this capture; the handle's borrow
    // of the client keeps every other capture or restore away until done.
    let spans = unsafe { staging.slot_spans(slot) }?;
    let copies = spans
        .into_iter()
        .zip(leases)
        .map(|(dst, lease)| CaptureCopy {
            src: lease.source(),
            dst,
        })
        .collect();
    device.capture(copies)
}

/// Copies stream chunk `seq` into its ring position; holes are zeroed.
fn copy_chunk(
    device: &dyn Device,
    staging: &Staging,
    seq: u64,
    leases: &[ReadLease],
) -> Result<()> {
    // SAFETY: this ring position is free (its previous chunk's ChunkFree
    // came, or it was never used), and one stream runs at a time.
    let spans = unsafe { staging.chunk_spans(seq) };
    let mut copies = Vec::with_capacity(spans.len());
    for (segment, mut span) in spans {
        let Some(i) = segment.tensor else {
            span.zero();
            continue;
        };
        let bytes = leases.get(i).map(ReadLease::bytes).unwrap_or(&[]);
        let start = usize::try_from(segment.tensor_offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(span.len())
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| Error::Internal(format!("chunk {seq}: segment outside tensor {i}")))?;
        copies.push(CaptureCopy {
            src: Source::Host(src),
            dst: span,
        });
    }
    device.capture(copies)
}

//! Capture: `Begin`, the copies (started on the devices and left running
//! for a slot, chunk by chunk through the ring for a stream),
//! `Captured`/`Accepted`, `Abort`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::background::{Finisher, Job, Pending};
use crate::client::{CaptureInfo, Client, CommitInfo, SnapshotOutcome};
use crate::conn::Deadline;
use crate::device::{CaptureCopy, Source, StreamOrder, Tickets};
use crate::error::{Error, Result};
use crate::proto::convert::{nanos, to_usize};
use crate::proto::{BusyPolicy, ReplyBody, RequestBody};
use crate::route;
use crate::session::Outcome;
use crate::staging::Staging;

enum State {
    /// The devices copy into the slot; `sources` hold the read leases.
    Copying {
        tickets: Tickets,
        sources: Vec<Source>,
    },
    /// The data is in staging; `Captured` is still to be sent.
    Copied {
        sources: Vec<Source>,
        capture: Duration,
    },
    /// Accepted or skipped.
    Done(SnapshotOutcome),
}

/// The capture a client has open: started by [`Client::snapshot_begin`] or
/// [`Client::begin_snapshot`], finished by waiting for it. A client has at
/// most one; restores, registrations and other snapshots are refused while
/// it is open ([`Error::CaptureInProgress`]).
pub(crate) struct OpenCapture {
    step: u64,
    /// The trainer's streams the copies are ordered after.
    order: StreamOrder,
    state: State,
    /// Time the trainer was blocked so far.
    stall: Duration,
    bytes: u64,
}

impl std::fmt::Debug for OpenCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Copying { .. } => "copying",
            State::Copied { .. } => "copied",
            State::Done(_) => "done",
        };
        f.debug_struct("OpenCapture")
            .field("step", &self.step)
            .field("state", &state)
            .finish()
    }
}

impl OpenCapture {
    /// Whether the copies have finished (never blocks; true once they
    /// have, or when there were none to run).
    pub(crate) fn copies_done(&self) -> bool {
        match &self.state {
            State::Copying { tickets, .. } => tickets.is_done(),
            State::Copied { .. } | State::Done(_) => true,
        }
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
    /// What waiting came to, once it did; a failure is kept so a second
    /// wait reports the same error.
    finished: Option<Result<SnapshotOutcome>>,
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
        self.snapshot_begin_on(step, StreamOrder::legacy())
    }

    /// [`snapshot_begin`](Client::snapshot_begin), with the copies of CUDA
    /// buffers ordered after the work queued so far on the trainer's
    /// streams in `order` (each device's legacy default stream where
    /// `order` names none).
    pub fn snapshot_begin_on(
        &mut self,
        step: u64,
        order: StreamOrder,
    ) -> Result<SnapshotHandle<'_>> {
        self.begin_snapshot_on(step, order)?;
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
        self.begin_snapshot_on(step, StreamOrder::legacy())
    }

    /// [`begin_snapshot`](Client::begin_snapshot) ordered after `order`'s
    /// streams (see [`snapshot_begin_on`](Client::snapshot_begin_on)).
    pub fn begin_snapshot_on(&mut self, step: u64, order: StreamOrder) -> Result<()> {
        self.collect_background();
        self.refuse_open_capture()?;
        let open = self.start_capture(step, order)?;
        self.capture = Some(open);
        Ok(())
    }

    /// The step of the open capture, if one is open.
    pub fn open_capture(&self) -> Option<u64> {
        self.capture.as_ref().map(|c| c.step)
    }

    /// Whether the copies of the open capture have finished, without
    /// blocking: `Some(true)` once every device's copies are done (the
    /// rest of [`finish_snapshot`](Client::finish_snapshot) is telling the
    /// daemon and awaiting its answer), `Some(false)` while they run,
    /// `None` when no capture is open. A trainer can poll it to decide
    /// when to finish; the buffers must still not be written before
    /// `finish_snapshot` returns.
    pub fn copies_done(&self) -> Option<bool> {
        if let Some(pending) = &self.handed_off {
            return Some(pending.copies_done.load(Ordering::Acquire));
        }
        self.capture.as_ref().map(OpenCapture::copies_done)
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

    /// Finishes the open capture without blocking the host on the device:
    /// the trainer's CUDA streams are made to wait for the copies on the
    /// device (`cuStreamWaitEvent`; the optimizer step queued next cannot
    /// change state under them), and a client thread waits for the copies,
    /// tells the daemon and awaits its answer. Copies of host memory are
    /// waited for here first (a [`RawBuffer`](crate::RawBuffer) has no
    /// lease that would hold the trainer's writes back), so every buffer
    /// may be written, or its writes queued, once this returns; host
    /// tensors stay read-locked until the daemon has the data.
    ///
    /// The capture's outcome is kept for [`background_outcome`](Client::background_outcome)
    /// and [`wait_committed`](Client::wait_committed), which raise its
    /// error; the client's next call that needs the connection first waits
    /// for the thread (usually long done by then). Where nothing is left
    /// to wait for (a skip, a stream), or the streams cannot be ordered, or
    /// no thread can be started, it finishes here and now instead, and
    /// returns that error, if any.
    pub fn finish_snapshot_in_background(&mut self) -> Result<()> {
        let open = self
            .capture
            .take()
            .ok_or_else(|| Error::NotFound("no snapshot capture is open".into()))?;
        let step = open.step;
        let open = match self.hand_off(open) {
            Ok(()) => return Ok(()),
            Err(open) => *open,
        };
        let outcome = self.drive_capture(open);
        let result = match &outcome {
            Ok(_) => Ok(()),
            Err(e) => Err(e.replay()),
        };
        self.keep_background_outcome(step, outcome);
        result
    }

    /// Gives a capture whose copies run to the finishing thread, or gives
    /// it back.
    fn hand_off(&mut self, open: OpenCapture) -> std::result::Result<(), Box<OpenCapture>> {
        let OpenCapture {
            step,
            order,
            state,
            stall,
            bytes,
        } = open;
        let State::Copying {
            mut tickets,
            sources,
        } = state
        else {
            return Err(Box::new(OpenCapture {
                step,
                order,
                state,
                stall,
                bytes,
            }));
        };
        let waited = Instant::now();
        let ordered = tickets.order_or_wait();
        let stall = stall + waited.elapsed();
        let give_back = |state| {
            Box::new(OpenCapture {
                step,
                order: order.clone(),
                state,
                stall,
                bytes,
            })
        };
        if let Err(e) = ordered {
            tracing::warn!(step, error = %e, "cannot order the trainer's streams after the copies: waiting for them on the host");
            return Err(give_back(State::Copying { tickets, sources }));
        }
        if self.finisher.is_none() {
            match Finisher::start() {
                Ok(f) => self.finisher = Some(f),
                Err(e) => {
                    tracing::warn!(step, error = %e, "no thread to finish captures in the background");
                    return Err(give_back(State::Copying { tickets, sources }));
                }
            }
        }
        let (Some(finisher), Some(session)) = (self.finisher.as_ref(), self.session.take()) else {
            return Err(give_back(State::Copying { tickets, sources }));
        };
        let copies_done = Arc::new(AtomicBool::new(false));
        let job = Job {
            step,
            tickets,
            sources,
            session,
            stall,
            bytes,
            call_timeout: self.config.call_timeout,
            copies_done: Arc::clone(&copies_done),
        };
        match finisher.hand(job) {
            Ok(()) => {
                self.handed_off = Some(Pending { step, copies_done });
                Ok(())
            }
            Err(job) => {
                let Job {
                    tickets,
                    sources,
                    session,
                    ..
                } = *job;
                self.session = Some(session);
                Err(give_back(State::Copying { tickets, sources }))
            }
        }
    }

    /// Takes back the connection and the outcome of a handed-off capture
    /// (waiting for it if it still runs); nothing when none is handed off.
    pub(crate) fn collect_background(&mut self) {
        let Some(pending) = self.handed_off.take() else {
            return;
        };
        let Some(finisher) = self.finisher.as_ref() else {
            return;
        };
        match finisher.collect() {
            Ok(finished) => {
                debug_assert_eq!(finished.step, pending.step);
                debug_assert!(
                    self.session.is_none(),
                    "a second connection opened during a hand-off"
                );
                self.session = Some(finished.session);
                self.events.absorb(finished.events);
                self.keep_background_outcome(finished.step, finished.outcome);
            }
            Err(e) => self.keep_background_outcome(pending.step, Err(e)),
        }
    }

    /// How the capture of `step` handed off by
    /// [`finish_snapshot_in_background`](Client::finish_snapshot_in_background)
    /// came out (waiting for it if it still runs); `None` when no such
    /// capture's outcome is kept (never handed off, asked for already, or
    /// dropped: of each kind, failures, captures and skips, the latest 64
    /// nobody asked for are kept, so skips never push out a failure).
    pub fn background_outcome(&mut self, step: u64) -> Option<Result<SnapshotOutcome>> {
        self.collect_background();
        self.background_outcomes.take(step)
    }

    fn keep_background_outcome(&mut self, step: u64, outcome: Result<SnapshotOutcome>) {
        if let Err(e) = &outcome {
            tracing::warn!(step, error = %e, "a capture finished in the background failed");
        }
        self.background_outcomes.keep(step, outcome);
    }

    /// [`Error::CaptureInProgress`] while a capture is open.
    pub(crate) fn refuse_open_capture(&self) -> Result<()> {
        match self.open_capture() {
            Some(step) => Err(Error::CaptureInProgress { step }),
            None => Ok(()),
        }
    }

    fn start_capture(&mut self, step: u64, order: StreamOrder) -> Result<OpenCapture> {
        let started = Instant::now();
        let staging = self.retry("register", |c| c.registered())?;
        let sources: Vec<Source> = self.tensors.iter().map(|r| r.buffer.source()).collect();
        let bytes = staging.tensor_bytes_total();
        let done = |outcome: SnapshotOutcome, order: StreamOrder| OpenCapture {
            step,
            order,
            state: State::Done(outcome),
            stall: started.elapsed(),
            bytes,
        };
        let begun = match self.begin(step, &staging) {
            Err(e) if self.broke(&e) => {
                tracing::warn!(step, "begin: connection broke ({e}); reconnecting");
                self.close_session();
                let outcome = self.capture_again(step, &sources, &order, started);
                return Ok(done(outcome?, order));
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
            Begun::Slot(slot) => match self.copy_slot(&staging, slot, &sources, &order) {
                Ok(tickets) => State::Copying { tickets, sources },
                Err(e) => {
                    self.abort(step, &[], &e);
                    return Err(e);
                }
            },
            Begun::Stream(chunks) => match self.stream(step, chunks, &staging, &sources, &order) {
                Ok(capture) => State::Copied { sources, capture },
                Err(e) if self.broke(&e) => {
                    tracing::warn!(step, "stream: connection broke ({e}); reconnecting");
                    self.close_session();
                    let outcome = self.capture_again(step, &sources, &order, started);
                    return Ok(done(outcome?, order));
                }
                Err(e) => return Err(e),
            },
        };
        Ok(OpenCapture {
            step,
            order,
            state,
            stall: started.elapsed(),
            bytes,
        })
    }

    /// Runs an open capture to its end.
    fn drive_capture(&mut self, open: OpenCapture) -> Result<SnapshotOutcome> {
        let OpenCapture {
            step,
            order,
            state,
            mut stall,
            bytes,
        } = open;
        let (sources, capture) = match state {
            State::Done(outcome) => return Ok(outcome),
            State::Copied { sources, capture } => (sources, capture),
            State::Copying { tickets, sources } => {
                let waited = Instant::now();
                let copied = tickets.wait();
                stall += waited.elapsed();
                match copied {
                    Ok(capture) => (sources, capture),
                    Err(e) => {
                        self.abort(step, &[], &e);
                        return Err(e);
                    }
                }
            }
        };
        let outcome = match self.captured(step, capture, stall) {
            Ok(()) => SnapshotOutcome::Captured(CaptureInfo {
                step,
                bytes,
                capture,
                stall,
            }),
            Err(e) if self.broke(&e) => {
                tracing::warn!(step, "captured: connection broke ({e}); reconnecting");
                self.close_session();
                let started = Instant::now() - stall;
                self.capture_again(step, &sources, &order, started)?
            }
            Err(e) => return Err(e),
        };
        // The read leases go only now: the daemon has the data.
        drop(sources);
        Ok(outcome)
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
        sources: &[Source],
        order: &StreamOrder,
    ) -> Result<Duration> {
        let mut outstanding: VecDeque<(u64, u64)> = VecDeque::new();
        let result = self.stream_chunks(step, chunks, staging, sources, order, &mut outstanding);
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
        sources: &[Source],
        order: &StreamOrder,
        outstanding: &mut VecDeque<(u64, u64)>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let ring = u64::from(staging.info().ring_chunks);
        for seq in 0..chunks {
            if outstanding.len() >= to_usize(ring)
                && let Some((free, id)) = outstanding.pop_front()
            {
                self.chunk_free(step, free, id)?;
            }
            if let Err(e) = self.copy_chunk(staging, seq, sources, order) {
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
        sources: &[Source],
        order: &StreamOrder,
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
            Begun::Slot(slot) => match self
                .slot_copies(&staging, slot, sources)
                .and_then(|copies| route::capture_and_wait(&self.devices, copies, order))
            {
                Ok(capture) => capture,
                Err(e) => {
                    self.abort(step, &[], &e);
                    return Err(e);
                }
            },
            Begun::Stream(chunks) => self.stream(step, chunks, &staging, sources, order)?,
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

    /// Whether the copies into staging have finished, without blocking
    /// (true too once the capture was waited for, or when it needed no
    /// copies: a skip, a stream, which copies before `snapshot_begin`
    /// returns). After it turns true, [`wait_captured`](SnapshotHandle::wait_captured)
    /// only tells the daemon and awaits its answer; the buffers must still
    /// not be written before it returns.
    pub fn copies_done(&self) -> bool {
        self.finished.is_some() || self.client.copies_done().unwrap_or(true)
    }

    /// Waits for the copies, tells the daemon the capture is complete and
    /// waits for it to accept; the host tensors are unlocked after this.
    /// A second call returns what the first came to (the same error,
    /// when it failed).
    pub fn wait_captured(&mut self) -> Result<SnapshotOutcome> {
        if let Some(finished) = &self.finished {
            return match finished {
                Ok(outcome) => Ok(outcome.clone()),
                Err(e) => Err(e.replay()),
            };
        }
        let result = self.client.finish_snapshot();
        self.finished = Some(match &result {
            Ok(outcome) => Ok(outcome.clone()),
            Err(e) => Err(e.replay()),
        });
        result
    }

    /// Finishes the capture without blocking the host: the trainer's CUDA
    /// streams wait for the copies on the device, a client thread tells
    /// the daemon. See [`Client::finish_snapshot_in_background`]; the
    /// outcome comes from [`Client::background_outcome`] or
    /// [`Client::wait_committed`].
    pub fn finish_in_background(mut self) -> Result<()> {
        if self.finished.is_some() {
            return Ok(());
        }
        let result = self.client.finish_snapshot_in_background();
        // Nothing is left for `Drop` to finish, whatever the result.
        self.finished = Some(Err(Error::internal("finished in the background")));
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

impl Client {
    /// Starts the copies of every source into its place in `slot`.
    fn copy_slot(
        &self,
        staging: &Staging,
        slot: u32,
        sources: &[Source],
        order: &StreamOrder,
    ) -> Result<Tickets> {
        route::capture(
            &self.devices,
            self.slot_copies(staging, slot, sources)?,
            order,
        )
    }

    /// The copies of every source into its place in `slot`, each with the
    /// index of its device.
    fn slot_copies(
        &self,
        staging: &Staging,
        slot: u32,
        sources: &[Source],
    ) -> Result<Vec<(usize, CaptureCopy)>> {
        // SAFETY: the daemon handed `slot` to this capture, and this client
        // runs one capture or restore at a time and waits for all of its
        // copies before the next (a device drops its spans before its
        // ticket is done), so no other span over the slot is alive.
        let spans = unsafe { staging.slot_spans(slot) }?;
        Ok(spans
            .into_iter()
            .zip(sources)
            .zip(&self.tensors)
            .map(|((dst, src), r)| {
                (
                    r.device,
                    CaptureCopy {
                        src: src.clone(),
                        dst,
                    },
                )
            })
            .collect())
    }

    /// Copies stream chunk `seq` into its ring position (holes are zeroed)
    /// and returns when they are done (the host device copies a chunk on
    /// this thread).
    fn copy_chunk(
        &self,
        staging: &Staging,
        seq: u64,
        sources: &[Source],
        order: &StreamOrder,
    ) -> Result<()> {
        // SAFETY: this ring position is free (its previous chunk's ChunkFree
        // came, or it was never used), one stream runs at a time, and the
        // previous chunk's copies finished before it was sent as filled.
        let spans = unsafe { staging.chunk_spans(seq) };
        let mut copies = Vec::with_capacity(spans.len());
        for (segment, mut span) in spans {
            let Some(i) = segment.tensor else {
                span.zero();
                continue;
            };
            let start = to_usize(segment.tensor_offset);
            let piece = start
                .checked_add(span.len())
                .and_then(|end| sources.get(i)?.subrange(start..end));
            let (Some(src), Some(r)) = (piece, self.tensors.get(i)) else {
                return Err(Error::internal(format!(
                    "chunk {seq}: segment outside tensor {i}"
                )));
            };
            copies.push((r.device, CaptureCopy { src, dst: span }));
        }
        route::capture_and_wait(&self.devices, copies, order).map(drop)
    }
}

//! Finishing a capture off the trainer's thread: what overlapped use
//! needs.
//!
//! The trainer wants its thread back as soon as the copies are enqueued and
//! its streams are ordered after them ([`Client::finish_snapshot_in_background`]):
//! the optimizer step that follows waits for the copies on the device, not
//! on the host. Someone must still wait for the copies and only then tell
//! the daemon `Captured` (so it never persists half-copied bytes, and so a
//! trainer that dies later loses nothing it captured). That is a client
//! thread, [`Finisher`], kept for the client's lifetime and started by its
//! first hand-off. The connection goes to the thread with the capture and
//! comes back with its outcome: the client's next call that needs the
//! connection collects it first (waiting, if the copies still run), so a
//! connection is only ever used by one thread. The outcome is kept in
//! [`Outcomes`] until the trainer asks for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::{CaptureInfo, SnapshotOutcome};
use crate::conn::Deadline;
use crate::device::{Source, Tickets};
use crate::error::{Error, Result};
use crate::proto::convert::nanos;
use crate::proto::{ReplyBody, RequestBody};
use crate::session::{Events, Session};
use crate::window::Window;

/// Outcomes of handed-off captures kept until asked for, at most, of each
/// kind (failures, captures, skips).
pub(crate) const OUTCOMES_MAX: usize = 64;

/// A capture handed to the finisher.
pub(crate) struct Job {
    pub step: u64,
    pub tickets: Tickets,
    /// The read leases of the host buffers, dropped once the daemon has
    /// the data (the trainer's host writes wait until then).
    pub sources: Vec<Source>,
    pub session: Session,
    pub stall: Duration,
    pub bytes: u64,
    pub call_timeout: Duration,
    pub copies_done: Arc<AtomicBool>,
}

/// What the finisher hands back.
pub(crate) struct Finished {
    pub step: u64,
    pub session: Session,
    /// Events that arrived on the connection meanwhile.
    pub events: Events,
    pub outcome: Result<SnapshotOutcome>,
}

/// How handed-off captures came out, by step, until asked for. Failures,
/// captures and skips each have a bounded window ([`OUTCOMES_MAX`]) of
/// their own, so no number of skips or captures pushes out a failure
/// nobody has collected yet; a full window drops its lowest step.
#[derive(Debug)]
pub(crate) struct Outcomes {
    failed: Window<Error>,
    captured: Window<CaptureInfo>,
    skipped: Window<String>,
}

impl Default for Outcomes {
    fn default() -> Outcomes {
        Outcomes {
            failed: Window::new(OUTCOMES_MAX),
            captured: Window::new(OUTCOMES_MAX),
            skipped: Window::new(OUTCOMES_MAX),
        }
    }
}

impl Outcomes {
    /// Keeps how the capture of `step` came out, replacing what was kept
    /// for it.
    pub(crate) fn keep(&mut self, step: u64, outcome: Result<SnapshotOutcome>) {
        self.failed.remove(step);
        self.captured.remove(step);
        self.skipped.remove(step);
        match outcome {
            Err(e) => self.failed.insert(step, e),
            Ok(SnapshotOutcome::Captured(info)) => self.captured.insert(step, info),
            Ok(SnapshotOutcome::Skipped { reason, .. }) => self.skipped.insert(step, reason),
        }
    }

    /// Takes how the capture of `step` came out.
    pub(crate) fn take(&mut self, step: u64) -> Option<Result<SnapshotOutcome>> {
        if let Some(e) = self.failed.remove(step) {
            return Some(Err(e));
        }
        if let Some(info) = self.captured.remove(step) {
            return Some(Ok(SnapshotOutcome::Captured(info)));
        }
        self.skipped
            .remove(step)
            .map(|reason| Ok(SnapshotOutcome::Skipped { step, reason }))
    }

    /// Takes every failure kept, lowest step first.
    pub(crate) fn take_failures(&mut self) -> impl Iterator<Item = (u64, Error)> + use<> {
        self.failed.drain()
    }

    /// The highest step whose failure was dropped to keep the bound, when
    /// `step` is at or below it; `None` otherwise.
    pub(crate) fn failure_dropped_through(&self, step: u64) -> Option<u64> {
        self.failed
            .dropped_through()
            .filter(|&through| step <= through)
    }
}

/// The capture the finisher is working on.
#[derive(Debug)]
pub(crate) struct Pending {
    pub step: u64,
    pub copies_done: Arc<AtomicBool>,
}

/// The client's finishing thread.
pub(crate) struct Finisher {
    jobs: Option<mpsc::Sender<Job>>,
    finished: mpsc::Receiver<Finished>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Finisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Finisher")
    }
}

impl Finisher {
    /// Starts the thread. On an error (no thread could be started) the
    /// caller finishes the capture itself.
    pub(crate) fn start() -> std::io::Result<Finisher> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, finished) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("gpusnap-finish".into())
            .spawn(move || {
                // Ends when the client drops its sender.
                for job in inbox {
                    if outbox.send(finish(job)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Finisher {
            jobs: Some(jobs),
            finished,
            thread: Some(thread),
        })
    }

    /// Hands `job` over; gives it back when the thread is gone.
    pub(crate) fn hand(&self, job: Job) -> std::result::Result<(), Box<Job>> {
        match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(job)),
        }
    }

    /// Waits for the job handed last. The wait is the copies' (bounded by
    /// the devices: every copy ends) plus one reply (`call_timeout`).
    pub(crate) fn collect(&self) -> Result<Finished> {
        self.finished
            .recv()
            .map_err(|_| Error::internal("the capture finishing thread ended without an answer"))
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the capture finishing thread panicked");
        }
    }
}

/// Waits for the copies, then tells the daemon (or aborts the snapshot
/// when a copy failed).
fn finish(job: Job) -> Finished {
    let Job {
        step,
        tickets,
        sources,
        mut session,
        stall,
        bytes,
        call_timeout,
        copies_done,
    } = job;
    let mut events = Events::default();
    let copied = tickets.wait();
    copies_done.store(true, Ordering::Release);
    let outcome = match copied {
        Err(e) => {
            abort(&mut session, &mut events, step, &e, call_timeout);
            Err(e)
        }
        Ok(capture) => {
            let body = RequestBody::Captured {
                step,
                capture_ns: nanos(capture),
                stall_ns: nanos(stall),
            };
            match session.call(body, Deadline::after(call_timeout), &mut events) {
                Ok(ReplyBody::Accepted { step: s }) if s == step => {
                    session.in_flight.insert(step);
                    Ok(SnapshotOutcome::Captured(CaptureInfo {
                        step,
                        bytes,
                        capture,
                        stall,
                    }))
                }
                Ok(other) => Err(session.unexpected("captured", &other)),
                Err(e) => Err(e),
            }
        }
    };
    // The daemon has the data (or the snapshot is over): the trainer's
    // host writes may go on.
    drop(sources);
    Finished {
        step,
        session,
        events,
        outcome,
    }
}

/// Gives the slot back after a failed copy; errors are logged (the copy
/// error is what the caller reports).
pub(crate) fn abort(
    session: &mut Session,
    events: &mut Events,
    step: u64,
    cause: &Error,
    timeout: Duration,
) {
    let body = RequestBody::Abort {
        step,
        reason: cause.to_string(),
    };
    match session.call(body, Deadline::after(timeout), events) {
        Ok(ReplyBody::Aborted { step: s }) if s == step => {}
        Ok(other) => {
            let e = session.unexpected("abort", &other);
            tracing::warn!(step, error = %e, "abort after a failed copy did not complete");
        }
        Err(e) => tracing::warn!(step, error = %e, "abort after a failed copy did not complete"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(step: u64) -> Result<SnapshotOutcome> {
        Ok(SnapshotOutcome::Captured(CaptureInfo {
            step,
            bytes: 8,
            capture: Duration::from_millis(1),
            stall: Duration::ZERO,
        }))
    }

    fn skipped(step: u64) -> Result<SnapshotOutcome> {
        Ok(SnapshotOutcome::Skipped {
            step,
            reason: "busy".into(),
        })
    }

    /// The regression: skips and captures shared one window of 64 with
    /// failures, so a failure nobody had asked for yet was dropped after
    /// 64 later skips, and `wait_committed` of its step said "not found".
    #[test]
    fn no_number_of_skips_or_captures_pushes_out_an_uncollected_failure() {
        let mut kept = Outcomes::default();
        kept.keep(1, Err(Error::internal("device lost")));
        for step in 2..(2 + 4 * OUTCOMES_MAX as u64) {
            kept.keep(step, skipped(step));
        }
        for step in 1000..(1000 + 4 * OUTCOMES_MAX as u64) {
            kept.keep(step, captured(step));
        }
        match kept.take(1) {
            Some(Err(Error::Internal { message, .. })) => assert_eq!(message, "device lost"),
            other => panic!("{other:?}"),
        }
        assert_eq!(kept.failure_dropped_through(1), None);
    }

    #[test]
    fn each_kind_is_bounded_taken_once_and_replaced_by_the_latest() {
        let mut kept = Outcomes::default();
        for step in 0..=(OUTCOMES_MAX as u64) {
            kept.keep(step, Err(Error::internal(format!("failed {step}"))));
        }
        assert!(kept.take(0).is_none(), "the lowest failure went");
        assert_eq!(kept.failure_dropped_through(0), Some(0));
        assert_eq!(kept.failure_dropped_through(1), None);
        assert!(matches!(kept.take(1), Some(Err(_))));
        assert!(kept.take(1).is_none(), "taken once");
        kept.keep(2, skipped(2));
        assert_eq!(kept.take(2).map(Result::ok), Some(skipped(2).ok()));
        kept.keep(3, captured(3));
        assert_eq!(kept.take(3).map(Result::ok), Some(captured(3).ok()));
        assert!(kept.take(3).is_none());
        let failures: Vec<u64> = kept.take_failures().map(|(s, _)| s).collect();
        assert_eq!(failures, (4..=(OUTCOMES_MAX as u64)).collect::<Vec<_>>());
    }
}

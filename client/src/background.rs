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
//! connection is only ever used by one thread.

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

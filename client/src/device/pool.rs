//! The host device's copy threads: a fixed pool, started once (at the first
//! attach) and kept for the device's lifetime, and the jobs they run.
//!
//! A job is one `capture` or `restore` call: batches of pieces (each piece
//! one `memcpy` of at most the device's piece size). A job started in the
//! background ([`CopyPool::submit`]) wakes up to `threads` pool workers,
//! which take batches until none is left; the thread that waits for the
//! job takes batches too. A job whose caller waits at once
//! ([`CopyPool::run`]: a stream chunk, a restore) wakes one worker fewer,
//! since the caller takes a batch itself: a single-batch job (a stream
//! chunk) runs on the caller and wakes no thread. A piece owns its source,
//! target and span, and is dropped right after its copy: when a job reports
//! done, nothing of it holds a lease or a span any more.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{CopyTicket, StagingSpan};
use crate::buffer::{HostSource, HostTarget};
use crate::error::{Error, Result};

/// A wait for running copies logs a warning after this long, and again at
/// each multiple. It is never cut short: see [`Job::wait_idle`].
const COPY_WAIT_WARN: Duration = Duration::from_secs(5);

/// One `memcpy`, owning both of its sides.
pub(super) enum Piece {
    Capture {
        src: HostSource,
        dst: StagingSpan,
    },
    Restore {
        src: StagingSpan,
        dst: HostTarget,
    },
    /// A copy that takes as long as its test wants: it waits for the gate.
    #[cfg(test)]
    Gated(Arc<Gate>),
}

impl Piece {
    pub(super) fn len(&self) -> usize {
        match self {
            Piece::Capture { src, .. } => src.len(),
            Piece::Restore { dst, .. } => dst.len(),
            #[cfg(test)]
            Piece::Gated(_) => 0,
        }
    }

    /// Copies, then drops both sides (their leases and the span).
    fn copy(self) {
        match self {
            Piece::Capture { src, mut dst } => {
                // SAFETY: this runs while the piece's job counts it as
                // running, so before the job's ticket can report done.
                dst.copy_from(unsafe { src.as_slice() });
            }
            Piece::Restore { src, mut dst } => {
                // SAFETY: as above.
                src.copy_to(unsafe { dst.as_mut_slice() });
            }
            #[cfg(test)]
            Piece::Gated(gate) => gate.pass(),
        }
    }
}

/// What a [`Piece::Gated`] waits for: the test sees it enter, opens it,
/// and sees it pass.
#[cfg(test)]
#[derive(Default)]
pub(super) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[cfg(test)]
#[derive(Default)]
struct GateState {
    entered: bool,
    open: bool,
    passed: bool,
}

#[cfg(test)]
impl Gate {
    const WAIT_MAX: Duration = Duration::from_secs(20);

    fn wait_for(&self, what: &str, until: impl Fn(&GateState) -> bool) {
        let deadline = Instant::now() + Self::WAIT_MAX;
        let mut state = self.state.lock().expect("gate");
        while !until(&state) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("a gated copy: {what} took over {:?}", Self::WAIT_MAX));
            state = self.changed.wait_timeout(state, left).expect("gate").0;
        }
    }

    /// The copy: waits until the gate is open.
    fn pass(&self) {
        self.state.lock().expect("gate").entered = true;
        self.changed.notify_all();
        self.wait_for("the gate to open", |s| s.open);
        self.state.lock().expect("gate").passed = true;
        self.changed.notify_all();
    }

    /// Waits until a copy thread is inside the gate.
    pub(super) fn wait_entered(&self) {
        self.wait_for("a thread to enter", |s| s.entered);
    }

    pub(super) fn open(&self) {
        self.state.lock().expect("gate").open = true;
        self.changed.notify_all();
    }

    /// Whether the gated copy has finished.
    pub(super) fn passed(&self) -> bool {
        self.state.lock().expect("gate").passed
    }
}

/// Pieces run one after the other by one thread.
pub(super) type Batch = Vec<Piece>;

#[derive(Default)]
struct JobState {
    /// Batches no thread has taken yet.
    batches: Vec<Batch>,
    /// Batches a thread is copying now.
    running: usize,
    /// The first panic of a copy (a length mismatch is asserted).
    panicked: Option<String>,
    /// When the last batch finished (or the job was cancelled).
    finished: Option<Instant>,
}

impl JobState {
    fn idle(&self) -> bool {
        self.batches.is_empty() && self.running == 0
    }
}

/// One `capture` or `restore` call's copies.
struct Job {
    state: Mutex<JobState>,
    done: Condvar,
    started: Instant,
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        // Held only to move batches and counters, never across a copy: a
        // panic cannot leave the state half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes and copies batches until none is left.
    fn run(&self) {
        loop {
            let batch = {
                let mut state = self.lock();
                let Some(batch) = state.batches.pop() else {
                    return;
                };
                state.running += 1;
                batch
            };
            // Each piece is dropped inside: a panic drops the rest.
            let outcome = catch_unwind(AssertUnwindSafe(move || {
                for piece in batch {
                    piece.copy();
                }
            }));
            let mut state = self.lock();
            state.running -= 1;
            if let Err(payload) = outcome {
                state
                    .panicked
                    .get_or_insert_with(|| panic_message(payload.as_ref()));
            }
            if state.idle() {
                state.finished.get_or_insert_with(Instant::now);
                self.done.notify_all();
            }
        }
    }

    /// Drops the batches no thread has started; returns how many.
    fn cancel(&self) -> usize {
        let dropped = {
            let mut state = self.lock();
            let dropped = std::mem::take(&mut state.batches);
            if state.idle() {
                state.finished.get_or_insert_with(Instant::now);
            }
            dropped
        };
        // Outside the lock: dropping releases buffer leases.
        dropped.len()
    }

    fn is_done(&self) -> bool {
        self.lock().idle()
    }

    /// Waits until no batch runs or waits. The wait is bounded by the
    /// batches themselves: each is a `memcpy` of about one piece, which
    /// always ends, and no new batch starts once the queue is empty (or
    /// cancelled). It is not cut short by a timer: returning while a copy
    /// still writes memory its owner may free would be unsound, and
    /// aborting would kill the trainer for a snapshot (a process stopped
    /// by a debugger or a scheduler's suspend resumes with its clock far
    /// ahead of its copies).
    fn wait_idle(&self) {
        let begun = Instant::now();
        let mut warned = Duration::ZERO;
        let mut state = self.lock();
        while !state.idle() {
            let waited = begun.elapsed();
            if waited >= warned + COPY_WAIT_WARN {
                warned = waited;
                tracing::warn!(
                    running = state.running,
                    ?waited,
                    "still waiting for host copies"
                );
            }
            state = self
                .done
                .wait_timeout(state, COPY_WAIT_WARN)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// What the finished job came to.
    fn outcome(&self) -> Result<Duration> {
        let state = self.lock();
        if let Some(panic) = &state.panicked {
            return Err(Error::internal(format!("a host copy panicked: {panic}")));
        }
        let finished = state
            .finished
            .expect("a job is waited for only until it is idle, which sets `finished`");
        Ok(finished.saturating_duration_since(self.started))
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The ticket of one host job.
pub(super) struct HostTicket {
    job: Arc<Job>,
    waited: bool,
}

impl CopyTicket for HostTicket {
    fn is_done(&self) -> bool {
        self.job.is_done()
    }

    fn wait(mut self: Box<Self>) -> Result<Duration> {
        // Help: copy what no worker has taken yet.
        self.job.run();
        self.job.wait_idle();
        self.waited = true;
        self.job.outcome()
    }
}

impl Drop for HostTicket {
    fn drop(&mut self) {
        if self.waited {
            return;
        }
        let cancelled = self.job.cancel();
        if cancelled > 0 || !self.job.is_done() {
            tracing::warn!(
                cancelled,
                "a host copy ticket was dropped before its copies finished; waiting for those running"
            );
        }
        self.job.wait_idle();
    }
}

struct PoolState {
    /// Jobs with batches a woken worker should take (a job appears once per
    /// worker it wakes).
    queue: VecDeque<Arc<Job>>,
    /// Worker threads started.
    started: usize,
    /// Workers woken for jobs so far (one per queue entry).
    woken: usize,
    /// The pool's owner is gone: workers exit once the queue is empty.
    shutdown: bool,
}

struct PoolShared {
    threads: usize,
    state: Mutex<PoolState>,
    work: Condvar,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Held only to move jobs and counters: never left half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A worker: runs queued jobs until the pool shuts down and the queue is
/// empty. An idle worker waits for work or for the shutdown.
fn work(shared: Arc<PoolShared>) {
    loop {
        let job = {
            let mut state = shared.lock();
            loop {
                if let Some(job) = state.queue.pop_front() {
                    break job;
                }
                if state.shutdown {
                    return;
                }
                state = shared
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        job.run();
    }
}

/// A pool of copy threads; its workers stop when it is dropped (after the
/// jobs already queued, whose tickets can also finish them).
pub(super) struct CopyPool {
    shared: Arc<PoolShared>,
}

impl fmt::Debug for CopyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyPool")
            .field("threads", &self.shared.threads)
            .field("started", &self.started())
            .finish()
    }
}

impl CopyPool {
    /// A pool of `threads` workers (at least 1), none started yet.
    pub(super) fn new(threads: usize) -> CopyPool {
        CopyPool {
            shared: Arc::new(PoolShared {
                threads: threads.max(1),
                state: Mutex::new(PoolState {
                    queue: VecDeque::new(),
                    started: 0,
                    woken: 0,
                    shutdown: false,
                }),
                work: Condvar::new(),
            }),
        }
    }

    pub(super) fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Workers started so far.
    pub(super) fn started(&self) -> usize {
        self.shared.lock().started
    }

    /// Starts the workers not started yet (once per pool in practice).
    pub(super) fn start(&self) -> Result<()> {
        let mut state = self.shared.lock();
        while state.started < self.shared.threads {
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name(format!("gpusnap-copy-{}", state.started))
                .spawn(move || work(shared))
                .map_err(|e| Error::BackendUnavailable {
                    backend: "host",
                    reason: format!("cannot start a copy thread: {e}"),
                })?;
            state.started += 1;
        }
        Ok(())
    }

    /// Workers woken for jobs since the pool was made.
    #[cfg(test)]
    pub(super) fn woken(&self) -> usize {
        self.shared.lock().woken
    }

    /// Queues `batches` as one job copied in the background: wakes up to
    /// `threads` workers (one per batch).
    pub(super) fn submit(&self, batches: Vec<Batch>) -> Result<HostTicket> {
        let wake = batches.len().min(self.shared.threads);
        self.queue(batches, wake)
    }

    /// Copies `batches` and returns when they are done (the time they
    /// took): the calling thread takes batches itself, so only one worker
    /// per further batch is woken (up to `threads`), none for one batch.
    pub(super) fn run(&self, batches: Vec<Batch>) -> Result<Duration> {
        let wake = batches.len().saturating_sub(1).min(self.shared.threads);
        Box::new(self.queue(batches, wake)?).wait()
    }

    /// Queues `batches` as one job and wakes `wake` workers for it.
    fn queue(&self, batches: Vec<Batch>, wake: usize) -> Result<HostTicket> {
        let now = Instant::now();
        let job = Arc::new(Job {
            state: Mutex::new(JobState {
                finished: batches.is_empty().then_some(now),
                batches,
                ..JobState::default()
            }),
            done: Condvar::new(),
            started: now,
        });
        {
            let mut state = self.shared.lock();
            if state.started == 0 {
                drop(state);
                // No thread ever saw the job: dropping it drops the pieces.
                drop(job);
                return Err(Error::internal(
                    "host device: copies before attach (no copy thread started)",
                ));
            }
            for _ in 0..wake {
                state.queue.push_back(Arc::clone(&job));
            }
            state.woken += wake;
        }
        for _ in 0..wake {
            self.shared.work.notify_one();
        }
        Ok(HostTicket { job, waited: false })
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
    }
}

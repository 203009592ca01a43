//! The persist engine: writes captured staging slots to the store on its own
//! threads, then tells the client.
//!
//! * Each registration has a lane: one thread that persists its captured
//!   slots in capture order, straight from the staging mapping (no copy):
//!   the slot's guard gives its memory ([`PersistingSlot::memory`]), whose
//!   store source is `Source::Shared` (O_DIRECT from the slot, the CRCs
//!   through its handle), never a slice over memory the trainer maps.
//!   The lane holds the staging area, so a snapshot captured by a trainer
//!   that then dies is still committed; the staging memory goes back to the
//!   budget when the lane has drained.
//! * `persist.concurrent_writes` permits bound how many slot snapshots are
//!   written at once across all lanes; a snapshot waits at most
//!   `persist.write_wait_s` for one, then fails with `Timeout`.
//! * A streamed capture (policy `stream`, every slot busy) runs on a thread
//!   of its own, concurrently with its lane: the store pulls chunk after
//!   chunk from the client's ring as the client fills it. It takes no permit:
//!   its trainer is blocked on it, and its memory is the ring. If the client
//!   goes away mid-stream the source fails and nothing is committed.
//!
//! After a commit the lane offers the slot to the hot tier (one copy out of
//! the slot's handle), frees the slot, then applies retention
//! ([`Store::apply_retention`]): after the commit is reported and outside
//! the write permit (the store's `commit_laid_out` prunes nothing), while
//! the step is still in flight. A streamed capture copies each ring chunk
//! out of its handle ([`StagingArea::ring_chunk`]) into a pool buffer, and
//! applies retention the same way once its commit is reported.
//!
//! Clean-up is structural. A lane job carries a [`PersistingSlot`] (freed
//! when dropped) and an [`InFlight`] (the step untracked when dropped), so a
//! job that is never run (the lane is gone: [`Lane::persist`] refuses it)
//! or that panics gives both back. Each job, and each streamed capture, runs
//! under `catch_unwind`: a panic (an assertion, a bug) is reported to the
//! client as `Failed { kind: Internal }`, counted as failed, and the lane
//! goes on with its next job; the daemon keeps serving. We chose this over
//! `panic = "abort"` and a restart by systemd: a restart would drop every
//! other trainer's connection, staging and in-flight snapshots for one bad
//! step, and what a panic here can leave behind (one slot, one step, one
//! write permit) is exactly what the guards release.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gpusnap_proto::ReplyBody;
use gpusnap_proto::convert::{gauge, nanos, to_u64, to_usize};

use crate::config::PersistConfig;
use crate::hot_tier::HotTier;
use crate::metrics::{Metrics, PanicSite, SnapshotOutcome};
use crate::ranks::{RankKey, Ranks};
use crate::server::errors::{failed_event, os_error, panic_message};
use crate::staging::{PersistingSlot, SlotState, StagingArea};
use crate::store::{Committed, SnapshotId, Source, Store, StoreError};
use crate::testing::Hooks;

/// How long a streamed capture waits for the client's next chunk.
pub const STREAM_CHUNK_WAIT: Duration = Duration::from_secs(120);

/// One registration as the engine sees it.
#[derive(Debug)]
pub struct SessionCore {
    pub conn_id: u64,
    pub uid: u32,
    pub pid: i32,
    pub key: RankKey,
    pub world_size: u32,
    pub staging: Arc<StagingArea>,
    /// What the client's devices did to the staging mapping, once it said
    /// (`Attached`, protocol version 3), for `Status`.
    pub staging_pinning: std::sync::OnceLock<Vec<gpusnap_proto::AttachReport>>,
    /// Events for the connection; gone when the client is.
    pub events: tokio::sync::mpsc::Sender<ReplyBody>,
}

impl SessionCore {
    fn id(&self, step: u64) -> Result<SnapshotId, StoreError> {
        Ok(SnapshotId::new(self.key.job.clone(), self.key.rank, step)?)
    }

    fn tell(&self, event: ReplyBody) {
        // The channel holds more events than a client can have snapshots in
        // flight; a full or closed one means the client is gone.
        if self.events.try_send(event).is_err() {
            tracing::debug!(job = %self.key.job, rank = self.key.rank, "client gone; event not delivered");
        }
    }
}

/// Why a captured snapshot was not committed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "no write turn within {waited_s} s (persist.write_wait_s): the {concurrent_writes} concurrent write(s) stayed busy"
    )]
    WriteWait {
        waited_s: u64,
        concurrent_writes: usize,
    },
    #[error("persisting step {step} panicked ({message}); older snapshots stand")]
    Panicked { step: u64, message: String },
}

impl PersistError {
    /// The operating system's error behind this one, if a system call
    /// failed.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            PersistError::Store(e) => e.raw_os_error(),
            PersistError::WriteWait { .. } | PersistError::Panicked { .. } => None,
        }
    }
}

/// Why a streamed capture's source stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the client sent no chunk {seq} within {} s", STREAM_CHUNK_WAIT.as_secs())]
    ClientTimeout { seq: u64 },
    #[error("the client went away at chunk {seq}")]
    ClientGone { seq: u64 },
    #[error("the client filled chunk {got}, expected {expected}")]
    OutOfOrder { got: u64, expected: u64 },
    #[error(
        "the store asked for data bytes {offset}..+{len} but ring chunks are {chunk_bytes} bytes"
    )]
    Misaligned {
        offset: u64,
        len: usize,
        chunk_bytes: u64,
    },
}

/// Why a lane did not take a job; the job is dropped (its slot freed, its
/// step untracked).
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("the persist lane's queue is full ({slots} slot(s) queued)")]
    Full { slots: usize },
    #[error("the persist lane's thread is gone")]
    Gone,
}

/// A step of a (job, rank) captured and not yet committed or failed;
/// untracked when dropped, as committed only if [`InFlight::report`] said
/// so.
#[derive(Debug)]
#[must_use = "the step is untracked when this is dropped"]
pub struct InFlight {
    engine: Arc<Engine>,
    key: RankKey,
    step: u64,
    /// `Some(committed)` once the outcome was reported to the client.
    reported: Option<bool>,
}

impl InFlight {
    pub fn step(&self) -> u64 {
        self.step
    }

    fn report(&mut self, committed: bool) {
        assert!(
            self.reported.is_none(),
            "step {} of {} reported twice",
            self.step,
            self.key
        );
        self.reported = Some(committed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.engine
            .untrack(&self.key, self.step, self.reported == Some(true));
    }
}

/// A captured slot to persist.
#[derive(Debug)]
struct LaneJob {
    // Dropped in this order: the slot is free before the step stops being
    // in flight, so a restore waiting for the step finds a slot.
    slot: PersistingSlot,
    in_flight: InFlight,
}

/// The sending end of a registration's lane; dropping it lets the lane
/// drain and exit.
#[derive(Debug)]
pub struct Lane {
    tx: crossbeam_channel::Sender<LaneJob>,
    slots: usize,
}

impl Lane {
    /// Queues `slot` (captured, now `Persisting`) for the lane to write.
    /// The queue holds one job per slot, so it is never full while the lane
    /// lives.
    pub fn persist(&self, slot: PersistingSlot, in_flight: InFlight) -> Result<(), LaneError> {
        assert_eq!(
            slot.step(),
            in_flight.step,
            "a slot queued for another step"
        );
        self.tx
            .try_send(LaneJob { slot, in_flight })
            .map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(_) => LaneError::Full { slots: self.slots },
                crossbeam_channel::TrySendError::Disconnected(_) => LaneError::Gone,
            })
    }
}

/// The end of a streamed capture the connection feeds.
#[derive(Debug)]
pub struct StreamFeed {
    /// `seq` of each chunk the client filled.
    pub filled: crossbeam_channel::Sender<u64>,
    /// `seq` of each chunk the engine has taken (the ring position is free).
    pub taken: tokio::sync::mpsc::Receiver<u64>,
    /// Set when the client aborted (counted as aborted, not failed).
    pub aborted: Arc<std::sync::atomic::AtomicBool>,
}

impl StreamFeed {
    /// Marks the stream as aborted by the client: when its source fails,
    /// the snapshot counts as aborted, not failed.
    pub fn abort(&self) {
        self.aborted
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Counting semaphore of concurrent writes.
#[derive(Debug)]
struct Permits {
    free: Mutex<usize>,
    returned: Condvar,
}

impl Permits {
    fn new(count: usize) -> Permits {
        Permits {
            free: Mutex::new(count),
            returned: Condvar::new(),
        }
    }

    /// A permit, or `None` if none was returned within `wait`.
    fn acquire(&self, wait: Duration) -> Option<PermitGuard<'_>> {
        let free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut free, _) = self
            .returned
            .wait_timeout_while(free, wait, |free| *free == 0)
            .unwrap_or_else(PoisonError::into_inner);
        if *free == 0 {
            return None;
        }
        *free -= 1;
        Some(PermitGuard { permits: self })
    }
}

struct PermitGuard<'p> {
    permits: &'p Permits,
}

impl Drop for PermitGuard<'_> {
    fn drop(&mut self) {
        *self
            .permits
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        self.permits.returned.notify_one();
    }
}

/// The persist engine.
#[derive(Debug)]
pub struct Engine {
    store: Arc<Store>,
    hot: Arc<HotTier>,
    ranks: Arc<Ranks>,
    metrics: Arc<Metrics>,
    hooks: Arc<Hooks>,
    permits: Permits,
    concurrent_writes: usize,
    write_wait: Duration,
    in_flight: Mutex<u64>,
    drained: Condvar,
    /// Told of every commit, when the remote tier is on.
    remote: Option<Arc<crate::remote::Remote>>,
}

impl Engine {
    pub fn new(
        store: Arc<Store>,
        hot: Arc<HotTier>,
        ranks: Arc<Ranks>,
        metrics: Arc<Metrics>,
        hooks: Arc<Hooks>,
        config: &PersistConfig,
        remote: Option<Arc<crate::remote::Remote>>,
    ) -> Arc<Engine> {
        assert!(
            config.concurrent_writes >= 1,
            "configuration guarantees a permit"
        );
        Arc::new(Engine {
            store,
            hot,
            ranks,
            metrics,
            hooks,
            permits: Permits::new(config.concurrent_writes),
            concurrent_writes: config.concurrent_writes,
            write_wait: Duration::from_secs(config.write_wait_s),
            in_flight: Mutex::new(0),
            drained: Condvar::new(),
            remote,
        })
    }

    /// Starts the lane of a registration.
    pub fn spawn_lane(self: &Arc<Self>, core: Arc<SessionCore>) -> std::io::Result<Lane> {
        let slots = to_usize(u64::from(core.staging.info().slots));
        let (tx, rx) = crossbeam_channel::bounded::<LaneJob>(slots);
        let engine = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("persist-{}", core.conn_id))
            .spawn(move || {
                for job in rx {
                    engine.run_lane_job(&core, job);
                }
            })?;
        Ok(Lane { tx, slots })
    }

    /// Records `step` of `key` as in flight until the returned guard is
    /// dropped; `None` if it already is.
    pub fn track(self: &Arc<Self>, key: &RankKey, step: u64) -> Option<InFlight> {
        if !self.ranks.start(key, step) {
            return None;
        }
        let mut n = self.lock_in_flight();
        *n += 1;
        self.metrics.snapshots_in_flight.set(gauge(*n));
        Some(InFlight {
            engine: Arc::clone(self),
            key: key.clone(),
            step,
            reported: None,
        })
    }

    /// Called by an [`InFlight`]'s Drop: never panics (a second panic
    /// while unwinding aborts the daemon); an underflow is logged, and fails
    /// debug builds when not unwinding already.
    fn untrack(&self, key: &RankKey, step: u64, committed: bool) {
        self.ranks.finish(key, step, committed);
        let mut n = self.lock_in_flight();
        let left = n.checked_sub(1);
        if left.is_none() {
            tracing::error!(%key, step, "in-flight count underflow; counting it as none");
        }
        debug_assert!(
            left.is_some() || std::thread::panicking(),
            "in-flight count underflow untracking step {step} of {key}"
        );
        *n = left.unwrap_or(0);
        self.metrics.snapshots_in_flight.set(gauge(*n));
        if *n == 0 {
            self.drained.notify_all();
        }
    }

    /// Snapshots captured and not yet committed or failed.
    pub fn in_flight(&self) -> u64 {
        *self.lock_in_flight()
    }

    /// Waits until nothing is in flight; false if `timeout` passed first.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let n = self.lock_in_flight();
        let (n, result) = self
            .drained
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner);
        drop(n);
        !result.timed_out()
    }

    /// One lane job, a panic in it caught and reported.
    fn run_lane_job(&self, core: &SessionCore, job: LaneJob) {
        let LaneJob {
            slot,
            mut in_flight,
        } = job;
        let started = Instant::now();
        let tracked = &mut in_flight;
        // The slot moves in: a panic drops it (free) while unwinding.
        let ran = catch_unwind(AssertUnwindSafe(move || {
            self.persist_slot(core, slot, tracked, started);
        }));
        if let Err(panic) = ran {
            self.metrics.count_panic(PanicSite::Lane);
            self.persist_panicked(core, &mut in_flight, started, &*panic);
        }
    }

    fn persist_slot(
        &self,
        core: &SessionCore,
        slot: PersistingSlot,
        in_flight: &mut InFlight,
        started: Instant,
    ) {
        let staging = &core.staging;
        assert!(
            Arc::ptr_eq(slot.staging(), staging),
            "lane got a slot of another registration"
        );
        assert_eq!(
            staging.slot_state(slot.index()),
            Some(SlotState::Persisting { step: slot.step() }),
            "lane got a slot that is not persisting"
        );
        let result = self.write_slot(core, &slot);
        // The commit is reported first: the hot copy is not part of it. The
        // step stays in flight until the copy is hot, so a restore waiting
        // for it finds it in memory.
        let hot = result.as_ref().ok().map(|c| c.manifest.clone());
        self.report(core, in_flight, started, result, false);
        if let Some(manifest) = hot {
            // Copied out of the slot's handle while the guard holds it
            // `Persisting`: a client that writes it meanwhile corrupts only
            // this hot copy, which its chunk CRCs expose at restore (the
            // restore then reads from disk).
            let memory = slot.memory();
            assert_eq!(
                to_u64(memory.len()),
                manifest.data_len,
                "the committed data section is the slot's"
            );
            let kept = self
                .hot
                .offer(&core.key, &manifest, staging.layout(), |copy| {
                    if let Err(e) = memory.copy_out(0, copy) {
                        unreachable!("the hot copy is the slot's length (asserted): {e}");
                    }
                });
            if kept {
                tracing::debug!(job = %core.key.job, rank = core.key.rank, step = slot.step(), "kept hot");
            }
        }
        let committed = in_flight.reported == Some(true);
        drop(slot);
        if committed {
            // After the commit was reported and outside the write permit;
            // the step stays in flight until it is done.
            self.store.apply_retention(&core.key.job, core.key.rank);
        }
    }

    /// Writes the slot as its step, within a write permit.
    fn write_slot(
        &self,
        core: &SessionCore,
        slot: &PersistingSlot,
    ) -> Result<Committed, PersistError> {
        let Some(_permit) = self.permits.acquire(self.write_wait) else {
            return Err(PersistError::WriteWait {
                waited_s: self.write_wait.as_secs(),
                concurrent_writes: self.concurrent_writes,
            });
        };
        self.hooks.on_persist(slot.step());
        let id = core.id(slot.step())?;
        // Host staging is `Source::Shared`: O_DIRECT straight from the slot,
        // no copy, the CRCs computed through its handle. The handle borrows
        // the guard, which holds the slot `Persisting` for this whole call.
        // Retention runs later, outside the permit (`persist_slot`).
        Ok(self.store.commit_laid_out(
            &id,
            core.staging.layout(),
            core.world_size,
            slot.memory().source(),
        )?)
    }

    /// A persist that panicked: reported as failed (`Internal`) unless its
    /// outcome was already reported (a panic after the commit, in the hot
    /// copy).
    fn persist_panicked(
        &self,
        core: &SessionCore,
        in_flight: &mut InFlight,
        started: Instant,
        payload: &(dyn Any + Send),
    ) {
        let step = in_flight.step;
        let message = panic_message(payload);
        if in_flight.reported.is_some() {
            tracing::error!(job = %core.key.job, rank = core.key.rank, step, panic = %message, "the persist lane panicked after reporting the step; it goes on");
            return;
        }
        let failed = PersistError::Panicked { step, message };
        self.report(core, in_flight, started, Err(failed), false);
    }

    /// Starts a streamed capture of the tracked step through the ring.
    /// If the thread cannot start, `in_flight` is dropped with it: the step
    /// is untracked again.
    pub fn start_stream(
        self: &Arc<Self>,
        core: Arc<SessionCore>,
        in_flight: InFlight,
    ) -> std::io::Result<StreamFeed> {
        let ring_chunks = to_usize(u64::from(core.staging.info().ring_chunks));
        assert!(ring_chunks >= 2, "stream policy without a ring");
        let (filled_tx, filled_rx) = crossbeam_channel::bounded::<u64>(ring_chunks);
        let (taken_tx, taken_rx) = tokio::sync::mpsc::channel::<u64>(ring_chunks);
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = Arc::clone(self);
        let abort_flag = Arc::clone(&aborted);
        std::thread::Builder::new()
            .name(format!("stream-{}", core.conn_id))
            .spawn(move || {
                let mut in_flight = in_flight;
                let step = in_flight.step;
                let started = Instant::now();
                let ran = catch_unwind(AssertUnwindSafe(|| {
                    engine.hooks.on_persist(step);
                    let result = engine
                        .write_stream(&core, step, &filled_rx, &taken_tx)
                        .map_err(PersistError::from);
                    let aborted = abort_flag.load(std::sync::atomic::Ordering::SeqCst);
                    engine.report(&core, &mut in_flight, started, result, aborted);
                    if in_flight.reported == Some(true) {
                        // After the commit was reported; the step stays in
                        // flight until it is done.
                        engine.store.apply_retention(&core.key.job, core.key.rank);
                    }
                }));
                if let Err(panic) = ran {
                    engine.metrics.count_panic(PanicSite::Stream);
                    engine.persist_panicked(&core, &mut in_flight, started, &*panic);
                }
            })?;
        Ok(StreamFeed {
            filled: filled_tx,
            taken: taken_rx,
            aborted,
        })
    }

    fn write_stream(
        &self,
        core: &SessionCore,
        step: u64,
        filled: &crossbeam_channel::Receiver<u64>,
        taken: &tokio::sync::mpsc::Sender<u64>,
    ) -> Result<Committed, StoreError> {
        let id = core.id(step)?;
        // Borrowed: `core` outlives this call, and with it the staging area.
        let staging = &*core.staging;
        let info = staging.info();
        let mut fill = |offset: u64, dst: &mut [u8]| -> Result<(), crate::store::SourceError> {
            let seq = offset / info.chunk_bytes;
            let (start, end) = info.chunk_range(seq);
            if start != offset || (end - start) != gpusnap_proto::convert::to_u64(dst.len()) {
                return Err(StreamError::Misaligned {
                    offset,
                    len: dst.len(),
                    chunk_bytes: info.chunk_bytes,
                }
                .into());
            }
            let got = filled
                .recv_timeout(STREAM_CHUNK_WAIT)
                .map_err(|e| match e {
                    crossbeam_channel::RecvTimeoutError::Timeout => {
                        StreamError::ClientTimeout { seq }
                    }
                    crossbeam_channel::RecvTimeoutError::Disconnected => {
                        StreamError::ClientGone { seq }
                    }
                })?;
            if got != seq {
                return Err(StreamError::OutOfOrder { got, expected: seq }.into());
            }
            // The client announced chunk `seq` and is not told its ring
            // position is free until `taken` below.
            if let Err(e) = staging.ring_chunk(seq, dst.len()).copy_out(dst) {
                unreachable!("the ring chunk is the destination's length: {e}");
            }
            taken
                .blocking_send(seq)
                .map_err(|_| StreamError::ClientGone { seq })?;
            Ok(())
        };
        // Retention runs once the commit is reported (`start_stream`).
        self.store.commit_laid_out(
            &id,
            staging.layout(),
            core.world_size,
            Source::Stream(&mut fill),
        )
    }

    /// Counts the outcome, tells the client and records it in `in_flight`.
    fn report(
        &self,
        core: &SessionCore,
        in_flight: &mut InFlight,
        started: Instant,
        result: Result<Committed, PersistError>,
        aborted: bool,
    ) {
        let step = in_flight.step;
        let job = core.key.job.as_str();
        let elapsed = started.elapsed();
        match result {
            Ok(committed) => {
                let bytes = committed.manifest.file_len;
                self.metrics
                    .persist_seconds
                    .with_label_values(&[job])
                    .observe(elapsed.as_secs_f64());
                self.metrics
                    .bytes_written_total
                    .with_label_values(&[job])
                    .inc_by(bytes);
                self.metrics.count_snapshot(job, SnapshotOutcome::Committed);
                let gauge_step = self.metrics.last_committed_step.with_label_values(&[job]);
                gauge_step.set(gauge_step.get().max(gauge(step)));
                in_flight.report(true);
                if let Some(remote) = &self.remote {
                    remote.committed(&core.key, step);
                }
                core.tell(ReplyBody::Committed {
                    step,
                    bytes,
                    persist_ns: nanos(elapsed),
                });
            }
            Err(e) => {
                if aborted {
                    tracing::info!(
                        job,
                        rank = core.key.rank,
                        step,
                        "streamed capture aborted by the client; nothing committed"
                    );
                    self.metrics.count_snapshot(job, SnapshotOutcome::Aborted);
                } else {
                    let os = os_error(e.raw_os_error());
                    tracing::error!(job, rank = core.key.rank, step, error = %e, os_error = ?os, "snapshot failed; older snapshots stand");
                    self.metrics.count_snapshot_failure(job, os);
                }
                in_flight.report(false);
                core.tell(failed_event(step, &e));
            }
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, u64> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TestingConfig;
    use crate::staging::{StagingBudget, StagingPlan};
    use crate::store::StoreConfig;
    use gpusnap_proto::{BusyPolicy, Dtype, ErrorKind, TensorSpec};

    #[test]
    fn a_write_permit_is_waited_for_at_most_its_deadline() {
        let permits = Permits::new(1);
        let held = permits.acquire(Duration::from_secs(1)).expect("free");
        let started = Instant::now();
        assert!(permits.acquire(Duration::from_millis(50)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(held);
        assert!(permits.acquire(Duration::from_millis(50)).is_some());
        std::thread::scope(|s| {
            let held = permits.acquire(Duration::from_secs(1)).expect("free");
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                drop(held);
            });
            assert!(
                permits.acquire(Duration::from_secs(10)).is_some(),
                "a returned permit wakes the waiter"
            );
        });
    }

    struct Rig {
        _dir: tempfile::TempDir,
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        budget: Arc<StagingBudget>,
        core: Arc<SessionCore>,
        events: tokio::sync::mpsc::Receiver<ReplyBody>,
    }

    /// An engine on a scratch store whose persists of `panic_step` panic,
    /// and one registration of policy `policy`.
    fn rig(panic_step: u64, policy: BusyPolicy) -> Rig {
        rig_with(panic_step, policy, &PersistConfig::default())
    }

    fn rig_with(panic_step: u64, policy: BusyPolicy, persist: &PersistConfig) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(
            Store::open(StoreConfig {
                root: dir.path().to_path_buf(),
                io_backend: crate::storage::probe::BackendChoice::Buffered,
                io_buffer_bytes: 4096,
                io_pool_bytes: 16 * 4096,
                ..StoreConfig::default()
            })
            .expect("store"),
        );
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let hot = Arc::new(HotTier::new(
            1 << 20,
            Arc::clone(store.checksum()),
            Arc::clone(&metrics),
        ));
        let hooks = Arc::new(Hooks::new(Some(&TestingConfig {
            panic_persisting_step: Some(panic_step),
            ..TestingConfig::default()
        })));
        let engine = Engine::new(
            store,
            hot,
            Arc::new(Ranks::default()),
            Arc::clone(&metrics),
            hooks,
            persist,
            None,
        );
        let budget = StagingBudget::new(1 << 20, Arc::clone(&metrics));
        let plan = StagingPlan {
            double: true,
            policy,
            chunk_bytes: 4096,
            ring_chunks: 2,
        };
        let staging = StagingArea::create(
            vec![TensorSpec::new("w", Dtype::F32, [1024])],
            plan,
            &budget,
        )
        .expect("staging");
        let (events_tx, events) = tokio::sync::mpsc::channel(16);
        let core = Arc::new(SessionCore {
            conn_id: 1,
            uid: 0,
            pid: 0,
            key: RankKey::new("j", 0),
            world_size: 1,
            staging: Arc::new(staging),
            staging_pinning: std::sync::OnceLock::new(),
            events: events_tx,
        });
        Rig {
            _dir: dir,
            engine,
            metrics,
            budget,
            core,
            events,
        }
    }

    fn next_event(events: &mut tokio::sync::mpsc::Receiver<ReplyBody>) -> ReplyBody {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match events.try_recv() {
                Ok(event) => return event,
                Err(_) => {
                    assert!(Instant::now() < deadline, "no event in 30 s");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn capture(rig: &Rig, step: u64) -> (PersistingSlot, InFlight) {
        let slot = rig
            .core
            .staging
            .claim_capturing(step)
            .expect("free slot")
            .into_persisting();
        let in_flight = rig.engine.track(&rig.core.key, step).expect("new step");
        (slot, in_flight)
    }

    /// The data section of step `step` as the store reads it back.
    fn read_back(rig: &Rig, step: u64) -> Vec<u8> {
        let store = &rig.engine.store;
        let snapshot = store.find("j", 0, Some(step)).expect("committed");
        let mut read = Vec::new();
        store
            .read(&snapshot, &mut |_, bytes| {
                read.extend_from_slice(bytes);
                Ok(())
            })
            .expect("verified read");
        read
    }

    #[test]
    fn the_slot_and_the_ring_are_written_as_the_trainer_filled_them_and_the_slot_kept_hot() {
        let mut rig = rig(99, BusyPolicy::Stream);
        let info = rig.core.staging.info().clone();
        let trainer = crate::staging::testing::TrainerMapping::of(&rig.core.staging);
        let lane = rig.engine.spawn_lane(Arc::clone(&rig.core)).expect("lane");
        let data: Vec<u8> = (0..info.data_bytes)
            .map(|i| (i.wrapping_mul(7) >> 2).to_le_bytes()[0])
            .collect();

        // A slot: written from its memory, then copied into the hot tier.
        let (slot, in_flight) = capture(&rig, 1);
        trainer.write(to_usize(u64::from(slot.index()) * info.slot_bytes), &data);
        lane.persist(slot, in_flight).expect("queued");
        assert!(matches!(
            next_event(&mut rig.events),
            ReplyBody::Committed { step: 1, .. }
        ));
        assert!(rig.engine.wait_drained(Duration::from_secs(30)));
        assert_eq!(read_back(&rig, 1), data);
        let hot = rig
            .engine
            .hot
            .get(&rig.core.key, Some(1))
            .expect("kept hot");
        assert_eq!(&hot.data[..], &data[..]);
        for index in 0..hot.chunk_count() {
            hot.verified_chunk(index)
                .expect("the hot copy matches the CRCs");
        }

        // A stream: each ring chunk copied out as the trainer announced it.
        let streamed: Vec<u8> = data.iter().rev().copied().collect();
        let in_flight = rig.engine.track(&rig.core.key, 2).expect("new step");
        let mut feed = rig
            .engine
            .start_stream(Arc::clone(&rig.core), in_flight)
            .expect("stream");
        for seq in 0..info.chunk_count() {
            let (start, end) = info.chunk_range(seq);
            let piece = &streamed[to_usize(start)..to_usize(end)];
            trainer.write(to_usize(info.ring_position(seq)), piece);
            feed.filled.send(seq).expect("the stream takes chunks");
            assert_eq!(feed.taken.blocking_recv(), Some(seq));
        }
        assert!(matches!(
            next_event(&mut rig.events),
            ReplyBody::Committed { step: 2, .. }
        ));
        assert_eq!(read_back(&rig, 2), streamed);
    }

    #[test]
    fn a_lane_that_panics_reports_internal_frees_the_slot_and_goes_on() {
        let mut rig = rig(2, BusyPolicy::Block);
        let lane = rig.engine.spawn_lane(Arc::clone(&rig.core)).expect("lane");
        for step in 1..=3 {
            let (slot, in_flight) = capture(&rig, step);
            lane.persist(slot, in_flight).expect("queued");
            match next_event(&mut rig.events) {
                ReplyBody::Committed { step: s, .. } if step != 2 => assert_eq!(s, step),
                ReplyBody::Failed {
                    step: 2,
                    kind: ErrorKind::Internal,
                    message,
                    os_error: None,
                } if step == 2 => assert!(message.contains("panicked"), "{message}"),
                other => panic!("step {step}: {other:?}"),
            }
            assert!(rig.engine.wait_drained(Duration::from_secs(30)));
            assert_eq!(rig.core.staging.busy_slots(), 0, "step {step}");
        }
        assert!(!rig.engine.ranks.is_in_flight(&rig.core.key, 2));
        let failed = rig
            .metrics
            .snapshot_failures_total
            .with_label_values(&["j", "none"])
            .get();
        assert_eq!(failed, 1);
        drop(lane);
        drop(rig.core);
        // The lane thread held the staging area; it lets it go as it exits.
        let deadline = Instant::now() + Duration::from_secs(30);
        while rig.budget.used_bytes() != 0 {
            assert!(
                Instant::now() < deadline,
                "the lane never let go of staging"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_snapshot_that_gets_no_write_turn_in_time_fails_with_timeout() {
        let persist = PersistConfig {
            concurrent_writes: 1,
            write_wait_s: 1,
        };
        let mut rig = rig_with(99, BusyPolicy::Block, &persist);
        let lane = rig.engine.spawn_lane(Arc::clone(&rig.core)).expect("lane");
        // A hung write elsewhere holds the only turn.
        let held = rig
            .engine
            .permits
            .acquire(Duration::from_secs(1))
            .expect("free");
        let (slot, in_flight) = capture(&rig, 1);
        lane.persist(slot, in_flight).expect("queued");
        match next_event(&mut rig.events) {
            ReplyBody::Failed {
                step: 1,
                kind: ErrorKind::Timeout,
                message,
                ..
            } => assert!(message.contains("persist.write_wait_s"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(rig.engine.wait_drained(Duration::from_secs(30)));
        assert_eq!(rig.core.staging.busy_slots(), 0);
        drop(held);
        let (slot, in_flight) = capture(&rig, 2);
        lane.persist(slot, in_flight).expect("queued");
        assert!(matches!(
            next_event(&mut rig.events),
            ReplyBody::Committed { step: 2, .. }
        ));
    }

    /// Retention runs in the lane after each commit is reported (outside
    /// the write permit; the store's commit applies none), before the step
    /// leaves flight: once drained, the newest `keep_snapshots` remain.
    #[test]
    fn the_lane_applies_retention_after_reporting_each_commit() {
        let mut rig = rig(99, BusyPolicy::Block);
        let keep = rig.engine.store.config().keep_snapshots;
        let lane = rig.engine.spawn_lane(Arc::clone(&rig.core)).expect("lane");
        let last = u64::try_from(keep).expect("small") + 2;
        for step in 1..=last {
            let (slot, in_flight) = capture(&rig, step);
            lane.persist(slot, in_flight).expect("queued");
            assert!(matches!(
                next_event(&mut rig.events),
                ReplyBody::Committed { step: s, .. } if s == step
            ));
            assert!(rig.engine.wait_drained(Duration::from_secs(30)));
        }
        let listing = rig.engine.store.list(Some("j")).expect("list");
        let steps: Vec<u64> = listing.snapshots.iter().map(|s| s.manifest.step).collect();
        let kept: Vec<u64> = (last + 1 - u64::try_from(keep).expect("small")..=last).collect();
        assert_eq!(steps, kept);
    }

    #[test]
    fn a_job_the_lane_cannot_take_gives_its_slot_and_step_back() {
        let rig = rig(99, BusyPolicy::Block);
        let (tx, rx) = crossbeam_channel::bounded::<LaneJob>(1);
        drop(rx);
        let lane = Lane { tx, slots: 1 };
        let (slot, in_flight) = capture(&rig, 5);
        assert!(matches!(
            lane.persist(slot, in_flight),
            Err(LaneError::Gone)
        ));
        assert_eq!(rig.core.staging.busy_slots(), 0);
        assert_eq!(rig.engine.in_flight(), 0);
        assert!(!rig.engine.ranks.is_in_flight(&rig.core.key, 5));
    }

    #[test]
    fn a_stream_that_panics_reports_internal_and_untracks_its_step() {
        let mut rig = rig(4, BusyPolicy::Stream);
        let in_flight = rig.engine.track(&rig.core.key, 4).expect("new step");
        let feed = rig
            .engine
            .start_stream(Arc::clone(&rig.core), in_flight)
            .expect("stream");
        match next_event(&mut rig.events) {
            ReplyBody::Failed {
                step: 4,
                kind: ErrorKind::Internal,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(rig.engine.wait_drained(Duration::from_secs(30)));
        assert!(
            feed.filled.send(0).is_err(),
            "the stream's end of the ring is gone"
        );
    }
}

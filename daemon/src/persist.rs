//! The persist engine: writes captured staging slots to the store on its own
//! threads, then tells the client.
//!
//! * Each registration has a lane: one thread that persists its captured
//!   slots in capture order, straight from the staging mapping (no copy).
//!   The lane holds the staging area, so a snapshot captured by a trainer
//!   that then dies is still committed; the staging memory goes back to the
//!   budget when the lane has drained.
//! * `persist.concurrent_writes` permits bound how many slot snapshots are
//!   written at once across all lanes.
//! * A streamed capture (policy `stream`, every slot busy) runs on a thread
//!   of its own, concurrently with its lane: the store pulls chunk after
//!   chunk from the client's ring as the client fills it. It takes no permit:
//!   its trainer is blocked on it, and its memory is the ring. If the client
//!   goes away mid-stream the source fails and nothing is committed.
//!
//! After a commit the lane offers the slot to the hot tier (a copy), then
//! frees the slot.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gpusnap_proto::{ErrorKind, OsError, ReplyBody};

use crate::hot_tier::{HotTier, RankKey};
use crate::metrics::Metrics;
use crate::ranks::Ranks;
use crate::staging::{SlotState, StagingArea};
use crate::store::{Committed, SnapshotId, Source, Store, StoreError};

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
    /// Events for the connection; gone when the client is.
    pub events: tokio::sync::mpsc::Sender<ReplyBody>,
}

impl SessionCore {
    fn id(&self, step: u64) -> Result<SnapshotId, StoreError> {
        Ok(SnapshotId::new(self.key.0.clone(), self.key.1, step)?)
    }

    fn tell(&self, event: ReplyBody) {
        // The channel holds more events than a client can have snapshots in
        // flight; a full or closed one means the client is gone.
        if self.events.try_send(event).is_err() {
            tracing::debug!(job = %self.key.0, rank = self.key.1, "client gone; event not delivered");
        }
    }
}

/// A captured slot to persist.
#[derive(Debug, Clone, Copy)]
struct LaneJob {
    slot: u32,
    step: u64,
}

/// The sending end of a registration's lane; dropping it lets the lane
/// drain and exit.
#[derive(Debug)]
pub struct Lane {
    tx: crossbeam_channel::Sender<LaneJob>,
}

impl Lane {
    /// Queues slot `slot` (now `Persisting`) holding `step`.
    pub fn persist(&self, slot: u32, step: u64) {
        // The lane holds at most one job per slot, and its capacity is the
        // slot count, so this never blocks; the lane outlives every Lane.
        if self.tx.try_send(LaneJob { slot, step }).is_err() {
            unreachable!("a lane's queue overflowed or its thread is gone");
        }
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

/// Counting semaphore of concurrent writes.
#[derive(Debug)]
struct Permits {
    free: Mutex<usize>,
    returned: Condvar,
}

impl Permits {
    fn acquire(&self) -> PermitGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self
                .returned
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        PermitGuard { permits: self }
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
    permits: Permits,
    in_flight: Mutex<u64>,
    drained: Condvar,
}

impl Engine {
    pub fn new(
        store: Arc<Store>,
        hot: Arc<HotTier>,
        ranks: Arc<Ranks>,
        metrics: Arc<Metrics>,
        concurrent_writes: usize,
    ) -> Arc<Engine> {
        assert!(concurrent_writes >= 1, "configuration guarantees a permit");
        Arc::new(Engine {
            store,
            hot,
            ranks,
            metrics,
            permits: Permits {
                free: Mutex::new(concurrent_writes),
                returned: Condvar::new(),
            },
            in_flight: Mutex::new(0),
            drained: Condvar::new(),
        })
    }

    /// Starts the lane of a registration.
    pub fn spawn_lane(self: &Arc<Self>, core: Arc<SessionCore>) -> std::io::Result<Lane> {
        let slots = usize::try_from(core.staging.info().slots).unwrap_or(1);
        let (tx, rx) = crossbeam_channel::bounded::<LaneJob>(slots);
        let engine = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("persist-{}", core.conn_id))
            .spawn(move || {
                for job in rx {
                    engine.persist_slot(&core, job);
                }
            })?;
        Ok(Lane { tx })
    }

    /// Records `step` of `key` as in flight; false if it already is.
    pub fn track(&self, key: &RankKey, step: u64) -> bool {
        if !self.ranks.start(key, step) {
            return false;
        }
        let mut n = self.lock_in_flight();
        *n += 1;
        self.metrics.snapshots_in_flight.set(gauge(*n));
        true
    }

    fn untrack(&self, key: &RankKey, step: u64, committed: bool) {
        self.ranks.finish(key, step, committed);
        let mut n = self.lock_in_flight();
        assert!(*n > 0, "in-flight count underflow");
        *n -= 1;
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

    fn persist_slot(&self, core: &SessionCore, job: LaneJob) {
        let staging = &core.staging;
        assert_eq!(
            staging.slot_state(job.slot),
            Some(SlotState::Persisting { step: job.step }),
            "lane got a slot that is not persisting"
        );
        let started = Instant::now();
        let result = {
            let _permit = self.permits.acquire();
            core.id(job.step).and_then(|id| {
                // SAFETY: the slot is `Persisting` (asserted above) until this
                // lane frees it below, after the slice is gone.
                let data = unsafe { staging.slot_data(job.slot) };
                self.store.write_laid_out(
                    &id,
                    staging.layout(),
                    core.world_size,
                    Source::Memory(data),
                )
            })
        };
        // The commit is reported first: the hot copy is not part of it. The
        // step stays in flight until the copy is hot, so a restore waiting
        // for it finds it in memory.
        let hot = result.as_ref().ok().map(|c| c.manifest.clone());
        let committed = self.report(core, job.step, started, result, false);
        if let Some(manifest) = hot {
            // SAFETY: still `Persisting` (freed below); nobody writes the slot.
            let data = unsafe { staging.slot_data(job.slot) };
            if self.hot.offer(&core.key, &manifest, staging.layout(), data) {
                tracing::debug!(job = %core.key.0, rank = core.key.1, step = job.step, "kept hot");
            }
        }
        let freed = staging.transition(
            job.slot,
            SlotState::Persisting { step: job.step },
            SlotState::Free,
        );
        assert!(freed, "a persisting slot changed state under its lane");
        self.untrack(&core.key, job.step, committed);
    }

    /// Starts a streamed capture of `step` through the ring; the caller has
    /// tracked it (and on an error here it is untracked again).
    pub fn start_stream(
        self: &Arc<Self>,
        core: Arc<SessionCore>,
        step: u64,
    ) -> std::io::Result<StreamFeed> {
        let ring_chunks = usize::try_from(core.staging.info().ring_chunks).unwrap_or(1);
        assert!(ring_chunks >= 2, "stream policy without a ring");
        let (filled_tx, filled_rx) = crossbeam_channel::bounded::<u64>(ring_chunks);
        let (taken_tx, taken_rx) = tokio::sync::mpsc::channel::<u64>(ring_chunks);
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = Arc::clone(self);
        let abort_flag = Arc::clone(&aborted);
        let key = core.key.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("stream-{}", core.conn_id))
            .spawn(move || {
                let started = Instant::now();
                let result = engine.write_stream(&core, step, &filled_rx, &taken_tx);
                let aborted = abort_flag.load(std::sync::atomic::Ordering::SeqCst);
                let committed = engine.report(&core, step, started, result, aborted);
                engine.untrack(&core.key, step, committed);
            });
        if let Err(e) = spawned {
            // The caller tracked the step; nothing will persist it now.
            self.untrack(&key, step, false);
            return Err(e);
        }
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
        let info = core.staging.info().clone();
        let staging = Arc::clone(&core.staging);
        let mut fill =
            move |offset: u64, dst: &mut [u8]| -> Result<(), crate::store::SourceError> {
                let seq = offset / info.chunk_bytes;
                let (start, end) = info.chunk_range(seq);
                if start != offset || (end - start) != dst.len() as u64 {
                    return Err(format!(
                        "the store asked for data bytes {offset}..+{} but ring chunks are {} bytes",
                        dst.len(),
                        info.chunk_bytes
                    )
                    .into());
                }
                let got = filled
                    .recv_timeout(STREAM_CHUNK_WAIT)
                    .map_err(|e| match e {
                        crossbeam_channel::RecvTimeoutError::Timeout => format!(
                            "the client sent no chunk {seq} within {} s",
                            STREAM_CHUNK_WAIT.as_secs()
                        ),
                        crossbeam_channel::RecvTimeoutError::Disconnected => {
                            format!("the client went away before chunk {seq}")
                        }
                    })?;
                if got != seq {
                    return Err(format!("the client filled chunk {got}, expected {seq}").into());
                }
                // SAFETY: the client announced chunk `seq` and is not told its
                // ring position is free until `taken` below.
                let src = unsafe { staging.ring_chunk(seq, dst.len()) };
                dst.copy_from_slice(src);
                taken
                    .blocking_send(seq)
                    .map_err(|_| format!("the client went away after chunk {seq}"))?;
                Ok(())
            };
        self.store.write_laid_out(
            &id,
            core.staging.layout(),
            core.world_size,
            Source::Stream(&mut fill),
        )
    }

    /// Counts the outcome and tells the client; whether it committed.
    fn report(
        &self,
        core: &SessionCore,
        step: u64,
        started: Instant,
        result: Result<Committed, StoreError>,
        aborted: bool,
    ) -> bool {
        let job = core.key.0.as_str();
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
                self.metrics
                    .snapshots_total
                    .with_label_values(&[job, "committed"])
                    .inc();
                let gauge_step = self.metrics.last_committed_step.with_label_values(&[job]);
                gauge_step.set(gauge_step.get().max(gauge(step)));
                core.tell(ReplyBody::Committed {
                    step,
                    bytes,
                    persist_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
                });
                true
            }
            Err(e) => {
                let outcome = if aborted { "aborted" } else { "failed" };
                if aborted {
                    tracing::info!(
                        job,
                        rank = core.key.1,
                        step,
                        "streamed capture aborted by the client; nothing committed"
                    );
                } else {
                    tracing::error!(job, rank = core.key.1, step, error = %e, "snapshot failed; older snapshots stand");
                }
                self.metrics
                    .snapshots_total
                    .with_label_values(&[job, outcome])
                    .inc();
                core.tell(ReplyBody::Failed {
                    step,
                    kind: store_error_kind(&e),
                    message: e.to_string(),
                    os_error: e.raw_os_error().map(OsError::from_raw),
                });
                false
            }
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, u64> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The wire kind of a store error.
pub fn store_error_kind(e: &StoreError) -> ErrorKind {
    match e {
        StoreError::Storage(_) | StoreError::ShortTransfer { .. } | StoreError::Pool(_) => {
            ErrorKind::Storage
        }
        StoreError::Manifest { .. }
        | StoreError::ManifestMissing { .. }
        | StoreError::LengthMismatch { .. }
        | StoreError::HeaderCorrupt { .. }
        | StoreError::ChunkCorrupt { .. } => ErrorKind::Corrupt,
        StoreError::NotFound { .. } => ErrorKind::NotFound,
        StoreError::AlreadyCommitted { .. } | StoreError::InProgress { .. } => ErrorKind::Busy,
        StoreError::Name(_) | StoreError::Layout(_) => ErrorKind::InvalidRegistration,
        StoreError::Source { .. } => ErrorKind::Protocol,
        _ => ErrorKind::Internal,
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

//! One client connection: authentication, the handshake, and the request
//! state machine of `gpusnap_proto`.
//!
//! A reader task turns the socket into a bounded stream of requests, so the
//! connection can wait for a slot or a ring chunk while still noticing that
//! the client went away. Everything this connection writes goes through this
//! task, in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpusnap_proto::TensorSpec;
use gpusnap_proto::{
    BusyPolicy, ErrorKind, JobStatus, JobSteps, OsError, PROTOCOL_VERSION_MIN, Reply, ReplyBody,
    Request, RequestBody, RestoreSource, SessionStatus, SnapshotInfo, StatusInfo,
};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use crate::persist::{Lane, SessionCore, StreamFeed};
use crate::restore::{self, Mapping, RestoreError};
use crate::server::Daemon;
use crate::server::wire::{self, WireError};
use crate::staging::{SlotState, StagingArea, StagingError, StagingPlan};
use crate::store::{SnapshotId, StoreError};

/// Requests read ahead of the one being handled.
const REQUEST_QUEUE: usize = 4;
/// Events buffered for a client (far more than it can have in flight).
const EVENT_QUEUE: usize = 256;

/// An error reply; kinds that close the connection
/// ([`ErrorKind::closes_connection`]) end it after it is sent.
#[derive(Debug)]
struct Refusal {
    kind: ErrorKind,
    message: String,
    os_error: Option<OsError>,
}

impl Refusal {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
            os_error: None,
        }
    }

    /// A refusal because of a store error, with the OS error behind it.
    fn store(e: &StoreError) -> Refusal {
        Refusal {
            kind: crate::persist::store_error_kind(e),
            message: e.to_string(),
            os_error: e.raw_os_error().map(OsError::from_raw),
        }
    }

    fn protocol(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorKind::Protocol, message)
    }
}

type Handled = Result<ReplyBody, Refusal>;

/// A capture in progress on this connection.
#[derive(Debug)]
enum Capture {
    Slot {
        step: u64,
        slot: u32,
    },
    Stream {
        step: u64,
        feed: StreamFeed,
        next_seq: u64,
        chunks: u64,
    },
}

/// A registered connection.
#[derive(Debug)]
struct Session {
    core: Arc<SessionCore>,
    lane: Lane,
}

/// Who is on the other end.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    pid: i32,
}

struct Conn {
    daemon: Arc<Daemon>,
    id: u64,
    peer: Peer,
    wr: OwnedWriteHalf,
    requests: mpsc::Receiver<Result<Request, WireError>>,
    events_tx: mpsc::Sender<ReplyBody>,
    events: mpsc::Receiver<ReplyBody>,
    /// The version negotiated by the handshake; `None` before `Hello`.
    protocol: Option<u32>,
    last_id: u64,
    session: Option<Session>,
    capture: Option<Capture>,
    lent: Option<u32>,
}

/// Serves one accepted connection until it closes.
pub async fn serve(daemon: Arc<Daemon>, id: u64, stream: UnixStream) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            pid: c.pid().unwrap_or(0),
        },
        Err(e) => {
            tracing::warn!(error = %e, "SO_PEERCRED failed; dropping the connection");
            return;
        }
    };
    let (mut rd, wr) = stream.into_split();
    let (req_tx, requests) = mpsc::channel(REQUEST_QUEUE);
    let limit = daemon.config.daemon.frame_bytes_max;
    let reader = tokio::spawn(async move {
        loop {
            let item = wire::read_request(&mut rd, limit).await;
            let stop = !matches!(item, Ok(Some(_)));
            let item = match item {
                Ok(Some(r)) => Ok(r),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            if req_tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let mut conn = Conn {
        daemon: Arc::clone(&daemon),
        id,
        peer,
        wr,
        requests,
        events_tx,
        events,
        protocol: None,
        last_id: 0,
        session: None,
        capture: None,
        lent: None,
    };
    tracing::debug!(
        conn = id,
        uid = peer.uid,
        pid = peer.pid,
        "client connected"
    );
    conn.run().await;
    conn.close();
    reader.abort();
    tracing::debug!(conn = id, "client disconnected");
}

impl Conn {
    async fn run(&mut self) {
        let mut shutdown = self.daemon.shutdown.subscribe();
        loop {
            tokio::select! {
                item = self.requests.recv() => {
                    let request = match item {
                        None => return,
                        Some(Ok(r)) => r,
                        Some(Err(e)) => {
                            if let Some(kind) = e.kind() {
                                tracing::warn!(conn = self.id, error = %e, "bad frame; closing the connection");
                                let _ = self.send(0, ReplyBody::error(kind, e.to_string())).await;
                            }
                            return;
                        }
                    };
                    if !self.handle_one(request).await {
                        return;
                    }
                }
                Some(event) = self.events.recv() => {
                    if self.send(0, event).await.is_err() {
                        return;
                    }
                }
                _ = shutdown.changed() => {
                    tracing::info!(conn = self.id, "daemon stopping; closing the connection");
                    let _ = self.send(0, ReplyBody::error(ErrorKind::ShuttingDown, "the daemon is stopping")).await;
                    return;
                }
            }
        }
    }

    /// Handles one request and sends its reply; false to close.
    async fn handle_one(&mut self, request: Request) -> bool {
        let Request { id, body } = request;
        if id <= self.last_id {
            let refusal = Refusal::protocol(format!(
                "request id {id} is not above the previous {}",
                self.last_id
            ));
            return self.refuse(id, refusal).await;
        }
        self.last_id = id;
        let name = body.name();
        let result = self.dispatch(id, body).await;
        match result {
            Ok(Some(reply)) => self.send(id, reply).await.is_ok(),
            Ok(None) => true,
            Err(refusal) => {
                tracing::debug!(conn = self.id, request = name, kind = ?refusal.kind, message = %refusal.message, "request refused");
                self.refuse(id, refusal).await
            }
        }
    }

    async fn refuse(&mut self, id: u64, refusal: Refusal) -> bool {
        let closes = refusal.kind.closes_connection();
        let sent = self
            .send(
                id,
                ReplyBody::Error {
                    kind: refusal.kind,
                    message: refusal.message,
                    os_error: refusal.os_error,
                },
            )
            .await;
        sent.is_ok() && !closes
    }

    async fn send(&mut self, id: u64, body: ReplyBody) -> std::io::Result<()> {
        let version = self.version();
        wire::write_reply(&mut self.wr, &Reply { id, body }, version).await
    }

    /// The protocol version this connection speaks: the client's, once its
    /// `Hello` was accepted; before that the oldest served, which any
    /// client reads.
    fn version(&self) -> u32 {
        self.protocol.unwrap_or(PROTOCOL_VERSION_MIN)
    }

    /// `Ok(None)`: the reply was already sent (it carried a file descriptor).
    async fn dispatch(&mut self, id: u64, body: RequestBody) -> Result<Option<ReplyBody>, Refusal> {
        if self.protocol.is_none() {
            let RequestBody::Hello {
                protocol_version,
                client,
            } = body
            else {
                return Err(Refusal::protocol(format!(
                    "the first message must be hello, not {}",
                    body.name()
                )));
            };
            let version = gpusnap_proto::negotiate(protocol_version)
                .map_err(|e| Refusal::new(ErrorKind::VersionMismatch, e.to_string()))?;
            self.protocol = Some(version);
            tracing::debug!(conn = self.id, client, version, "hello");
            return Ok(Some(ReplyBody::Welcome {
                protocol_version: version,
                daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
                uid: self.peer.uid,
            }));
        }
        match body {
            RequestBody::Hello { .. } => Err(Refusal::protocol("hello sent twice")),
            RequestBody::Register {
                job,
                rank,
                world_size,
                tensors,
            } => {
                self.register(id, job, rank, world_size, tensors).await?;
                Ok(None)
            }
            RequestBody::Begin { step } => self.begin(step).await.map(Some),
            RequestBody::ChunkFilled { step, seq } => self.chunk_filled(step, seq).await.map(Some),
            RequestBody::Captured {
                step,
                capture_ns,
                stall_ns,
            } => self.captured(step, capture_ns, stall_ns).map(Some),
            RequestBody::Abort { step, reason } => self.abort(step, &reason).map(Some),
            RequestBody::Restore { step } => self.restore(step).await.map(Some),
            RequestBody::Release { slot } => self.release(slot).map(Some),
            RequestBody::List { job } => self.list(job).await.map(Some),
            RequestBody::Status => Ok(Some(self.status())),
            RequestBody::Describe { job, rank, step } => {
                self.describe(job, rank, step).await.map(Some)
            }
        }
    }

    async fn register(
        &mut self,
        id: u64,
        job: String,
        rank: u32,
        world_size: u32,
        tensors: Vec<TensorSpec>,
    ) -> Result<(), Refusal> {
        if self.session.is_some() {
            return Err(Refusal::protocol(
                "this connection is already registered; connect again to register another set",
            ));
        }
        self.refuse_if_stopping()?;
        let invalid = |m: String| Refusal::new(ErrorKind::InvalidRegistration, m);
        SnapshotId::new(job.clone(), rank, 0).map_err(|e| invalid(e.to_string()))?;
        if world_size == 0 || rank >= world_size {
            return Err(invalid(format!(
                "rank {rank} is not below world size {world_size}"
            )));
        }
        let daemon = Arc::clone(&self.daemon);
        let (uid, job_for_claim) = (self.peer.uid, job.clone());
        let claimed = tokio::task::spawn_blocking(move || {
            daemon.owners.claim(&daemon.store, &job_for_claim, uid)
        })
        .await
        .map_err(|e| Refusal::new(ErrorKind::Internal, e.to_string()))?;
        claimed.map_err(|e| match e {
            crate::owners::OwnerError::NotOwner { .. } => {
                Refusal::new(ErrorKind::PermissionDenied, e.to_string())
            }
            other => Refusal::new(ErrorKind::Storage, other.to_string()),
        })?;
        let key = (job.clone(), rank);
        if let Err(holder) = self.daemon.ranks.acquire(&key, self.id) {
            return Err(Refusal::new(
                ErrorKind::Busy,
                format!("job {job:?} rank {rank} is registered by another connection ({holder})"),
            ));
        }
        let config = &self.daemon.config;
        let plan = StagingPlan {
            double: config.staging.double,
            policy: config.staging.policy,
            chunk_bytes: config.store.io_buffer_bytes as u64,
            ring_chunks: config.ring_chunks(),
        };
        let tensor_count = tensors.len();
        let budget = Arc::clone(&self.daemon.budget);
        let made = tokio::task::spawn_blocking(move || StagingArea::create(tensors, plan, &budget))
            .await
            .map_err(|e| Refusal::new(ErrorKind::Internal, e.to_string()));
        let staging = match made {
            Ok(Ok(s)) => Arc::new(s),
            Ok(Err(e)) => {
                self.daemon.ranks.release(&key, self.id);
                let kind = match e {
                    StagingError::Layout(_) => ErrorKind::InvalidRegistration,
                    StagingError::BudgetExceeded { .. } => ErrorKind::StagingFull,
                    _ => ErrorKind::Internal,
                };
                return Err(Refusal::new(kind, e.to_string()));
            }
            Err(r) => {
                self.daemon.ranks.release(&key, self.id);
                return Err(r);
            }
        };
        let core = Arc::new(SessionCore {
            conn_id: self.id,
            uid: self.peer.uid,
            pid: self.peer.pid,
            key: key.clone(),
            world_size,
            staging: Arc::clone(&staging),
            events: self.events_tx.clone(),
        });
        let lane = match self.daemon.engine.spawn_lane(Arc::clone(&core)) {
            Ok(l) => l,
            Err(e) => {
                self.daemon.ranks.release(&key, self.id);
                return Err(Refusal::new(
                    ErrorKind::Internal,
                    format!("persist thread: {e}"),
                ));
            }
        };
        self.daemon.sessions_insert(self.id, Arc::clone(&core));
        self.session = Some(Session { core, lane });
        let info = staging.info().clone();
        tracing::info!(
            conn = self.id,
            job,
            rank,
            world_size,
            uid = self.peer.uid,
            pid = self.peer.pid,
            tensors = tensor_count,
            data_bytes = info.data_bytes,
            slots = info.slots,
            "registered"
        );
        let reply = Reply {
            id,
            body: ReplyBody::Registered(info),
        };
        let version = self.version();
        wire::write_reply_with_fd(&mut self.wr, &reply, version, staging.memfd())
            .await
            .map_err(|e| {
                Refusal::new(
                    ErrorKind::Internal,
                    format!("sending the staging memfd: {e}"),
                )
            })
    }

    fn session(&self) -> Result<&Session, Refusal> {
        self.session.as_ref().ok_or_else(|| {
            Refusal::new(
                ErrorKind::NotRegistered,
                "register before snapshots and restores",
            )
        })
    }

    async fn begin(&mut self, step: u64) -> Handled {
        let session = self.session()?;
        let core = Arc::clone(&session.core);
        if let Some(c) = &self.capture {
            return Err(Refusal::protocol(format!(
                "begin of step {step} while step {} is being captured",
                c.step()
            )));
        }
        if self.lent.is_some() {
            return Err(Refusal::protocol(
                "begin while a restored slot is not released",
            ));
        }
        self.refuse_if_stopping()?;
        let job = core.key.0.clone();
        if let Some(reason) = self.already_have(&core, step).await {
            self.count_outcome(&job, "skipped");
            return Ok(ReplyBody::Skipped { step, reason });
        }
        let staging = Arc::clone(&core.staging);
        let capturing = SlotState::Capturing { step };
        if let Some(slot) = staging.claim(capturing) {
            self.capture = Some(Capture::Slot { step, slot });
            return Ok(ReplyBody::Slot { step, slot });
        }
        match staging.info().policy {
            BusyPolicy::Skip => {
                self.count_outcome(&job, "skipped");
                Ok(ReplyBody::Skipped {
                    step,
                    reason: format!(
                        "every staging slot ({}) is still persisting an earlier step (policy skip)",
                        staging.info().slots
                    ),
                })
            }
            BusyPolicy::Block => {
                let slot = self.wait_for_slot(&staging, capturing).await?;
                self.capture = Some(Capture::Slot { step, slot });
                Ok(ReplyBody::Slot { step, slot })
            }
            BusyPolicy::Stream => {
                if !self.daemon.engine.track(&core.key, step) {
                    self.count_outcome(&job, "skipped");
                    return Ok(ReplyBody::Skipped {
                        step,
                        reason: format!("step {step} is already being persisted"),
                    });
                }
                let feed = self
                    .daemon
                    .engine
                    .start_stream(Arc::clone(&core), step)
                    .map_err(|e| {
                        Refusal::new(ErrorKind::Internal, format!("stream thread: {e}"))
                    })?;
                let chunks = staging.info().chunk_count();
                tracing::info!(
                    conn = self.id,
                    job,
                    step,
                    chunks,
                    "every slot busy; streaming the capture through the ring"
                );
                self.capture = Some(Capture::Stream {
                    step,
                    feed,
                    next_seq: 0,
                    chunks,
                });
                Ok(ReplyBody::Stream { step, chunks })
            }
        }
    }

    /// Why `step` cannot be captured again, if it cannot.
    async fn already_have(&self, core: &SessionCore, step: u64) -> Option<String> {
        if self.daemon.ranks.is_in_flight(&core.key, step) {
            return Some(format!("step {step} is already being persisted"));
        }
        let dir = SnapshotId::new(core.key.0.clone(), core.key.1, step)
            .ok()?
            .dir(self.daemon.store.root());
        let daemon = Arc::clone(&self.daemon);
        let exists = tokio::task::spawn_blocking(move || {
            daemon.store.storage().metadata(&dir).map(|m| m.is_some())
        })
        .await;
        match exists {
            Ok(Ok(true)) => Some(format!(
                "step {step} is already committed; committed snapshots are never overwritten"
            )),
            _ => None,
        }
    }

    /// Counts a snapshot that ended here, without a persist.
    fn count_outcome(&self, job: &str, outcome: &str) {
        self.daemon
            .metrics
            .snapshots_total
            .with_label_values(&[job, outcome])
            .inc();
    }

    fn refuse_if_stopping(&self) -> Result<(), Refusal> {
        if self.daemon.is_stopping() {
            return Err(Refusal::new(
                ErrorKind::ShuttingDown,
                "the daemon is stopping",
            ));
        }
        Ok(())
    }

    /// Waits for a free slot under policy block, delivering events (commits
    /// free slots) and noticing the client leaving.
    async fn wait_for_slot(
        &mut self,
        staging: &Arc<StagingArea>,
        state: SlotState,
    ) -> Result<u32, Refusal> {
        let wait = Duration::from_secs(self.daemon.config.daemon.slot_wait_s);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = staging.slot_freed().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(slot) = staging.claim(state) {
                return Ok(slot);
            }
            tokio::select! {
                _ = &mut notified => {}
                Some(event) = self.events.recv() => {
                    if self.send(0, event).await.is_err() {
                        return Err(Refusal::protocol("client went away"));
                    }
                }
                item = self.requests.recv() => {
                    return Err(match item {
                        None => Refusal::protocol("client went away while waiting for a slot"),
                        Some(_) => Refusal::protocol("a request arrived before the reply to the previous one"),
                    });
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Refusal::new(ErrorKind::Timeout, format!(
                        "no staging slot became free within {} s", wait.as_secs()
                    )));
                }
            }
        }
    }

    async fn chunk_filled(&mut self, step: u64, seq: u64) -> Handled {
        let Some(Capture::Stream {
            step: streaming,
            feed,
            next_seq,
            chunks,
        }) = &mut self.capture
        else {
            return Err(Refusal::protocol("chunk_filled without a streamed capture"));
        };
        if step != *streaming || seq != *next_seq || seq >= *chunks {
            return Err(Refusal::protocol(format!(
                "chunk_filled step {step} seq {seq}; expected step {streaming} seq {next_seq} of {chunks}"
            )));
        }
        if feed.filled.try_send(seq).is_err() {
            return Err(Refusal::protocol(
                "more chunks filled than the ring holds, or the stream already failed",
            ));
        }
        *next_seq += 1;
        let wait = tokio::time::timeout(crate::persist::STREAM_CHUNK_WAIT, feed.taken.recv()).await;
        match wait {
            Ok(Some(taken)) => {
                assert_eq!(taken, seq, "the engine takes ring chunks in order");
                Ok(ReplyBody::ChunkFree { step, seq })
            }
            // The stream failed (its Failed event says why) or stalled.
            Ok(None) | Err(_) => {
                self.capture = None;
                Err(Refusal::new(
                    ErrorKind::Storage,
                    format!("the streamed snapshot of step {step} stopped at chunk {seq}"),
                ))
            }
        }
    }

    fn captured(&mut self, step: u64, capture_ns: u64, stall_ns: u64) -> Handled {
        let core = Arc::clone(&self.session()?.core);
        match self.capture.take() {
            Some(Capture::Slot { step: s, slot }) if s == step => {
                let moved = core.staging.transition(
                    slot,
                    SlotState::Capturing { step },
                    SlotState::Persisting { step },
                );
                assert!(moved, "a capturing slot changed state under its connection");
                if !self.daemon.engine.track(&core.key, step) {
                    core.staging
                        .transition(slot, SlotState::Persisting { step }, SlotState::Free);
                    return Err(Refusal::new(
                        ErrorKind::Busy,
                        format!("step {step} is already being persisted"),
                    ));
                }
                if let Some(session) = &self.session {
                    session.lane.persist(slot, step);
                }
            }
            Some(Capture::Stream {
                step: s,
                feed,
                next_seq,
                chunks,
            }) if s == step => {
                if next_seq != chunks {
                    feed.aborted
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    return Err(Refusal::protocol(format!(
                        "captured after {next_seq} of {chunks} chunks"
                    )));
                }
                // The engine has every chunk; dropping the feed is fine.
            }
            other => {
                self.capture = other;
                return Err(Refusal::protocol(format!(
                    "captured for step {step}, which is not being captured"
                )));
            }
        }
        let job = core.key.0.as_str();
        let m = &self.daemon.metrics;
        m.capture_seconds
            .with_label_values(&[job])
            .observe(Duration::from_nanos(capture_ns).as_secs_f64());
        m.stall_seconds
            .with_label_values(&[job])
            .observe(Duration::from_nanos(stall_ns).as_secs_f64());
        Ok(ReplyBody::Accepted { step })
    }

    fn abort(&mut self, step: u64, reason: &str) -> Handled {
        let session = self.session()?;
        let core = Arc::clone(&session.core);
        match self.capture.take() {
            Some(Capture::Slot { step: s, slot }) if s == step => {
                core.staging
                    .transition(slot, SlotState::Capturing { step }, SlotState::Free);
                self.count_outcome(&core.key.0, "aborted");
            }
            Some(Capture::Stream { step: s, feed, .. }) if s == step => {
                feed.aborted
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                drop(feed);
            }
            other => {
                self.capture = other;
                return Err(Refusal::protocol(format!(
                    "abort for step {step}, which is not being captured"
                )));
            }
        }
        tracing::info!(
            conn = self.id,
            step,
            reason,
            "capture aborted by the client"
        );
        Ok(ReplyBody::Aborted { step })
    }

    async fn restore(&mut self, step: Option<u64>) -> Handled {
        let session = self.session()?;
        let core = Arc::clone(&session.core);
        if self.capture.is_some() || self.lent.is_some() {
            return Err(Refusal::protocol(
                "restore while a capture or a restore is open",
            ));
        }
        let started = Instant::now();
        let job = core.key.0.clone();
        let wait = Duration::from_secs(self.daemon.config.daemon.slot_wait_s);
        if !self.daemon.ranks.wait_idle(&core.key, wait).await {
            return Err(Refusal::new(
                ErrorKind::Timeout,
                format!(
                    "snapshots of job {job:?} rank {} were still being persisted after {} s",
                    core.key.1,
                    wait.as_secs()
                ),
            ));
        }
        let staging = Arc::clone(&core.staging);
        let slot = self.wait_for_slot(&staging, SlotState::Lent).await?;
        let daemon = Arc::clone(&self.daemon);
        let core_for_fill = Arc::clone(&core);
        let filled =
            tokio::task::spawn_blocking(move || fill_slot(&daemon, &core_for_fill, slot, step))
                .await
                .map_err(|e| Refusal::new(ErrorKind::Internal, e.to_string()))
                .and_then(|r| r);
        let m = &self.daemon.metrics;
        match filled {
            Ok(Some((restored_step, source, bytes))) => {
                self.lent = Some(slot);
                let elapsed = started.elapsed();
                m.restore_seconds
                    .with_label_values(&[job.as_str(), source.name()])
                    .observe(elapsed.as_secs_f64());
                m.bytes_read_total
                    .with_label_values(&[job.as_str(), source.name()])
                    .inc_by(bytes);
                m.restores_total
                    .with_label_values(&[job.as_str(), source.name(), "ok"])
                    .inc();
                tracing::info!(
                    conn = self.id,
                    job,
                    rank = core.key.1,
                    step = restored_step,
                    source = source.name(),
                    bytes,
                    "restored"
                );
                Ok(ReplyBody::Restored {
                    step: restored_step,
                    slot,
                    source,
                    bytes,
                    elapsed_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
                })
            }
            Ok(None) => {
                staging.transition(slot, SlotState::Lent, SlotState::Free);
                Ok(ReplyBody::NoSnapshot)
            }
            Err(refusal) => {
                staging.transition(slot, SlotState::Lent, SlotState::Free);
                m.restores_total
                    .with_label_values(&[job.as_str(), "none", "failed"])
                    .inc();
                Err(refusal)
            }
        }
    }

    fn release(&mut self, slot: u32) -> Handled {
        let session = self.session()?;
        if self.lent != Some(slot) {
            return Err(Refusal::protocol(format!(
                "release of slot {slot}, which is not lent"
            )));
        }
        session
            .core
            .staging
            .transition(slot, SlotState::Lent, SlotState::Free);
        self.lent = None;
        Ok(ReplyBody::Released)
    }

    async fn list(&mut self, job: Option<String>) -> Handled {
        let daemon = Arc::clone(&self.daemon);
        let uid = self.peer.uid;
        tokio::task::spawn_blocking(move || list(&daemon, uid, job.as_deref()))
            .await
            .map_err(|e| Refusal::new(ErrorKind::Internal, e.to_string()))?
    }

    fn status(&self) -> ReplyBody {
        ReplyBody::Status(Box::new(status(&self.daemon, self.peer.uid)))
    }

    /// Needs no registration and touches no slot, so it is answered in any
    /// state after the handshake, a capture or a restore open or not.
    async fn describe(&mut self, job: String, rank: u32, step: u64) -> Handled {
        let daemon = Arc::clone(&self.daemon);
        let uid = self.peer.uid;
        tokio::task::spawn_blocking(move || describe(&daemon, uid, job, rank, step))
            .await
            .map_err(|e| Refusal::new(ErrorKind::Internal, e.to_string()))?
    }

    /// Gives back what this connection held: a capture in progress leaves
    /// nothing written; a lent slot is freed; captured snapshots go on.
    fn close(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let core = &session.core;
        match self.capture.take() {
            Some(Capture::Slot { step, slot }) => {
                core.staging
                    .transition(slot, SlotState::Capturing { step }, SlotState::Free);
                self.count_outcome(&core.key.0, "aborted");
                tracing::warn!(conn = self.id, job = %core.key.0, rank = core.key.1, step, "client left mid-capture; nothing of that step is written");
            }
            Some(Capture::Stream { feed, step, .. }) => {
                feed.aborted
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!(conn = self.id, job = %core.key.0, rank = core.key.1, step, "client left mid-stream; nothing of that step is committed");
            }
            None => {}
        }
        if let Some(slot) = self.lent.take() {
            core.staging
                .transition(slot, SlotState::Lent, SlotState::Free);
        }
        self.daemon.ranks.release(&core.key, self.id);
        self.daemon.sessions_remove(self.id);
        // Dropping the lane lets it finish what was captured, then exit.
        drop(session);
    }
}

impl Capture {
    fn step(&self) -> u64 {
        match self {
            Capture::Slot { step, .. } | Capture::Stream { step, .. } => *step,
        }
    }
}

/// Fills `slot` with the snapshot of `step` (newest when `None`): from the
/// hot tier when it holds that step, else from disk. `None`: no snapshot.
fn fill_slot(
    daemon: &Daemon,
    core: &SessionCore,
    slot: u32,
    step: Option<u64>,
) -> Result<Option<(u64, RestoreSource, u64)>, Refusal> {
    let (job, rank) = (&core.key.0, core.key.1);
    let snapshot = match daemon.store.find(job, rank, step) {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) if step.is_none() => return Ok(None),
        Err(e) => return Err(restore_refusal(RestoreError::Store(e))),
    };
    let found = snapshot.manifest.step;
    // SAFETY: the slot is `Lent` to this connection and not yet reported to
    // the client, so nobody else touches it until this returns.
    let whole = unsafe { core.staging.slot_whole_mut(slot) };
    let data_len = usize::try_from(core.staging.info().data_bytes).unwrap_or(usize::MAX);
    if let Some(hot) = daemon.hot.get(&core.key, Some(found)) {
        let mapping =
            Mapping::plan(&hot.layout, core.staging.layout(), found).map_err(restore_refusal)?;
        match restore::fill_from_hot(&hot, &mapping, &mut whole[..data_len]) {
            Ok(bytes) => return Ok(Some((found, RestoreSource::Memory, bytes))),
            Err(e) => {
                tracing::error!(job, rank, step = found, error = %e, "hot copy failed verification; dropping it and reading from disk");
                daemon.hot.discard(&core.key);
            }
        }
    }
    let mapping =
        Mapping::plan(&snapshot.layout, core.staging.layout(), found).map_err(restore_refusal)?;
    let bytes = restore::fill_from_disk(&daemon.store, &snapshot, &mapping, whole)
        .map_err(restore_refusal)?;
    Ok(Some((found, RestoreSource::Disk, bytes)))
}

fn restore_refusal(e: RestoreError) -> Refusal {
    let kind = match &e {
        RestoreError::TensorDiffers { .. }
        | RestoreError::MissingInSnapshot { .. }
        | RestoreError::NotRegistered { .. } => ErrorKind::Mismatch,
        RestoreError::Hot(_) => ErrorKind::Corrupt,
        RestoreError::Store(s) => return Refusal::store(s),
    };
    Refusal::new(kind, e.to_string())
}

fn list(daemon: &Daemon, uid: u32, job: Option<&str>) -> Handled {
    let listing = daemon.store.list(job).map_err(|e| Refusal::store(&e))?;
    let mut jobs: Vec<String> = Vec::new();
    let snapshots: Vec<SnapshotInfo> = listing
        .snapshots
        .iter()
        .filter(|s| daemon.owners.visible(&daemon.store, &s.manifest.job, uid))
        .map(|s| {
            let m = &s.manifest;
            if jobs.last() != Some(&m.job) {
                jobs.push(m.job.clone());
            }
            SnapshotInfo {
                job: m.job.clone(),
                rank: m.rank,
                world_size: m.world_size,
                step: m.step,
                bytes: m.file_len,
                tensors: m.tensors.len() as u64,
                created_unix_ms: m.created_unix_ms,
            }
        })
        .collect();
    jobs.dedup();
    let complete = jobs
        .into_iter()
        .map(|j| JobSteps {
            steps: listing.complete_steps(&j),
            job: j,
        })
        .collect();
    Ok(ReplyBody::Listing {
        snapshots,
        complete,
    })
}

/// The tensor table of the committed snapshot (job, rank, step), from its
/// manifest alone, for a uid that owns the job (root: any job).
fn describe(daemon: &Daemon, uid: u32, job: String, rank: u32, step: u64) -> Handled {
    let id = SnapshotId::new(job, rank, step)
        .map_err(|e| Refusal::new(ErrorKind::InvalidRegistration, e.to_string()))?;
    let owner = daemon
        .owners
        .owner(&daemon.store, &id.job)
        .map_err(|e| Refusal::new(ErrorKind::Storage, e.to_string()))?;
    match owner {
        None => {
            return Err(Refusal::new(
                ErrorKind::NotFound,
                format!("snapshot {id} not found: job {:?} has none", id.job),
            ));
        }
        Some(owner) if uid != 0 && owner != uid => {
            return Err(Refusal::new(
                ErrorKind::PermissionDenied,
                format!("job {:?} belongs to uid {owner}, not {uid}", id.job),
            ));
        }
        Some(_) => {}
    }
    let (manifest, layout) = daemon
        .store
        .committed_manifest(&id)
        .map_err(|e| Refusal::store(&e))?;
    Ok(ReplyBody::Described {
        job: manifest.job,
        rank: manifest.rank,
        step: manifest.step,
        world_size: manifest.world_size,
        tensors: layout.tensors.iter().map(|t| t.spec()).collect(),
    })
}

fn status(daemon: &Daemon, uid: u32) -> StatusInfo {
    let sessions: Vec<SessionStatus> = daemon
        .sessions_snapshot()
        .into_iter()
        .filter(|c| uid == 0 || c.uid == uid)
        .map(|c| SessionStatus {
            job: c.key.0.clone(),
            rank: c.key.1,
            uid: c.uid,
            pid: c.pid,
            tensors: c.staging.specs().len() as u64,
            staging_bytes: c.staging.info().memfd_bytes,
            slots: c.staging.info().slots,
            slots_busy: c.staging.busy_slots(),
        })
        .collect();
    let mut jobs: Vec<JobStatus> = Vec::new();
    for view in daemon.ranks.views() {
        let Ok(Some(owner)) = daemon.owners.owner(&daemon.store, &view.key.0) else {
            continue;
        };
        if uid != 0 && owner != uid {
            continue;
        }
        let hot_step = daemon.hot.step(&view.key);
        match jobs.iter_mut().find(|j| j.job == view.key.0) {
            Some(j) => {
                j.last_committed_step = j.last_committed_step.max(view.last_committed);
                j.in_flight += view.in_flight;
                j.hot_step = j.hot_step.max(hot_step);
            }
            None => jobs.push(JobStatus {
                job: view.key.0.clone(),
                uid: owner,
                last_committed_step: view.last_committed,
                in_flight: view.in_flight,
                hot_step,
            }),
        }
    }
    StatusInfo {
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: daemon.started.elapsed().as_secs(),
        io_backend: daemon.store.storage().backend().name().to_owned(),
        clients_connected: daemon.clients_connected(),
        staging_bytes_used: daemon.budget.used_bytes(),
        staging_budget_bytes: daemon.budget.budget_bytes(),
        hot_tier_bytes: daemon.hot.bytes(),
        hot_tier_budget_bytes: daemon.hot.budget_bytes(),
        snapshots_in_flight: daemon.engine.in_flight(),
        sessions,
        jobs,
    }
}

//! One client connection: authentication, the handshake, and the request
//! state machine of `gpusnap_proto`.
//!
//! A reader task turns the socket into a bounded stream of requests, so the
//! connection can wait for a slot or a ring chunk while still noticing that
//! the client went away. Everything this connection writes goes through this
//! task, in order.
//!
//! The connection's state is one [`Phase`]: greeting, open (after `Hello`),
//! or registered with a [`Session`] and one [`Activity`] (idle, capturing
//! one step, or lending one restored slot), so a capture and a lent slot
//! can never both be open. Everything a phase holds is a guard (the rank,
//! the session entry, the slot), and [`Conn`]'s `Drop` ends the phase:
//! however the connection ends, a clean close, an error, or a panic in its
//! task, it gives back what it held. Only the logging and the counting
//! differ: a connection that did not close in order (a panic) counts its
//! open capture as failed, not aborted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpusnap_proto::convert::nanos;
use gpusnap_proto::{AttachReport, PinState, check_reports};
use gpusnap_proto::{ErrorKind, Reply, ReplyBody, Request, RequestBody, TensorSpec};
use gpusnap_proto::{PROTOCOL_VERSION_MIN, negotiate};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use crate::metrics::{
    ClosedReason, PanicSite, PinningShare, RestoreOutcome, SnapshotOutcome, StagingPinning,
};
use crate::persist::{Lane, SessionCore, StreamFeed};
use crate::ranks::{RankHold, RankKey};
use crate::restore;
use crate::server::errors::{Refusal, panic_message};
use crate::server::wire::{self, WireError};
use crate::server::{Daemon, SessionEntry};
use crate::staging::{CapturingSlot, LentSlot, StagingArea, StagingPlan};
use crate::store::SnapshotId;

/// The first protocol version with `Attached`.
const ATTACHED_SINCE: u32 = 3;

/// Requests read ahead of the one being handled.
const REQUEST_QUEUE: usize = 4;
/// Events buffered for a client (far more than it can have in flight).
const EVENT_QUEUE: usize = 256;

/// The reply to one request, or the refusal sent instead.
pub(super) type Handled = Result<ReplyBody, Refusal>;

/// Where a connection is in the protocol.
#[derive(Debug)]
pub(super) enum Phase {
    /// Before `Hello`.
    Greeting,
    /// After the handshake, before `Register`.
    Open,
    /// Registered: the session, and what it is doing.
    Registered(Session, Activity),
}

/// What a registered connection is doing.
#[derive(Debug)]
pub(super) enum Activity {
    Idle,
    /// Between `Begin` and `Captured` (or `Abort`).
    Capturing(Capture),
    /// A restored slot the client has not released.
    Lent(LentSlot),
}

/// A capture in progress.
#[derive(Debug)]
pub(super) enum Capture {
    /// Into a staging slot (freed if the capture does not complete).
    Slot(CapturingSlot),
    /// Through the ring, chunk by chunk.
    Stream(StreamCapture),
}

impl Capture {
    pub(super) fn step(&self) -> u64 {
        match self {
            Capture::Slot(slot) => slot.step(),
            Capture::Stream(stream) => stream.step,
        }
    }
}

/// A streamed capture: the engine pulls each chunk as the client fills it.
#[derive(Debug)]
pub(super) struct StreamCapture {
    pub(super) step: u64,
    pub(super) feed: StreamFeed,
    pub(super) next_seq: u64,
    pub(super) chunks: u64,
}

/// A registered connection: what it holds while registered, each released
/// when dropped.
#[derive(Debug)]
pub(super) struct Session {
    /// Dropped first (fields drop in declaration order): the lane finishes
    /// what was captured, then exits; then the session leaves the listing
    /// and the rank is free.
    pub(super) lane: Lane,
    pub(super) core: Arc<SessionCore>,
    _entry: SessionEntry,
    _hold: RankHold,
    /// This registration in the staging pinning gauges (`unreported` until
    /// the client's `Attached`).
    pinning: PinningShare,
}

/// The refusal of a request whose wait the daemon's stop cut short; `what`
/// says what it waited for.
pub(super) fn stopping(what: &str) -> Refusal {
    Refusal::new(
        ErrorKind::ShuttingDown,
        format!("the daemon is stopping; the request {what} and is not served"),
    )
}

/// Resolves once the daemon is stopping (at once if it already is).
pub(super) async fn until_stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the sender is gone, and with it the daemon.
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

/// Who is on the other end.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub(super) uid: u32,
    pub(super) pid: i32,
}

/// Aborts the reader task when the connection is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) daemon: Arc<Daemon>,
    pub(super) id: u64,
    pub(super) peer: Peer,
    pub(super) phase: Phase,
    pub(super) requests: mpsc::Receiver<Result<Request, WireError>>,
    pub(super) events: mpsc::Receiver<ReplyBody>,
    events_tx: mpsc::Sender<ReplyBody>,
    /// The version this connection speaks: the client's, once its `Hello`
    /// was accepted; before that the oldest served, which any client reads.
    version: u32,
    last_id: u64,
    /// Set once `run` has returned: the connection ended in order.
    ended_in_order: bool,
    /// How long one reply may wait for the client to read (`daemon.reply_wait_s`).
    reply_wait: Duration,
    /// Set by a write that failed or timed out: a frame may be cut short,
    /// so nothing more is written and the connection closes.
    write_failed: bool,
    _reader: AbortOnDrop,
    /// Dropped after the phase (`Drop` ends it first), so a client that
    /// sees the socket close finds its rank and slots already free.
    wr: OwnedWriteHalf,
}

/// Serves one accepted connection until it closes.
pub async fn serve(daemon: Arc<Daemon>, id: u64, stream: UnixStream) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            // Unknown (0) only for a peer in another pid namespace.
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
    let daemon_reply_wait_s = daemon.config.daemon.reply_wait_s;
    let mut conn = Conn {
        daemon,
        id,
        peer,
        phase: Phase::Greeting,
        requests,
        events,
        events_tx,
        version: PROTOCOL_VERSION_MIN,
        last_id: 0,
        ended_in_order: false,
        reply_wait: Duration::from_secs(daemon_reply_wait_s),
        write_failed: false,
        _reader: AbortOnDrop(reader),
        wr,
    };
    tracing::debug!(
        conn = id,
        uid = peer.uid,
        pid = peer.pid,
        "client connected"
    );
    conn.run().await;
    conn.ended_in_order = true;
    drop(conn);
    tracing::debug!(conn = id, "client disconnected");
}

impl Conn {
    async fn run(&mut self) {
        let mut shutdown = self.daemon.shutdown.subscribe();
        let hello_wait = Duration::from_secs(self.daemon.config.daemon.hello_wait_s);
        let hello_deadline = tokio::time::Instant::now() + hello_wait;
        loop {
            let greeting = matches!(self.phase, Phase::Greeting);
            tokio::select! {
                () = tokio::time::sleep_until(hello_deadline), if greeting => {
                    self.daemon.metrics.count_closed(ClosedReason::HelloTimeout);
                    tracing::warn!(conn = self.id, uid = self.peer.uid, pid = self.peer.pid, wait_s = hello_wait.as_secs(), "no hello in time; closing the connection");
                    let message = format!("no hello within {} s (daemon.hello_wait_s)", hello_wait.as_secs());
                    let _ = self.send(0, ReplyBody::error(ErrorKind::Timeout, message)).await;
                    return;
                }
                item = self.requests.recv() => {
                    let request = match item {
                        None => return,
                        Some(Ok(r)) => r,
                        Some(Err(e)) => {
                            if let Some(kind) = e.kind() {
                                self.daemon.metrics.count_closed(ClosedReason::BadFrame);
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
        self.daemon.hooks.on_request(name);
        let result = self.dispatch(id, body).await;
        match result {
            Ok(Some(reply)) => self.send(id, reply).await.is_ok(),
            Ok(None) => true,
            Err(refusal) => {
                tracing::debug!(conn = self.id, request = name, kind = ?refusal.kind, message = %refusal.message, os_error = ?refusal.os_error, "request refused");
                self.refuse(id, refusal).await
            }
        }
    }

    async fn refuse(&mut self, id: u64, refusal: Refusal) -> bool {
        let closes = refusal.kind.closes_connection();
        let sent = self.send(id, refusal.into_reply()).await;
        sent.is_ok() && !closes
    }

    /// Writes one reply, within `daemon.reply_wait_s`: a client that
    /// leaves its socket full longer gets a `TimedOut` error, and every
    /// caller closes the connection on an error.
    pub(super) async fn send(&mut self, id: u64, body: ReplyBody) -> std::io::Result<()> {
        self.refuse_if_write_failed()?;
        let reply = Reply { id, body };
        let write = wire::write_reply(&mut self.wr, &reply, self.version);
        let written = tokio::time::timeout(self.reply_wait, write).await;
        self.written_in_time(written)
    }

    /// The result of a reply's write, or `TimedOut` (counted and logged)
    /// when it did not finish within `reply_wait`.
    fn written_in_time(
        &mut self,
        written: Result<std::io::Result<()>, tokio::time::error::Elapsed>,
    ) -> std::io::Result<()> {
        let result = written.unwrap_or_else(|_| {
            self.daemon.metrics.count_closed(ClosedReason::ReplyTimeout);
            tracing::warn!(
                conn = self.id,
                uid = self.peer.uid,
                pid = self.peer.pid,
                wait_s = self.reply_wait.as_secs(),
                "the client did not read its reply in time; closing the connection"
            );
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client did not read its reply within {} s (daemon.reply_wait_s)",
                    self.reply_wait.as_secs()
                ),
            ))
        });
        self.write_failed |= result.is_err();
        result
    }

    fn refuse_if_write_failed(&self) -> std::io::Result<()> {
        if self.write_failed {
            Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "an earlier reply on this connection could not be written",
            ))
        } else {
            Ok(())
        }
    }

    /// `Ok(None)`: the reply was already sent (it carried a file descriptor).
    async fn dispatch(&mut self, id: u64, body: RequestBody) -> Result<Option<ReplyBody>, Refusal> {
        if matches!(self.phase, Phase::Greeting) {
            return self.hello(body).map(Some);
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
            RequestBody::Status => Ok(Some(ReplyBody::Status(Box::new(super::query::status(
                &self.daemon,
                self.peer.uid,
            ))))),
            RequestBody::Describe { job, rank, step } => {
                self.describe(job, rank, step).await.map(Some)
            }
            RequestBody::Attached { devices } => self.attached(devices).map(Some),
        }
    }

    fn hello(&mut self, body: RequestBody) -> Handled {
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
        let version = negotiate(protocol_version)
            .map_err(|e| Refusal::new(ErrorKind::VersionMismatch, e.to_string()))?;
        self.version = version;
        self.phase = Phase::Open;
        tracing::debug!(conn = self.id, client, version, "hello");
        Ok(ReplyBody::Welcome {
            protocol_version: version,
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            uid: self.peer.uid,
        })
    }

    async fn register(
        &mut self,
        id: u64,
        job: String,
        rank: u32,
        world_size: u32,
        tensors: Vec<TensorSpec>,
    ) -> Result<(), Refusal> {
        if matches!(self.phase, Phase::Registered(..)) {
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
        tokio::task::spawn_blocking(move || {
            daemon.owners.claim(&daemon.store, &job_for_claim, uid)
        })
        .await
        .map_err(|e| self.blocking_failed(&format!("claiming job {job:?}"), e))?
        .map_err(|e| Refusal::owner(&e))?;
        let key = RankKey::new(job, rank);
        let hold = self.daemon.ranks.acquire(&key, self.id).map_err(|holder| {
            Refusal::new(
                ErrorKind::Busy,
                format!("{key} is registered by another connection ({holder})"),
            )
        })?;
        let config = &self.daemon.config;
        let plan = StagingPlan {
            double: config.staging.double,
            policy: config.staging.policy,
            chunk_bytes: gpusnap_proto::convert::to_u64(config.store.io_buffer_bytes),
            ring_chunks: config.ring_chunks(),
        };
        let tensor_count = tensors.len();
        let budget = Arc::clone(&self.daemon.budget);
        // On any error below, `hold` is dropped: the rank is free again.
        let staging =
            tokio::task::spawn_blocking(move || StagingArea::create(tensors, plan, &budget))
                .await
                .map_err(|e| self.blocking_failed("creating staging", e))?
                .map_err(|e| Refusal::staging(&e))?;
        let staging = Arc::new(staging);
        let core = Arc::new(SessionCore {
            conn_id: self.id,
            uid: self.peer.uid,
            pid: self.peer.pid,
            key,
            world_size,
            staging: Arc::clone(&staging),
            staging_pinning: std::sync::OnceLock::new(),
            events: self.events_tx.clone(),
        });
        let lane = self
            .daemon
            .engine
            .spawn_lane(Arc::clone(&core))
            .map_err(|e| Refusal::io("starting the persist thread", &e))?;
        let entry = self.daemon.sessions.enter(Arc::clone(&core));
        let pinning = self.daemon.metrics.pinning_share();
        let info = staging.info().clone();
        tracing::info!(
            conn = self.id,
            job = %core.key.job,
            rank,
            world_size,
            uid = self.peer.uid,
            pid = self.peer.pid,
            tensors = tensor_count,
            data_bytes = info.data_bytes,
            slots = info.slots,
            "registered"
        );
        self.phase = Phase::Registered(
            Session {
                lane,
                core,
                _entry: entry,
                _hold: hold,
                pinning,
            },
            Activity::Idle,
        );
        let reply = Reply {
            id,
            body: ReplyBody::Registered(info),
        };
        self.refuse_if_write_failed()
            .map_err(|e| Refusal::io("sending the staging memfd", &e))?;
        let write = wire::write_reply_with_fd(&mut self.wr, &reply, self.version, staging.memfd());
        let written = tokio::time::timeout(self.reply_wait, write).await;
        self.written_in_time(written)
            .map_err(|e| Refusal::io("sending the staging memfd", &e))
    }

    /// The client's report of what its devices did to this registration's
    /// staging: checked ([`check_reports`]), logged (the pin rate at info,
    /// an unpinned staging and its reason at warn), exported (the session's
    /// [`PinningShare`], `gpusnap_staging_pin_seconds`) and kept for
    /// `Status`. Once per registration, on a version-3 connection.
    fn attached(&mut self, devices: Vec<AttachReport>) -> Handled {
        if self.version < ATTACHED_SINCE {
            return Err(Refusal::protocol(format!(
                "attached is a request of protocol version {ATTACHED_SINCE}; this connection speaks version {}",
                self.version
            )));
        }
        let conn = self.id;
        let metrics = Arc::clone(&self.daemon.metrics);
        let Phase::Registered(session, _) = &mut self.phase else {
            return Err(Refusal::new(
                ErrorKind::NotRegistered,
                "register before reporting what the devices did to staging",
            ));
        };
        let core = Arc::clone(&session.core);
        if core.staging_pinning.get().is_some() {
            return Err(Refusal::protocol(
                "attached sent twice for one registration",
            ));
        }
        check_reports(&devices, core.staging.info().memfd_bytes)
            .map_err(|e| Refusal::protocol(format!("attach report refused: {e}")))?;
        let (job, rank) = (&core.key.job, core.key.rank);
        let mut state = StagingPinning::NotNeeded;
        let (mut pinned_bytes, mut pin_ns) = (0u64, 0u64);
        for report in &devices {
            let device = report.device.as_str();
            match &report.pin {
                PinState::NotNeeded => {
                    tracing::debug!(conn, %job, rank, device, "staging needs no pinning for this device");
                }
                PinState::Pinned { bytes, pin_ns: ns } => {
                    let seconds = Duration::from_nanos(*ns).as_secs_f64();
                    #[expect(
                        clippy::cast_precision_loss,
                        reason = "a rate for the log; 2^53 bytes is far beyond any staging"
                    )]
                    let gb_per_s = *bytes as f64 / seconds.max(1e-9) / 1e9;
                    tracing::info!(conn, %job, rank, device, bytes, seconds, gb_per_s, "staging page-locked by the client, once for this registration");
                    pinned_bytes = pinned_bytes.max(*bytes);
                    pin_ns = pin_ns.max(*ns);
                    if state == StagingPinning::NotNeeded {
                        state = StagingPinning::Pinned;
                    }
                }
                PinState::Unpinned { reason } => {
                    tracing::warn!(conn, %job, rank, device, %reason, "staging is not page-locked by the client: its CUDA copies use pageable memory, slower and synchronous");
                    state = StagingPinning::Unpinned;
                }
            }
        }
        if pinned_bytes > 0 {
            metrics
                .staging_pin_seconds
                .with_label_values(&[job.as_str()])
                .observe(Duration::from_nanos(pin_ns).as_secs_f64());
        }
        session.pinning.report(state, pinned_bytes);
        if core.staging_pinning.set(devices).is_err() {
            // Only this connection's task sets it, and it checked above.
            return Err(Refusal::internal("the attach report was recorded twice"));
        }
        Ok(ReplyBody::AttachNoted)
    }

    /// The session and its activity; `NotRegistered` before `Register`.
    pub(super) fn registered(&self) -> Result<(&Session, &Activity), Refusal> {
        match &self.phase {
            Phase::Registered(session, activity) => Ok((session, activity)),
            Phase::Greeting | Phase::Open => Err(Refusal::new(
                ErrorKind::NotRegistered,
                "register before snapshots and restores",
            )),
        }
    }

    /// The activity, to move on from; `Idle` is left in its place.
    pub(super) fn take_activity(&mut self) -> Activity {
        match &mut self.phase {
            Phase::Registered(_, activity) => std::mem::replace(activity, Activity::Idle),
            Phase::Greeting | Phase::Open => Activity::Idle,
        }
    }

    /// Sets the activity of an idle registered connection.
    pub(super) fn set_activity(&mut self, next: Activity) {
        match &mut self.phase {
            Phase::Registered(_, activity) => {
                assert!(
                    matches!(activity, Activity::Idle),
                    "connection {}: {next:?} over {activity:?}",
                    self.id
                );
                *activity = next;
            }
            Phase::Greeting | Phase::Open => {
                unreachable!("connection {}: an activity before registering", self.id)
            }
        }
    }

    /// The refusal of this connection's blocking work that did not finish
    /// (`what` names it): a panic in it, logged and counted
    /// ([`PanicSite::Connection`]), or a cancellation.
    pub(super) fn blocking_failed(&self, what: &str, e: tokio::task::JoinError) -> Refusal {
        if !e.is_panic() {
            return Refusal::internal(format!("{what}: {e}"));
        }
        self.daemon.metrics.count_panic(PanicSite::Connection);
        let panic = panic_message(&*e.into_panic());
        tracing::error!(conn = self.id, what, %panic, "a connection's blocking work panicked; refused as Internal, the connection goes on");
        Refusal::internal(format!("{what} panicked: {panic}"))
    }

    pub(super) fn refuse_if_stopping(&self) -> Result<(), Refusal> {
        if self.daemon.is_stopping() {
            return Err(Refusal::new(
                ErrorKind::ShuttingDown,
                "the daemon is stopping",
            ));
        }
        Ok(())
    }

    /// Waits (at most `daemon.slot_wait_s`) until `claim` gets a slot,
    /// delivering events (commits free slots) and noticing the client
    /// leaving and the daemon stopping (`ShuttingDown` at once).
    pub(super) async fn wait_for_slot<T>(
        &mut self,
        staging: &StagingArea,
        claim: impl Fn() -> Option<T>,
    ) -> Result<T, Refusal> {
        let wait = Duration::from_secs(self.daemon.config.daemon.slot_wait_s);
        let deadline = tokio::time::Instant::now() + wait;
        let mut shutdown = self.daemon.shutdown.subscribe();
        let mut logged = false;
        loop {
            let notified = staging.slot_freed().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(slot) = claim() {
                return Ok(slot);
            }
            if !logged {
                logged = true;
                tracing::info!(
                    conn = self.id,
                    slots = staging.info().slots,
                    wait_s = wait.as_secs(),
                    "every staging slot is busy; waiting for one"
                );
            }
            tokio::select! {
                _ = &mut notified => {}
                () = until_stopping(&mut shutdown) => {
                    return Err(stopping("waited for a staging slot"));
                }
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

    async fn restore(&mut self, step: Option<u64>) -> Handled {
        let (session, activity) = self.registered()?;
        if !matches!(activity, Activity::Idle) {
            return Err(Refusal::protocol(
                "restore while a capture or a restore is open",
            ));
        }
        let core = Arc::clone(&session.core);
        let started = Instant::now();
        let job = core.key.job.clone();
        let wait = Duration::from_secs(self.daemon.config.daemon.slot_wait_s);
        let mut shutdown = self.daemon.shutdown.subscribe();
        let idle = tokio::select! {
            idle = self.daemon.ranks.wait_idle(&core.key, wait) => idle,
            () = until_stopping(&mut shutdown) => {
                return Err(stopping("waited for the rank's snapshots in flight"));
            }
        };
        if !idle {
            return Err(Refusal::new(
                ErrorKind::Timeout,
                format!(
                    "snapshots of {} were still being persisted after {} s",
                    core.key,
                    wait.as_secs()
                ),
            ));
        }
        let staging = Arc::clone(&core.staging);
        let slot = self
            .wait_for_slot(&staging, || staging.claim_lent())
            .await?;
        let daemon = Arc::clone(&self.daemon);
        let filler = Arc::clone(&core);
        // The slot travels with the fill and comes back with its result; a
        // panic in the fill drops it there, freeing it.
        let runtime = tokio::runtime::Handle::current();
        let joined = tokio::task::spawn_blocking(move || {
            let sources = restore::walk::Sources {
                store: &daemon.store,
                hot: &daemon.hot,
                remote: daemon.remote.as_deref(),
                runtime: &runtime,
                metrics: &daemon.metrics,
                uid: filler.uid,
            };
            let filled = restore::walk::restore(&sources, &filler.key, &slot, step);
            (slot, filled)
        })
        .await;
        let metrics = Arc::clone(&self.daemon.metrics);
        let m = &*metrics;
        let (slot, filled) = match joined {
            Ok(done) => done,
            Err(e) => {
                m.count_restore(&job, None, RestoreOutcome::Failed);
                let why = if e.is_panic() {
                    m.count_panic(PanicSite::Connection);
                    panic_message(&*e.into_panic())
                } else {
                    e.to_string()
                };
                tracing::error!(conn = self.id, job, error = %why, "the restore fill did not finish (a panic); its slot is free again");
                return Err(Refusal::internal(format!("the restore failed: {why}")));
            }
        };
        match filled {
            Ok(Some(restore::walk::Restored {
                filled,
                walked_back,
            })) => {
                let lent = slot.index();
                self.set_activity(Activity::Lent(slot));
                let elapsed = started.elapsed();
                let source = filled.source;
                m.restore_seconds
                    .with_label_values(&[job.as_str(), source.name()])
                    .observe(elapsed.as_secs_f64());
                m.bytes_read_total
                    .with_label_values(&[job.as_str(), source.name()])
                    .inc_by(filled.bytes);
                m.count_restore(&job, Some(source), RestoreOutcome::Ok);
                tracing::info!(
                    conn = self.id,
                    job,
                    rank = core.key.rank,
                    step = filled.step,
                    source = source.name(),
                    bytes = filled.bytes,
                    walked_back = walked_back.len(),
                    "restored"
                );
                Ok(ReplyBody::Restored {
                    step: filled.step,
                    slot: lent,
                    source,
                    bytes: filled.bytes,
                    elapsed_ns: nanos(elapsed),
                    walked_back,
                })
            }
            Ok(None) => {
                drop(slot);
                Ok(ReplyBody::NoSnapshot)
            }
            Err(e) => {
                drop(slot);
                m.count_restore(&job, None, RestoreOutcome::Failed);
                Err(Refusal::restore(&e))
            }
        }
    }

    fn release(&mut self, slot: u32) -> Handled {
        self.registered()?;
        match self.take_activity() {
            Activity::Lent(lent) if lent.index() == slot => {
                drop(lent);
                Ok(ReplyBody::Released)
            }
            other => {
                self.set_activity(other);
                Err(Refusal::protocol(format!(
                    "release of slot {slot}, which is not lent"
                )))
            }
        }
    }

    async fn list(&mut self, job: Option<String>) -> Handled {
        let daemon = Arc::clone(&self.daemon);
        let uid = self.peer.uid;
        let asked = job.clone();
        let local =
            tokio::task::spawn_blocking(move || super::query::list(&daemon, uid, job.as_deref()))
                .await
                .map_err(|e| self.blocking_failed("listing", e))??;
        let Some(job) = asked else { return Ok(local) };
        let ReplyBody::Listing {
            snapshots,
            complete,
            ..
        } = local
        else {
            return Ok(local);
        };
        let (remote_complete, remote_error) = match super::query::remote_complete(
            &self.daemon,
            uid,
            &job,
        )
        .await
        {
            Ok(steps) => (steps.into_iter().collect(), None),
            Err(why) => {
                tracing::warn!(conn = self.id, job, error = %why, "listing: the object store could not be listed; answering with the local steps");
                (Vec::new(), Some(why))
            }
        };
        Ok(ReplyBody::Listing {
            snapshots,
            complete,
            remote_complete,
            remote_error,
        })
    }

    async fn describe(&mut self, job: String, rank: u32, step: u64) -> Handled {
        let daemon = Arc::clone(&self.daemon);
        let uid = self.peer.uid;
        let asked = (job.clone(), rank, step);
        let local = tokio::task::spawn_blocking(move || {
            super::query::describe(&daemon, uid, job, rank, step)
        })
        .await
        .map_err(|e| self.blocking_failed("describing", e))?;
        // A step this node does not hold (a replaced node): the object
        // store's manifest says the same.
        match local {
            Err(refusal) if refusal.kind == ErrorKind::NotFound && self.daemon.remote.is_some() => {
                let (job, rank, step) = asked;
                let Ok(id) = SnapshotId::new(job, rank, step) else {
                    return Err(refusal);
                };
                match super::query::describe_remote(&self.daemon, uid, &id).await? {
                    Some(described) => Ok(described),
                    None => Err(refusal),
                }
            }
            other => other,
        }
    }

    /// Ends the registration: a capture in progress leaves nothing
    /// written, a lent slot is freed, captured snapshots go on (the lane
    /// drains), the session and the rank are given back.
    fn end_session(&mut self, session: Session, activity: Activity) {
        let key = &session.core.key;
        let metrics = &self.daemon.metrics;
        match activity {
            Activity::Idle => {}
            Activity::Capturing(Capture::Slot(slot)) => {
                let step = slot.step();
                drop(slot);
                if self.ended_in_order {
                    metrics.count_snapshot(&key.job, SnapshotOutcome::Aborted);
                    tracing::warn!(conn = self.id, job = %key.job, rank = key.rank, step, "client left mid-capture; nothing of that step is written");
                } else {
                    metrics.count_snapshot_failure(&key.job, None);
                    tracing::error!(conn = self.id, job = %key.job, rank = key.rank, step, "connection ended out of order mid-capture; nothing of that step is written");
                }
            }
            Activity::Capturing(Capture::Stream(stream)) => {
                // The engine counts it when its source fails: aborted if the
                // client left, failed if this connection broke down.
                if self.ended_in_order {
                    stream.feed.abort();
                    tracing::warn!(conn = self.id, job = %key.job, rank = key.rank, step = stream.step, "client left mid-stream; nothing of that step is committed");
                } else {
                    tracing::error!(conn = self.id, job = %key.job, rank = key.rank, step = stream.step, "connection ended out of order mid-stream; nothing of that step is committed");
                }
                drop(stream);
            }
            Activity::Lent(slot) => drop(slot),
        }
        drop(session);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.ended_in_order {
            tracing::error!(
                conn = self.id,
                "connection ended out of order (its task panicked or was cancelled); releasing what it held"
            );
        }
        if let Phase::Registered(session, activity) =
            std::mem::replace(&mut self.phase, Phase::Greeting)
        {
            self.end_session(session, activity);
        }
    }
}

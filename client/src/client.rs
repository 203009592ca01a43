//! The trainer-facing client: configuration, registration, restore, list,
//! status, commit waits and reconnection. Capture lives in `handle.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::background::{self, Finisher, Pending};
use crate::backoff::Backoff;
use crate::buffer::{Buffer, HostTensor};
use crate::conn::Deadline;
use crate::device::{
    Device, HostDevice, PinPolicy, Pinning, RestoreCopy, StreamOrder, Target, same_device,
};
use crate::error::{Error, Result};
use crate::proto::convert::to_u64;
use crate::proto::{self, ReplyBody, RequestBody, RestoreSource, StagingInfo};
use crate::route;
use crate::session::{Events, Outcome, SETTLED_MAX, Session};
use crate::staging::Staging;
use crate::{Dtype, TensorSpec};

use crate::handle::OpenCapture;
pub use crate::handle::SnapshotHandle;

/// How a [`Client`] connects and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The job name snapshots are filed under.
    pub job: String,
    /// This process's rank in the job.
    pub rank: u32,
    /// Ranks in the job.
    pub world_size: u32,
    /// How long to keep retrying a missing or refusing socket (10 s).
    pub connect_timeout: Duration,
    /// How long a registration refused as `Busy` (another connection holds
    /// this job and rank) is retried on new connections; `None`: as long as
    /// `connect_timeout`. One deadline bounds the retries of the whole
    /// registration, its reconnects included: no connection is tried later
    /// than `max(connect_timeout, busy_timeout)` after it began; the try
    /// under way then may still wait `call_timeout` for each of its replies
    /// (the handshake's and the registration's).
    pub busy_timeout: Option<Duration>,
    /// Bound on every wait for a reply (60 s).
    pub call_timeout: Duration,
    /// Bound on waiting for a commit, for a slot under the `block` policy,
    /// and for a restore's data (600 s).
    pub commit_timeout: Duration,
    /// When the connection breaks, reconnect, register again and retry the
    /// interrupted operation once (true). When false the operation fails
    /// with [`Error::Disconnected`] and the next call opens a new connection.
    pub reconnect: bool,
    /// Threads the host copy backend uses (min(4, available parallelism)).
    pub copy_threads: usize,
    /// Whether a registration with CUDA buffers fails when its staging
    /// cannot be page-locked ([`PinPolicy::Require`]) or goes on unpinned,
    /// slower, with a warning ([`PinPolicy::Prefer`], the default).
    pub pin_policy: PinPolicy,
}

impl ClientConfig {
    /// Defaults for `job`, rank 0 of 1, socket from `GPUSNAP_SOCKET` or
    /// [`proto::DEFAULT_SOCKET`].
    pub fn new(job: impl Into<String>) -> ClientConfig {
        let socket = std::env::var_os("GPUSNAP_SOCKET")
            .filter(|s| !s.is_empty())
            .map_or_else(|| PathBuf::from(proto::DEFAULT_SOCKET), PathBuf::from);
        ClientConfig {
            socket,
            job: job.into(),
            rank: 0,
            world_size: 1,
            connect_timeout: Duration::from_secs(10),
            busy_timeout: None,
            call_timeout: Duration::from_secs(60),
            commit_timeout: Duration::from_secs(600),
            reconnect: true,
            copy_threads: crate::device::host_default_threads(),
            pin_policy: PinPolicy::Prefer,
        }
    }
}

/// Which snapshot to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The newest committed step of this (job, rank).
    Latest,
    /// That step.
    At(u64),
}

/// What a snapshot request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// The data is in the daemon's staging; it persists in the background.
    Captured(CaptureInfo),
    /// The daemon's staging was busy and its policy is `skip`.
    Skipped { step: u64, reason: String },
}

/// A captured snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureInfo {
    pub step: u64,
    /// Tensor bytes copied.
    pub bytes: u64,
    /// Time the copies took.
    pub capture: Duration,
    /// Time the trainer was blocked by the snapshot.
    pub stall: Duration,
}

/// A committed snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub step: u64,
    pub bytes: u64,
    /// Time the daemon took to persist it (zero when only a listing, not
    /// the commit event, told us it is committed).
    pub persist: Duration,
}

/// A finished restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    pub step: u64,
    pub source: RestoreSource,
    /// Bytes the daemon reported for the snapshot.
    pub bytes: u64,
    /// Time the daemon took to fill its staging slot.
    pub daemon_fill: Duration,
    /// Time the copies into the registered buffers took.
    pub copy: Duration,
    /// Newer steps the daemon passed over before this one, newest first:
    /// each snapshot failed verification (`reason` says how) where it was
    /// read (`source`). Empty when the first step tried restored.
    pub walked_back: Vec<proto::WalkBack>,
}

/// Committed snapshots, as the daemon lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub snapshots: Vec<proto::SnapshotInfo>,
    /// Per job: steps every rank has committed.
    pub complete: Vec<proto::JobSteps>,
    /// Per job: steps complete in the object store (every rank uploaded);
    /// a restore can download them. Empty when the remote tier is off.
    pub remote_complete: Vec<proto::JobSteps>,
    /// Why the daemon could not list the object store (then
    /// `remote_complete` is empty and only local steps are listed).
    pub remote_error: Option<String>,
}

/// What a committed snapshot holds, as [`Client::describe`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub job: String,
    pub rank: u32,
    pub step: u64,
    /// Ranks in the job when the snapshot was taken.
    pub world_size: u32,
    /// The snapshot's tensors in the order of its data file (packed by
    /// element size, largest first), not necessarily registration order.
    pub tensors: Vec<TensorSpec>,
}

#[derive(Debug)]
pub(crate) struct Registration {
    pub spec: TensorSpec,
    pub buffer: Buffer,
    /// Index in `Client::devices` of the device that copies `buffer`.
    pub device: usize,
}

/// Pauses between registrations refused as `Busy`.
const BUSY_PAUSE_FIRST: Duration = Duration::from_millis(5);
const BUSY_PAUSE_MAX: Duration = Duration::from_millis(200);

/// A connection to `gpusnapd` and the buffers registered on it.
///
/// Calls block; each wait for the daemon is bounded by the configured
/// timeouts. Registration is sent lazily with the first snapshot or restore.
#[derive(Debug)]
pub struct Client {
    pub(crate) config: ClientConfig,
    /// The device host buffers are copied by.
    host: Arc<dyn Device>,
    /// Every device a registered buffer is copied by, in the order they
    /// first appeared: each is attached to every registration's staging.
    pub(crate) devices: Vec<Arc<dyn Device>>,
    pub(crate) tensors: Vec<Registration>,
    pub(crate) session: Option<Session>,
    pub(crate) events: Events,
    /// Steps accepted on a connection that broke before their event came.
    pub(crate) orphaned: BTreeSet<u64>,
    /// The capture started by `begin_snapshot`, until it is finished.
    pub(crate) capture: Option<OpenCapture>,
    /// The thread that finishes captures handed off by
    /// `finish_snapshot_in_background`, started by the first.
    pub(crate) finisher: Option<Finisher>,
    /// The capture it works on, until collected (it holds the connection).
    pub(crate) handed_off: Option<Pending>,
    /// How handed-off captures came out, by step, until asked for.
    pub(crate) background_outcomes: background::Outcomes,
    uid: u32,
}

impl Client {
    /// Connects to `socket` as rank 0 of a one-rank `job`.
    pub fn connect(socket: impl AsRef<Path>, job: impl Into<String>) -> Result<Client> {
        let mut config = ClientConfig::new(job);
        config.socket = socket.as_ref().to_path_buf();
        Client::with_config(config)
    }

    /// Connects with `config`, copying with the host backend.
    pub fn with_config(config: ClientConfig) -> Result<Client> {
        let device = Arc::new(HostDevice::new(config.copy_threads));
        Client::with_device(config, device)
    }

    /// Connects with `config`, copying host buffers ([`Buffer::Host`],
    /// [`Buffer::Raw`]) with `device`; a [`Buffer::Device`] is copied by the
    /// device it names.
    pub fn with_device(config: ClientConfig, device: Arc<dyn Device>) -> Result<Client> {
        let mut client = Client {
            config,
            host: device,
            devices: Vec::new(),
            tensors: Vec::new(),
            session: None,
            events: Events::default(),
            orphaned: BTreeSet::new(),
            capture: None,
            finisher: None,
            handed_off: None,
            background_outcomes: background::Outcomes::default(),
            uid: 0,
        };
        client.live()?;
        Ok(client)
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The uid the daemon authenticated this client as.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The staging layout of the current registration, once sent.
    pub fn staging(&self) -> Option<&StagingInfo> {
        self.session.as_ref()?.staging.as_deref().map(Staging::info)
    }

    /// What attaching each device did to the current registration's
    /// staging (page-locked for CUDA copies, or not and why), in the order
    /// of [`devices`](Client::devices); empty before the registration was
    /// sent.
    pub fn staging_pinning(&self) -> Vec<Pinning> {
        self.session
            .as_ref()
            .and_then(|s| s.staging.as_deref())
            .map(Staging::pinning)
            .unwrap_or_default()
    }

    /// Registers a buffer as tensor `name`. Checked here (spec, byte length,
    /// unique name, no aliasing); sent to the daemon with the whole set on
    /// the next snapshot or restore. Registering after the set was sent
    /// makes the next call register again on a fresh connection.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: impl Into<Vec<u64>>,
        buffer: impl Into<Buffer>,
    ) -> Result<()> {
        self.refuse_open_capture()?;
        let spec = TensorSpec::new(name, dtype, shape);
        let buffer = buffer.into();
        let expected = spec.validate()?;
        if self.tensors.iter().any(|r| r.spec.name == spec.name) {
            return Err(Error::DuplicateName { name: spec.name });
        }
        let actual = to_u64(buffer.byte_len());
        if actual != expected {
            return Err(Error::BufferLength {
                name: spec.name,
                expected,
                actual,
            });
        }
        if let Buffer::Device(d) = &buffer
            && !same_device(&d.device(), &d.device())
        {
            // Devices are told apart by their `Arc` (DeviceBuffer::device's
            // contract): a new one per call would make a device per buffer.
            return Err(Error::InvalidRegistration(format!(
                "the buffer of {:?} ({d:?}) names a different device object on each call of DeviceBuffer::device; it must return one Arc",
                spec.name
            )));
        }
        if let Some(other) = self.tensors.iter().find(|r| r.buffer.aliases(&buffer)) {
            return Err(Error::InvalidRegistration(format!(
                "the buffer of {:?} shares memory with the one of {:?}",
                spec.name, other.spec.name
            )));
        }
        let device = buffer.device().unwrap_or_else(|| Arc::clone(&self.host));
        let device = match self.devices.iter().position(|d| same_device(d, &device)) {
            Some(i) => i,
            None => {
                self.devices.push(device);
                self.devices.len() - 1
            }
        };
        self.tensors.push(Registration {
            spec,
            buffer,
            device,
        });
        Ok(())
    }

    /// The devices the registered buffers are copied by (each attached to
    /// the staging of every registration), in the order they first appeared.
    pub fn devices(&self) -> &[Arc<dyn Device>] {
        &self.devices
    }

    /// Registers a host tensor under `name` with its own dtype and shape.
    pub fn register_host(&mut self, name: impl Into<String>, tensor: &HostTensor) -> Result<()> {
        self.register(name, tensor.dtype(), tensor.shape().to_vec(), tensor)
    }

    /// Tensors registered so far, in registration order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().map(|r| &r.spec)
    }

    /// Sends the registration now (if it is not current) and returns the
    /// staging layout the daemon chose.
    pub fn sync_registration(&mut self) -> Result<&StagingInfo> {
        self.refuse_open_capture()?;
        self.retry("register", |c| c.registered().map(drop))?;
        self.staging()
            .ok_or_else(|| Error::internal("registration has no staging"))
    }

    /// Restores `step` into every registered buffer. `Ok(None)`: there is
    /// no snapshot. On an error nothing has been written into the buffers.
    ///
    /// The copies take each host tensor's write lock: a `read()` or
    /// `write()` guard held by the calling thread across this call would
    /// wait forever.
    pub fn restore(&mut self, step: Step) -> Result<Option<RestoreInfo>> {
        self.restore_on(step, &StreamOrder::legacy())
    }

    /// [`restore`](Client::restore), with the copies into CUDA buffers
    /// ordered after the work queued so far on `order`'s streams, and the
    /// work queued there later ordered after the copies (the restore also
    /// waits for them on the host before it returns).
    pub fn restore_on(&mut self, step: Step, order: &StreamOrder) -> Result<Option<RestoreInfo>> {
        self.collect_background();
        self.refuse_open_capture()?;
        self.retry("restore", |c| c.restore_once(step, order))
    }

    fn restore_once(&mut self, step: Step, order: &StreamOrder) -> Result<Option<RestoreInfo>> {
        let staging = self.registered()?;
        let wanted = match step {
            Step::Latest => None,
            Step::At(s) => Some(s),
        };
        let reply = self.call(
            RequestBody::Restore { step: wanted },
            self.config.commit_timeout,
        )?;
        let (got, slot, source, bytes, elapsed_ns, walked_back) = match reply {
            ReplyBody::NoSnapshot => return Ok(None),
            ReplyBody::Restored {
                step,
                slot,
                source,
                bytes,
                elapsed_ns,
                walked_back,
            } => (step, slot, source, bytes, elapsed_ns, walked_back),
            other => return Err(self.unexpected("restore", &other)),
        };
        if wanted.is_some_and(|w| w != got) {
            return Err(self.protocol(format!("asked to restore step {wanted:?}, got step {got}")));
        }
        let started = Instant::now();
        let copied = self.copy_out(&staging, slot, order);
        let copy = started.elapsed();
        let released = self.call(RequestBody::Release { slot }, self.config.call_timeout);
        copied?;
        match released {
            Ok(ReplyBody::Released) => {}
            Ok(other) => return Err(self.unexpected("release", &other)),
            // The daemon frees what a closed connection had lent.
            Err(Error::Disconnected(m)) => tracing::warn!(slot, "release after restore: {m}"),
            Err(e) => return Err(e),
        }
        Ok(Some(RestoreInfo {
            step: got,
            source,
            bytes,
            daemon_fill: Duration::from_nanos(elapsed_ns),
            copy,
            walked_back,
        }))
    }

    /// Copies slot `slot` into every registered buffer, under write locks.
    fn copy_out(&mut self, staging: &Staging, slot: u32, order: &StreamOrder) -> Result<()> {
        let targets: Vec<Target> = self.tensors.iter().map(|r| r.buffer.target()).collect();
        // SAFETY: the daemon lent `slot` to this restore, and `&mut self`
        // keeps every other capture or restore of this client away (each
        // waited for all of its tickets, whose copies dropped their spans).
        let spans = unsafe { staging.slot_spans(slot) }?;
        let copies = spans
            .into_iter()
            .zip(targets)
            .zip(&self.tensors)
            .map(|((src, dst), r)| (r.device, RestoreCopy { src, dst }));
        route::restore_and_wait(&self.devices, copies, order).map(drop)
    }

    /// Committed snapshots of this job.
    pub fn list(&mut self) -> Result<Listing> {
        let job = self.config.job.clone();
        self.list_job(Some(&job))
    }

    /// Committed snapshots of `job`, or of every job this user may see.
    pub fn list_job(&mut self, job: Option<&str>) -> Result<Listing> {
        let job = job.map(str::to_owned);
        self.retry("list", |c| {
            c.live()?;
            match c.call(
                RequestBody::List { job: job.clone() },
                c.config.call_timeout,
            )? {
                ReplyBody::Listing {
                    snapshots,
                    complete,
                    remote_complete,
                    remote_error,
                } => Ok(Listing {
                    snapshots,
                    complete,
                    remote_complete,
                    remote_error,
                }),
                other => Err(c.unexpected("list", &other)),
            }
        })
    }

    /// What the committed snapshot of `step` of (`job`, `rank`) holds (job
    /// `None`: this client's job), read from its manifest without restoring
    /// it. Needs no registration and works while a capture is open, so one
    /// rank can learn another rank's tensor table.
    /// [`Error::NotFound`] when that step is not committed,
    /// [`Error::PermissionDenied`] for a job of another user,
    /// [`Error::Corrupt`] when the snapshot's manifest does not check.
    pub fn describe(&mut self, job: Option<&str>, rank: u32, step: u64) -> Result<Description> {
        let job = job.unwrap_or(&self.config.job).to_owned();
        self.retry("describe", |c| {
            c.live()?;
            let body = RequestBody::Describe {
                job: job.clone(),
                rank,
                step,
            };
            match c.call(body, c.config.call_timeout)? {
                ReplyBody::Described {
                    job: got_job,
                    rank: got_rank,
                    step: got_step,
                    world_size,
                    tensors,
                } => {
                    if (got_job.as_str(), got_rank, got_step) != (job.as_str(), rank, step) {
                        return Err(c.protocol(format!(
                            "asked to describe job {job:?} rank {rank} step {step}, got job {got_job:?} rank {got_rank} step {got_step}"
                        )));
                    }
                    Ok(Description {
                        job: got_job,
                        rank: got_rank,
                        step: got_step,
                        world_size,
                        tensors,
                    })
                }
                other => Err(c.unexpected("describe", &other)),
            }
        })
    }

    /// The daemon's status (needs no registration).
    pub fn status(&mut self) -> Result<proto::StatusInfo> {
        self.retry("status", |c| {
            c.live()?;
            match c.call(RequestBody::Status, c.config.call_timeout)? {
                ReplyBody::Status(status) => Ok(*status),
                other => Err(c.unexpected("status", &other)),
            }
        })
    }

    /// Waits until the snapshot of `step` is committed (bounded by
    /// `commit_timeout`). Works for any step this client captured, also
    /// after its handle is gone. A step whose connection broke before its
    /// commit was reported is looked up in the listing: committed → `Ok`,
    /// otherwise [`Error::Lost`].
    ///
    /// What became of each step is kept until collected here (or by
    /// [`background_outcome`](Client::background_outcome)), within bounds,
    /// each kind apart: the latest 1,024 commits and failures reported
    /// by the daemon, the latest 1,024 skips, and of captures finished in
    /// the background the latest 64 failures. Skips never push out a
    /// commit or a failure. A step whose outcome was dropped is looked up
    /// in the listing (`Ok` with a zero `persist` when it is there);
    /// otherwise it is [`Error::NotFound`], saying its outcome was dropped.
    pub fn wait_committed(&mut self, step: u64) -> Result<CommitInfo> {
        if self.open_capture() == Some(step) {
            return Err(Error::CaptureInProgress { step });
        }
        self.collect_background();
        match self.background_outcomes.take(step) {
            Some(Err(e)) => return Err(e),
            Some(Ok(SnapshotOutcome::Skipped { step, reason })) => {
                self.events.take(step);
                return Err(Error::Skipped { step, reason });
            }
            Some(Ok(SnapshotOutcome::Captured(_))) | None => {}
        }
        let deadline = Deadline::after(self.config.commit_timeout);
        loop {
            self.reap_broken();
            if let Some(outcome) = self.events.take(step) {
                return outcome_result(step, outcome);
            }
            if self.orphaned.remove(&step) {
                return match self.committed_in_listing(step) {
                    Ok(Some(info)) => Ok(info),
                    Ok(None) => Err(Error::Lost { step }),
                    Err(e) => {
                        self.orphaned.insert(step);
                        Err(e)
                    }
                };
            }
            let Some(session) = self
                .session
                .as_mut()
                .filter(|s| s.in_flight.contains(&step))
            else {
                return self
                    .committed_in_listing(step)?
                    .ok_or_else(|| self.not_found(step));
            };
            match session.await_event(step, deadline, &mut self.events) {
                Ok(()) => {}
                Err(e) if self.broke(&e) => {
                    tracing::warn!(step, "connection broke while awaiting a commit: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Error::NotFound`] for a step neither kept, nor in flight, nor
    /// listed: saying so when its outcome may be one this client dropped
    /// to stay bounded.
    fn not_found(&self, step: u64) -> Error {
        let dropped = self
            .events
            .dropped_through(step)
            .map(|through| (through, SETTLED_MAX, "commit and failure events"))
            .or_else(|| {
                self.background_outcomes
                    .failure_dropped_through(step)
                    .map(|through| {
                        (
                            through,
                            background::OUTCOMES_MAX,
                            "background capture failures",
                        )
                    })
            });
        Error::NotFound(match dropped {
            Some((through, max, what)) => format!(
                "step {step} is not listed as committed, and what became of it is no longer \
                 known: this client keeps the latest {max} {what} nobody collected, and \
                 dropped older ones, up to step {through}"
            ),
            None => format!("step {step} is neither in flight on this client nor committed"),
        })
    }

    fn committed_in_listing(&mut self, step: u64) -> Result<Option<CommitInfo>> {
        let listing = self.list()?;
        let (job, rank) = (&self.config.job, self.config.rank);
        Ok(listing
            .snapshots
            .iter()
            .find(|s| &s.job == job && s.rank == rank && s.step == step)
            .map(|s| CommitInfo {
                step,
                bytes: s.bytes,
                persist: Duration::ZERO,
            }))
    }

    // ---- connection management ----

    /// Drops a broken session; its in-flight steps become orphans.
    pub(crate) fn reap_broken(&mut self) {
        if self.session.as_ref().is_some_and(Session::is_broken) {
            self.close_session();
        }
    }

    pub(crate) fn close_session(&mut self) {
        if let Some(session) = self.session.take() {
            self.orphaned.extend(session.in_flight);
        }
    }

    /// Makes sure a handshaken session exists (connecting for up to
    /// `connect_timeout`).
    pub(crate) fn live(&mut self) -> Result<()> {
        self.live_until(Instant::now() + self.config.connect_timeout)
    }

    /// Makes sure a handshaken session exists, connecting until `deadline`.
    fn live_until(&mut self, deadline: Instant) -> Result<()> {
        // A handed-off capture holds the connection: take it back first.
        self.collect_background();
        self.reap_broken();
        if self.session.is_none() {
            let session = Session::open(&self.config.socket, deadline, self.config.call_timeout)?;
            self.uid = session.uid;
            self.session = Some(session);
        }
        Ok(())
    }

    /// Makes sure the current tensor set is registered; returns its staging.
    ///
    /// `Busy` is retried on a new connection until `busy_timeout` (default:
    /// `connect_timeout`): the connection that held this (job, rank) may be
    /// one the daemon has not finished closing (a trainer that just closed
    /// or died), which lets go within milliseconds. A second live trainer
    /// of the same rank still gets `Busy`, after that wait. Reconnecting
    /// shares the deadline: no connection is tried, and no try is retried,
    /// later than `max(connect_timeout, busy_timeout)` after this call
    /// began. Each reply is waited for up to `call_timeout` (a slow
    /// registration, say one that allocates a large staging area, is never
    /// cut short by a deadline that ran out meanwhile), so the try under
    /// way at the deadline may end up to two `call_timeout`s (Hello, then
    /// Register) after it; a new tensor set first waits, up to
    /// `commit_timeout`, for the commits of steps in flight on the old
    /// connection.
    pub(crate) fn registered(&mut self) -> Result<Arc<Staging>> {
        let started = Instant::now();
        let bound = self
            .config
            .busy_timeout
            .unwrap_or(self.config.connect_timeout);
        let mut backoff = Backoff::new(BUSY_PAUSE_FIRST, BUSY_PAUSE_MAX, started + bound);
        let mut connect_by = started + self.config.connect_timeout;
        loop {
            match self.register_now(connect_by) {
                Err(Error::Busy(message)) => {
                    self.close_session();
                    if !backoff.pause() {
                        return Err(Error::Busy(format!(
                            "{message} (still busy after {} s)",
                            bound.as_secs_f64()
                        )));
                    }
                    tracing::info!("registration refused as busy ({message}); retrying");
                    // The daemon just answered: a reconnect gets its own
                    // connect window, never past the busy deadline.
                    connect_by = backoff
                        .deadline()
                        .min(Instant::now() + self.config.connect_timeout);
                }
                other => return other,
            }
        }
    }

    fn register_now(&mut self, connect_by: Instant) -> Result<Arc<Staging>> {
        if self.tensors.is_empty() {
            return Err(Error::NotRegistered("no tensors are registered".into()));
        }
        self.live_until(connect_by)?;
        let current = self
            .session
            .as_ref()
            .and_then(|s| s.staging.as_ref().map(|st| (Arc::clone(st), s.registered)));
        match current {
            Some((staging, n)) if n == self.tensors.len() => return Ok(staging),
            Some(_) => {
                // Register once per connection: a new set needs a new one.
                // Let the old one report its commits first.
                self.drain_in_flight();
                self.close_session();
                self.live_until(connect_by)?;
            }
            None => {}
        }
        let tensors: Vec<TensorSpec> = self.tensors.iter().map(|r| r.spec.clone()).collect();
        let lens: Vec<u64> = self
            .tensors
            .iter()
            .map(|r| to_u64(r.buffer.byte_len()))
            .collect();
        let body = RequestBody::Register {
            job: self.config.job.clone(),
            rank: self.config.rank,
            world_size: self.config.world_size,
            tensors,
        };
        let deadline = Deadline::after(self.config.call_timeout);
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| Error::Disconnected("no connection to gpusnapd".into()))?;
        let id = session.send(body, deadline)?;
        let (reply, mut fds) = session.recv(id, "register", deadline, &mut self.events, true)?;
        let ReplyBody::Registered(info) = reply else {
            return Err(self.unexpected("register", &reply));
        };
        let fd = match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => fd,
            (None, _) => return Err(self.protocol("registered without a staging memfd".into())),
            (Some(_), false) => {
                return Err(self.protocol(format!(
                    "registered with {} file descriptors",
                    fds.len() + 1
                )));
            }
        };
        let staging = match Staging::map(fd, info, lens, &self.devices, self.config.pin_policy) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                // A staging this client cannot use (a bad description, or a
                // device that cannot attach to it): this registration is
                // over, and closing its connection frees it in the daemon.
                self.close_session();
                return Err(e);
            }
        };
        let reports = staging.attach_reports(&self.devices);
        let deadline = Deadline::after(self.config.call_timeout);
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| Error::Disconnected("no connection to gpusnapd".into()))?;
        if let Err(e) = session.report_attached(reports, deadline, &mut self.events) {
            // Like any request's failure on the registration's connection:
            // this registration is over (a retry registers on a new one).
            self.close_session();
            return Err(e);
        }
        let count = self.tensors.len();
        let session = self.session_mut()?;
        session.staging = Some(Arc::clone(&staging));
        session.registered = count;
        tracing::debug!(tensors = count, info = ?staging.info(), "registered");
        Ok(staging)
    }

    /// Awaits the events of steps in flight on the current connection.
    fn drain_in_flight(&mut self) {
        let deadline = Deadline::after(self.config.commit_timeout);
        let Some(session) = self.session.as_mut() else {
            return;
        };
        while let Some(&step) = session.in_flight.first() {
            if let Err(e) = session.await_event(step, deadline, &mut self.events) {
                tracing::warn!(step, error = %e, "commit not reported before re-registering");
                return;
            }
        }
    }

    pub(crate) fn session_mut(&mut self) -> Result<&mut Session> {
        self.session
            .as_mut()
            .ok_or_else(|| Error::Disconnected("no connection to gpusnapd".into()))
    }

    /// One request, one reply, within `timeout`.
    pub(crate) fn call(&mut self, body: RequestBody, timeout: Duration) -> Result<ReplyBody> {
        let deadline = Deadline::after(timeout);
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| Error::Disconnected("no connection to gpusnapd".into()))?;
        session.call(body, deadline, &mut self.events)
    }

    pub(crate) fn unexpected(&mut self, what: &str, body: &ReplyBody) -> Error {
        match self.session.as_mut() {
            Some(s) => s.unexpected(what, body),
            None => Error::Protocol(format!("unexpected reply {:?} to {what}", body.name())),
        }
    }

    /// A protocol error: the connection is done.
    pub(crate) fn protocol(&mut self, message: String) -> Error {
        if let Some(s) = self.session.as_mut() {
            s.unexpected_broken();
        }
        Error::Protocol(message)
    }

    /// Whether `e` means the connection broke and a retry on a new one is
    /// due: an I/O-level break, or the daemon closing because it stops.
    pub(crate) fn broke(&self, e: &Error) -> bool {
        let closed = self.session.as_ref().is_none_or(Session::is_broken);
        self.config.reconnect
            && match e {
                Error::Disconnected(_) => true,
                Error::ShuttingDown(_) => closed,
                _ => false,
            }
    }

    /// Runs `op`; when the connection broke and `reconnect` is set, runs it
    /// once more on a new connection.
    pub(crate) fn retry<T>(
        &mut self,
        what: &str,
        mut op: impl FnMut(&mut Client) -> Result<T>,
    ) -> Result<T> {
        match op(self) {
            Err(e) if self.broke(&e) => {
                tracing::warn!("{what}: connection to gpusnapd broke ({e}); reconnecting");
                self.close_session();
                op(self)
            }
            r => r,
        }
    }
}

impl Drop for Client {
    /// A capture left open by `begin_snapshot` is finished (its copies may
    /// still read the registered buffers, which the caller frees after
    /// this), and any error logged.
    fn drop(&mut self) {
        if self.capture.is_some()
            && let Err(e) = self.finish_snapshot()
        {
            tracing::error!(error = %e, "client dropped with a capture open: finishing it failed");
        }
        self.collect_background();
        for (step, e) in self.background_outcomes.take_failures() {
            tracing::error!(step, error = %e, "a capture finished in the background failed, and nobody asked");
        }
    }
}

fn outcome_result(step: u64, outcome: Outcome) -> Result<CommitInfo> {
    match outcome {
        Outcome::Committed { bytes, persist } => Ok(CommitInfo {
            step,
            bytes,
            persist,
        }),
        Outcome::Failed {
            kind,
            message,
            os_error,
        } => Err(Error::SnapshotFailed {
            step,
            kind,
            message,
            os_error,
        }),
        Outcome::Skipped { reason } => Err(Error::Skipped { step, reason }),
    }
}

//! Prometheus metrics of the daemon and the HTTP endpoint that exports them.
//!
//! Every metric lives in one [`prometheus::Registry`] owned by [`Metrics`];
//! the control plane and the persist engine update the public fields, and
//! [`serve`] exports them as `GET /metrics` (Prometheus text format) beside
//! `GET /healthz`.
//!
//! Conventions: every name starts with `gpusnap_` and ends with its unit
//! (`_seconds`, `_bytes`) or `_total` for counters. Labels stay
//! low-cardinality: a job name, a fixed outcome or source word, the I/O
//! backend; never a step number or a rank.
//!
//! Histogram buckets: exponential, factor 2, starting at 100 µs
//! ([`BUCKET_START_SECONDS`]), [`BUCKET_COUNT`] of them, so the last finite
//! bound is 1e-4 × 2^23 ≈ 839 s. That covers a sub-millisecond
//! device-to-device capture at the low end and a multi-minute persist of a
//! large snapshot to a slow disk at the high end (10 min = 600 s falls inside
//! the last finite bucket), with a relative resolution of 2x everywhere.

use std::future::Future;
use std::sync::Arc;

use gpusnap_proto::convert::gauge;
use gpusnap_proto::{OsError, RestoreSource};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Upper bound of the first histogram bucket: 100 µs.
pub const BUCKET_START_SECONDS: f64 = 1e-4;
/// Each bucket's bound is this many times the previous one.
pub const BUCKET_FACTOR: f64 = 2.0;
/// Finite buckets per histogram; the last bound is 1e-4 × 2^23 ≈ 839 s.
pub const BUCKET_COUNT: usize = 24;

/// Errors of building the metric set.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The bucket layout was refused (only if the constants above are broken).
    #[error("histogram buckets (start {start}, factor {factor}, count {count}): {source}")]
    Buckets {
        start: f64,
        factor: f64,
        count: usize,
        #[source]
        source: prometheus::Error,
    },
    /// A metric could not be built or registered (bad name, duplicate).
    #[error("metric {name}: {source}")]
    Metric {
        name: &'static str,
        #[source]
        source: prometheus::Error,
    },
}

/// Every metric the daemon exports.
///
/// Label values: `source` is `memory` or `disk` (and `none` for a restore
/// that failed before any source delivered its bytes: a mismatch, a missing
/// step, a corrupt snapshot); snapshot `outcome` is a [`SnapshotOutcome`],
/// restore `outcome` a [`RestoreOutcome`]; `errno` is an [`errno_label`]:
/// the symbolic name of the OS error (`ENOSPC`, `EIO`...), `other` for an
/// errno without one, `none` for a failure with no OS error behind it.
#[derive(Debug)]
pub struct Metrics {
    /// `gpusnap_stall_seconds{job}`: how long the trainer was blocked per
    /// snapshot, as measured and reported by the client.
    pub stall_seconds: HistogramVec,
    /// `gpusnap_capture_seconds{job}`: copy of the state into staging, as
    /// measured and reported by the client.
    pub capture_seconds: HistogramVec,
    /// `gpusnap_persist_seconds{job}`: from captured in staging to committed
    /// on disk.
    pub persist_seconds: HistogramVec,
    /// `gpusnap_restore_seconds{job,source}`: serving a restore.
    pub restore_seconds: HistogramVec,
    /// `gpusnap_bytes_written_total{job}`: snapshot bytes written to disk.
    pub bytes_written_total: IntCounterVec,
    /// `gpusnap_bytes_read_total{job,source}`: bytes served to restores.
    pub bytes_read_total: IntCounterVec,
    /// `gpusnap_snapshots_total{job,outcome}`: snapshots by outcome.
    pub snapshots_total: IntCounterVec,
    /// `gpusnap_restores_total{job,source,outcome}`: restores by source and
    /// outcome.
    pub restores_total: IntCounterVec,
    /// `gpusnap_snapshot_failures_total{job,errno}`: failed snapshots (the
    /// `failed` outcome) by the OS error that failed them.
    pub snapshot_failures_total: IntCounterVec,
    /// `gpusnap_streamed_snapshots_total{job}`: captures that went through
    /// the stream ring (policy `stream`, every slot busy at `Begin`).
    pub streamed_snapshots_total: IntCounterVec,
    /// `gpusnap_panics_total{site}`: panics the daemon caught and survived,
    /// by where ([`PanicSite`]: a connection, a persist lane, a streamed
    /// capture).
    pub panics_total: IntCounterVec,
    /// `gpusnap_slot_wait_seconds{job}`: under policy `block`, how long each
    /// `Begin` waited for a free staging slot (0 when one was free; a wait
    /// that timed out or that the client left counts too).
    pub slot_wait_seconds: HistogramVec,
    /// `gpusnap_staging_bytes`: staging memory in use.
    pub staging_bytes: IntGauge,
    /// `gpusnap_staging_budget_bytes`: staging memory the daemon may use.
    pub staging_budget_bytes: IntGauge,
    /// `gpusnap_staging_clients{pinning}`: registered connections by what
    /// their client's devices did to the staging mapping, as the client
    /// reported it (`Attached`, protocol version 3): a [`StagingPinning`]
    /// (`unreported` until then, and for good from an older client). Every
    /// value is exported from the start.
    pub staging_clients: IntGaugeVec,
    /// `gpusnap_staging_pinned_bytes`: staging the connected clients
    /// page-locked for their CUDA copies (per registration, the most any of
    /// its devices reported: the devices of one process share one
    /// registration of the mapping).
    pub staging_pinned_bytes: IntGauge,
    /// `gpusnap_staging_pin_seconds{job}`: how long a client took to
    /// page-lock a registration's staging, as it reported it (once per
    /// registration that was pinned; never per snapshot).
    pub staging_pin_seconds: HistogramVec,
    /// `gpusnap_hot_tier_bytes`: memory holding committed snapshots for fast
    /// restore.
    pub hot_tier_bytes: IntGauge,
    /// `gpusnap_hot_tier_budget_bytes`: memory the hot tier may use.
    pub hot_tier_budget_bytes: IntGauge,
    /// `gpusnap_clients_connected`: open control connections.
    pub clients_connected: IntGauge,
    /// `gpusnap_snapshots_in_flight`: captured, not yet committed or failed.
    pub snapshots_in_flight: IntGauge,
    /// `gpusnap_last_committed_step{job}`: newest step committed to disk.
    pub last_committed_step: IntGaugeVec,
    /// `gpusnap_io_backend_info{backend}`: 1 for the I/O backend in use (an
    /// info-style metric; the backend's name is the label).
    pub io_backend: IntGaugeVec,
    /// `gpusnap_restore_walkbacks_total{job,source}`: restores that passed
    /// over a newer step because it failed verification (`source`: where
    /// the failed copy was, `disk`, `memory` or `remote`), one per step
    /// passed over.
    pub restore_walkbacks_total: IntCounterVec,
    /// `gpusnap_remote_up`: 1 when the object store answered the remote
    /// tier's last request, 0 when it failed (down, refusing, missing its
    /// bucket). 0 too while the tier is off or has sent nothing yet.
    pub remote_up: IntGauge,
    /// `gpusnap_remote_errors_total{op,kind}`: failed object store
    /// operations, after retries, by operation and kind
    /// (`RemoteError::kind`).
    pub remote_errors_total: IntCounterVec,
    /// `gpusnap_remote_retries_total{op}`: attempts retried.
    pub remote_retries_total: IntCounterVec,
    /// `gpusnap_remote_uploads_total{job,outcome}`: uploads by outcome
    /// (`uploaded`, `already_there`, `skipped`, `conflict`, `failed`).
    pub remote_uploads_total: IntCounterVec,
    /// `gpusnap_remote_upload_bytes_total{job}`: data bytes uploaded.
    pub remote_upload_bytes_total: IntCounterVec,
    /// `gpusnap_remote_upload_seconds{job}`: one snapshot's upload.
    pub remote_upload_seconds: HistogramVec,
    /// `gpusnap_remote_upload_lag_steps{job}`: local commits not uploaded
    /// (the most of the job's ranks on this node); alert on it staying up.
    pub remote_upload_lag_steps: IntGaugeVec,
    /// `gpusnap_remote_upload_lag_seconds{job}`: how long the oldest of
    /// those has waited (0 when up to date).
    pub remote_upload_lag_seconds: IntGaugeVec,
    /// `gpusnap_remote_markers_total{outcome}`: COMPLETE markers `created`
    /// by this daemon, `matched` (another daemon's, equal to ours), or in
    /// `conflict`.
    pub remote_markers_total: IntCounterVec,
    /// `gpusnap_remote_complete_step{job}`: newest step this daemon saw
    /// complete in the object store.
    pub remote_complete_step: IntGaugeVec,
    /// `gpusnap_remote_deletes_total{what}`: objects retention deleted
    /// (`marker`, `manifest`, `data`).
    pub remote_deletes_total: IntCounterVec,
    /// `gpusnap_remote_downloads_total{job,outcome}`: snapshots downloaded
    /// for restores (`ok`, `failed`).
    pub remote_downloads_total: IntCounterVec,
    /// `gpusnap_remote_download_bytes_total{job}`: bytes downloaded.
    pub remote_download_bytes_total: IntCounterVec,
    /// `gpusnap_connections_closed_total{reason}`: connections the daemon
    /// closed on a client's misbehaviour, by [`ClosedReason`]. Every reason
    /// is exported from the start.
    pub connections_closed_total: IntCounterVec,
    registry: Registry,
}

impl Metrics {
    /// Builds every metric and registers it in a fresh registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let buckets =
            prometheus::exponential_buckets(BUCKET_START_SECONDS, BUCKET_FACTOR, BUCKET_COUNT)
                .map_err(|source| MetricsError::Buckets {
                    start: BUCKET_START_SECONDS,
                    factor: BUCKET_FACTOR,
                    count: BUCKET_COUNT,
                    source,
                })?;
        let r = Registrar {
            registry: &registry,
            buckets: &buckets,
        };
        Ok(Metrics {
            stall_seconds: r.histogram(
                "gpusnap_stall_seconds",
                "Time the trainer was blocked per snapshot, measured by the client.",
                &["job"],
            )?,
            capture_seconds: r.histogram(
                "gpusnap_capture_seconds",
                "Time to copy the trainer's state into staging memory, measured by the client.",
                &["job"],
            )?,
            persist_seconds: r.histogram(
                "gpusnap_persist_seconds",
                "Time from a snapshot captured in staging to committed on disk.",
                &["job"],
            )?,
            restore_seconds: r.histogram(
                "gpusnap_restore_seconds",
                "Time to serve a restore, by source (memory or disk).",
                &["job", "source"],
            )?,
            bytes_written_total: r.int_counter(
                "gpusnap_bytes_written_total",
                "Snapshot bytes written to disk.",
                &["job"],
            )?,
            bytes_read_total: r.int_counter(
                "gpusnap_bytes_read_total",
                "Snapshot bytes served to restores, by source (memory or disk).",
                &["job", "source"],
            )?,
            snapshots_total: r.int_counter(
                "gpusnap_snapshots_total",
                "Snapshots by outcome (committed, failed, skipped, aborted).",
                &["job", "outcome"],
            )?,
            restores_total: r.int_counter(
                "gpusnap_restores_total",
                "Restores by source (memory, disk, none) and outcome (ok, failed).",
                &["job", "source", "outcome"],
            )?,
            snapshot_failures_total: r.int_counter(
                "gpusnap_snapshot_failures_total",
                "Failed snapshots by the OS error behind them (ENOSPC, EIO, ...; other; none).",
                &["job", "errno"],
            )?,
            streamed_snapshots_total: r.int_counter(
                "gpusnap_streamed_snapshots_total",
                "Captures streamed through the ring because every staging slot was busy (policy stream).",
                &["job"],
            )?,
            panics_total: r.int_counter(
                "gpusnap_panics_total",
                "Panics caught (the daemon went on), by site: connection, lane, stream.",
                &["site"],
            )?,
            slot_wait_seconds: r.histogram(
                "gpusnap_slot_wait_seconds",
                "Time a snapshot waited for a free staging slot under policy block.",
                &["job"],
            )?,
            staging_bytes: r.int_gauge("gpusnap_staging_bytes", "Staging memory in use.")?,
            staging_budget_bytes: r.int_gauge(
                "gpusnap_staging_budget_bytes",
                "Staging memory the daemon may hand out.",
            )?,
            staging_clients: r.int_gauge_vec(
                "gpusnap_staging_clients",
                "Registered connections by what their client did to the staging mapping (pinned, unpinned, not_needed, unreported).",
                &["pinning"],
            )?,
            staging_pinned_bytes: r.int_gauge(
                "gpusnap_staging_pinned_bytes",
                "Staging memory connected clients page-locked for CUDA copies.",
            )?,
            staging_pin_seconds: r.histogram(
                "gpusnap_staging_pin_seconds",
                "Time a client took to page-lock a registration's staging, reported by the client.",
                &["job"],
            )?,
            hot_tier_bytes: r.int_gauge(
                "gpusnap_hot_tier_bytes",
                "Memory holding committed snapshots for restore without disk reads.",
            )?,
            hot_tier_budget_bytes: r.int_gauge(
                "gpusnap_hot_tier_budget_bytes",
                "Memory the hot tier may use.",
            )?,
            clients_connected: r.int_gauge(
                "gpusnap_clients_connected",
                "Open control connections from clients.",
            )?,
            snapshots_in_flight: r.int_gauge(
                "gpusnap_snapshots_in_flight",
                "Snapshots captured in staging and not yet committed or failed.",
            )?,
            last_committed_step: r.int_gauge_vec(
                "gpusnap_last_committed_step",
                "Newest training step committed to disk, per job.",
                &["job"],
            )?,
            io_backend: r.int_gauge_vec(
                "gpusnap_io_backend_info",
                "I/O backend in use for snapshot files (1 for the backend in use).",
                &["backend"],
            )?,
            restore_walkbacks_total: r.int_counter(
                "gpusnap_restore_walkbacks_total",
                "Steps a restore passed over because they failed verification, by where the failed copy was (disk, memory, remote).",
                &["job", "source"],
            )?,
            remote_up: r.int_gauge(
                "gpusnap_remote_up",
                "1 when the object store answered the remote tier's last request, else 0.",
            )?,
            remote_errors_total: r.int_counter(
                "gpusnap_remote_errors_total",
                "Failed object store operations after retries, by operation and kind.",
                &["op", "kind"],
            )?,
            remote_retries_total: r.int_counter(
                "gpusnap_remote_retries_total",
                "Object store requests retried, by operation.",
                &["op"],
            )?,
            remote_uploads_total: r.int_counter(
                "gpusnap_remote_uploads_total",
                "Snapshot uploads by outcome (uploaded, already_there, skipped, conflict, failed).",
                &["job", "outcome"],
            )?,
            remote_upload_bytes_total: r.int_counter(
                "gpusnap_remote_upload_bytes_total",
                "Snapshot bytes uploaded to the object store.",
                &["job"],
            )?,
            remote_upload_seconds: r.histogram(
                "gpusnap_remote_upload_seconds",
                "Time to upload one snapshot to the object store.",
                &["job"],
            )?,
            remote_upload_lag_steps: r.int_gauge_vec(
                "gpusnap_remote_upload_lag_steps",
                "Local commits not yet uploaded (most of the job's ranks on this node).",
                &["job"],
            )?,
            remote_upload_lag_seconds: r.int_gauge_vec(
                "gpusnap_remote_upload_lag_seconds",
                "Seconds the oldest local commit not yet uploaded has waited (0 when up to date).",
                &["job"],
            )?,
            remote_markers_total: r.int_counter(
                "gpusnap_remote_markers_total",
                "COMPLETE markers created by this daemon, matched (another's, equal), or in conflict.",
                &["outcome"],
            )?,
            remote_complete_step: r.int_gauge_vec(
                "gpusnap_remote_complete_step",
                "Newest step this daemon saw complete in the object store, per job.",
                &["job"],
            )?,
            remote_deletes_total: r.int_counter(
                "gpusnap_remote_deletes_total",
                "Objects remote retention deleted (marker, manifest, data).",
                &["what"],
            )?,
            remote_downloads_total: r.int_counter(
                "gpusnap_remote_downloads_total",
                "Snapshots downloaded from the object store for restores, by outcome.",
                &["job", "outcome"],
            )?,
            remote_download_bytes_total: r.int_counter(
                "gpusnap_remote_download_bytes_total",
                "Snapshot bytes downloaded from the object store.",
                &["job"],
            )?,
            connections_closed_total: r.int_counter(
                "gpusnap_connections_closed_total",
                "Connections the daemon closed on the client's misbehaviour, by reason (hello_timeout, reply_timeout, bad_frame).",
                &["reason"],
            )?,
            registry,
        })
        .inspect(|m| {
            for reason in ClosedReason::ALL {
                m.connections_closed_total
                    .with_label_values(&[reason.name()])
                    .inc_by(0);
            }
            // Every state has a series from the start, so an alert on
            // `pinning="unpinned"` and the dashboard see a 0, not nothing.
            for state in StagingPinning::ALL {
                m.staging_clients.with_label_values(&[state.name()]).set(0);
            }
        })
    }

    /// A new registration's place in `gpusnap_staging_clients`
    /// (`unreported` until [`PinningShare::report`]); given back when the
    /// share drops, with the connection's session.
    pub fn pinning_share(self: &Arc<Self>) -> PinningShare {
        let share = PinningShare {
            metrics: Arc::clone(self),
            state: StagingPinning::Unreported,
            pinned_bytes: 0,
        };
        share.add(1);
        share
    }

    /// Every metric in the Prometheus text exposition format.
    ///
    /// A labelled metric appears once it has at least one series (first
    /// `with_label_values`); unlabelled gauges always appear.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut text = String::new();
        if let Err(error) = TextEncoder::new().encode_utf8(&families, &mut text) {
            // Only reachable with a malformed family, which the registry
            // refuses at registration; keep what was encoded and say why.
            tracing::error!(%error, "encoding metrics");
        }
        text
    }

    /// The registry holding every metric (to gather or to add collectors).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a snapshot of `job` that ended with `outcome`.
    pub fn count_snapshot(&self, job: &str, outcome: SnapshotOutcome) {
        self.snapshots_total
            .with_label_values(&[job, outcome.name()])
            .inc();
    }

    /// Counts a failed snapshot of `job`: its outcome and its OS error.
    pub fn count_snapshot_failure(&self, job: &str, os_error: Option<OsError>) {
        self.count_snapshot(job, SnapshotOutcome::Failed);
        self.snapshot_failures_total
            .with_label_values(&[job, errno_label(os_error)])
            .inc();
    }

    /// Counts a connection closed for `reason`.
    pub fn count_closed(&self, reason: ClosedReason) {
        self.connections_closed_total
            .with_label_values(&[reason.name()])
            .inc();
    }

    /// Counts a panic caught at `site`.
    pub fn count_panic(&self, site: PanicSite) {
        self.panics_total.with_label_values(&[site.name()]).inc();
    }

    /// Counts a restore of `job` (its source, `None` when none delivered).
    pub fn count_restore(&self, job: &str, source: Option<RestoreSource>, outcome: RestoreOutcome) {
        self.restores_total
            .with_label_values(&[job, source_label(source), outcome.name()])
            .inc();
    }
}

/// What a registration's staging is, as its client reported it: the
/// `pinning` label of `gpusnap_staging_clients`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagingPinning {
    /// The client has not said (yet, or ever: a client older than protocol
    /// version 3).
    Unreported,
    /// Every device copies with plain memory access (host buffers only).
    NotNeeded,
    /// Page-locked for CUDA copies.
    Pinned,
    /// A device could not page-lock it; its copies use pageable memory.
    Unpinned,
}

impl StagingPinning {
    pub const ALL: [StagingPinning; 4] = [
        StagingPinning::Unreported,
        StagingPinning::NotNeeded,
        StagingPinning::Pinned,
        StagingPinning::Unpinned,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            StagingPinning::Unreported => "unreported",
            StagingPinning::NotNeeded => "not_needed",
            StagingPinning::Pinned => "pinned",
            StagingPinning::Unpinned => "unpinned",
        }
    }
}

/// One registered connection's share of `gpusnap_staging_clients` and
/// `gpusnap_staging_pinned_bytes`. Held by the connection's session, so
/// however the connection ends (in order, an error, a panic) dropping it
/// takes the share back: the gauges are right by construction.
#[derive(Debug)]
#[must_use = "the share is taken back when it is dropped"]
pub struct PinningShare {
    metrics: Arc<Metrics>,
    state: StagingPinning,
    pinned_bytes: u64,
}

impl PinningShare {
    /// The client's report: the connection moves to `state`, holding
    /// `pinned_bytes` page-locked.
    pub fn report(&mut self, state: StagingPinning, pinned_bytes: u64) {
        self.add(-1);
        self.state = state;
        self.pinned_bytes = pinned_bytes;
        self.add(1);
    }

    pub fn state(&self) -> StagingPinning {
        self.state
    }

    /// Adds this share once (`sign` 1) or takes it back (`sign` -1).
    fn add(&self, sign: i64) {
        let m = &self.metrics;
        m.staging_clients
            .with_label_values(&[self.state.name()])
            .add(sign);
        m.staging_pinned_bytes
            .add(sign.saturating_mul(gauge(self.pinned_bytes)));
    }
}

impl Drop for PinningShare {
    fn drop(&mut self) {
        self.add(-1);
    }
}

/// How a snapshot ended: the `outcome` label of `gpusnap_snapshots_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// Durable on disk.
    Committed,
    /// The persist failed (the client got `Failed`); older snapshots stand.
    Failed,
    /// Refused at `Begin` (already committed or in flight, policy skip).
    Skipped,
    /// The client aborted the capture or left in the middle of it.
    Aborted,
}

impl SnapshotOutcome {
    pub const fn name(self) -> &'static str {
        match self {
            SnapshotOutcome::Committed => "committed",
            SnapshotOutcome::Failed => "failed",
            SnapshotOutcome::Skipped => "skipped",
            SnapshotOutcome::Aborted => "aborted",
        }
    }
}

/// Where a panic was caught: the `site` label of `gpusnap_panics_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanicSite {
    /// A connection task, or blocking work it ran (a restore's fill, a
    /// claim, a listing); the connection ends or refuses with `Internal`.
    Connection,
    /// A persist lane's job; the step fails with `Internal`.
    Lane,
    /// A streamed capture's thread; the step fails with `Internal`.
    Stream,
}

impl PanicSite {
    pub const fn name(self) -> &'static str {
        match self {
            PanicSite::Connection => "connection",
            PanicSite::Lane => "lane",
            PanicSite::Stream => "stream",
        }
    }
}

/// Why the daemon closed a connection: the `reason` label of
/// `gpusnap_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedReason {
    /// No `Hello` within `daemon.hello_wait_s`.
    HelloTimeout,
    /// A reply not taken within `daemon.reply_wait_s`.
    ReplyTimeout,
    /// A frame over the limit, malformed, or whose body came too slowly.
    BadFrame,
}

impl ClosedReason {
    pub const ALL: [ClosedReason; 3] = [
        ClosedReason::HelloTimeout,
        ClosedReason::ReplyTimeout,
        ClosedReason::BadFrame,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            ClosedReason::HelloTimeout => "hello_timeout",
            ClosedReason::ReplyTimeout => "reply_timeout",
            ClosedReason::BadFrame => "bad_frame",
        }
    }
}

/// How a restore ended: the `outcome` label of `gpusnap_restores_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreOutcome {
    Ok,
    Failed,
}

impl RestoreOutcome {
    pub const fn name(self) -> &'static str {
        match self {
            RestoreOutcome::Ok => "ok",
            RestoreOutcome::Failed => "failed",
        }
    }
}

/// The `source` label: where a restore's bytes came from, `none` when no
/// source delivered them.
pub const fn source_label(source: Option<RestoreSource>) -> &'static str {
    match source {
        Some(s) => s.name(),
        None => "none",
    }
}

/// The `errno` label: a bounded set of values whatever the error.
pub const fn errno_label(os_error: Option<OsError>) -> &'static str {
    match os_error {
        None => "none",
        Some(e) => match e.name() {
            Some(name) => name,
            None => "other",
        },
    }
}

/// Builds metrics and registers each in one registry.
struct Registrar<'a> {
    registry: &'a Registry,
    buckets: &'a [f64],
}

impl Registrar<'_> {
    fn register<M>(
        &self,
        name: &'static str,
        built: prometheus::Result<M>,
    ) -> Result<M, MetricsError>
    where
        M: prometheus::core::Collector + Clone + 'static,
    {
        let metric = built.map_err(|source| MetricsError::Metric { name, source })?;
        self.registry
            .register(Box::new(metric.clone()))
            .map_err(|source| MetricsError::Metric { name, source })?;
        Ok(metric)
    }

    fn histogram(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<HistogramVec, MetricsError> {
        let opts = HistogramOpts::new(name, help).buckets(self.buckets.to_vec());
        self.register(name, HistogramVec::new(opts, labels))
    }

    fn int_counter(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        self.register(name, IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn int_gauge(&self, name: &'static str, help: &str) -> Result<IntGauge, MetricsError> {
        self.register(name, IntGauge::with_opts(Opts::new(name, help)))
    }

    fn int_gauge_vec(
        &self,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        self.register(name, IntGaugeVec::new(Opts::new(name, help), labels))
    }
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Metrics>,
    healthy: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// Serves GET /metrics (text format, correct content type) and GET /healthz
/// (200 "ok" while `healthy()` is true, 503 otherwise) until `shutdown`
/// resolves; then stops accepting, lets requests in progress finish, and
/// returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(get_healthz))
        .with_state(Endpoint { metrics, healthy });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn get_metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        endpoint.metrics.render(),
    )
}

async fn get_healthz(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    if (endpoint.healthy)() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Gives every metric a series and returns the exported names, one per
    /// field. The destructuring names every field, so a field added to
    /// `Metrics` does not compile here until it is touched and listed.
    fn touch_all(m: &Metrics) -> Vec<&'static str> {
        let Metrics {
            stall_seconds,
            capture_seconds,
            persist_seconds,
            restore_seconds,
            bytes_written_total,
            bytes_read_total,
            snapshots_total,
            restores_total,
            snapshot_failures_total,
            streamed_snapshots_total,
            panics_total,
            slot_wait_seconds,
            staging_bytes,
            staging_budget_bytes,
            staging_clients,
            staging_pinned_bytes,
            staging_pin_seconds,
            hot_tier_bytes,
            hot_tier_budget_bytes,
            clients_connected,
            snapshots_in_flight,
            last_committed_step,
            io_backend,
            restore_walkbacks_total,
            remote_up,
            remote_errors_total,
            remote_retries_total,
            remote_uploads_total,
            remote_upload_bytes_total,
            remote_upload_seconds,
            remote_upload_lag_steps,
            remote_upload_lag_seconds,
            remote_markers_total,
            remote_complete_step,
            remote_deletes_total,
            remote_downloads_total,
            remote_download_bytes_total,
            connections_closed_total,
            registry: _,
        } = m;
        stall_seconds.with_label_values(&["j"]).observe(0.002);
        capture_seconds.with_label_values(&["j"]).observe(0.001);
        persist_seconds.with_label_values(&["j"]).observe(1.5);
        restore_seconds
            .with_label_values(&["j", "disk"])
            .observe(0.3);
        bytes_written_total.with_label_values(&["j"]).inc_by(4096);
        bytes_read_total
            .with_label_values(&["j", "memory"])
            .inc_by(8192);
        snapshots_total.with_label_values(&["j", "committed"]).inc();
        restores_total.with_label_values(&["j", "disk", "ok"]).inc();
        snapshot_failures_total
            .with_label_values(&["j", "ENOSPC"])
            .inc();
        streamed_snapshots_total.with_label_values(&["j"]).inc();
        panics_total.with_label_values(&["lane"]).inc();
        slot_wait_seconds.with_label_values(&["j"]).observe(0.5);
        staging_bytes.set(1 << 20);
        staging_budget_bytes.set(1 << 30);
        staging_clients.with_label_values(&["pinned"]).set(1);
        staging_pinned_bytes.set(1 << 20);
        staging_pin_seconds.with_label_values(&["j"]).observe(0.05);
        hot_tier_bytes.set(1 << 21);
        hot_tier_budget_bytes.set(1 << 31);
        clients_connected.set(2);
        snapshots_in_flight.set(1);
        last_committed_step.with_label_values(&["j"]).set(1200);
        io_backend.with_label_values(&["io_uring"]).set(1);
        restore_walkbacks_total
            .with_label_values(&["j", "disk"])
            .inc();
        remote_up.set(1);
        remote_errors_total
            .with_label_values(&["put_part", "unavailable"])
            .inc();
        remote_retries_total.with_label_values(&["put_part"]).inc();
        remote_uploads_total
            .with_label_values(&["j", "uploaded"])
            .inc();
        remote_upload_bytes_total
            .with_label_values(&["j"])
            .inc_by(1);
        remote_upload_seconds.with_label_values(&["j"]).observe(2.0);
        remote_upload_lag_steps.with_label_values(&["j"]).set(1);
        remote_upload_lag_seconds.with_label_values(&["j"]).set(3);
        remote_markers_total.with_label_values(&["created"]).inc();
        remote_complete_step.with_label_values(&["j"]).set(1200);
        remote_deletes_total.with_label_values(&["marker"]).inc();
        remote_downloads_total.with_label_values(&["j", "ok"]).inc();
        remote_download_bytes_total
            .with_label_values(&["j"])
            .inc_by(1);
        connections_closed_total
            .with_label_values(&["hello_timeout"])
            .inc();
        vec![
            "gpusnap_stall_seconds",
            "gpusnap_capture_seconds",
            "gpusnap_persist_seconds",
            "gpusnap_restore_seconds",
            "gpusnap_bytes_written_total",
            "gpusnap_bytes_read_total",
            "gpusnap_snapshots_total",
            "gpusnap_restores_total",
            "gpusnap_snapshot_failures_total",
            "gpusnap_streamed_snapshots_total",
            "gpusnap_panics_total",
            "gpusnap_slot_wait_seconds",
            "gpusnap_staging_bytes",
            "gpusnap_staging_budget_bytes",
            "gpusnap_staging_clients",
            "gpusnap_staging_pinned_bytes",
            "gpusnap_staging_pin_seconds",
            "gpusnap_hot_tier_bytes",
            "gpusnap_hot_tier_budget_bytes",
            "gpusnap_clients_connected",
            "gpusnap_snapshots_in_flight",
            "gpusnap_last_committed_step",
            "gpusnap_io_backend_info",
            "gpusnap_restore_walkbacks_total",
            "gpusnap_remote_up",
            "gpusnap_remote_errors_total",
            "gpusnap_remote_retries_total",
            "gpusnap_remote_uploads_total",
            "gpusnap_remote_upload_bytes_total",
            "gpusnap_remote_upload_seconds",
            "gpusnap_remote_upload_lag_steps",
            "gpusnap_remote_upload_lag_seconds",
            "gpusnap_remote_markers_total",
            "gpusnap_remote_complete_step",
            "gpusnap_remote_deletes_total",
            "gpusnap_remote_downloads_total",
            "gpusnap_remote_download_bytes_total",
            "gpusnap_connections_closed_total",
        ]
    }

    #[test]
    fn every_metric_is_exported_after_it_is_touched() {
        let m = Metrics::new().expect("metrics");
        let names = touch_all(&m);
        let text = m.render();
        for name in &names {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no help"
            );
        }
        // Nothing is registered that the list does not name.
        let mut gathered: Vec<String> = m
            .registry()
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        gathered.sort();
        let mut expected: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        expected.sort();
        assert_eq!(gathered, expected);
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new().expect("metrics");
        touch_all(&m);
        for family in m.registry().gather() {
            let name = family.name();
            assert!(name.starts_with("gpusnap_"), "{name}");
            match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => {
                    assert!(name.ends_with("_total"), "{name}");
                }
                prometheus::proto::MetricType::HISTOGRAM => {
                    assert!(name.ends_with("_seconds"), "{name}");
                }
                _ => assert!(!name.ends_with("_total"), "{name}"),
            }
            for metric in family.get_metric() {
                for label in metric.get_label() {
                    assert!(
                        [
                            "job", "source", "outcome", "backend", "errno", "site", "pinning",
                            "op", "kind", "what", "reason"
                        ]
                        .contains(&label.name()),
                        "{name} has label {}",
                        label.name()
                    );
                }
            }
        }
    }

    #[test]
    fn unlabelled_gauges_are_exported_untouched() {
        let m = Metrics::new().expect("metrics");
        let text = m.render();
        for name in [
            "gpusnap_staging_bytes",
            "gpusnap_staging_budget_bytes",
            "gpusnap_staging_pinned_bytes",
            "gpusnap_hot_tier_bytes",
            "gpusnap_hot_tier_budget_bytes",
            "gpusnap_clients_connected",
            "gpusnap_snapshots_in_flight",
        ] {
            assert!(text.contains(&format!("\n{name} 0\n")), "{name}:\n{text}");
        }
        for state in StagingPinning::ALL {
            let line = format!(
                "\ngpusnap_staging_clients{{pinning=\"{}\"}} 0\n",
                state.name()
            );
            assert!(text.contains(&line), "{line}:\n{text}");
        }
    }

    #[test]
    fn histogram_buckets_span_100us_to_10min() {
        let m = Metrics::new().expect("metrics");
        touch_all(&m);
        let mut histograms = 0;
        for family in m.registry().gather() {
            if family.get_field_type() != prometheus::proto::MetricType::HISTOGRAM {
                continue;
            }
            histograms += 1;
            for metric in family.get_metric() {
                let bounds: Vec<f64> = metric
                    .get_histogram()
                    .get_bucket()
                    .iter()
                    .map(|b| b.upper_bound())
                    .collect();
                let first = *bounds.first().expect("buckets");
                let last = *bounds.last().expect("buckets");
                assert!(
                    first <= 1e-4 * (1.0 + 1e-9),
                    "{}: first {first}",
                    family.name()
                );
                assert!(last >= 600.0, "{}: last {last}", family.name());
                assert!(
                    bounds.windows(2).all(|w| w[1] > w[0]),
                    "{}: bounds not increasing",
                    family.name()
                );
            }
        }
        assert_eq!(histograms, 7);
    }

    #[test]
    fn label_values_come_from_fixed_sets() {
        assert_eq!(errno_label(None), "none");
        assert_eq!(errno_label(Some(OsError::ENOSPC)), "ENOSPC");
        assert_eq!(errno_label(Some(OsError::from_raw(4000))), "other");
        assert_eq!(source_label(None), "none");
        assert_eq!(source_label(Some(RestoreSource::Disk)), "disk");
        let m = Metrics::new().expect("metrics");
        m.count_snapshot_failure("j", Some(OsError::EIO));
        m.count_restore("j", None, RestoreOutcome::Failed);
        for site in [PanicSite::Connection, PanicSite::Lane, PanicSite::Stream] {
            m.count_panic(site);
        }
        let text = m.render();
        for line in [
            "gpusnap_panics_total{site=\"connection\"} 1\n",
            "gpusnap_panics_total{site=\"lane\"} 1\n",
            "gpusnap_panics_total{site=\"stream\"} 1\n",
            "gpusnap_snapshots_total{job=\"j\",outcome=\"failed\"} 1\n",
            "gpusnap_snapshot_failures_total{errno=\"EIO\",job=\"j\"} 1\n",
            "gpusnap_restores_total{job=\"j\",outcome=\"failed\",source=\"none\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn a_pinning_share_moves_between_states_and_is_taken_back_when_dropped() {
        let m = Arc::new(Metrics::new().expect("metrics"));
        let clients =
            |state: StagingPinning| m.staging_clients.with_label_values(&[state.name()]).get();
        let mut a = m.pinning_share();
        let mut b = m.pinning_share();
        assert_eq!(clients(StagingPinning::Unreported), 2);
        a.report(StagingPinning::Pinned, 8192);
        b.report(StagingPinning::Unpinned, 0);
        assert_eq!(a.state(), StagingPinning::Pinned);
        assert_eq!(clients(StagingPinning::Unreported), 0);
        assert_eq!(clients(StagingPinning::Pinned), 1);
        assert_eq!(clients(StagingPinning::Unpinned), 1);
        assert_eq!(m.staging_pinned_bytes.get(), 8192);
        let c = m.pinning_share();
        drop(a);
        assert_eq!(clients(StagingPinning::Pinned), 0);
        assert_eq!(m.staging_pinned_bytes.get(), 0);
        drop(b);
        drop(c);
        for state in StagingPinning::ALL {
            assert_eq!(clients(state), 0, "{state:?}");
        }
    }

    #[test]
    fn observations_land_in_the_right_bucket() {
        let m = Metrics::new().expect("metrics");
        let h = m.stall_seconds.with_label_values(&["j"]);
        h.observe(0.00005); // below 100 µs: first bucket
        h.observe(599.0); // 10 min: inside the finite range
        let text = m.render();
        assert!(
            text.contains("gpusnap_stall_seconds_bucket{job=\"j\",le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("gpusnap_stall_seconds_bucket{job=\"j\",le=\"838.8608\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("gpusnap_stall_seconds_count{job=\"j\"} 2\n"),
            "{text}"
        );
    }

    /// One HTTP/1.1 request over a fresh connection; returns status and body.
    async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let response = String::from_utf8(response).expect("utf-8 response");
        let (head, body) = response.split_once("\r\n\r\n").expect("header end");
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line: {head}"));
        (status, head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_and_health_until_shutdown() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        metrics.clients_connected.set(3);
        metrics
            .snapshots_total
            .with_label_values(&["llama", "committed"])
            .inc();
        let healthy = Arc::new(AtomicBool::new(true));
        let health_flag = Arc::clone(&healthy);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Arc::clone(&metrics),
            Arc::new(move || health_flag.load(Ordering::SeqCst)),
            async move {
                let _ = stopped.await;
            },
        ));

        let (status, head, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(body.contains("\ngpusnap_clients_connected 3\n"), "{body}");
        assert!(
            body.contains("gpusnap_snapshots_total{job=\"llama\",outcome=\"committed\"} 1\n"),
            "{body}"
        );

        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        healthy.store(false, Ordering::SeqCst);
        let (status, _, _) = http_get(addr, "/healthz").await;
        assert_eq!(status, 503);

        let (status, _, _) = http_get(addr, "/nothing").await;
        assert_eq!(status, 404);

        stop.send(()).expect("server still running");
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("server stops after shutdown")
            .expect("server task");
        result.expect("serve returns Ok");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener closed after shutdown"
        );
    }
}

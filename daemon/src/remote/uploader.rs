//! [`Remote`]: the daemon's remote tier. A persist lane tells it a step
//! committed ([`Remote::committed`]: a map update, never a wait); one
//! background task uploads, marks complete steps and applies retention;
//! restores ask it for the steps complete remotely and download one.
//!
//! Which step the uploader sends: the newest committed local step of the
//! rank not yet uploaded, except that a step another rank of the job has
//! already uploaded (and which this daemon still has) goes first, so the
//! daemons of a multi-node job that all lag behind still converge on
//! common steps instead of each skipping to its own newest. Older steps it
//! skips are counted (`outcome="skipped"`): the remote tier keeps complete
//! steps, and a step one rank skipped can never be complete.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gpusnap_kernels::ChunkChecksum;
use gpusnap_proto::convert::gauge;

use crate::hot_tier::HotTier;
use crate::metrics::Metrics;
use crate::ranks::RankKey;
use crate::remote::bucket::RemoteError;
use crate::remote::catalog::{self, Completion};
use crate::remote::config::RemoteConfig;
use crate::remote::marker::Marker;
use crate::remote::transfer::{self, Tier, Uploaded};
use crate::store::{Snapshot, SnapshotId, Store, StoreError};

/// How often the uploader looks again without being told (lag gauges, a
/// failed upload's retry).
const TICK: Duration = Duration::from_secs(1);
/// First wait after a failed pass; doubles up to [`RETRY_MAX`].
const RETRY_START: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// One rank's upload state.
#[derive(Debug, Clone, Default)]
struct RankState {
    /// Newest step committed locally (as told by the lanes or found at start).
    newest_committed: Option<u64>,
    /// Newest step uploaded (or found already there).
    uploaded: Option<u64>,
    /// Local commits since the last upload.
    behind: u64,
    /// When the oldest of those committed.
    behind_since: Option<Instant>,
}

/// What `gpusnapctl status` shows of the tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierStatus {
    pub endpoint: String,
    pub bucket: String,
    /// The last request got an answer.
    pub reachable: bool,
    /// The last failure, when the last pass failed.
    pub last_error: Option<String>,
    pub uploads: u64,
    pub failures: u64,
    /// Per (job, rank): newest uploaded, commits behind, seconds behind.
    pub ranks: Vec<RankLag>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLag {
    pub job: String,
    pub rank: u32,
    pub uploaded: Option<u64>,
    pub behind_steps: u64,
    pub behind_s: u64,
}

#[derive(Debug, Default)]
struct State {
    ranks: HashMap<RankKey, RankState>,
    /// Local snapshots found corrupt while uploading: never tried again.
    corrupt: std::collections::HashSet<(RankKey, u64)>,
    /// Jobs whose `OWNER` object this run found (or made) naming the local
    /// owner.
    owners_confirmed: BTreeSet<String>,
    last_error: Option<String>,
    uploads: u64,
    failures: u64,
}

/// The daemon's remote tier.
#[derive(Debug)]
pub struct Remote {
    tier: Tier,
    store: Arc<Store>,
    checksum: Arc<dyn ChunkChecksum>,
    keep_steps: usize,
    /// The daemon's hot tier: parts of a step it still holds are read from
    /// memory, not from the disk the next persist writes.
    hot: Option<Arc<HotTier>>,
    metrics: Arc<Metrics>,
    /// Reads the local `OWNER` files (its own cache).
    owners: crate::owners::Owners,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
}

impl Remote {
    /// The tier of `config` (enabled), credentials loaded as it says.
    pub fn open(
        config: &RemoteConfig,
        store: Arc<Store>,
        hot: Option<Arc<HotTier>>,
        metrics: Arc<Metrics>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Remote, RemoteError> {
        let tier = Tier::open(
            config,
            Some(Arc::clone(&metrics)),
            stopping,
            Some(store.root()),
        )?;
        let checksum = Arc::clone(store.checksum());
        Ok(Remote {
            tier,
            store,
            checksum,
            keep_steps: config.keep_steps,
            hot,
            metrics,
            owners: crate::owners::Owners::default(),
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub fn tier(&self) -> &Tier {
        &self.tier
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A lane committed `step` of `key`: upload it when the uploader gets
    /// to it. Never waits (a short lock, a notification).
    pub fn committed(&self, key: &RankKey, step: u64) {
        {
            let mut state = self.lock();
            let rank = state.ranks.entry(key.clone()).or_default();
            if rank.newest_committed.is_none_or(|n| step > n) {
                rank.newest_committed = Some(step);
            }
            if rank.uploaded.is_none_or(|u| step > u) {
                rank.behind += 1;
                rank.behind_since.get_or_insert_with(Instant::now);
            }
        }
        self.wake.notify_one();
    }

    /// The tier's state for `Status`.
    pub fn status(&self) -> TierStatus {
        let state = self.lock();
        let now = Instant::now();
        let mut ranks: Vec<RankLag> = state
            .ranks
            .iter()
            .map(|(key, r)| RankLag {
                job: key.job.clone(),
                rank: key.rank,
                uploaded: r.uploaded,
                behind_steps: r.behind,
                behind_s: r
                    .behind_since
                    .map_or(0, |t| now.duration_since(t).as_secs()),
            })
            .collect();
        ranks.sort_by(|a, b| (&a.job, a.rank).cmp(&(&b.job, b.rank)));
        TierStatus {
            endpoint: self.tier.bucket.endpoint().to_owned(),
            bucket: self.tier.bucket.name().to_owned(),
            reachable: self.metrics.remote_up.get() == 1,
            last_error: state.last_error.clone(),
            uploads: state.uploads,
            failures: state.failures,
            ranks,
        }
    }

    /// Runs the uploader until `stopping` flips: aborts the uploads a
    /// previous run left open, seeds every local rank, then uploads what
    /// the lanes report.
    pub async fn run(self: Arc<Self>, mut stopping: tokio::sync::watch::Receiver<bool>) {
        self.abort_leftovers().await;
        self.seed_from_store().await;
        let mut retry_at: Option<Instant> = None;
        let mut retry_wait = RETRY_START;
        loop {
            self.update_lag_gauges();
            let due = retry_at.is_none_or(|t| Instant::now() >= t);
            if due {
                match self.pass().await {
                    Ok(()) => {
                        retry_at = None;
                        retry_wait = RETRY_START;
                        self.lock().last_error = None;
                    }
                    Err(RemoteError::Stopping) => return,
                    Err(e) => {
                        if e.is_configuration() {
                            tracing::error!(error = %e, retry_s = retry_wait.as_secs(), "the object store refuses the remote tier's requests; local snapshots go on, uploads wait");
                        } else {
                            tracing::warn!(error = %e, retry_s = retry_wait.as_secs(), "remote upload failed; local snapshots go on, the upload is tried again");
                        }
                        {
                            let mut state = self.lock();
                            state.last_error = Some(e.to_string());
                            state.failures += 1;
                        }
                        retry_at = Some(Instant::now() + retry_wait);
                        retry_wait = (retry_wait * 2).min(RETRY_MAX);
                    }
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    /// Aborts every multipart upload the journal lists (cut short by a
    /// crash or a kill).
    async fn abort_leftovers(&self) {
        let Some(journal) = &self.tier.journal else {
            return;
        };
        let open = match journal.open_uploads() {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the remote upload journal");
                return;
            }
        };
        for upload in open {
            let Ok(key) = object_store::path::Path::parse(&upload.key) else {
                let _ = journal.forget(&upload.key);
                continue;
            };
            match self
                .tier
                .bucket
                .abort_multipart(&key, &upload.upload_id)
                .await
            {
                Ok(()) => {
                    tracing::info!(key = %upload.key, "aborted a multipart upload a previous run left open");
                    let _ = journal.forget(&upload.key);
                }
                Err(e) => {
                    tracing::warn!(key = %upload.key, error = %e, "could not abort a multipart upload a previous run left open; tried again at the next start");
                }
            }
        }
    }

    /// Every rank with local snapshots gets its newest one considered.
    async fn seed_from_store(&self) {
        let store = Arc::clone(&self.store);
        let listed = tokio::task::spawn_blocking(move || store.list(None)).await;
        let Ok(Ok(listing)) = listed else {
            tracing::warn!("cannot list the local store to seed the remote uploader");
            return;
        };
        for s in &listing.snapshots {
            let key = RankKey::new(s.manifest.job.clone(), s.manifest.rank);
            let mut state = self.lock();
            let rank = state.ranks.entry(key).or_default();
            if rank.newest_committed.is_none_or(|n| s.manifest.step > n) {
                rank.newest_committed = Some(s.manifest.step);
                rank.behind = 1;
                rank.behind_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Uploads what is behind, rank by rank.
    async fn pass(&self) -> Result<(), RemoteError> {
        loop {
            let behind: Vec<RankKey> = {
                let state = self.lock();
                let mut keys: Vec<RankKey> = state
                    .ranks
                    .iter()
                    .filter(|(_, r)| match (r.newest_committed, r.uploaded) {
                        (Some(n), Some(u)) => n > u,
                        (Some(_), None) => true,
                        _ => false,
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                keys.sort_by(|a, b| (&a.job, a.rank).cmp(&(&b.job, b.rank)));
                keys
            };
            if behind.is_empty() {
                return Ok(());
            }
            for key in behind {
                self.upload_rank(&key).await?;
            }
        }
    }

    /// The committed local snapshots of `key`, oldest first.
    async fn local_snapshots(&self, key: &RankKey) -> Result<Vec<Snapshot>, RemoteError> {
        let store = Arc::clone(&self.store);
        let job = key.job.clone();
        let rank = key.rank;
        let listing = tokio::task::spawn_blocking(move || store.list(Some(&job)))
            .await
            .map_err(|e| RemoteError::Client(e.to_string()))??;
        Ok(listing
            .snapshots
            .into_iter()
            .filter(|s| s.manifest.rank == rank)
            .collect())
    }

    /// Nothing of `key` up to its newest commit is to be sent (gone,
    /// superseded, refused): the pass moves on. `keep_lag`: the lag gauges
    /// go on saying the rank is behind (its newest state is not there).
    fn pass_over(&self, key: &RankKey, keep_lag: bool) {
        let mut state = self.lock();
        if let Some(r) = state.ranks.get_mut(key) {
            r.uploaded = r.newest_committed.max(r.uploaded);
            if !keep_lag {
                r.behind = 0;
                r.behind_since = None;
            }
        }
    }

    async fn upload_rank(&self, key: &RankKey) -> Result<(), RemoteError> {
        let (uploaded, corrupt) = {
            let state = self.lock();
            let corrupt: BTreeSet<u64> = state
                .corrupt
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, step)| *step)
                .collect();
            (state.ranks.get(key).and_then(|r| r.uploaded), corrupt)
        };
        let local = self.local_snapshots(key).await?;
        let pending: Vec<&Snapshot> = local
            .iter()
            .filter(|s| uploaded.is_none_or(|u| s.manifest.step > u))
            .filter(|s| !corrupt.contains(&s.manifest.step))
            .collect();
        let Some(newest) = pending.last() else {
            // Retention removed them before they went up, or they are
            // corrupt: nothing to send. A corrupt one keeps the lag gauges
            // up: that rank's newest state is not in the object store.
            self.pass_over(key, !corrupt.is_empty());
            return Ok(());
        };
        let listing = catalog::list_job(&self.tier, &key.job).await?;
        let others_have = |step: u64| {
            listing
                .manifests
                .get(&step)
                .is_some_and(|ranks| ranks.iter().any(|r| *r != key.rank))
                && !listing.markers.contains(&step)
        };
        let chosen = pending
            .iter()
            .rev()
            .find(|s| others_have(s.manifest.step))
            .unwrap_or(newest);
        let step = chosen.manifest.step;
        // A step older than one already marked complete is never sent: it
        // could never be the newest complete step, and retention may be
        // deleting it right now (an upload racing that deletion could
        // re-create objects of a half-deleted step).
        if let Some(&newest_marked) = listing.markers.last()
            && step < newest_marked
        {
            tracing::info!(job = %key.job, rank = key.rank, step, newest_marked, "not uploading a step older than the newest complete one in the object store");
            self.metrics
                .remote_uploads_total
                .with_label_values(&[key.job.as_str(), "superseded"])
                .inc_by(gpusnap_proto::convert::to_u64(pending.len()));
            self.pass_over(key, false);
            return Ok(());
        }
        if let Err(e) = self.confirm_owner(&key.job).await {
            if !matches!(e, RemoteError::Conflict { .. }) {
                return Err(e);
            }
            // Another uid's job of the same name: never uploaded into.
            tracing::error!(job = %key.job, error = %e, "not uploading: the object store's job of this name belongs to another uid");
            self.metrics
                .remote_uploads_total
                .with_label_values(&[key.job.as_str(), "conflict"])
                .inc();
            self.pass_over(key, false);
            self.lock().last_error = Some(e.to_string());
            return Ok(());
        }
        let skipped = pending.iter().filter(|s| s.manifest.step < step).count();
        let started = Instant::now();
        let job = key.job.as_str();
        let hot = self.hot.as_ref().map(|tier| transfer::HotSource {
            tier: Arc::clone(tier),
            key: key.clone(),
        });
        let result = transfer::upload_from(&self.tier, chosen, &self.checksum, hot).await;
        let m = &self.metrics;
        let outcome = match &result {
            Ok(Uploaded::Sent { bytes, .. }) => {
                m.remote_upload_bytes_total
                    .with_label_values(&[job])
                    .inc_by(*bytes);
                m.remote_upload_seconds
                    .with_label_values(&[job])
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    job,
                    rank = key.rank,
                    step,
                    bytes,
                    seconds = started.elapsed().as_secs_f64(),
                    "uploaded to the remote tier"
                );
                "uploaded"
            }
            Ok(Uploaded::AlreadyThere { .. }) => "already_there",
            Err(RemoteError::Conflict { .. }) => "conflict",
            Err(RemoteError::LocalCorrupt { .. }) => "local_corrupt",
            Err(RemoteError::Local(StoreError::NotFound { .. })) => "skipped",
            Err(RemoteError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                "skipped"
            }
            Err(_) => "failed",
        };
        m.remote_uploads_total
            .with_label_values(&[job, outcome])
            .inc();
        if skipped > 0 {
            m.remote_uploads_total
                .with_label_values(&[job, "skipped"])
                .inc_by(gpusnap_proto::convert::to_u64(skipped));
        }
        match result {
            Ok(_) => {}
            // Another snapshot of this step is there: never overwritten,
            // reported, and not tried again.
            Err(e @ RemoteError::Conflict { .. }) => {
                tracing::error!(job, rank = key.rank, step, error = %e, "the object store holds another snapshot of this step; it is left as it is");
            }
            // The disk corrupted it: never sent, never tried again (a
            // newer commit of the rank is), and the lag gauges go on
            // saying the rank is not backed up.
            Err(e @ RemoteError::LocalCorrupt { .. }) => {
                tracing::error!(job, rank = key.rank, step, error = %e, "a committed local snapshot fails verification; it is not uploaded (gpusnapctl verify tells more)");
                let mut state = self.lock();
                state.last_error = Some(e.to_string());
                state.corrupt.insert((key.clone(), step));
                return Ok(());
            }
            // Local retention removed it before it went up: the next pass
            // lists the rank again.
            Err(RemoteError::Local(StoreError::NotFound { .. })) => return Ok(()),
            Err(RemoteError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        {
            let mut state = self.lock();
            state.uploads += 1;
            let r = state.ranks.entry(key.clone()).or_default();
            r.uploaded = Some(r.uploaded.map_or(step, |u| u.max(step)));
            let newer = local.iter().filter(|s| s.manifest.step > step).count();
            r.behind = gpusnap_proto::convert::to_u64(newer);
            if newer == 0 {
                r.behind_since = None;
            }
        }
        self.update_lag_gauges();
        self.complete_and_prune(job, step, chosen.manifest.world_size)
            .await
    }

    /// Records (or checks) the job's owner in the object store, once per
    /// job and run.
    async fn confirm_owner(&self, job: &str) -> Result<(), RemoteError> {
        if self.lock().owners_confirmed.contains(job) {
            return Ok(());
        }
        // One small cached read of `<root>/<job>/OWNER`.
        let local = self
            .owners
            .owner(&self.store, job)
            .map_err(|e| RemoteError::Client(format!("job {job:?}: {e}")))?;
        let Some(uid) = local else {
            return Err(RemoteError::Client(format!(
                "job {job:?} has snapshots but no owner on this node"
            )));
        };
        catalog::ensure_owner(&self.tier, job, uid).await?;
        self.lock().owners_confirmed.insert(job.to_owned());
        Ok(())
    }

    /// Writes (or matches) the step's marker when every rank is there.
    async fn mark_complete(&self, job: &str, step: u64, world: u32) -> Result<(), RemoteError> {
        let m = &self.metrics;
        match catalog::try_complete(&self.tier, &self.store, job, step, world).await {
            Ok(Completion::Incomplete { missing }) => {
                tracing::debug!(
                    job,
                    step,
                    ?missing,
                    "step not complete in the object store yet"
                );
            }
            Ok(done) => {
                let word = if done == Completion::Created {
                    "created"
                } else {
                    "matched"
                };
                m.remote_markers_total.with_label_values(&[word]).inc();
                let gauge_step = m.remote_complete_step.with_label_values(&[job]);
                gauge_step.set(gauge_step.get().max(gauge(step)));
                tracing::info!(
                    job,
                    step,
                    marker = word,
                    "step complete in the object store"
                );
            }
            Err(e @ RemoteError::Conflict { .. }) => {
                m.remote_markers_total
                    .with_label_values(&["conflict"])
                    .inc();
                tracing::error!(job, step, error = %e, "the step's COMPLETE marker disagrees with the ranks' uploads");
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    async fn complete_and_prune(
        &self,
        job: &str,
        step: u64,
        world: u32,
    ) -> Result<(), RemoteError> {
        let m = &self.metrics;
        // As for uploads: no marker for a step older than a complete one
        // (listed again: markers may have appeared during the upload).
        let listing = catalog::list_job(&self.tier, job).await?;
        if listing.markers.last().is_some_and(|&newest| step < newest) {
            tracing::debug!(
                job,
                step,
                "a newer step is complete in the object store; no marker for this one"
            );
        } else {
            self.mark_complete(job, step, world).await?;
        }
        let deleted = catalog::apply_retention(&self.tier, job, self.keep_steps).await?;
        for d in &deleted {
            m.remote_deletes_total.with_label_values(&[d.what()]).inc();
        }
        if !deleted.is_empty() {
            let steps: BTreeSet<u64> = deleted.iter().map(|d| d.step()).collect();
            tracing::info!(job, ?steps, "remote retention deleted old steps");
        }
        Ok(())
    }

    fn update_lag_gauges(&self) {
        let state = self.lock();
        let now = Instant::now();
        let mut by_job: HashMap<&str, (u64, u64)> = HashMap::new();
        for (key, r) in &state.ranks {
            let entry = by_job.entry(key.job.as_str()).or_default();
            entry.0 = entry.0.max(r.behind);
            entry.1 = entry.1.max(
                r.behind_since
                    .map_or(0, |t| now.duration_since(t).as_secs()),
            );
        }
        for (job, (steps, secs)) in by_job {
            self.metrics
                .remote_upload_lag_steps
                .with_label_values(&[job])
                .set(gauge(steps));
            self.metrics
                .remote_upload_lag_seconds
                .with_label_values(&[job])
                .set(gauge(secs));
        }
    }

    /// The steps of `job` complete in the object store, newest first, with
    /// their markers.
    pub async fn complete_steps(&self, job: &str) -> Result<Vec<(u64, Marker)>, RemoteError> {
        let listing = catalog::list_job(&self.tier, job).await?;
        catalog::complete_steps(&self.tier, job, &listing).await
    }

    /// The uid owning `job` in the object store (`None`: nothing of it
    /// was uploaded).
    pub async fn owner(&self, job: &str) -> Result<Option<u32>, RemoteError> {
        catalog::remote_owner(&self.tier, job).await
    }

    /// Every step of `job` with a marker, newest first: the marker, or why
    /// the step does not count as complete ([`catalog::marked_steps`]).
    pub async fn marked_steps(
        &self,
        job: &str,
    ) -> Result<Vec<(u64, Result<Marker, String>)>, RemoteError> {
        let listing = catalog::list_job(&self.tier, job).await?;
        catalog::marked_steps(&self.tier, job, &listing).await
    }

    /// Downloads `id` (of a step complete by `marker`) into the local store.
    pub async fn download(
        &self,
        id: &SnapshotId,
        marker: &Marker,
    ) -> Result<Snapshot, RemoteError> {
        let Some(entry) = marker.rank(id.rank) else {
            return Err(RemoteError::Corrupt {
                key: self.tier.keys.marker(&id.job, id.step).to_string(),
                why: format!(
                    "the marker's world of {} has no rank {}",
                    marker.world_size, id.rank
                ),
            });
        };
        let started = Instant::now();
        let result = transfer::download(&self.tier, &self.store, id, Some(entry)).await;
        let m = &self.metrics;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        m.remote_downloads_total
            .with_label_values(&[id.job.as_str(), outcome])
            .inc();
        if let Ok(s) = &result {
            m.remote_download_bytes_total
                .with_label_values(&[id.job.as_str()])
                .inc_by(s.manifest.file_len);
            tracing::info!(snapshot = %id, bytes = s.manifest.file_len, seconds = started.elapsed().as_secs_f64(), "downloaded from the remote tier");
        }
        result
    }
}

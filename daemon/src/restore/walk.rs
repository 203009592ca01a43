//! Which snapshot a restore uses, and the walk-back past those that fail
//! verification.
//!
//! `restore(Latest)`: the rank's newest local step first (the hot tier's
//! copy, else the disk's). The remote tier is asked only when that is not
//! enough: the node has no local snapshot of the rank (a replaced node), or
//! a local copy failed verification. From then on the candidates are the
//! local steps and the steps complete in the object store (a valid
//! `COMPLETE` marker whose ranks are all listed), newest first; a step held
//! in both places is tried locally, then from the object store (a corrupt
//! local copy is removed to make room for the verified download). The
//! first copy that verifies end to end is restored; every copy passed over
//! is logged, counted (`gpusnap_restore_walkbacks_total{job,source}`) and
//! reported to the client (`Restored::walked_back`), so a restore is never
//! silently older than what there is.
//!
//! `restore(step N)`: that step only, locally then remotely; an older one
//! is never substituted for a step asked for by number.
//!
//! What never walks back: a snapshot whose tensors differ from the
//! registration (the trainer registered another model: every older step
//! would differ too, and restoring one silently would be worse), and the
//! daemon stopping. A rank with no local snapshot whose remote tier cannot
//! be listed fails ([`RestoreError::RemoteUnavailable`]) rather than say
//! "no snapshot", which would start the trainer over. When every copy
//! fails, nothing is restored ([`RestoreError::NothingVerifies`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use gpusnap_proto::{RestoreSource, WalkBack};

use crate::hot_tier::HotTier;
use crate::metrics::Metrics;
use crate::ranks::RankKey;
use crate::remote::marker::Marker;
use crate::remote::{Remote, RemoteError};
use crate::restore::{Filled, Mapping, RestoreError, fill_from_disk, fill_snapshot};
use crate::staging::LentSlot;
use crate::store::{RankStep, SnapshotId, Store, StoreError};

/// Where a restore may find snapshots.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub store: &'a Store,
    pub hot: &'a HotTier,
    /// The remote tier, when `[remote]` enables it.
    pub remote: Option<&'a Remote>,
    /// The daemon's runtime: the remote tier's requests run on it while
    /// the walk itself runs on a blocking thread.
    pub runtime: &'a tokio::runtime::Handle,
    pub metrics: &'a Metrics,
    /// The registered client's uid: the object store's copy of a job is
    /// used only for the uid its `OWNER` object names (root: any).
    pub uid: u32,
}

/// A restore that placed a snapshot in the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub filled: Filled,
    /// Every newer copy passed over, newest first, with why.
    pub walked_back: Vec<WalkBack>,
}

/// The message of [`RestoreError::NothingVerifies`].
pub(crate) fn nothing_verifies(key: &RankKey, step: Option<u64>, passed: &[WalkBack]) -> String {
    let mut out = match step {
        Some(step) => format!("no copy of step {step} of {key} verifies:"),
        None => format!("no snapshot of {key} verifies:"),
    };
    for p in passed {
        let _ = write!(out, " step {} ({}): {};", p.step, p.source.name(), p.reason);
    }
    out.pop();
    out
}

/// Restores into `slot` the snapshot of `key` the module doc describes.
/// `Ok(None)`: there is none anywhere (a new job).
pub fn restore(
    sources: &Sources<'_>,
    key: &RankKey,
    slot: &LentSlot,
    step: Option<u64>,
) -> Result<Option<Restored>, RestoreError> {
    let mut local: BTreeMap<u64, RankStep> = sources
        .store
        .rank_steps(&key.job, key.rank)?
        .into_iter()
        .map(|s| (s.step, s))
        .collect();
    let mut walk = Walk {
        sources,
        key,
        slot,
        passed: Vec::new(),
        remote: None,
    };
    if let Some(want) = step {
        let local_copy = local.remove(&want);
        let found_locally = local_copy.is_some();
        if let Some(filled) = walk.step(want, local_copy)? {
            return Ok(Some(walk.done(filled)));
        }
        let marked_remotely = walk.remote.as_ref().is_some_and(|r| r.contains_key(&want));
        if !found_locally && !marked_remotely && walk.passed.is_empty() {
            return Err(StoreError::NotFound {
                job: key.job.clone(),
                rank: key.rank,
                step: Some(want),
            }
            .into());
        }
        return Err(walk.nothing(Some(want)));
    }
    let mut below: Option<u64> = None;
    loop {
        let newest_local = local
            .range(..below.unwrap_or(u64::MAX))
            .next_back()
            .map(|(s, _)| *s);
        if newest_local.is_none() {
            walk.list_remote(local.is_empty() && walk.passed.is_empty())?;
        }
        let newest_remote = walk.remote.as_ref().and_then(|r| {
            r.range(..below.unwrap_or(u64::MAX))
                .next_back()
                .map(|(s, _)| *s)
        });
        let Some(candidate) = newest_local.max(newest_remote) else {
            if walk.passed.is_empty() {
                return Ok(None);
            }
            return Err(walk.nothing(None));
        };
        if let Some(filled) = walk.step(candidate, local.remove(&candidate))? {
            return Ok(Some(walk.done(filled)));
        }
        if candidate == 0 {
            return Err(walk.nothing(None));
        }
        below = Some(candidate);
    }
}

struct Walk<'s, 'a> {
    sources: &'s Sources<'a>,
    key: &'s RankKey,
    slot: &'s LentSlot,
    /// Copies passed over so far, newest first.
    passed: Vec<WalkBack>,
    /// The steps marked complete in the object store, once listed (empty
    /// when the tier is off or could not be listed): the marker, or why the
    /// step is not complete after all.
    remote: Option<BTreeMap<u64, Result<Marker, String>>>,
}

impl Walk<'_, '_> {
    /// Tries step `step`: its local copy when there is one, then (once the
    /// local copy failed or there is none) the object store's.
    fn step(&mut self, step: u64, local: Option<RankStep>) -> Result<Option<Filled>, RestoreError> {
        let mut corrupt_dir = None;
        let only_remote = local.is_none();
        if let Some(local) = local {
            match self.try_local(&local)? {
                Ok(filled) => return Ok(Some(filled)),
                Err(reason) => {
                    self.pass(step, RestoreSource::Disk, reason);
                    corrupt_dir = Some(local.dir);
                }
            }
        }
        // Listing is needed now: a local copy failed, or there is none (and
        // then an unreachable tier fails the restore instead of hiding it).
        self.list_remote(only_remote)?;
        let marker = match self.remote.as_ref().and_then(|r| r.get(&step)).cloned() {
            None => return Ok(None),
            Some(Err(why)) => {
                self.pass(step, RestoreSource::Remote, why);
                return Ok(None);
            }
            Some(Ok(marker)) => marker,
        };
        match self.try_remote(step, &marker, corrupt_dir.as_deref())? {
            Ok(filled) => Ok(Some(filled)),
            Err(reason) => {
                self.pass(step, RestoreSource::Remote, reason);
                Ok(None)
            }
        }
    }

    /// `Ok(Err(reason))`: the copy fails verification (walk on);
    /// `Err`: the restore fails.
    fn try_local(&self, local: &RankStep) -> Result<Result<Filled, String>, RestoreError> {
        let s = self.sources;
        let snapshot = match &local.opened {
            Ok(snapshot) => snapshot,
            Err(e) => return Ok(Err(e.to_string())),
        };
        match fill_snapshot(s.store, s.hot, self.key, self.slot, snapshot) {
            Ok(filled) => Ok(Ok(filled)),
            Err(RestoreError::Store(e)) if fails_verification(&e) => Ok(Err(e.to_string())),
            Err(e) => Err(e),
        }
    }

    fn try_remote(
        &self,
        step: u64,
        marker: &Marker,
        corrupt_dir: Option<&std::path::Path>,
    ) -> Result<Result<Filled, String>, RestoreError> {
        let s = self.sources;
        let Some(remote) = s.remote else {
            return Ok(Err("the remote tier is off".into()));
        };
        let id = SnapshotId::new(&self.key.job, self.key.rank, step).map_err(StoreError::from)?;
        if let Some(dir) = corrupt_dir {
            s.hot.discard(self.key, step);
            if let Err(e) = s.store.discard_corrupt(dir) {
                return Ok(Err(format!(
                    "the object store's copy cannot replace the local one, which cannot be removed: {e}"
                )));
            }
        }
        let snapshot = match s.runtime.block_on(remote.download(&id, marker)) {
            Ok(snapshot) => snapshot,
            Err(RemoteError::Stopping) => return Err(RestoreError::Stopping),
            Err(e) => return Ok(Err(e.to_string())),
        };
        let staging = self.slot.staging();
        let mapping = Mapping::plan(&snapshot.layout, staging.layout(), step)?;
        match fill_from_disk(s.store, &snapshot, &mapping, self.slot.fill_target()) {
            Ok(bytes) => Ok(Ok(Filled {
                step,
                source: RestoreSource::Remote,
                bytes,
            })),
            Err(RestoreError::Store(e)) if fails_verification(&e) => Ok(Err(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Lists the steps complete in the object store, once. `required`: the
    /// rank has nothing locally, so a tier that cannot be listed fails the
    /// restore; otherwise it is logged and the walk goes on locally.
    fn list_remote(&mut self, required: bool) -> Result<(), RestoreError> {
        if self.remote.is_some() {
            return Ok(());
        }
        let Some(remote) = self.sources.remote else {
            self.remote = Some(BTreeMap::new());
            return Ok(());
        };
        let uid = self.sources.uid;
        let listed = self.sources.runtime.block_on(async {
            if uid != 0 {
                let owner = remote.owner(&self.key.job).await?;
                if owner != Some(uid) {
                    return Ok(Err(owner));
                }
            }
            remote.marked_steps(&self.key.job).await.map(Ok)
        });
        let listed = match listed {
            Ok(Err(owner)) => {
                if required && owner.is_some() {
                    return Err(RestoreError::RemoteNotOwner {
                        key: self.key.clone(),
                        uid,
                        owner,
                    });
                }
                tracing::warn!(key = %self.key, uid, ?owner, "the object store's copy of the job is not this uid's; it is not used");
                Ok(Vec::new())
            }
            Ok(Ok(steps)) => Ok(steps),
            Err(e) => Err(e),
        };
        match listed {
            Ok(steps) => {
                self.remote = Some(steps.into_iter().collect());
                Ok(())
            }
            Err(RemoteError::Stopping) => Err(RestoreError::Stopping),
            Err(e) if required => Err(RestoreError::RemoteUnavailable {
                key: self.key.clone(),
                source: Box::new(e),
            }),
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "the remote tier cannot be listed; the restore goes on with the local snapshots");
                self.remote = Some(BTreeMap::new());
                Ok(())
            }
        }
    }

    fn pass(&mut self, step: u64, source: RestoreSource, reason: String) {
        tracing::warn!(job = %self.key.job, rank = self.key.rank, step, source = source.name(), reason, "a snapshot failed verification; walking back past it");
        self.sources
            .metrics
            .restore_walkbacks_total
            .with_label_values(&[self.key.job.as_str(), source.name()])
            .inc();
        self.passed.push(WalkBack {
            step,
            source,
            reason,
        });
    }

    fn done(self, filled: Filled) -> Restored {
        if !self.passed.is_empty() {
            tracing::warn!(job = %self.key.job, rank = self.key.rank, step = filled.step, source = filled.source.name(), passed = self.passed.len(), "restored an older snapshot than the newest there is: the newer ones failed verification");
        }
        Restored {
            filled,
            walked_back: self.passed,
        }
    }

    fn nothing(self, step: Option<u64>) -> RestoreError {
        RestoreError::NothingVerifies {
            key: self.key.clone(),
            step,
            passed: self.passed,
        }
    }
}

/// Errors that say a copy is not what its manifest promises (corrupt,
/// truncated, unreadable, gone): another copy may be good. Everything else
/// (buffers, configuration) would fail for any copy.
fn fails_verification(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Manifest { .. }
            | StoreError::ManifestMissing { .. }
            | StoreError::Layout(_)
            | StoreError::Storage(_)
            | StoreError::ShortTransfer { .. }
            | StoreError::LengthMismatch { .. }
            | StoreError::HeaderCorrupt { .. }
            | StoreError::ChunkCorrupt { .. }
            | StoreError::NotFound { .. }
    )
}

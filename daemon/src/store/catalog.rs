//! What is on disk: listing, start-up recovery and retention.

use std::path::{Path, PathBuf};

use crate::store::Store;
use crate::store::error::StoreError;
use crate::store::paths::{self, CLAIM_PREFIX, PARTIAL_SUFFIX, SnapshotId, TRASH_SUFFIX};
use crate::store::read::Snapshot;

/// A directory that looks like a snapshot but is not one.
#[derive(Debug)]
pub struct Invalid {
    pub dir: PathBuf,
    pub error: StoreError,
}

/// One step directory of a rank, as [`Store::rank_steps`] found it.
#[derive(Debug)]
pub struct RankStep {
    pub step: u64,
    pub dir: PathBuf,
    /// The snapshot, or why the directory is not a valid one.
    pub opened: Result<Snapshot, StoreError>,
}

/// Every snapshot under the root (or one job), oldest step first within
/// each (job, rank).
#[derive(Debug, Default)]
pub struct Listing {
    pub snapshots: Vec<Snapshot>,
    pub invalid: Vec<Invalid>,
}

impl Listing {
    /// Steps of `job` that every rank of its world has committed.
    pub fn complete_steps(&self, job: &str) -> Vec<u64> {
        let mut by_step: std::collections::BTreeMap<u64, (u32, std::collections::BTreeSet<u32>)> =
            std::collections::BTreeMap::new();
        for s in self.snapshots.iter().filter(|s| s.manifest.job == job) {
            let entry = by_step
                .entry(s.manifest.step)
                .or_insert((s.manifest.world_size, Default::default()));
            entry.0 = entry.0.max(s.manifest.world_size);
            entry.1.insert(s.manifest.rank);
        }
        by_step
            .into_iter()
            .filter(|(_, (world, ranks))| u32::try_from(ranks.len()).ok() == Some(*world))
            .map(|(step, _)| step)
            .collect()
    }
}

impl Store {
    /// Lists snapshots whose manifest parses and matches its file. Anything
    /// else that is named like a snapshot is reported in `invalid`.
    pub fn list(&self, job: Option<&str>) -> Result<Listing, StoreError> {
        let mut listing = Listing::default();
        for job_name in self.jobs()? {
            if job.is_some_and(|j| j != job_name) {
                continue;
            }
            for rank in self.ranks(&job_name)? {
                for (step, dir) in self.step_dirs(&job_name, rank)? {
                    let id = SnapshotId {
                        job: job_name.clone(),
                        rank,
                        step,
                    };
                    match self.open_dir(&dir, Some(&id)) {
                        Ok(s) => listing.snapshots.push(s),
                        Err(error) => listing.invalid.push(Invalid { dir, error }),
                    }
                }
            }
        }
        Ok(listing)
    }

    /// The newest listed snapshot of (job, rank), or of one step of it.
    pub fn find(&self, job: &str, rank: u32, step: Option<u64>) -> Result<Snapshot, StoreError> {
        paths::validate_job(job)?;
        let mut steps = self.step_dirs(job, rank)?;
        steps.reverse();
        for (s, dir) in steps {
            if step.is_some_and(|want| want != s) {
                continue;
            }
            let id = SnapshotId {
                job: job.to_owned(),
                rank,
                step: s,
            };
            match self.open_dir(&dir, Some(&id)) {
                Ok(snapshot) => return Ok(snapshot),
                Err(e) if step.is_some() => return Err(e),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "skipping a snapshot that does not verify")
                }
            }
        }
        Err(StoreError::NotFound {
            job: job.to_owned(),
            rank,
            step,
        })
    }

    /// Every step directory of (job, rank), newest first, each with what
    /// opening it gave (a snapshot, or why it is not one): what a restore
    /// walks back through.
    pub fn rank_steps(&self, job: &str, rank: u32) -> Result<Vec<RankStep>, StoreError> {
        paths::validate_job(job)?;
        let mut steps = self.step_dirs(job, rank)?;
        steps.reverse();
        Ok(steps
            .into_iter()
            .map(|(step, dir)| {
                let id = SnapshotId {
                    job: job.to_owned(),
                    rank,
                    step,
                };
                let opened = self.open_dir(&dir, Some(&id));
                RankStep { step, dir, opened }
            })
            .collect())
    }

    /// Start-up recovery: removes every `*.partial` directory (never read,
    /// never listed), every `*.trash` one (a removal cut short) and every
    /// `.claiming-*` one in the root (a job claim cut short). Returns what
    /// was removed.
    pub fn recover(&self) -> Result<Vec<PathBuf>, StoreError> {
        let storage = self.storage();
        let mut removed = Vec::new();
        let claims: Vec<String> = self
            .dir_names(self.root())?
            .into_iter()
            .filter(|n| n.starts_with(CLAIM_PREFIX))
            .collect();
        for name in &claims {
            let dir = self.root().join(name);
            storage.remove_dir_all(&dir)?;
            tracing::warn!(dir = %dir.display(), "removed a job claim left unfinished by a crash");
            removed.push(dir);
        }
        if !claims.is_empty() {
            storage.sync_dir(self.root())?;
        }
        for job in self.jobs()? {
            for rank in self.ranks(&job)? {
                let rank_dir = self.root().join(&job).join(rank.to_string());
                let mut changed = false;
                for entry in storage.read_dir(&rank_dir)? {
                    if entry.name.ends_with(PARTIAL_SUFFIX) || entry.name.ends_with(TRASH_SUFFIX) {
                        let dir = rank_dir.join(&entry.name);
                        storage.remove_dir_all(&dir)?;
                        tracing::warn!(dir = %dir.display(), "removed an unfinished snapshot left by a crash");
                        removed.push(dir);
                        changed = true;
                    }
                }
                if changed {
                    storage.sync_dir(&rank_dir)?;
                }
            }
        }
        Ok(removed)
    }

    /// Retention for (job, rank): keeps the newest `keep_snapshots` listed
    /// snapshots and removes older listed ones. Only snapshots that are
    /// listed count as kept, so the newest one that verifies is never
    /// removed; directories that are not valid snapshots are left for an
    /// operator to inspect (`gpusnapctl list` shows them).
    pub fn prune(&self, job: &str, rank: u32) -> Result<Vec<PathBuf>, StoreError> {
        let keep = self.config().keep_snapshots;
        assert!(keep >= 1, "configuration guarantees keep_snapshots >= 1");
        let mut valid = Vec::new();
        let mut steps = self.step_dirs(job, rank)?;
        steps.reverse();
        for (step, dir) in steps {
            let id = SnapshotId {
                job: job.to_owned(),
                rank,
                step,
            };
            if self.open_dir(&dir, Some(&id)).is_ok() {
                valid.push(dir);
            }
        }
        let doomed: Vec<PathBuf> = valid.into_iter().skip(keep).collect();
        if doomed.is_empty() {
            return Ok(doomed);
        }
        for dir in &doomed {
            self.discard_committed(dir)?;
            tracing::info!(dir = %dir.display(), "retention removed an old snapshot");
        }
        Ok(doomed)
    }

    /// Removes a committed snapshot directory that failed verification, so
    /// that a verified copy (downloaded from the remote tier) can take its
    /// name. Only the restore path calls it, and only once that copy is
    /// known to exist.
    pub fn discard_corrupt(&self, dir: &Path) -> Result<(), StoreError> {
        tracing::warn!(dir = %dir.display(), "removing a snapshot that failed verification, to replace it with the remote tier's copy");
        self.discard_committed(dir)
    }

    /// Removes a committed snapshot directory without ever exposing a
    /// half-removed one under its committed name: rename to `*.trash`, fsync
    /// the parent, then remove.
    pub(crate) fn discard_committed(&self, dir: &Path) -> Result<(), StoreError> {
        let storage = self.storage();
        let mut trash = dir.as_os_str().to_owned();
        trash.push(TRASH_SUFFIX);
        let trash = PathBuf::from(trash);
        match storage.remove_dir_all(&trash) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        storage.rename(dir, &trash)?;
        if let Some(parent) = dir.parent() {
            storage.sync_dir(parent)?;
        }
        storage.remove_dir_all(&trash)?;
        Ok(())
    }

    fn jobs(&self) -> Result<Vec<String>, StoreError> {
        let mut jobs: Vec<String> = self
            .dir_names(self.root())?
            .into_iter()
            .filter(|n| paths::validate_job(n).is_ok())
            .collect();
        jobs.sort();
        Ok(jobs)
    }

    fn ranks(&self, job: &str) -> Result<Vec<u32>, StoreError> {
        let mut ranks: Vec<u32> = self
            .dir_names(&self.root().join(job))?
            .iter()
            .filter_map(|n| paths::parse_rank_dir(n))
            .collect();
        ranks.sort_unstable();
        Ok(ranks)
    }

    /// Committed-looking step directories of (job, rank), oldest first.
    fn step_dirs(&self, job: &str, rank: u32) -> Result<Vec<(u64, PathBuf)>, StoreError> {
        let rank_dir = self.root().join(job).join(rank.to_string());
        let mut steps: Vec<(u64, PathBuf)> = self
            .dir_names(&rank_dir)?
            .into_iter()
            .filter_map(|n| paths::parse_step_dir(&n).map(|s| (s, rank_dir.join(n))))
            .collect();
        steps.sort_unstable_by_key(|(s, _)| *s);
        Ok(steps)
    }

    /// Subdirectory names of `dir`; none if `dir` does not exist.
    fn dir_names(&self, dir: &Path) -> Result<Vec<String>, StoreError> {
        match self.storage().read_dir(dir) {
            Ok(entries) => Ok(entries
                .into_iter()
                .filter(|e| e.is_dir)
                .map(|e| e.name)
                .collect()),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

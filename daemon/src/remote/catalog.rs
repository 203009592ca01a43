//! What the object store holds of a job: listing, the marker of a complete
//! step (written by whichever daemon finds the step complete first), and
//! retention.
//!
//! Retention ([`plan_retention`]) keeps the newest `keep_steps` complete
//! steps (a valid marker each) and deletes, in this order, markers, then
//! manifests, then data objects, so a half-deleted step never looks
//! complete (no marker) and never looks like a rank's snapshot (no
//! manifest). The newest complete step is never deleted. A step without a
//! valid marker is deleted only once a newer complete step exists (until
//! then its ranks may still be uploading). Plans made by several daemons
//! from different listings are all safe: each deletes only steps older than
//! the newest complete step it saw, which is never newer than the newest
//! complete step there is.

use std::collections::{BTreeMap, BTreeSet};

use object_store::path::Path as ObjectPath;

use crate::remote::bucket::RemoteError;
use crate::remote::keys::Object;
use crate::remote::marker::{MARKER_LEN_MAX, Marker, RankEntry};
use crate::remote::transfer::{Tier, remote_manifest};
use crate::store::{SnapshotId, Store};

/// The objects of one job, by step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobListing {
    /// Steps with a `COMPLETE` object (valid or not).
    pub markers: BTreeSet<u64>,
    /// Per step, the ranks with a manifest object.
    pub manifests: BTreeMap<u64, BTreeSet<u32>>,
    /// Per step, the ranks with a data object, and its length.
    pub data: BTreeMap<u64, BTreeMap<u32, u64>>,
}

impl JobListing {
    /// Every step anything is listed for.
    pub fn steps(&self) -> BTreeSet<u64> {
        let mut steps: BTreeSet<u64> = self.markers.clone();
        steps.extend(self.manifests.keys());
        steps.extend(self.data.keys());
        steps
    }
}

/// Lists `job`'s objects.
pub async fn list_job(tier: &Tier, job: &str) -> Result<JobListing, RemoteError> {
    let mut listing = JobListing::default();
    for meta in tier.bucket.list(&tier.keys.job(job)).await? {
        match tier.keys.parse(job, &meta.location) {
            Some(Object::Marker { step }) => {
                listing.markers.insert(step);
            }
            Some(Object::Manifest { rank, step }) => {
                listing.manifests.entry(step).or_default().insert(rank);
            }
            Some(Object::Data { rank, step }) => {
                listing
                    .data
                    .entry(step)
                    .or_default()
                    .insert(rank, meta.size);
            }
            None => {}
        }
    }
    Ok(listing)
}

/// The jobs with objects under the prefix.
pub async fn list_jobs(tier: &Tier) -> Result<Vec<String>, RemoteError> {
    let root = tier.keys.root();
    let mut jobs: Vec<String> = tier
        .bucket
        .list_dirs(root.as_ref())
        .await?
        .iter()
        .filter_map(|p| tier.keys.job_of(p))
        .collect();
    jobs.sort();
    Ok(jobs)
}

/// The marker of `job`'s `step`, parsed and checked.
pub async fn read_marker(tier: &Tier, job: &str, step: u64) -> Result<Marker, RemoteError> {
    let key = tier.keys.marker(job, step);
    let bytes = tier.bucket.get_small(&key, MARKER_LEN_MAX).await?;
    Marker::parse(&bytes, job, step).map_err(|e| RemoteError::Corrupt {
        key: key.to_string(),
        why: e.to_string(),
    })
}

/// The steps of `job` complete by a valid marker, newest first, with their
/// markers; an invalid marker is logged and left out.
pub async fn complete_steps(
    tier: &Tier,
    job: &str,
    listing: &JobListing,
) -> Result<Vec<(u64, Marker)>, RemoteError> {
    Ok(marked_steps(tier, job, listing)
        .await?
        .into_iter()
        .filter_map(|(step, marker)| marker.ok().map(|m| (step, m)))
        .collect())
}

/// Every step of `job` with a `COMPLETE` marker, newest first: its marker
/// when valid and every rank it names is listed with the length it says,
/// else why the step does not count as complete (logged too). A restore
/// reports a broken step it passes over.
pub async fn marked_steps(
    tier: &Tier,
    job: &str,
    listing: &JobListing,
) -> Result<Vec<(u64, Result<Marker, String>)>, RemoteError> {
    let mut out = Vec::new();
    for &step in listing.markers.iter().rev() {
        let verdict = match read_marker(tier, job, step).await {
            Ok(marker) => {
                // A marker is the job's word that every rank is there; the
                // listing is checked too, so a rank's objects deleted (or
                // lost, or cut short) under a marker never make it count.
                let gone: Vec<u32> = marker
                    .ranks
                    .iter()
                    .filter(|r| {
                        !listing
                            .manifests
                            .get(&step)
                            .is_some_and(|m| m.contains(&r.rank))
                            || listing.data.get(&step).and_then(|d| d.get(&r.rank))
                                != Some(&r.file_len)
                    })
                    .map(|r| r.rank)
                    .collect();
                if gone.is_empty() {
                    Ok(marker)
                } else {
                    Err(format!(
                        "the COMPLETE marker names rank(s) {gone:?} whose manifest or data object is missing or of another length"
                    ))
                }
            }
            Err(e @ (RemoteError::Corrupt { .. } | RemoteError::NotFound { .. })) => {
                Err(e.to_string())
            }
            Err(e) => return Err(e),
        };
        if let Err(why) = &verdict {
            tracing::warn!(
                job,
                step,
                why,
                "a step marked complete in the object store is not; it is never restored"
            );
        }
        out.push((step, verdict));
    }
    Ok(out)
}

/// The uid that owns `job` in the object store (its `OWNER` object),
/// `None` when there is none (nothing of the job was ever uploaded).
pub async fn remote_owner(tier: &Tier, job: &str) -> Result<Option<u32>, RemoteError> {
    let key = tier.keys.owner(job);
    match tier.bucket.get_small(&key, OWNER_LEN_MAX).await {
        Ok(bytes) => crate::owners::parse(&bytes)
            .map(Some)
            .map_err(|why| RemoteError::Corrupt {
                key: key.to_string(),
                why: format!("not an OWNER record: {why}"),
            }),
        Err(RemoteError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes `job`'s `OWNER` object say `uid` (a create-only put, read back):
/// the first daemon to upload a job records its owner, every later one
/// checks it is the same uid. A job of another uid is a
/// [`RemoteError::Conflict`]: nothing of it is uploaded, and no other uid
/// restores it from the object store.
pub async fn ensure_owner(tier: &Tier, job: &str, uid: u32) -> Result<(), RemoteError> {
    let key = tier.keys.owner(job);
    match tier.bucket.create(&key, format!("{uid}\n").into()).await {
        Ok(()) | Err(RemoteError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    match remote_owner(tier, job).await? {
        Some(owner) if owner == uid => Ok(()),
        Some(owner) => Err(RemoteError::Conflict {
            key: key.to_string(),
            why: format!(
                "job {job:?} belongs to uid {owner} in the object store, not to uid {uid}"
            ),
        }),
        None => Err(RemoteError::NotFound {
            key: key.to_string(),
        }),
    }
}

/// Longest `OWNER` object read.
const OWNER_LEN_MAX: u64 = 64;

/// What [`try_complete`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Some ranks have no manifest (or data object) yet.
    Incomplete { missing: Vec<u32> },
    /// This daemon wrote the marker.
    Created,
    /// The marker was there already and says what ours would.
    Matched,
}

/// Writes `job`'s marker for `step` if every rank of `world_size` has its
/// manifest and data object there (module doc of `marker`).
pub async fn try_complete(
    tier: &Tier,
    store: &Store,
    job: &str,
    step: u64,
    world_size: u32,
) -> Result<Completion, RemoteError> {
    let mut ranks = Vec::new();
    let mut missing = Vec::new();
    for rank in 0..world_size {
        let id =
            SnapshotId::new(job, rank, step).map_err(|e| RemoteError::Client(e.to_string()))?;
        let (manifest, _layout, digest) =
            match remote_manifest(tier, store.format(), &id, None).await {
                Ok(found) => found,
                Err(RemoteError::NotFound { .. }) => {
                    missing.push(rank);
                    continue;
                }
                Err(e) => return Err(e),
            };
        if manifest.world_size != world_size {
            return Err(RemoteError::Conflict {
                key: tier.keys.manifest(&id).to_string(),
                why: format!(
                    "rank {rank}'s manifest says world size {}, ours {world_size}",
                    manifest.world_size
                ),
            });
        }
        match tier.bucket.exists(&tier.keys.data(&id)).await? {
            Some(meta) if meta.size == manifest.file_len => {}
            _ => {
                missing.push(rank);
                continue;
            }
        }
        ranks.push(RankEntry {
            rank,
            manifest_sha256: digest,
            file_len: manifest.file_len,
        });
    }
    if !missing.is_empty() {
        return Ok(Completion::Incomplete { missing });
    }
    let marker = Marker::new(job, step, ranks).map_err(|e| RemoteError::Client(e.to_string()))?;
    let key = tier.keys.marker(job, step);
    let created = match tier.bucket.create(&key, marker.to_json().into()).await {
        Ok(()) => true,
        Err(RemoteError::AlreadyExists { .. }) => false,
        Err(e) => return Err(e),
    };
    // Read back whichever way it went: a create retried after a lost
    // answer reports AlreadyExists for our own object.
    let there = read_marker(tier, job, step).await?;
    if there != marker {
        return Err(RemoteError::Conflict {
            key: key.to_string(),
            why: "the COMPLETE marker there names other manifests than the ranks' uploads".into(),
        });
    }
    Ok(if created {
        Completion::Created
    } else {
        Completion::Matched
    })
}

/// One deletion of a retention plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    Marker { step: u64 },
    Manifest { rank: u32, step: u64 },
    Data { rank: u32, step: u64 },
}

impl Deletion {
    pub fn step(self) -> u64 {
        match self {
            Deletion::Marker { step }
            | Deletion::Manifest { step, .. }
            | Deletion::Data { step, .. } => step,
        }
    }

    pub fn key(self, tier: &Tier, job: &str) -> ObjectPath {
        let id = |rank, step| SnapshotId {
            job: job.to_owned(),
            rank,
            step,
        };
        match self {
            Deletion::Marker { step } => tier.keys.marker(job, step),
            Deletion::Manifest { rank, step } => tier.keys.manifest(&id(rank, step)),
            Deletion::Data { rank, step } => tier.keys.data(&id(rank, step)),
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            Deletion::Marker { .. } => "marker",
            Deletion::Manifest { .. } => "manifest",
            Deletion::Data { .. } => "data",
        }
    }
}

/// The deletions retention makes of `listing` (module doc), in the order
/// they must run: every marker, then every manifest, then every data
/// object. `complete` are the steps with a valid marker.
pub fn plan_retention(
    listing: &JobListing,
    complete: &BTreeSet<u64>,
    keep: usize,
) -> Vec<Deletion> {
    assert!(keep >= 1, "configuration guarantees keep_steps >= 1");
    let kept: BTreeSet<u64> = complete.iter().rev().take(keep).copied().collect();
    let Some(&newest_complete) = complete.iter().next_back() else {
        return Vec::new();
    };
    let doomed: BTreeSet<u64> = listing
        .steps()
        .into_iter()
        .filter(|step| !kept.contains(step) && *step < newest_complete)
        .collect();
    let mut plan = Vec::new();
    for &step in &doomed {
        if listing.markers.contains(&step) {
            plan.push(Deletion::Marker { step });
        }
    }
    for &step in &doomed {
        for &rank in listing.manifests.get(&step).into_iter().flatten() {
            plan.push(Deletion::Manifest { rank, step });
        }
    }
    for &step in &doomed {
        for &rank in listing.data.get(&step).into_iter().flat_map(BTreeMap::keys) {
            plan.push(Deletion::Data { rank, step });
        }
    }
    plan
}

/// Runs retention for `job`; returns the deletions made.
pub async fn apply_retention(
    tier: &Tier,
    job: &str,
    keep: usize,
) -> Result<Vec<Deletion>, RemoteError> {
    let listing = list_job(tier, job).await?;
    let complete: BTreeSet<u64> = complete_steps(tier, job, &listing)
        .await?
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    let plan = plan_retention(&listing, &complete, keep);
    for deletion in &plan {
        tier.bucket.delete(&deletion.key(tier, job)).await?;
    }
    Ok(plan)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A model object store: which objects of a world-2 job exist.
    #[derive(Debug, Clone, Default)]
    struct Model {
        objects: BTreeSet<(u64, u8, u32)>,
    }

    const MARKER: u8 = 0;
    const MANIFEST: u8 = 1;
    const DATA: u8 = 2;

    impl Model {
        fn listing(&self) -> (JobListing, BTreeSet<u64>) {
            let mut l = JobListing::default();
            for &(step, kind, rank) in &self.objects {
                match kind {
                    MARKER => {
                        l.markers.insert(step);
                    }
                    MANIFEST => {
                        l.manifests.entry(step).or_default().insert(rank);
                    }
                    _ => {
                        l.data.entry(step).or_default().insert(rank, 1);
                    }
                }
            }
            let complete = l.markers.clone();
            (l, complete)
        }

        fn apply(&mut self, d: Deletion) {
            let k = match d {
                Deletion::Marker { step } => (step, MARKER, 0),
                Deletion::Manifest { rank, step } => (step, MANIFEST, rank),
                Deletion::Data { rank, step } => (step, DATA, rank),
            };
            self.objects.remove(&k);
        }

        /// A step is complete when its marker and every rank's objects exist.
        fn newest_whole_complete(&self) -> Option<u64> {
            let (l, _) = self.listing();
            l.markers
                .iter()
                .rev()
                .find(|s| {
                    (0..2).all(|r| {
                        self.objects.contains(&(**s, MANIFEST, r))
                            && self.objects.contains(&(**s, DATA, r))
                    })
                })
                .copied()
        }

        /// A marker never outlives a manifest or data object of its step
        /// (deletion order), and a manifest never outlives its data.
        fn half_deleted_looks_complete(&self) -> bool {
            self.objects.iter().any(|&(step, kind, rank)| match kind {
                MARKER => (0..2).any(|r| {
                    !self.objects.contains(&(step, MANIFEST, r))
                        || !self.objects.contains(&(step, DATA, r))
                }),
                MANIFEST => !self.objects.contains(&(step, DATA, rank)),
                _ => false,
            })
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Rank uploads its data then manifest for step; the last rank writes the marker.
        Upload { step: u64, rank: u32 },
        /// A daemon plans retention on the current listing...
        Plan { runner: usize, keep: usize },
        /// ... and runs the next deletion of its plan (possibly much later).
        Delete { runner: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..12, 0u32..2).prop_map(|(step, rank)| Op::Upload { step, rank }),
            (0usize..2, 1usize..3).prop_map(|(runner, keep)| Op::Plan { runner, keep }),
            (0usize..2).prop_map(|runner| Op::Delete { runner }),
        ]
    }

    proptest! {
        /// Two daemons planning and deleting at any interleaving with
        /// uploads: the newest complete step, once there, stays whole until
        /// a newer one is complete, and nothing half-deleted looks complete.
        #[test]
        fn retention_keeps_the_newest_complete_step_under_any_interleaving(ops in prop::collection::vec(op(), 1..80)) {
            let mut model = Model::default();
            let mut plans: [Vec<Deletion>; 2] = [Vec::new(), Vec::new()];
            for op in ops {
                let before = model.newest_whole_complete();
                match op {
                    Op::Upload { step, rank } => {
                        // The uploader's rule: nothing older than the
                        // newest marker is sent or marked.
                        let newest_marked = model.listing().0.markers.last().copied();
                        if newest_marked.is_none_or(|n| step >= n) {
                            model.objects.insert((step, DATA, rank));
                            model.objects.insert((step, MANIFEST, rank));
                            let all = (0..2).all(|r| model.objects.contains(&(step, MANIFEST, r)) && model.objects.contains(&(step, DATA, r)));
                            if all {
                                model.objects.insert((step, MARKER, 0));
                            }
                        }
                    }
                    Op::Plan { runner, keep } => {
                        let (l, c) = model.listing();
                        plans[runner] = plan_retention(&l, &c, keep);
                        plans[runner].reverse();
                    }
                    Op::Delete { runner } => {
                        if let Some(d) = plans[runner].pop() {
                            model.apply(d);
                        }
                    }
                }
                let after = model.newest_whole_complete();
                if let Some(b) = before {
                    prop_assert!(after.is_some_and(|a| a >= b), "newest complete {before:?} -> {after:?}");
                }
                prop_assert!(!model.half_deleted_looks_complete(), "{:?}", model.objects);
            }
        }
    }

    #[test]
    fn retention_deletes_old_complete_steps_and_stale_partial_ones_in_order() {
        let mut l = JobListing::default();
        for step in [1, 2, 3, 4, 5, 6] {
            l.manifests.insert(step, [0, 1].into());
            l.data.insert(step, [(0, 10), (1, 10)].into());
        }
        // Complete: 2, 3, 5. Step 1 and 4: markerless, older than 5.
        // Step 6: markerless and newest: in progress, kept.
        l.markers = [2, 3, 5].into();
        let complete: BTreeSet<u64> = [2, 3, 5].into();
        let plan = plan_retention(&l, &complete, 2);
        let steps: BTreeSet<u64> = plan.iter().map(|d| d.step()).collect();
        assert_eq!(steps, [1, 2, 4].into());
        let first_manifest = plan.iter().position(|d| d.what() == "manifest").unwrap();
        let first_data = plan.iter().position(|d| d.what() == "data").unwrap();
        assert!(plan[..first_manifest].iter().all(|d| d.what() == "marker"));
        assert!(
            plan[first_manifest..first_data]
                .iter()
                .all(|d| d.what() == "manifest")
        );
        assert!(plan[first_data..].iter().all(|d| d.what() == "data"));
        assert_eq!(plan[0], Deletion::Marker { step: 2 });
        // Nothing complete: nothing is deleted, however old.
        assert!(plan_retention(&l, &BTreeSet::new(), 1).is_empty());
    }
}

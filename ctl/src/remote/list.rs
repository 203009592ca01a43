//! `gpusnapctl remote list`: per job and step, what the bucket holds.

use std::collections::BTreeSet;
use std::process::ExitCode;

use gpusnapd::remote::catalog::{self, JobListing};
use gpusnapd::remote::marker::Marker;
use gpusnapd::remote::{RemoteError, Tier};
use gpusnapd::store::SnapshotId;
use serde::Serialize;

use super::{Error, Output, Remote, check_job, fetch_manifest, print_json, ranks_text};

#[derive(Serialize)]
struct ListOutput {
    endpoint: String,
    bucket: String,
    prefix: String,
    jobs: Vec<JobOutput>,
}

#[derive(Serialize)]
struct JobOutput {
    job: String,
    /// Oldest first.
    steps: Vec<StepOutput>,
}

#[derive(Serialize)]
struct StepOutput {
    step: u64,
    /// A valid marker, and every rank it names has its manifest and a
    /// data object of the marker's length.
    complete: bool,
    marker: MarkerState,
    /// Why the marker is not valid.
    marker_error: Option<String>,
    /// From the marker, else from a rank's manifest; `None` when neither
    /// could be read.
    world_size: Option<u32>,
    /// Every rank with a manifest or a data object.
    ranks: Vec<RankOutput>,
    /// Ranks of the world without both objects (only when the world size
    /// is known).
    missing_ranks: Vec<u32>,
    /// All data objects of the step together.
    data_bytes: u64,
    /// What keeps the step from being complete, or is odd about it.
    problems: Vec<String>,
}

#[derive(Serialize)]
struct RankOutput {
    rank: u32,
    manifest: bool,
    /// Length of the data object; `None`: none there.
    data_bytes: Option<u64>,
}

/// What a step's `COMPLETE` object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MarkerState {
    Absent,
    Valid,
    Invalid,
}

impl MarkerState {
    pub fn word(self) -> &'static str {
        match self {
            MarkerState::Absent => "absent",
            MarkerState::Valid => "valid",
            MarkerState::Invalid => "invalid",
        }
    }
}

/// The marker of `step` as the listing shows it: absent, valid (parsed and
/// checked), or invalid (with why). Other errors (the store unreachable)
/// are returned.
pub(crate) async fn read_marker(
    tier: &Tier,
    job: &str,
    step: u64,
    listing: &JobListing,
) -> Result<(MarkerState, Option<Marker>, Option<String>), RemoteError> {
    if !listing.markers.contains(&step) {
        return Ok((MarkerState::Absent, None, None));
    }
    match catalog::read_marker(tier, job, step).await {
        Ok(marker) => Ok((MarkerState::Valid, Some(marker), None)),
        Err(e @ RemoteError::Corrupt { .. }) => {
            Ok((MarkerState::Invalid, None, Some(e.to_string())))
        }
        // Deleted since the listing (retention).
        Err(RemoteError::NotFound { .. }) => Ok((MarkerState::Absent, None, None)),
        Err(e) => Err(e),
    }
}

/// What keeps a step with a valid `marker` from being complete: a rank
/// whose manifest or data object is missing, or of another length.
pub(crate) fn marker_gaps(marker: &Marker, listing: &JobListing) -> Vec<(u32, String)> {
    let step = marker.step;
    let manifests = listing.manifests.get(&step);
    let data = listing.data.get(&step);
    let mut gaps = Vec::new();
    for entry in &marker.ranks {
        let rank = entry.rank;
        if !manifests.is_some_and(|m| m.contains(&rank)) {
            gaps.push((rank, "no manifest object".to_owned()));
        }
        match data.and_then(|d| d.get(&rank)) {
            None => gaps.push((rank, "no data object".to_owned())),
            Some(&len) if len != entry.file_len => gaps.push((
                rank,
                format!(
                    "data object of {len} bytes, the marker says {}",
                    entry.file_len
                ),
            )),
            Some(_) => {}
        }
    }
    gaps
}

async fn step_output(
    tier: &Tier,
    job: &str,
    step: u64,
    listing: &JobListing,
) -> Result<StepOutput, RemoteError> {
    let (marker_state, marker, marker_error) = read_marker(tier, job, step, listing).await?;
    let manifests: BTreeSet<u32> = listing.manifests.get(&step).cloned().unwrap_or_default();
    let data = listing.data.get(&step).cloned().unwrap_or_default();
    let mut problems = Vec::new();
    if let Some(why) = &marker_error {
        problems.push(format!("the COMPLETE marker is not valid: {why}"));
    }
    let world_size = match &marker {
        Some(m) => Some(m.world_size),
        None => match manifests.first() {
            None => None,
            Some(&rank) => {
                let id = SnapshotId {
                    job: job.to_owned(),
                    rank,
                    step,
                };
                match fetch_manifest(tier, &id, None).await {
                    Ok((manifest, _, _)) => Some(manifest.world_size),
                    Err(e @ (RemoteError::Corrupt { .. } | RemoteError::NotFound { .. })) => {
                        problems.push(format!("rank {rank}'s manifest: {e}"));
                        None
                    }
                    Err(e) => return Err(e),
                }
            }
        },
    };
    let mut complete = false;
    if let Some(m) = &marker {
        let gaps = marker_gaps(m, listing);
        complete = gaps.is_empty();
        for (rank, why) in gaps {
            problems.push(format!(
                "rank {rank}: {why} (the marker names it, so the step is not complete)"
            ));
        }
    }
    for rank in data.keys().filter(|r| !manifests.contains(r)) {
        problems.push(format!(
            "rank {rank}: a data object without its manifest (an upload in progress, or cut short)"
        ));
    }
    let missing_ranks = world_size.map_or_else(Vec::new, |world| {
        (0..world)
            .filter(|r| !manifests.contains(r) || !data.contains_key(r))
            .collect()
    });
    let ranks: BTreeSet<u32> = manifests.iter().chain(data.keys()).copied().collect();
    Ok(StepOutput {
        step,
        complete,
        marker: marker_state,
        marker_error,
        world_size,
        ranks: ranks
            .into_iter()
            .map(|rank| RankOutput {
                rank,
                manifest: manifests.contains(&rank),
                data_bytes: data.get(&rank).copied(),
            })
            .collect(),
        missing_ranks,
        data_bytes: data.values().sum(),
        problems,
    })
}

pub(crate) async fn run(
    remote: &Remote,
    job: Option<&str>,
    out: Output,
) -> Result<ExitCode, Error> {
    let tier = &remote.tier;
    let jobs = match job {
        Some(j) => {
            check_job(j)?;
            vec![j.to_owned()]
        }
        None => catalog::list_jobs(tier)
            .await
            .map_err(|e| remote.error(e))?,
    };
    let spinner = out.spinner(format!(
        "listing {} bucket {}",
        remote.endpoint(),
        remote.bucket()
    ));
    let mut listed = Vec::new();
    for job in jobs {
        spinner.set_message(format!("listing job {job}"));
        let listing = catalog::list_job(tier, &job)
            .await
            .map_err(|e| remote.error(e))?;
        let mut steps = Vec::new();
        for step in listing.steps() {
            steps.push(
                step_output(tier, &job, step, &listing)
                    .await
                    .map_err(|e| remote.error(e))?,
            );
        }
        listed.push(JobOutput { job, steps });
    }
    spinner.finish_and_clear();
    let output = ListOutput {
        endpoint: remote.endpoint().to_owned(),
        bucket: remote.bucket().to_owned(),
        prefix: remote.prefix().to_owned(),
        jobs: listed,
    };
    if out.json {
        print_json(&output);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "remote {} bucket {} prefix {:?}",
        output.endpoint, output.bucket, output.prefix
    );
    if output.jobs.is_empty() {
        println!("no jobs");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:>12}  {:<10}  {:<7}  {:>5}  {:<16} {:>14}",
        "JOB", "STEP", "STATE", "MARKER", "WORLD", "MANIFESTS", "DATA BYTES"
    );
    for j in &output.jobs {
        if j.steps.is_empty() {
            println!("{:<24} (no snapshots)", j.job);
        }
        for s in &j.steps {
            println!(
                "{:<24} {:>12}  {:<10}  {:<7}  {:>5}  {:<16} {:>14}",
                j.job,
                s.step,
                if s.complete { "complete" } else { "incomplete" },
                s.marker.word(),
                s.world_size
                    .map_or_else(|| "-".to_owned(), |w| w.to_string()),
                ranks_text(s.ranks.iter().filter(|r| r.manifest).map(|r| r.rank)),
                s.data_bytes
            );
            if !s.complete && !s.missing_ranks.is_empty() {
                println!(
                    "    missing ranks: {}",
                    ranks_text(s.missing_ranks.iter().copied())
                );
            }
            for p in &s.problems {
                println!("    {p}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

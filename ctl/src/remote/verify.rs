//! `gpusnapctl remote verify`: every object of a job's steps read back and
//! checked. Per rank: the manifest parses, describes the rank's snapshot
//! and its SHA-256 is the marker's; the data object has the manifest's
//! length; every part (as an upload or a download cuts it) comes back from
//! a ranged GET with the manifest's header and chunk CRCs.

use std::collections::BTreeSet;
use std::ops::Range;
use std::process::ExitCode;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use gpusnap_kernels::CpuCrc32;
use gpusnapd::remote::catalog::{self, JobListing};
use gpusnapd::remote::marker::RankEntry;
use gpusnapd::remote::transfer::{check_range, plan_parts};
use gpusnapd::remote::{RemoteError, Tier};
use gpusnapd::store::SnapshotId;
use indicatif::ProgressBar;
use serde::Serialize;

use super::list::{MarkerState, read_marker};
use super::{Error, Output, Remote, check_job, fetch_manifest, print_json};

#[derive(Serialize)]
struct VerifyOutput {
    endpoint: String,
    bucket: String,
    job: String,
    /// Every object of every step checked is intact, and each step is
    /// complete.
    ok: bool,
    bytes_checked: u64,
    /// Problems of the request itself (nothing to verify).
    problems: Vec<Problem>,
    steps: Vec<StepReport>,
}

/// One thing wrong, and the object it is about.
#[derive(Debug, Clone, Serialize)]
struct Problem {
    key: String,
    problem: String,
}

#[derive(Serialize)]
struct StepReport {
    step: u64,
    ok: bool,
    marker: MarkerState,
    world_size: Option<u32>,
    /// The step's own problems (its marker); the ranks' are theirs.
    problems: Vec<Problem>,
    ranks: Vec<RankReport>,
}

#[derive(Serialize)]
struct RankReport {
    rank: u32,
    ok: bool,
    manifest_key: String,
    data_key: String,
    /// SHA-256 of the manifest object, when it could be read.
    manifest_sha256: Option<String>,
    /// The data file's length by the manifest.
    file_len: Option<u64>,
    parts_checked: usize,
    bytes_checked: u64,
    problems: Vec<Problem>,
}

/// Which steps and ranks are checked, and how each step's marker is.
struct Planned {
    step: u64,
    marker: MarkerState,
    world_size: Option<u32>,
    entries: Vec<(u32, Option<RankEntry>)>,
    problems: Vec<Problem>,
}

async fn plan_step(
    tier: &Tier,
    job: &str,
    step: u64,
    listing: &JobListing,
) -> Result<Planned, RemoteError> {
    let marker_key = tier.keys.marker(job, step).to_string();
    let (state, marker, why) = read_marker(tier, job, step, listing).await?;
    let mut problems = Vec::new();
    match (state, why) {
        (MarkerState::Absent, _) => problems.push(Problem {
            key: marker_key,
            problem: "no COMPLETE marker: the step is not complete".into(),
        }),
        (MarkerState::Invalid, Some(why)) => problems.push(Problem {
            key: marker_key,
            problem: why,
        }),
        _ => {}
    }
    let (world_size, entries) = match marker {
        Some(m) => (
            Some(m.world_size),
            m.ranks.iter().map(|e| (e.rank, Some(e.clone()))).collect(),
        ),
        None => {
            let ranks: BTreeSet<u32> = listing
                .manifests
                .get(&step)
                .into_iter()
                .flatten()
                .copied()
                .chain(
                    listing
                        .data
                        .get(&step)
                        .into_iter()
                        .flat_map(|d| d.keys().copied()),
                )
                .collect();
            (None, ranks.into_iter().map(|r| (r, None)).collect())
        }
    };
    Ok(Planned {
        step,
        marker: state,
        world_size,
        entries,
        problems,
    })
}

/// Whether `e` is about the object (reported, the verify goes on) rather
/// than about reaching the store (the verify stops).
fn about_the_object(e: &RemoteError) -> bool {
    matches!(
        e,
        RemoteError::Corrupt { .. } | RemoteError::NotFound { .. } | RemoteError::Conflict { .. }
    )
}

async fn verify_rank(
    tier: &Tier,
    id: &SnapshotId,
    entry: Option<&RankEntry>,
    listing: &JobListing,
    bar: &ProgressBar,
) -> Result<RankReport, RemoteError> {
    let manifest_key = tier.keys.manifest(id);
    let data_key = tier.keys.data(id);
    let data_len = listing
        .data
        .get(&id.step)
        .and_then(|d| d.get(&id.rank))
        .copied();
    let mut report = RankReport {
        rank: id.rank,
        ok: false,
        manifest_key: manifest_key.to_string(),
        data_key: data_key.to_string(),
        manifest_sha256: None,
        file_len: None,
        parts_checked: 0,
        bytes_checked: 0,
        problems: Vec::new(),
    };
    let problem = |key: &str, problem: String| Problem {
        key: key.to_owned(),
        problem,
    };
    let has_manifest = listing
        .manifests
        .get(&id.step)
        .is_some_and(|m| m.contains(&id.rank));
    let manifest = if has_manifest {
        match fetch_manifest(tier, id, None).await {
            Ok(found) => Some(found),
            Err(e) if about_the_object(&e) => {
                report
                    .problems
                    .push(problem(&report.manifest_key, reason(&e)));
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        report.problems.push(problem(
            &report.manifest_key,
            "missing: the rank has no manifest object".into(),
        ));
        None
    };
    if let Some((m, _, digest)) = &manifest {
        report.manifest_sha256 = Some(digest.clone());
        report.file_len = Some(m.file_len);
        if let Some(e) = entry {
            if &e.manifest_sha256 != digest {
                report.problems.push(problem(
                    &report.manifest_key,
                    format!(
                        "its SHA-256 is {digest}, the step's COMPLETE marker says {}",
                        e.manifest_sha256
                    ),
                ));
            }
            if e.file_len != m.file_len {
                report.problems.push(problem(
                    &report.manifest_key,
                    format!(
                        "describes a data file of {} bytes, the marker says {}",
                        m.file_len, e.file_len
                    ),
                ));
            }
        }
    }
    let checkable = match (&manifest, data_len) {
        (_, None) => {
            report.problems.push(problem(
                &report.data_key,
                "missing: the rank has no data object".into(),
            ));
            None
        }
        (Some((m, layout, _)), Some(len)) if len == m.file_len => {
            Some((Arc::new(m.clone()), Arc::new(layout.clone())))
        }
        (Some((m, _, _)), Some(len)) => {
            report.problems.push(problem(
                &report.data_key,
                format!("{len} bytes, the manifest says {}", m.file_len),
            ));
            None
        }
        (None, Some(_)) => None,
    };
    let Some((manifest, layout)) = checkable else {
        bar.inc(data_len.unwrap_or(0));
        report.ok = report.problems.is_empty();
        return Ok(report);
    };
    let parts = plan_parts(&manifest, tier.limits.part_bytes);
    let checked: Vec<(Range<u64>, Result<(), String>)> = futures::stream::iter(parts)
        .map(|range| {
            let (manifest, layout) = (Arc::clone(&manifest), Arc::clone(&layout));
            let data_key = &data_key;
            async move {
                let len = range.end - range.start;
                let result = match tier.bucket.get_range(data_key, range.clone()).await {
                    Ok(bytes) => {
                        let r = range.clone();
                        tokio::task::spawn_blocking(move || {
                            check_range(&manifest, &layout, &r, &bytes, &CpuCrc32)
                        })
                        .await
                        .map_err(|e| RemoteError::Client(e.to_string()))?
                    }
                    Err(e) if about_the_object(&e) => Err(reason(&e)),
                    Err(e) => return Err(e),
                };
                bar.inc(len);
                Ok::<_, RemoteError>((range, result))
            }
        })
        .buffered(tier.limits.concurrency)
        .try_collect()
        .await?;
    for (range, result) in checked {
        report.parts_checked += 1;
        match result {
            Ok(()) => report.bytes_checked += range.end - range.start,
            Err(why) => report.problems.push(problem(
                &report.data_key,
                format!("bytes {}..{}: {why}", range.start, range.end),
            )),
        }
    }
    report.ok = report.problems.is_empty();
    Ok(report)
}

/// What is wrong with an object, without the key the report names anyway.
fn reason(e: &RemoteError) -> String {
    match e {
        RemoteError::Corrupt { why, .. } | RemoteError::Conflict { why, .. } => why.clone(),
        RemoteError::NotFound { .. } => "missing (deleted since the listing?)".into(),
        other => other.to_string(),
    }
}

fn print_rank(job: &str, step: u64, r: &RankReport) {
    if r.ok {
        println!(
            "OK       {job} step {step} rank {}: manifest {}, {} bytes in {} parts match its chunk CRCs",
            r.rank,
            r.manifest_sha256.as_deref().unwrap_or("-"),
            r.bytes_checked,
            r.parts_checked
        );
    } else {
        println!("CORRUPT  {job} step {step} rank {}", r.rank);
        for p in &r.problems {
            println!("    {}: {}", p.key, p.problem);
        }
    }
}

pub(crate) async fn run(
    remote: &Remote,
    job: &str,
    step: Option<u64>,
    out: Output,
) -> Result<ExitCode, Error> {
    check_job(job)?;
    let tier = &remote.tier;
    let fail = |e| remote.error(e);
    let listing = catalog::list_job(tier, job).await.map_err(fail)?;
    let mut problems = Vec::new();
    let steps: Vec<u64> = match step {
        Some(s) if listing.steps().contains(&s) => vec![s],
        Some(s) => {
            problems.push(Problem {
                key: tier.keys.job(job).to_string(),
                problem: format!("the bucket holds nothing of job {job} step {s}"),
            });
            Vec::new()
        }
        None if listing.markers.is_empty() => {
            problems.push(Problem {
                key: tier.keys.job(job).to_string(),
                problem: format!(
                    "job {job} has no step with a COMPLETE marker: nothing is complete to verify"
                ),
            });
            Vec::new()
        }
        None => listing.markers.iter().copied().collect(),
    };
    let mut planned = Vec::new();
    for s in steps {
        planned.push(plan_step(tier, job, s, &listing).await.map_err(fail)?);
    }
    let total: u64 = planned
        .iter()
        .flat_map(|p| {
            p.entries.iter().map(|(rank, _)| {
                listing
                    .data
                    .get(&p.step)
                    .and_then(|d| d.get(rank))
                    .copied()
                    .unwrap_or(0)
            })
        })
        .sum();
    let bar = out.bytes_bar(total, format!("verifying {job}"));
    let mut reports = Vec::new();
    for p in planned {
        let mut ranks = Vec::new();
        for (rank, entry) in &p.entries {
            bar.set_message(format!("verifying {job} step {} rank {rank}", p.step));
            let id = SnapshotId {
                job: job.to_owned(),
                rank: *rank,
                step: p.step,
            };
            let r = verify_rank(tier, &id, entry.as_ref(), &listing, &bar)
                .await
                .map_err(fail)?;
            if !out.json {
                bar.suspend(|| print_rank(job, p.step, &r));
            }
            ranks.push(r);
        }
        let ok = p.problems.is_empty() && !ranks.is_empty() && ranks.iter().all(|r| r.ok);
        if !out.json {
            bar.suspend(|| {
                for pr in &p.problems {
                    println!("PROBLEM  {job} step {}: {}: {}", p.step, pr.key, pr.problem);
                }
                if ranks.is_empty() {
                    println!("PROBLEM  {job} step {}: no rank has an object", p.step);
                }
            });
        }
        reports.push(StepReport {
            step: p.step,
            ok,
            marker: p.marker,
            world_size: p.world_size,
            problems: p.problems,
            ranks,
        });
    }
    bar.finish_and_clear();
    let output = VerifyOutput {
        endpoint: remote.endpoint().to_owned(),
        bucket: remote.bucket().to_owned(),
        job: job.to_owned(),
        ok: problems.is_empty() && !reports.is_empty() && reports.iter().all(|s| s.ok),
        bytes_checked: reports
            .iter()
            .flat_map(|s| &s.ranks)
            .map(|r| r.bytes_checked)
            .sum(),
        problems,
        steps: reports,
    };
    if out.json {
        print_json(&output);
    } else {
        for p in &output.problems {
            println!("PROBLEM  {}: {}", p.key, p.problem);
        }
        let bad: usize = output.steps.iter().filter(|s| !s.ok).count();
        if output.ok {
            println!(
                "OK: {} step(s) of job {job}, {} bytes, every object intact",
                output.steps.len(),
                output.bytes_checked
            );
        } else {
            println!(
                "FAILED: {bad} of {} step(s) of job {job} not intact in bucket {} at {}",
                output.steps.len(),
                output.bucket,
                output.endpoint
            );
        }
    }
    Ok(if output.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

//! `gpusnapctl remote push`: local committed snapshots up to the bucket
//! through the daemon's own upload (every part checked against the
//! manifest before it is sent, the manifest put last), then each step's
//! `COMPLETE` marker written if every rank of it is there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use gpusnapd::config::Config;
use gpusnapd::remote::RemoteError;
use gpusnapd::remote::catalog::{self, Completion};
use gpusnapd::remote::transfer::{self, Uploaded};
use gpusnapd::store::Snapshot;
use serde::Serialize;

use super::{Error, Output, Remote, TierArgs, check_job, print_json, ranks_text};

/// Which local snapshots to push.
#[derive(Debug)]
pub(crate) struct Select<'a> {
    pub job: Option<&'a str>,
    pub rank: Option<u32>,
    pub step: Option<u64>,
}

#[derive(Serialize)]
struct PushOutput {
    endpoint: String,
    bucket: String,
    root: PathBuf,
    /// Every upload went up or was there already, and no marker conflicts.
    ok: bool,
    uploads: Vec<UploadOutput>,
    steps: Vec<StepOutput>,
}

#[derive(Serialize)]
struct UploadOutput {
    job: String,
    rank: u32,
    step: u64,
    bytes: u64,
    /// `sent`, `already_there` or `failed`.
    outcome: &'static str,
    manifest_sha256: Option<String>,
    error: Option<String>,
}

#[derive(Serialize)]
struct StepOutput {
    job: String,
    step: u64,
    world_size: u32,
    complete: bool,
    /// `created` (this push wrote the marker), `matched` (it was there and
    /// agrees), or `None` (incomplete, or an error).
    marker: Option<&'static str>,
    missing_ranks: Vec<u32>,
    error: Option<String>,
}

/// Errors after which nothing else can go up either.
fn stops_everything(e: &RemoteError) -> bool {
    matches!(
        e,
        RemoteError::Refused { .. }
            | RemoteError::BucketMissing { .. }
            | RemoteError::Unavailable { .. }
            | RemoteError::Client(_)
            | RemoteError::Stopping
    )
}

/// The snapshots `select` names: per (job, rank), its step `select.step`,
/// else its newest.
fn chosen(snapshots: Vec<Snapshot>, select: &Select<'_>) -> Vec<Snapshot> {
    let mut by_rank: BTreeMap<(String, u32), Snapshot> = BTreeMap::new();
    for s in snapshots {
        let m = &s.manifest;
        if select.rank.is_some_and(|r| r != m.rank) || select.step.is_some_and(|st| st != m.step) {
            continue;
        }
        let key = (m.job.clone(), m.rank);
        match by_rank.get(&key) {
            Some(have) if have.manifest.step >= m.step => {}
            _ => {
                by_rank.insert(key, s);
            }
        }
    }
    by_rank.into_values().collect()
}

pub(crate) async fn run(
    args: &TierArgs,
    root: Option<&Path>,
    select: &Select<'_>,
    stopping: tokio::sync::watch::Receiver<bool>,
    out: Output,
) -> Result<ExitCode, Error> {
    if let Some(job) = select.job {
        check_job(job)?;
    }
    let config = Config::load(&args.config, true)?;
    let root = root.map_or_else(|| config.store.root.clone(), Path::to_path_buf);
    if !root.is_dir() {
        return Err(Error::Refused(format!(
            "store root {} is not a directory",
            root.display()
        )));
    }
    let store = crate::reader(&root)?;
    // Open multipart uploads are journalled in the root where it is
    // writable, so one a kill cuts short is aborted at the daemon's next
    // start there.
    let remote = match Remote::with_config(args, config.clone(), stopping.clone(), Some(&root)) {
        Ok(r) => r,
        Err(Error::Tier { source, .. }) if matches!(*source, RemoteError::Io { .. }) => {
            Remote::with_config(args, config, stopping, None)?
        }
        Err(e) => return Err(e),
    };
    let tier = &remote.tier;
    let listing = store.list(select.job)?;
    let snapshots = chosen(listing.snapshots, select);
    if snapshots.is_empty() {
        return Err(Error::Refused(format!(
            "no committed snapshot under {} matches (job {}, rank {}, step {})",
            root.display(),
            select.job.unwrap_or("any"),
            select.rank.map_or_else(|| "any".into(), |r| r.to_string()),
            select
                .step
                .map_or_else(|| "newest".into(), |s| s.to_string()),
        )));
    }
    let total = snapshots.iter().map(|s| s.manifest.file_len).sum();
    let bar = out.bytes_bar(total, "pushing");
    let mut uploads = Vec::new();
    let mut steps: BTreeMap<(String, u64), u32> = BTreeMap::new();
    // Each job's owner goes up first, as the daemon's uploader does it, so
    // that a replaced node knows whose job it is; a job another uid owns
    // in the bucket is never uploaded into.
    let mut owners_confirmed: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    let owners = gpusnapd::owners::Owners::default();
    for s in &snapshots {
        let job = s.manifest.job.clone();
        if owners_confirmed.contains_key(&job) {
            continue;
        }
        let confirmed = match owners.owner(&store, &job) {
            Ok(Some(uid)) => match gpusnapd::remote::catalog::ensure_owner(tier, &job, uid).await {
                Ok(()) => Ok(()),
                Err(e) if stops_everything(&e) => return Err(remote.error(e)),
                Err(e) => Err(remote.error(e).to_string()),
            },
            Ok(None) => Err(format!("job {job:?} has no OWNER under {}", root.display())),
            Err(e) => Err(e.to_string()),
        };
        owners_confirmed.insert(job, confirmed);
    }
    for s in &snapshots {
        let id = s.id();
        bar.set_message(format!("uploading {id}"));
        let result = match &owners_confirmed[&id.job] {
            Ok(()) => Some(transfer::upload(tier, s, store.checksum()).await),
            Err(_) => None,
        };
        bar.inc(s.manifest.file_len);
        let mut up = UploadOutput {
            job: id.job.clone(),
            rank: id.rank,
            step: id.step,
            bytes: s.manifest.file_len,
            outcome: "failed",
            manifest_sha256: None,
            error: None,
        };
        match result {
            None => {
                if let Some(Err(why)) = owners_confirmed.get(&id.job) {
                    up.error = Some(format!("not uploaded: {why}"));
                }
            }
            Some(Ok(done)) => {
                up.outcome = match done {
                    Uploaded::Sent { .. } => "sent",
                    Uploaded::AlreadyThere { .. } => "already_there",
                };
                up.manifest_sha256 = Some(done.manifest_sha256().to_owned());
                steps.insert((id.job.clone(), id.step), s.manifest.world_size);
            }
            Some(Err(e)) if stops_everything(&e) => {
                bar.finish_and_clear();
                return Err(remote.error(e));
            }
            Some(Err(e)) => up.error = Some(remote.error(e).to_string()),
        }
        if !out.json {
            bar.suspend(|| match (&up.outcome, &up.error) {
                (&"sent", _) => println!("SENT     {id} ({} bytes)", up.bytes),
                (&"already_there", _) => println!("THERE    {id} (already in the bucket)"),
                (_, error) => println!("FAILED   {id}: {}", error.as_deref().unwrap_or("?")),
            });
        }
        uploads.push(up);
    }
    bar.finish_and_clear();
    let mut completed = Vec::new();
    for ((job, step), world_size) in steps {
        let mut st = StepOutput {
            job: job.clone(),
            step,
            world_size,
            complete: false,
            marker: None,
            missing_ranks: Vec::new(),
            error: None,
        };
        match catalog::try_complete(tier, &store, &job, step, world_size).await {
            Ok(Completion::Incomplete { missing }) => st.missing_ranks = missing,
            Ok(Completion::Created) => {
                st.complete = true;
                st.marker = Some("created");
            }
            Ok(Completion::Matched) => {
                st.complete = true;
                st.marker = Some("matched");
            }
            Err(e) if stops_everything(&e) => return Err(remote.error(e)),
            Err(e) => st.error = Some(remote.error(e).to_string()),
        }
        if !out.json {
            match (&st.error, st.marker) {
                (Some(e), _) => println!("ERROR    {job} step {step}: {e}"),
                (None, Some(word)) => println!(
                    "COMPLETE {job} step {step}: every rank of {world_size} is in the bucket (marker {word})"
                ),
                (None, None) => println!(
                    "PARTIAL  {job} step {step}: not complete yet, ranks {} of {world_size} are not in the bucket",
                    ranks_text(st.missing_ranks.iter().copied())
                ),
            }
        }
        completed.push(st);
    }
    let ok =
        uploads.iter().all(|u| u.error.is_none()) && completed.iter().all(|s| s.error.is_none());
    if out.json {
        print_json(&PushOutput {
            endpoint: remote.endpoint().to_owned(),
            bucket: remote.bucket().to_owned(),
            root,
            ok,
            uploads,
            steps: completed,
        });
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

//! `gpusnapctl remote pull`: one rank's snapshot of a complete step, from
//! the bucket into a local store root, through the daemon's own download
//! (the manifest checked against the marker, every chunk against the
//! manifest, committed as the daemon commits).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use gpusnapd::owners::Owners;
use gpusnapd::remote::catalog;
use gpusnapd::remote::transfer;
use gpusnapd::store::{JobDirs, SnapshotId, Store, StoreConfig};
use serde::Serialize;

use super::list::marker_gaps;
use super::{Error, Output, Remote, check_job, print_json};

/// What to pull, and where.
#[derive(Debug)]
pub(crate) struct Want<'a> {
    pub job: &'a str,
    pub rank: u32,
    pub step: Option<u64>,
    pub root: &'a Path,
    pub owner_uid: Option<u32>,
}

#[derive(Serialize)]
struct PullOutput {
    endpoint: String,
    bucket: String,
    job: String,
    rank: u32,
    step: u64,
    world_size: u32,
    /// The local snapshot directory.
    path: PathBuf,
    data_file: PathBuf,
    bytes: u64,
    manifest_sha256: String,
}

/// Whether a `gpusnapd` process runs on this machine (read from /proc:
/// connecting to its socket could start it through socket activation).
fn daemon_running() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            && std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end() == "gpusnapd")
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

pub(crate) async fn run(remote: &Remote, want: &Want<'_>, out: Output) -> Result<ExitCode, Error> {
    let job = want.job;
    check_job(job)?;
    let root = std::path::absolute(want.root)
        .map_err(|e| Error::Refused(format!("{}: {e}", want.root.display())))?;
    let tier = &remote.tier;
    let fail = |e| remote.error(e);
    let listing = catalog::list_job(tier, job).await.map_err(fail)?;
    let where_ = format!("bucket {} at {}", remote.bucket(), remote.endpoint());
    let (step, marker) = match want.step {
        Some(step) => {
            if !listing.markers.contains(&step) {
                return Err(Error::Refused(format!(
                    "job {job} step {step} has no COMPLETE marker in {where_}: it is not complete there (gpusnapctl remote list shows what is)"
                )));
            }
            let marker = catalog::read_marker(tier, job, step).await.map_err(fail)?;
            (step, marker)
        }
        None => catalog::complete_steps(tier, job, &listing)
            .await
            .map_err(fail)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::Refused(format!(
                    "job {job} has no complete step in {where_} (gpusnapctl remote list shows what is there)"
                ))
            })?,
    };
    let Some(entry) = marker.rank(want.rank).cloned() else {
        return Err(Error::Refused(format!(
            "job {job} step {step} has a world of {} ranks: there is no rank {}",
            marker.world_size, want.rank
        )));
    };
    if let Some((_, why)) = marker_gaps(&marker, &listing)
        .into_iter()
        .find(|(r, _)| *r == want.rank)
    {
        return Err(Error::Refused(format!(
            "job {job} step {step} rank {} in {where_}: {why}; it cannot be pulled",
            want.rank
        )));
    }
    let id = SnapshotId::new(job, want.rank, step)
        .map_err(|e| Error::Refused(format!("job {job:?}: {e}")))?;
    let dir = id.dir(&root);
    if dir.symlink_metadata().is_ok() {
        return Err(Error::Refused(format!(
            "{id} already exists locally at {}: pull never replaces a local snapshot (remove it first, or pull into another --root)",
            dir.display()
        )));
    }
    if same_dir(&remote.config.store.root, &root) && daemon_running() {
        return Err(Error::Refused(format!(
            "{} is the daemon's store root and a gpusnapd is running: stop it before pulling into its root (or pull into another --root)",
            root.display()
        )));
    }
    // The job's owner here: as asked, else as the bucket records it (the
    // uid that will restore it), else the caller.
    let owner_uid = match want.owner_uid {
        Some(uid) => Some(uid),
        None => gpusnapd::remote::catalog::remote_owner(tier, job)
            .await
            .map_err(fail)?,
    };
    let store = open_store(&remote.config.store, &root, job, owner_uid)?;
    let spinner = out.spinner(format!(
        "downloading {id} ({} bytes) from {where_}",
        entry.file_len
    ));
    let downloaded = transfer::download(tier, &store, &id, Some(&entry)).await;
    spinner.finish_and_clear();
    let snapshot = downloaded.map_err(fail)?;
    let output = PullOutput {
        endpoint: remote.endpoint().to_owned(),
        bucket: remote.bucket().to_owned(),
        job: job.to_owned(),
        rank: want.rank,
        step,
        world_size: snapshot.manifest.world_size,
        data_file: snapshot.data_path(),
        path: snapshot.dir,
        bytes: snapshot.manifest.file_len,
        manifest_sha256: entry.manifest_sha256,
    };
    if out.json {
        print_json(&output);
    } else {
        eprintln!(
            "pulled {id} ({} bytes) from {where_}: the manifest matches the step's COMPLETE marker and every chunk its CRC",
            output.bytes
        );
        println!("{}", output.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The store at `root` with the daemon's store settings, opened for
/// writing (recovery first, as the daemon does), with `job`'s directory
/// there: made by an ownership claim when missing (`owner_uid`, else the
/// caller's), so the daemon later accepts it.
fn open_store(
    settings: &StoreConfig,
    root: &Path,
    job: &str,
    owner_uid: Option<u32>,
) -> Result<Arc<Store>, Error> {
    let mut store = Store::open(StoreConfig {
        root: root.to_path_buf(),
        ..settings.clone()
    })?;
    store.set_job_dirs(JobDirs::Claimed);
    if root.join(job).symlink_metadata().is_err() {
        let uid = owner_uid.unwrap_or_else(|| nix::unistd::getuid().as_raw());
        Owners::default()
            .claim(&store, job, uid)
            .map_err(|e| match e {
                gpusnapd::owners::OwnerError::Store(s) => Error::Store(s),
                other => Error::Refused(other.to_string()),
            })?;
    }
    Ok(Arc::new(store))
}

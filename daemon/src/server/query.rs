//! The read-only requests: `List`, `Describe` and `Status`. Each is a pure
//! function of the daemon's state and the asking uid; none needs a
//! registration or touches a slot, so they are answered in any state after
//! the handshake. `List` and `Describe` read the disk (run them off the
//! async threads). With the remote tier on, `List` of one job also says
//! the steps complete in the object store, and `Status` the tier's state.

use gpusnap_proto::convert::to_u64;
use std::time::Duration;

use gpusnap_proto::{
    ErrorKind, JobStatus, JobSteps, RemoteRankStatus, RemoteStatus, ReplyBody, SessionStatus,
    SnapshotInfo, StatusInfo,
};

use crate::server::Daemon;
use crate::server::errors::Refusal;
use crate::store::SnapshotId;

/// The committed snapshots of the jobs `uid` may see (`job` only, if
/// given), and per job the steps every rank has committed. A job name that
/// breaks the naming rule is refused (`InvalidRegistration`, the rule in
/// the message), as `Register` and `Describe` refuse it, rather than
/// answered with an empty listing.
pub fn list(daemon: &Daemon, uid: u32, job: Option<&str>) -> Result<ReplyBody, Refusal> {
    if let Some(job) = job {
        crate::store::paths::validate_job(job)
            .map_err(|e| Refusal::new(ErrorKind::InvalidRegistration, e.to_string()))?;
    }
    let listing = daemon.store.list(job).map_err(|e| Refusal::store(&e))?;
    let mut jobs: Vec<String> = Vec::new();
    let snapshots: Vec<SnapshotInfo> = listing
        .snapshots
        .iter()
        .filter(|s| daemon.owners.visible(&daemon.store, &s.manifest.job, uid))
        .map(|s| {
            let m = &s.manifest;
            if jobs.last() != Some(&m.job) {
                jobs.push(m.job.clone());
            }
            SnapshotInfo {
                job: m.job.clone(),
                rank: m.rank,
                world_size: m.world_size,
                step: m.step,
                bytes: m.file_len,
                tensors: to_u64(m.tensors.len()),
                created_unix_ms: m.created_unix_ms,
            }
        })
        .collect();
    jobs.dedup();
    let complete = jobs
        .into_iter()
        .map(|j| JobSteps {
            steps: listing.complete_steps(&j),
            job: j,
        })
        .collect();
    Ok(ReplyBody::Listing {
        snapshots,
        complete,
        remote_complete: Vec::new(),
        remote_error: None,
    })
}

/// How long `List` waits for the object store before answering with the
/// local steps alone (and `remote_error` saying why).
pub const REMOTE_LIST_WAIT: Duration = Duration::from_secs(10);

/// The steps of `job` complete in the object store, for the uid its
/// `OWNER` object there names (root: any job): a replaced node has no
/// local record of the job, and the object store's is the one that counts
/// for its remote copy. `Err`: why the store could not be listed.
pub async fn remote_complete(
    daemon: &Daemon,
    uid: u32,
    job: &str,
) -> Result<Option<JobSteps>, String> {
    let Some(remote) = &daemon.remote else {
        return Ok(None);
    };
    let asked = async {
        if uid != 0 && remote.owner(job).await? != Some(uid) {
            return Ok(Vec::new());
        }
        remote.complete_steps(job).await
    };
    match tokio::time::timeout(REMOTE_LIST_WAIT, asked).await {
        Ok(Ok(complete)) => {
            let mut steps: Vec<u64> = complete.into_iter().map(|(step, _)| step).collect();
            steps.sort_unstable();
            Ok((!steps.is_empty()).then(|| JobSteps {
                job: job.to_owned(),
                steps,
            }))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the object store at {} did not answer within {} s",
            remote.tier().bucket.endpoint(),
            REMOTE_LIST_WAIT.as_secs()
        )),
    }
}

/// `Describe` of a step the local store does not hold, from its manifest
/// in the object store, for the uid owning the job there (root: any).
pub async fn describe_remote(
    daemon: &Daemon,
    uid: u32,
    id: &SnapshotId,
) -> Result<Option<ReplyBody>, Refusal> {
    let Some(remote) = &daemon.remote else {
        return Ok(None);
    };
    let unavailable =
        |e: crate::remote::RemoteError| Refusal::new(ErrorKind::Storage, e.to_string());
    let owner = remote.owner(&id.job).await.map_err(unavailable)?;
    if owner.is_none() || (uid != 0 && owner != Some(uid)) {
        return Ok(None);
    }
    let tier = remote.tier();
    match crate::remote::transfer::remote_manifest(tier, daemon.store.format(), id, None).await {
        Ok((manifest, layout, _digest)) => Ok(Some(ReplyBody::Described {
            job: manifest.job,
            rank: manifest.rank,
            step: manifest.step,
            world_size: manifest.world_size,
            tensors: layout.tensors.iter().map(|t| t.spec()).collect(),
        })),
        Err(crate::remote::RemoteError::NotFound { .. }) => Ok(None),
        Err(e @ crate::remote::RemoteError::Corrupt { .. }) => {
            Err(Refusal::new(ErrorKind::Corrupt, e.to_string()))
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// The remote tier's state for `Status` (`uid` sees its own jobs' lag;
/// root all), `None` when the tier is off.
pub fn remote_status(daemon: &Daemon, uid: u32) -> Option<RemoteStatus> {
    let remote = daemon.remote.as_ref()?;
    let tier = remote.status();
    let ranks = tier
        .ranks
        .into_iter()
        .filter(|r| daemon.owners.visible(&daemon.store, &r.job, uid))
        .map(|r| RemoteRankStatus {
            job: r.job,
            rank: r.rank,
            uploaded: r.uploaded,
            behind_steps: r.behind_steps,
            behind_s: r.behind_s,
        })
        .collect();
    Some(RemoteStatus {
        endpoint: tier.endpoint,
        bucket: tier.bucket,
        reachable: tier.reachable,
        last_error: tier.last_error,
        uploads: tier.uploads,
        failures: tier.failures,
        ranks,
    })
}

/// The tensor table of the committed snapshot (job, rank, step), from its
/// manifest alone, for a uid that owns the job (root: any job).
pub fn describe(
    daemon: &Daemon,
    uid: u32,
    job: String,
    rank: u32,
    step: u64,
) -> Result<ReplyBody, Refusal> {
    let id = SnapshotId::new(job, rank, step)
        .map_err(|e| Refusal::new(ErrorKind::InvalidRegistration, e.to_string()))?;
    let owner = daemon
        .owners
        .owner(&daemon.store, &id.job)
        .map_err(|e| Refusal::owner(&e))?;
    match owner {
        None => {
            return Err(Refusal::new(
                ErrorKind::NotFound,
                format!("snapshot {id} not found: job {:?} has none", id.job),
            ));
        }
        Some(owner) if uid != 0 && owner != uid => {
            return Err(Refusal::new(
                ErrorKind::PermissionDenied,
                format!("job {:?} belongs to uid {owner}, not {uid}", id.job),
            ));
        }
        Some(_) => {}
    }
    let (manifest, layout) = daemon
        .store
        .committed_manifest(&id)
        .map_err(|e| Refusal::store(&e))?;
    Ok(ReplyBody::Described {
        job: manifest.job,
        rank: manifest.rank,
        step: manifest.step,
        world_size: manifest.world_size,
        tensors: layout.tensors.iter().map(|t| t.spec()).collect(),
    })
}

/// The daemon's state as `uid` may see it: its own sessions and jobs (root:
/// all).
pub fn status(daemon: &Daemon, uid: u32) -> StatusInfo {
    let sessions: Vec<SessionStatus> = daemon
        .sessions
        .snapshot()
        .into_iter()
        .filter(|c| uid == 0 || c.uid == uid)
        .map(|c| SessionStatus {
            job: c.key.job.clone(),
            rank: c.key.rank,
            uid: c.uid,
            pid: c.pid,
            tensors: to_u64(c.staging.specs().len()),
            staging_bytes: c.staging.info().memfd_bytes,
            slots: c.staging.info().slots,
            slots_busy: c.staging.busy_slots(),
            staging_pinning: c.staging_pinning.get().cloned().unwrap_or_default(),
        })
        .collect();
    let mut jobs: Vec<JobStatus> = Vec::new();
    for view in daemon.ranks.views() {
        // A job whose owner cannot be read is shown to nobody but is not
        // an error of the status request: `list` and `register` report it.
        let owner = match daemon.owners.owner(&daemon.store, &view.key.job) {
            Ok(Some(owner)) => owner,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(job = %view.key.job, error = %e, "status: the job's owner cannot be read; the job is left out");
                continue;
            }
        };
        if uid != 0 && owner != uid {
            continue;
        }
        let hot_step = daemon.hot.step(&view.key);
        match jobs.iter_mut().find(|j| j.job == view.key.job) {
            Some(j) => {
                j.last_committed_step = j.last_committed_step.max(view.last_committed);
                j.in_flight += view.in_flight;
                j.hot_step = j.hot_step.max(hot_step);
            }
            None => jobs.push(JobStatus {
                job: view.key.job.clone(),
                uid: owner,
                last_committed_step: view.last_committed,
                in_flight: view.in_flight,
                hot_step,
            }),
        }
    }
    StatusInfo {
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: daemon.started.elapsed().as_secs(),
        io_backend: daemon.store.storage().backend().name().to_owned(),
        clients_connected: daemon.clients_connected(),
        staging_bytes_used: daemon.budget.used_bytes(),
        staging_budget_bytes: daemon.budget.budget_bytes(),
        hot_tier_bytes: daemon.hot.bytes(),
        hot_tier_budget_bytes: daemon.hot.budget_bytes(),
        snapshots_in_flight: daemon.engine.in_flight(),
        sessions,
        jobs,
        remote: remote_status(daemon, uid),
    }
}

//! The checks after every kill, through the running daemon and on disk:
//!
//! * every step a trainer logged as acknowledged is listed, unless
//!   retention had the right to remove it (`keep` newer steps of that rank
//!   are listed);
//! * every listed snapshot's data file holds exactly the bytes its trainer
//!   registered for that step (regenerated from the seed), tensor by
//!   tensor, and no other tensor, so nothing partial or foreign is listed;
//! * once no trainer is connected ([`wait_idle`]): staging use and
//!   snapshots in flight are back to zero, nothing is in progress on disk,
//!   and every `step-<N>` directory on disk is listed ([`disk_is_listed`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use gpusnap::{Client, ClientConfig};

use crate::acklog::Entry;
use crate::disk;
use crate::state;

/// How long the daemon may take to give back a dead trainer's staging and
/// finish what it captured.
pub const IDLE_WAIT: Duration = Duration::from_secs(30);
const IDLE_POLL: Duration = Duration::from_millis(10);

/// What one check counted (violations are returned separately).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counted {
    /// Acknowledged steps compared with the listing.
    pub acks_checked: u64,
    /// Listed snapshots read and compared byte for byte.
    pub snapshots_verified: u64,
    /// Listed snapshots retention removed between the listing and the read.
    pub retired_while_checked: u64,
}

/// An observer's client: no registration, so it holds no staging.
pub fn observer(socket: &Path) -> Result<Client, gpusnap::Error> {
    let mut config = ClientConfig::new("soak-observer");
    config.socket = socket.to_path_buf();
    config.connect_timeout = Duration::from_secs(20);
    config.call_timeout = Duration::from_secs(20);
    Client::with_config(config)
}

/// (job index, rank) -> listed steps, for the campaign's jobs.
type Listed = BTreeMap<(u32, u32), BTreeSet<u64>>;

fn listed(client: &mut Client, jobs: u32) -> Result<Listed, gpusnap::Error> {
    let listing = client.list_job(None)?;
    let mut out = Listed::new();
    for s in listing.snapshots {
        if let Some(job) = (0..jobs).find(|&j| state::job_name(j) == s.job) {
            out.entry((job, s.rank)).or_default().insert(s.step);
        }
    }
    Ok(out)
}

/// The listing and data checks. `acks` are every trainer's log entries,
/// read before this is called (what was acknowledged before the listing
/// must be in it). Violations go to `violations`.
#[allow(clippy::too_many_arguments)]
pub fn listing_and_bytes(
    socket: &Path,
    root: &Path,
    seed: u64,
    jobs: u32,
    keep: u64,
    acks: &BTreeMap<(u32, u32), Vec<Entry>>,
    violations: &mut Vec<String>,
) -> Result<Counted, gpusnap::Error> {
    let mut client = observer(socket)?;
    let listing = listed(&mut client, jobs)?;
    let mut counted = Counted::default();
    let empty = BTreeSet::new();
    for (&(job, rank), entries) in acks {
        let steps = listing.get(&(job, rank)).unwrap_or(&empty);
        for entry in entries {
            let Entry::Ack(step) = *entry else { continue };
            counted.acks_checked += 1;
            let newer = u64::try_from(steps.range(step + 1..).count()).unwrap_or(u64::MAX);
            if !steps.contains(&step) && newer < keep {
                violations.push(format!(
                    "{} rank {rank}: step {step} was acknowledged but is not listed (listed: {steps:?}; retention keeps {keep})",
                    state::job_name(job)
                ));
            }
        }
    }
    for (&(job, rank), steps) in &listing {
        for &step in steps {
            let name = state::job_name(job);
            let dir = disk::snapshot_dir(root, &name, rank, step);
            match disk::read_tensors(&dir) {
                Ok(tensors) => {
                    counted.snapshots_verified += 1;
                    violations.extend(compare(seed, job, rank, step, &tensors));
                }
                Err(e) if e.is_not_found() => {
                    let again = listed(&mut client, jobs)?;
                    if again.get(&(job, rank)).is_some_and(|s| s.contains(&step)) {
                        violations.push(format!(
                            "{name} rank {rank} step {step} is listed but its data file is missing: {e}"
                        ));
                    } else {
                        counted.retired_while_checked += 1;
                    }
                }
                Err(e) => violations.push(format!(
                    "{name} rank {rank} step {step} is listed but cannot be read: {e}"
                )),
            }
        }
    }
    Ok(counted)
}

/// Every `step-<N>` directory on disk is listed (run while nothing commits
/// or retires: the daemon idle). One that is not is a snapshot the daemon
/// refuses as invalid: something a crash damaged.
pub fn disk_is_listed(
    socket: &Path,
    root: &Path,
    jobs: u32,
    violations: &mut Vec<String>,
) -> Result<(), gpusnap::Error> {
    let mut client = observer(socket)?;
    let listing = listed(&mut client, jobs)?;
    for job in 0..jobs {
        let name = state::job_name(job);
        let on_disk = match disk::committed_steps(root, &name) {
            Ok(d) => d,
            Err(e) => {
                violations.push(format!("the store cannot be read: {e}"));
                continue;
            }
        };
        for (rank, steps) in on_disk {
            let shown = listing.get(&(job, rank));
            for step in steps {
                if !shown.is_some_and(|s| s.contains(&step)) {
                    violations.push(format!(
                        "{name} rank {rank}: step-{step} is on disk but not listed (the daemon finds it invalid)"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Where a snapshot's tensors differ from what its trainer registered.
fn compare(
    seed: u64,
    job: u32,
    rank: u32,
    step: u64,
    tensors: &BTreeMap<String, Vec<u8>>,
) -> Vec<String> {
    let name = state::job_name(job);
    let specs = state::tensors(job, rank);
    let mut out = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        match tensors.get(&spec.name) {
            None => out.push(format!(
                "{name} rank {rank} step {step}: tensor {} is missing",
                spec.name
            )),
            Some(bytes) => {
                let len = state::byte_len(spec);
                if let Some(at) = state::first_difference(seed, job, rank, step, index, bytes, len)
                {
                    out.push(format!(
                        "{name} rank {rank} step {step}: tensor {} differs from what was registered at byte {at}",
                        spec.name
                    ));
                }
            }
        }
    }
    for extra in tensors
        .keys()
        .filter(|n| !specs.iter().any(|s| &s.name == *n))
    {
        out.push(format!(
            "{name} rank {rank} step {step}: holds a tensor {extra} nobody registered"
        ));
    }
    out
}

/// What the daemon reported once idle.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub waited: Duration,
}

/// Waits until only the observer is connected and staging use and
/// snapshots in flight are zero, then checks that nothing is in progress on
/// disk. A wait past `limit` ([`IDLE_WAIT`] in a campaign) or anything
/// left on disk is a violation.
pub fn wait_idle(
    socket: &Path,
    root: &Path,
    limit: Duration,
    violations: &mut Vec<String>,
) -> Result<Idle, gpusnap::Error> {
    let mut client = observer(socket)?;
    let started = Instant::now();
    loop {
        let status = client.status()?;
        let idle = status.clients_connected == 1
            && status.staging_bytes_used == 0
            && status.snapshots_in_flight == 0;
        if idle {
            break;
        }
        if started.elapsed() >= limit {
            violations.push(format!(
                "no trainer connected for {limit:?}, yet clients {} (the observer is 1), staging used {} bytes, {} snapshots in flight",
                status.clients_connected, status.staging_bytes_used, status.snapshots_in_flight
            ));
            return Ok(Idle {
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(IDLE_POLL);
    }
    let waited = started.elapsed();
    match disk::in_progress(root) {
        Ok(found) if found.is_clean() => {}
        Ok(found) => violations.push(format!(
            "the daemon is idle but the store holds work in progress: {found:?}"
        )),
        Err(e) => violations.push(format!("the store cannot be scanned: {e}")),
    }
    Ok(Idle { waited })
}

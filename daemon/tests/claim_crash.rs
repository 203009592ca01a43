//! A process SIGKILLed at every step of claiming a job on the real file
//! system, as `crash.rs` kills a writer at each commit step: after start-up
//! recovery the job is unclaimed (and anyone may claim it) or owned by the
//! claimer, never a job directory nobody may use, and no temporary claim
//! directory is left.
//!
//! The claimer is this test binary run again with `--ignored --exact
//! claim_crash_child` and the scenario in environment variables.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use gpusnapd::owners::{ClaimStep, OwnerError, Owners};
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::Store;

const ENV_ROOT: &str = "GPUSNAP_CLAIM_ROOT";
const ENV_KILL_AT: &str = "GPUSNAP_CLAIM_KILL_AT";
const CLAIMER: u32 = 1000;
const OTHER: u32 = 2000;

/// The claimer: claims job `job` for uid 1000, killed at the step named.
#[test]
#[ignore = "child process of the claim crash tests"]
fn claim_crash_child() {
    let root = std::env::var(ENV_ROOT).expect("root");
    let kill_at = std::env::var(ENV_KILL_AT)
        .ok()
        .and_then(|s| ClaimStep::ALL.into_iter().find(|c| format!("{c:?}") == s));
    let store = Store::open(config(Path::new(&root), BackendChoice::Buffered)).expect("open");
    let owners = Owners::with_stop_point(Arc::new(move |_, step| {
        if Some(step) == kill_at {
            // SAFETY: raise has no memory-safety preconditions.
            unsafe { libc::raise(libc::SIGKILL) };
        }
    }));
    owners.claim(&store, "job", CLAIMER).expect("claim");
    println!("claimed");
}

/// Runs the claimer; whether it reported the claim done.
fn run_claimer(root: &Path, kill_at: Option<ClaimStep>) -> bool {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--ignored",
        "--exact",
        "claim_crash_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ENV_ROOT, root)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(k) = kill_at {
        cmd.env(ENV_KILL_AT, format!("{k:?}"));
    }
    let out = cmd.output().expect("run claimer");
    let claimed = String::from_utf8_lossy(&out.stdout).contains("claimed");
    assert_eq!(
        out.status.success(),
        kill_at.is_none(),
        "{kill_at:?}: {}",
        out.status
    );
    claimed
}

fn claim_dir_left(root: &Path) -> bool {
    root.join(".claiming-job").exists()
}

#[test]
fn killed_at_each_step_of_a_claim_the_job_is_unclaimed_or_the_claimers() {
    for kill_at in ClaimStep::ALL.map(Some).into_iter().chain([None]) {
        let dir = scratch();
        let root = dir.path();
        let claimed = run_claimer(root, kill_at);
        assert_eq!(claimed, kill_at.is_none(), "{kill_at:?}");
        let renamed = matches!(
            kill_at,
            None | Some(ClaimStep::Renamed | ClaimStep::RootSynced)
        );
        assert_eq!(
            claim_dir_left(root),
            !renamed,
            "{kill_at:?}: the temporary directory is there until the rename"
        );
        assert_eq!(root.join("job").exists(), renamed, "{kill_at:?}");

        // Start-up: recovery removes the temporary directory.
        let store = open(root, BackendChoice::Buffered);
        assert!(!claim_dir_left(root), "{kill_at:?}: recovery removes it");
        let listing = store.list(None).expect("list");
        assert!(listing.snapshots.is_empty() && listing.invalid.is_empty());
        let owners = Owners::default();
        match owners.owner(&store, "job") {
            Ok(None) if !renamed => {
                owners
                    .claim(&store, "job", OTHER)
                    .expect("an unclaimed job is claimable by anyone");
                assert_eq!(
                    Owners::default().owner(&store, "job").expect("ask"),
                    Some(OTHER)
                );
            }
            Ok(Some(CLAIMER)) if renamed => {
                owners
                    .claim(&store, "job", CLAIMER)
                    .expect("the claimer uses its job");
                assert!(matches!(
                    owners.claim(&store, "job", OTHER),
                    Err(OwnerError::NotOwner { owner: CLAIMER, .. })
                ));
                write_memory(&store, "job", 1, &mixed_tensors(), 1).expect("and writes to it");
            }
            other => panic!("{kill_at:?}: {other:?}"),
        }
    }
}

//! A writer process SIGKILLed at random moments, and at each step of the
//! commit protocol: after recovery every listed snapshot verifies, no partial
//! one is listed or left, and every snapshot the writer reported committed is
//! there with its exact bytes.
//!
//! The writer is this test binary run again with `--ignored --exact
//! crash_child_writer` and the scenario in environment variables.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gpusnap::{Dtype, TensorSpec};
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::{CommitStep, Store};

const ENV_ROOT: &str = "GPUSNAP_CRASH_ROOT";
const ENV_KILL_AT: &str = "GPUSNAP_CRASH_KILL_AT";
const ENV_FIRST_STEP: &str = "GPUSNAP_CRASH_FIRST_STEP";

fn tensors() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("w", Dtype::F32, [1 << 20]),
        TensorSpec::new("b", Dtype::BF16, [777]),
        TensorSpec::new("step", Dtype::I64, []),
    ]
}

/// The writer: commits step after step, printing each committed step.
#[test]
#[ignore = "child process of the crash tests"]
fn crash_child_writer() {
    let root = std::env::var(ENV_ROOT).expect("root");
    let first: u64 = std::env::var(ENV_FIRST_STEP)
        .expect("first")
        .parse()
        .expect("number");
    let kill_at = std::env::var(ENV_KILL_AT)
        .ok()
        .and_then(|s| CommitStep::ALL.into_iter().find(|c| format!("{c:?}") == s));
    let mut store = Store::open(config(Path::new(&root), BackendChoice::Auto)).expect("open");
    if let Some(kill_at) = kill_at {
        store.set_stop_point(Arc::new(move |id, step| {
            if step == kill_at && id.step == first + 1 {
                // SAFETY: raise has no memory-safety preconditions.
                unsafe { libc::raise(libc::SIGKILL) };
            }
        }));
    }
    for step in first.. {
        write_memory(&store, "crash", step, &tensors(), step).expect("write");
        println!("committed {step}");
    }
}

fn spawn_writer(root: &Path, first: u64, kill_at: Option<CommitStep>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--ignored",
        "--exact",
        "crash_child_writer",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ENV_ROOT, root)
    .env(ENV_FIRST_STEP, first.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(k) = kill_at {
        cmd.env(ENV_KILL_AT, format!("{k:?}"));
    }
    cmd.spawn().expect("spawn writer")
}

/// Steps the writer reported committed.
fn committed_steps(child: &mut Child) -> Vec<u64> {
    let out = child.stdout.take().expect("stdout");
    BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        // libtest may print "test crash_child_writer ... " before the first line.
        .filter_map(|l| {
            l.split("committed ")
                .nth(1)
                .and_then(|s| s.trim().parse().ok())
        })
        .collect()
}

/// Recovery, then: nothing partial, everything listed verifies with its own
/// pattern, and every reported step that retention keeps is listed.
fn check_after_crash(root: &Path, reported: &[u64]) -> Vec<u64> {
    let store = Store::open(config(root, BackendChoice::Auto)).expect("reopen runs recovery");
    let rank_dir = root.join("crash").join("0");
    if rank_dir.exists() {
        for entry in std::fs::read_dir(&rank_dir).expect("rank dir") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            assert!(
                !name.ends_with(".partial"),
                "partial left after recovery: {name}"
            );
        }
    }
    let listing = store.list(None).expect("list");
    assert!(listing.invalid.is_empty(), "{:?}", listing.invalid);
    let listed: Vec<u64> = listing.snapshots.iter().map(|s| s.manifest.step).collect();
    for s in &listing.snapshots {
        assert!(
            store.verify(&s.dir).is_ok(),
            "step {} does not verify",
            s.manifest.step
        );
        check_pattern(&store, s, s.manifest.step).expect("exact bytes");
    }
    let keep = store.config().keep_snapshots;
    let newest_reported: Vec<u64> = reported.iter().rev().take(keep).copied().collect();
    for step in newest_reported.iter().take(1) {
        assert!(
            listed.contains(step),
            "reported step {step} lost; listed {listed:?}"
        );
    }
    listed
}

#[test]
fn killed_at_each_commit_step() {
    for kill_at in CommitStep::ALL {
        let dir = scratch();
        let mut child = spawn_writer(dir.path(), 1, Some(kill_at));
        let reported = committed_steps(&mut child);
        let status = child.wait().expect("wait");
        assert!(!status.success(), "{kill_at:?}: the writer was killed");
        assert_eq!(
            reported,
            [1],
            "{kill_at:?}: step 1 committed before the kill"
        );
        let listed = check_after_crash(dir.path(), &reported);
        // Before the rename the new snapshot does not exist; after it, it does.
        let renamed = matches!(kill_at, CommitStep::Renamed | CommitStep::Committed);
        assert_eq!(
            listed.contains(&2),
            renamed,
            "{kill_at:?}: listed {listed:?}"
        );
        assert!(
            listed.contains(&1),
            "{kill_at:?}: the previous snapshot survives"
        );
    }
}

#[test]
fn killed_at_random_moments() {
    let dir = scratch();
    let mut next_step = 1u64;
    let mut seed = 0x1234_5678_u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut kills = 0;
    while kills < 25 && Instant::now() < deadline {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let delay = Duration::from_millis(20 + (seed >> 33) % 180);
        let mut child = spawn_writer(dir.path(), next_step, None);
        std::thread::sleep(delay);
        child.kill().expect("SIGKILL");
        let reported = committed_steps(&mut child);
        child.wait().expect("wait");
        let listed = check_after_crash(dir.path(), &reported);
        next_step = listed
            .iter()
            .chain(&reported)
            .max()
            .map_or(next_step, |m| m + 1)
            .max(next_step + 1);
        kills += 1;
    }
    assert!(kills >= 5, "too few kills in the time allowed ({kills})");
}

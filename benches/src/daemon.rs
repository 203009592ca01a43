//! The real `gpusnapd` as the benchmarks drive it: the binary, a generated
//! config, start and stop through the shared launcher (crate
//! `gpusnapd-testkit`), a client, a snapshot waited on until committed, a
//! restore checked byte for byte. `e2e` and `remote` share these.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpusnap::proto::{BusyPolicy, RestoreSource};
use gpusnap::{Client, ClientConfig, RestoreInfo, SnapshotOutcome, Step};
use gpusnapd::config::{ByteSize, Config};
use gpusnapd_testkit::{DaemonProcess, Defaults, Launch, Settings};

use crate::e2e_report::{RestoreRun, SnapshotRun};
use crate::state::TrainerState;

/// The job name of the benchmarks' snapshots.
pub const JOB: &str = "bench";
/// Slack above the exact need in the staging and hot-tier budgets.
const BUDGET_SLACK_BYTES: u64 = 1 << 20;
/// Lines of the daemon's log an error carries.
const LOG_TAIL_LINES: usize = 30;

/// The `gpusnapd` binary: `--gpusnapd`, else the one beside this
/// executable (`benches/run` builds both into `target/release/`).
pub fn binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("locating gpusnap-bench: {e}"))?
            .with_file_name("gpusnapd"),
    };
    if !path.is_file() {
        return Err(format!(
            "{} is not there; build it (cargo build --release -p gpusnapd, as benches/run does) or pass --gpusnapd",
            path.display()
        ));
    }
    Ok(path)
}

/// Checks `config` as the daemon will, writes it as `dir/<name>.toml` and
/// starts the daemon on it through the shared launcher (its waits come from
/// testkit/defaults.toml; the config is all the benchmark's own).
pub fn start_daemon(
    binary: &Path,
    dir: &Path,
    name: &str,
    config: &Config,
) -> Result<DaemonProcess, String> {
    config
        .validate()
        .map_err(|e| format!("the generated daemon config is invalid: {e}"))?;
    let settings = Settings::from_config(config).map_err(|e| e.to_string())?;
    let waits = Defaults::load().map_err(|e| e.to_string())?.waits;
    Launch::new(binary, dir, settings, waits)
        .named(name)
        .start()
        .map_err(|e| e.to_string())
}

/// SIGTERM; anything but an orderly exit 0 is an error.
pub fn stop_daemon(daemon: &mut DaemonProcess) -> Result<(), String> {
    let status = daemon.stop().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!(
            "gpusnapd exited with {status} on SIGTERM; its log:\n{}",
            daemon.log_tail(LOG_TAIL_LINES)
        ));
    }
    Ok(())
}

/// The daemon's config: one staging slot and a hot tier each just above
/// the state's size, listening on `socket`, metrics on a free loopback port.
pub fn daemon_config(socket: &Path, root: &Path, size_bytes: u64) -> Result<Config, String> {
    let budget = size_bytes
        .next_multiple_of(BUDGET_SLACK_BYTES)
        .saturating_add(BUDGET_SLACK_BYTES);
    let mut config = Config::default();
    config.daemon.socket = socket.to_path_buf();
    config.daemon.log_level = "info".into();
    config.daemon.shutdown_deadline_s = 120;
    config.staging.budget_bytes = ByteSize(budget);
    config.staging.double = false;
    config.staging.policy = BusyPolicy::Block;
    config.hot_tier.budget_bytes = ByteSize(budget);
    let port = gpusnapd_testkit::free_port()
        .map_err(|e| format!("binding 127.0.0.1:0 for the metrics port: {e}"))?;
    config.metrics.listen = format!("127.0.0.1:{port}");
    config.store.root = root.to_path_buf();
    config.store.keep_snapshots = 1;
    Ok(config)
}

/// A client of job [`JOB`] on `daemon`'s socket, with long waits (a
/// multi-GiB commit or restore on a slow disk).
pub fn connect(daemon: &DaemonProcess, copy_threads: usize) -> Result<Client, String> {
    let mut config = ClientConfig::new(JOB);
    config.socket = daemon.socket().to_path_buf();
    config.copy_threads = copy_threads;
    config.connect_timeout = Duration::from_secs(30);
    config.call_timeout = Duration::from_secs(300);
    config.commit_timeout = Duration::from_secs(1200);
    Client::with_config(config).map_err(|e| with_log(&format!("connecting: {e}"), daemon))
}

/// `error` with the last lines of the daemon's log.
pub fn with_log(error: &str, daemon: &DaemonProcess) -> String {
    format!(
        "{error}\n--- gpusnapd log ({}), last lines ---\n{}",
        daemon.log_path().display(),
        daemon.log_tail(LOG_TAIL_LINES)
    )
}

/// Stamps `step`, snapshots it (the stall) and waits for its commit
/// (persist: from `snapshot` returning to `wait_committed` returning).
pub fn snapshot_and_commit(
    client: &mut Client,
    state: &TrainerState,
    step: u64,
    size_bytes: u64,
) -> Result<SnapshotRun, String> {
    state.stamp(step);
    let t = Instant::now();
    let outcome = client
        .snapshot(step)
        .map_err(|e| format!("snapshot of step {step}: {e}"))?;
    let stall_s = t.elapsed().as_secs_f64();
    let captured = match outcome {
        SnapshotOutcome::Captured(info) => info,
        SnapshotOutcome::Skipped { reason, .. } => {
            return Err(format!("step {step} was skipped: {reason}"));
        }
    };
    if captured.bytes != size_bytes {
        return Err(format!(
            "step {step}: captured {} bytes of a {size_bytes}-byte state",
            captured.bytes
        ));
    }
    let t = Instant::now();
    let commit = client
        .wait_committed(step)
        .map_err(|e| format!("commit of step {step}: {e}"))?;
    let persist_s = t.elapsed().as_secs_f64();
    Ok(SnapshotRun {
        step,
        stall_s,
        client_stall_s: captured.stall.as_secs_f64(),
        capture_s: captured.capture.as_secs_f64(),
        memcpy_s: None,
        memcpy_1thread_s: None,
        persist_s,
        persist_mb_per_s: size_bytes as f64 / 1e6 / persist_s,
        daemon_persist_s: commit.persist.as_secs_f64(),
        commit_bytes: commit.bytes,
    })
}

/// Scribbles the state, restores the latest step, checks where it came
/// from, which step it is and every byte.
pub fn restore_checked(
    client: &mut Client,
    state: &TrainerState,
    step: u64,
    expected: RestoreSource,
) -> Result<RestoreRun, String> {
    state.scribble();
    let t = Instant::now();
    let info: Option<RestoreInfo> = client
        .restore(Step::Latest)
        .map_err(|e| format!("restore: {e}"))?;
    let wall_s = t.elapsed().as_secs_f64();
    let info = info.ok_or("restore: gpusnapd has no snapshot")?;
    if info.source != expected {
        return Err(format!(
            "restore came from {:?}, not {expected:?} as this figure requires",
            info.source
        ));
    }
    if info.step != step {
        return Err(format!(
            "restore of the latest step gave step {}, not {step}",
            info.step
        ));
    }
    state.verify(step)?;
    Ok(RestoreRun {
        source: info.source.name().to_owned(),
        step,
        wall_s,
        mb_per_s: state.bytes as f64 / 1e6 / wall_s,
        daemon_fill_s: info.daemon_fill.as_secs_f64(),
        copy_s: info.copy.as_secs_f64(),
        bytes: info.bytes,
    })
}

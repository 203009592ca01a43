//! gpusnapctl: look at and check snapshots on disk.
//!
//! `list` shows what the store would offer for restore, `inspect` one
//! snapshot's manifest and tensor table, `verify` re-reads every chunk and
//! exits 0 only if every CRC matches; none of these write to the store.
//! `status` asks the running daemon (clients, jobs, staging and hot-tier
//! use, snapshots in flight); `probe` checks a node end to end through the
//! daemon: register, snapshot, commit, restore, compare. Human output by
//! default, `--json` for scripts.
//!
//! `remote` works on the S3 remote tier, reading the endpoint, bucket,
//! prefix and credentials from the daemon's config file (`--config`,
//! default /etc/gpusnap/gpusnapd.toml, its `[remote]` table); long
//! transfers show a progress bar on stderr (only on a terminal, never with
//! `--json`). Exit status 0: all well, 1: something checked is not, 2: the
//! command could not run (the message names the endpoint and bucket).
//!
//! * `remote list [--job J]`: per job and step, the ranks with a manifest,
//!   the data bytes, the `COMPLETE` marker (absent, valid, invalid), and
//!   whether the step is complete.
//! * `remote verify --job J [--step N]`: for each rank of each step (by
//!   default every step with a marker), the manifest parses and its SHA-256
//!   is the marker's, the data object has the manifest's length, and every
//!   part, read back with ranged GETs, matches the manifest's header and
//!   chunk CRCs; exit 0 only if every object is intact and every step
//!   complete, else a report per object.
//! * `remote pull --job J --rank R [--step N] --root DIR [--owner-uid U]`:
//!   downloads the rank's snapshot of a complete step (by default the
//!   newest) into the store root DIR, verified on the way, and prints its
//!   directory; refuses a snapshot already there, and a root a running
//!   daemon uses. A job directory it creates is claimed for U (default:
//!   the caller), so the daemon accepts it.
//! * `remote push [--root DIR] [--job J] [--rank R] [--step N]`: uploads
//!   local committed snapshots (by default each rank's newest; the root by
//!   default the config's `store.root`) the bucket does not have yet, then
//!   writes each step's marker if every rank is there, and says whether the
//!   step is complete.

mod remote;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpusnapd::store::{Snapshot, Store, StoreConfig, StoreError};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "gpusnapctl",
    version,
    about = "Inspect and verify gpusnap snapshots"
)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List committed snapshots (and anything named like one that is not valid).
    List {
        /// Store root.
        #[arg(long, default_value = "/var/lib/gpusnap")]
        root: PathBuf,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
    },
    /// Show one snapshot's manifest, sizes and tensor table.
    Inspect { path: PathBuf },
    /// Re-read every chunk of each snapshot; exit 0 only if all CRCs match.
    Verify {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Ask the running daemon what it is doing.
    Status {
        /// The daemon's socket (default: $GPUSNAP_SOCKET, else /run/gpusnap/gpusnapd.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Snapshot a few tensors through the daemon, wait for the commit,
    /// restore and compare; exit 0 only if the bytes come back exactly.
    Probe {
        /// The daemon's socket (default: $GPUSNAP_SOCKET, else /run/gpusnap/gpusnapd.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Job the probe's snapshots are filed under.
        #[arg(long, default_value = "gpusnap-probe")]
        job: String,
        /// Size of the probe's state in MiB.
        #[arg(long, default_value_t = 8)]
        mib: u64,
    },
    /// The S3 remote tier: list, verify, pull and push snapshots.
    Remote {
        #[command(subcommand)]
        command: remote::RemoteCommand,
    },
}

/// What can go wrong in a command.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] gpusnap::Error),
    #[error("{0}")]
    Check(String),
    #[error(transparent)]
    Remote(#[from] remote::Error),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gpusnapctl: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode, CtlError> {
    match &cli.command {
        Command::List { root, job } => Ok(list(root, job.as_deref(), cli.json)?),
        Command::Inspect { path } => Ok(inspect(path, cli.json)?),
        Command::Verify { paths } => Ok(verify(paths, cli.json)?),
        Command::Status { socket } => status(socket.as_deref(), cli.json),
        Command::Probe { socket, job, mib } => probe(socket.as_deref(), job, *mib, cli.json),
        Command::Remote { command } => Ok(remote::run(command, cli.json)?),
    }
}

fn client_config(socket: Option<&Path>, job: &str) -> gpusnap::ClientConfig {
    let mut config = gpusnap::ClientConfig::new(job);
    if let Some(s) = socket {
        config.socket = s.to_path_buf();
    }
    config.connect_timeout = std::time::Duration::from_secs(5);
    config.reconnect = false;
    config
}

fn status(socket: Option<&Path>, json: bool) -> Result<ExitCode, CtlError> {
    let mut client = gpusnap::Client::with_config(client_config(socket, "gpusnapctl"))?;
    let s = client.status()?;
    if json {
        print_json(&s);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "gpusnapd {} up {} s, I/O backend {}",
        s.daemon_version, s.uptime_s, s.io_backend
    );
    println!("clients   {}", s.clients_connected);
    println!(
        "staging   {} of {} bytes in use",
        s.staging_bytes_used, s.staging_budget_bytes
    );
    println!(
        "hot tier  {} of {} bytes",
        s.hot_tier_bytes, s.hot_tier_budget_bytes
    );
    println!(
        "in flight {} snapshot(s) captured, not yet committed",
        s.snapshots_in_flight
    );
    match &s.remote {
        None => println!("remote    off"),
        Some(r) => {
            let state = if r.reachable {
                "reachable"
            } else {
                "UNREACHABLE"
            };
            println!(
                "remote    {} bucket {}: {state}, {} upload(s), {} failed pass(es)",
                r.endpoint, r.bucket, r.uploads, r.failures
            );
            if let Some(e) = &r.last_error {
                println!("          last error: {e}");
            }
        }
    }
    println!();
    println!(
        "{:<24} {:>5} {:>7} {:>8} {:>8} {:>14} {:>11}  PINNING",
        "SESSION JOB", "RANK", "UID", "PID", "TENSORS", "STAGING", "SLOTS BUSY"
    );
    for c in &s.sessions {
        println!(
            "{:<24} {:>5} {:>7} {:>8} {:>8} {:>14} {:>6}/{}  {}",
            c.job,
            c.rank,
            c.uid,
            c.pid,
            c.tensors,
            c.staging_bytes,
            c.slots_busy,
            c.slots,
            pinning_summary(&c.staging_pinning)
        );
    }
    for c in &s.sessions {
        for report in &c.staging_pinning {
            if let gpusnap::proto::PinState::Unpinned { reason } = &report.pin {
                println!(
                    "  {} rank {}: {} staging unpinned: {reason}",
                    c.job, c.rank, report.device
                );
            }
        }
    }
    println!();
    println!(
        "{:<24} {:>7} {:>14} {:>10} {:>10}  REMOTE",
        "JOB", "UID", "LAST COMMITTED", "IN FLIGHT", "HOT STEP"
    );
    let dash = || "-".to_owned();
    for j in &s.jobs {
        println!(
            "{:<24} {:>7} {:>14} {:>10} {:>10}  {}",
            j.job,
            j.uid,
            j.last_committed_step.map_or_else(dash, |v| v.to_string()),
            j.in_flight,
            j.hot_step.map_or_else(dash, |v| v.to_string()),
            remote_summary(s.remote.as_ref(), &j.job)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A job's upload state: the oldest step its ranks have uploaded and how
/// far the slowest rank lags (`-` with the tier off).
fn remote_summary(remote: Option<&gpusnap::proto::RemoteStatus>, job: &str) -> String {
    let Some(remote) = remote else {
        return "-".to_owned();
    };
    let ranks: Vec<_> = remote.ranks.iter().filter(|r| r.job == job).collect();
    if ranks.is_empty() {
        return "nothing to upload".to_owned();
    }
    let uploaded = ranks
        .iter()
        .map(|r| r.uploaded)
        .min()
        .flatten()
        .map_or_else(|| "none".to_owned(), |s| s.to_string());
    let behind = ranks.iter().map(|r| r.behind_steps).max().unwrap_or(0);
    let behind_s = ranks.iter().map(|r| r.behind_s).max().unwrap_or(0);
    if behind == 0 {
        format!("uploaded {uploaded}, up to date")
    } else {
        format!("uploaded {uploaded}, {behind} step(s) / {behind_s} s behind")
    }
}

/// One word for what a session's devices did to its staging: `unpinned`
/// if any device could not page-lock it, `pinned (N bytes)` if one did,
/// `not needed` (host copies only), `-` before the client said (or a
/// client that never says: older than protocol version 3).
fn pinning_summary(reports: &[gpusnap::proto::AttachReport]) -> String {
    use gpusnap::proto::PinState;
    if reports.is_empty() {
        return "-".to_owned();
    }
    if reports
        .iter()
        .any(|r| matches!(r.pin, PinState::Unpinned { .. }))
    {
        return "unpinned".to_owned();
    }
    let pinned = reports
        .iter()
        .filter_map(|r| match r.pin {
            PinState::Pinned { bytes, .. } => Some(bytes),
            PinState::NotNeeded | PinState::Unpinned { .. } => None,
        })
        .max();
    match pinned {
        Some(bytes) => format!("pinned ({bytes} bytes)"),
        None => "not needed".to_owned(),
    }
}

#[derive(Serialize)]
struct ProbeOutput {
    ok: bool,
    job: String,
    step: u64,
    bytes: u64,
    stall_s: f64,
    persist_s: f64,
    restore_s: f64,
    restore_source: String,
}

fn probe(socket: Option<&Path>, job: &str, mib: u64, json: bool) -> Result<ExitCode, CtlError> {
    use gpusnap::{Dtype, HostTensor, SnapshotOutcome, Step};
    let mut client = gpusnap::Client::with_config(client_config(socket, job))?;
    let step = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let words = (mib.max(1) << 20) / 4;
    let tensors = [
        ("probe.weights", HostTensor::zeros(Dtype::F32, [words])?),
        ("probe.step", HostTensor::zeros(Dtype::I64, [])?),
        ("probe.bytes", HostTensor::zeros(Dtype::U8, [4097])?),
    ];
    // A pattern that depends on the step, so a stale snapshot cannot pass.
    let pattern = |i: usize| {
        let mixed = step
            .wrapping_mul(2_654_435_761)
            .wrapping_add((i as u64).wrapping_mul(40_503));
        mixed.to_le_bytes()[(i >> 3) % 8]
    };
    for (name, t) in &tensors {
        for (i, b) in t.write().iter_mut().enumerate() {
            *b = pattern(i);
        }
        client.register_host(*name, t)?;
    }
    let stall = match client.snapshot(step)? {
        SnapshotOutcome::Captured(c) => c.stall,
        SnapshotOutcome::Skipped { reason, .. } => {
            return Err(CtlError::Check(format!(
                "the daemon skipped the probe snapshot: {reason}"
            )));
        }
    };
    let committed = client.wait_committed(step)?;
    for (_, t) in &tensors {
        t.write().fill(0);
    }
    let restored = client.restore(Step::At(step))?.ok_or_else(|| {
        CtlError::Check(format!("step {step} was committed but cannot be restored"))
    })?;
    for (name, t) in &tensors {
        let read = t.read();
        if let Some(i) = read.iter().enumerate().position(|(i, b)| *b != pattern(i)) {
            return Err(CtlError::Check(format!(
                "tensor {name} came back different at byte {i}"
            )));
        }
    }
    let out = ProbeOutput {
        ok: true,
        job: job.to_owned(),
        step,
        bytes: committed.bytes,
        stall_s: stall.as_secs_f64(),
        persist_s: committed.persist.as_secs_f64(),
        restore_s: (restored.daemon_fill + restored.copy).as_secs_f64(),
        restore_source: restored.source.name().to_owned(),
    };
    if json {
        print_json(&out);
    } else {
        println!(
            "OK  probe of job {job} step {step}: {} bytes, stall {:.3} ms, committed in {:.3} ms, restored from {} in {:.3} ms, bytes identical",
            out.bytes,
            out.stall_s * 1e3,
            out.persist_s * 1e3,
            out.restore_source,
            out.restore_s * 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A read-only store rooted at `root` (only used to read snapshot dirs).
fn reader(root: &Path) -> Result<Store, StoreError> {
    let root = std::path::absolute(root)
        .map_err(|e| StoreError::Config(format!("{}: {e}", root.display())))?;
    Store::open_read_only(StoreConfig {
        root,
        // Chunks of any size a daemon may have used.
        io_buffer_bytes: 64 << 20,
        io_pool_bytes: 256 << 20,
        queue_depth: 4,
        ..StoreConfig::default()
    })
}

fn snapshot_dir(path: &Path) -> Result<(Store, PathBuf), StoreError> {
    let dir = std::path::absolute(path)
        .map_err(|e| StoreError::Config(format!("{}: {e}", path.display())))?;
    if !dir.is_dir() {
        return Err(StoreError::Config(format!(
            "{} is not a snapshot directory",
            dir.display()
        )));
    }
    let store = reader(dir.parent().unwrap_or(&dir))?;
    Ok((store, dir))
}

#[derive(Serialize)]
struct ListedSnapshot {
    job: String,
    rank: u32,
    world_size: u32,
    step: u64,
    path: PathBuf,
    bytes: u64,
    tensors: usize,
    created_unix_ms: u64,
    io_backend: String,
}

#[derive(Serialize)]
struct ListedInvalid {
    path: PathBuf,
    error: String,
}

#[derive(Serialize)]
struct ListOutput {
    snapshots: Vec<ListedSnapshot>,
    complete_steps: std::collections::BTreeMap<String, Vec<u64>>,
    invalid: Vec<ListedInvalid>,
}

fn listed(s: &Snapshot) -> ListedSnapshot {
    let m = &s.manifest;
    ListedSnapshot {
        job: m.job.clone(),
        rank: m.rank,
        world_size: m.world_size,
        step: m.step,
        path: s.dir.clone(),
        bytes: m.file_len,
        tensors: m.tensors.len(),
        created_unix_ms: m.created_unix_ms,
        io_backend: m.io_backend.to_string(),
    }
}

fn list(root: &Path, job: Option<&str>, json: bool) -> Result<ExitCode, StoreError> {
    if !root.is_dir() {
        return Err(StoreError::Config(format!(
            "store root {} is not a directory",
            root.display()
        )));
    }
    let store = reader(root)?;
    let listing = store.list(job)?;
    let mut jobs: Vec<String> = listing
        .snapshots
        .iter()
        .map(|s| s.manifest.job.clone())
        .collect();
    jobs.dedup();
    let out = ListOutput {
        snapshots: listing.snapshots.iter().map(listed).collect(),
        complete_steps: jobs
            .iter()
            .map(|j| (j.clone(), listing.complete_steps(j)))
            .collect(),
        invalid: listing
            .invalid
            .iter()
            .map(|i| ListedInvalid {
                path: i.dir.clone(),
                error: i.error.to_string(),
            })
            .collect(),
    };
    if json {
        print_json(&out);
    } else {
        println!(
            "{:<24} {:>5} {:>10} {:>14} {:>8}  {:<9} PATH",
            "JOB", "RANK", "STEP", "BYTES", "TENSORS", "BACKEND"
        );
        for s in &out.snapshots {
            println!(
                "{:<24} {:>5} {:>10} {:>14} {:>8}  {:<9} {}",
                s.job,
                s.rank,
                s.step,
                s.bytes,
                s.tensors,
                s.io_backend,
                s.path.display()
            );
        }
        for (job, steps) in &out.complete_steps {
            println!("job {job}: steps complete on every rank: {steps:?}");
        }
        for i in &out.invalid {
            println!("NOT A SNAPSHOT {}: {}", i.path.display(), i.error);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(path: &Path, json: bool) -> Result<ExitCode, StoreError> {
    let (store, dir) = snapshot_dir(path)?;
    let snapshot = store.open_dir(&dir, None)?;
    let m = &snapshot.manifest;
    if json {
        print_json(m);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "snapshot    {}/{}/step-{} (world size {})",
        m.job, m.rank, m.step, m.world_size
    );
    println!("path        {}", snapshot.dir.display());
    println!("format      {} v{}", m.format, m.format_version);
    println!("created     {} ms since the epoch", m.created_unix_ms);
    println!("backend     {}", m.io_backend);
    println!(
        "file        {} ({} bytes: header {} + data {})",
        m.data_file, m.file_len, m.header_len, m.data_len
    );
    println!(
        "chunks      {} of {} bytes, CRC32 each",
        m.chunk_crc32.len(),
        m.chunk_bytes
    );
    println!("tensors     {}", m.tensors.len());
    println!(
        "{:<48} {:<8} {:<24} {:>14} {:>14}",
        "NAME", "DTYPE", "SHAPE", "OFFSET", "BYTES"
    );
    for t in &m.tensors {
        println!(
            "{:<48} {:<8} {:<24} {:>14} {:>14}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            t.offset,
            t.len
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct VerifyOutput {
    path: PathBuf,
    ok: bool,
    chunks_checked: u64,
    problems: Vec<String>,
}

fn verify(paths: &[PathBuf], json: bool) -> Result<ExitCode, StoreError> {
    let mut all_ok = true;
    let mut outputs = Vec::new();
    for path in paths {
        let (store, dir) = snapshot_dir(path)?;
        let report = store.verify(&dir);
        all_ok &= report.is_ok();
        let out = VerifyOutput {
            path: dir,
            ok: report.is_ok(),
            chunks_checked: report.chunks_checked,
            problems: report.problems.iter().map(ToString::to_string).collect(),
        };
        // The problems go to stderr too (stdout is the report, or JSON),
        // so a caller that shows only errors still sees what is wrong.
        for p in &out.problems {
            eprintln!("gpusnapctl: verify {}: {p}", out.path.display());
        }
        if !json {
            if out.ok {
                println!(
                    "OK       {} ({} chunks)",
                    out.path.display(),
                    out.chunks_checked
                );
            } else {
                println!("CORRUPT  {}", out.path.display());
                for p in &out.problems {
                    println!("  {p}");
                }
            }
        }
        outputs.push(out);
    }
    if json {
        print_json(&outputs);
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("gpusnapctl: cannot print JSON: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use gpusnap::proto::{AttachReport, PinState};

    use super::{pinning_summary, remote_summary};

    #[test]
    fn the_remote_column_says_the_slowest_ranks_lag() {
        use gpusnap::proto::{RemoteRankStatus, RemoteStatus};
        assert_eq!(remote_summary(None, "j"), "-");
        let rank = |rank, uploaded, behind_steps, behind_s| RemoteRankStatus {
            job: "j".into(),
            rank,
            uploaded,
            behind_steps,
            behind_s,
        };
        let mut remote = RemoteStatus {
            endpoint: "http://s3".into(),
            bucket: "b".into(),
            reachable: true,
            last_error: None,
            uploads: 3,
            failures: 0,
            ranks: vec![rank(0, Some(20), 0, 0), rank(1, Some(10), 2, 40)],
        };
        assert_eq!(
            remote_summary(Some(&remote), "j"),
            "uploaded 10, 2 step(s) / 40 s behind"
        );
        assert_eq!(remote_summary(Some(&remote), "other"), "nothing to upload");
        remote.ranks = vec![rank(0, Some(20), 0, 0)];
        assert_eq!(
            remote_summary(Some(&remote), "j"),
            "uploaded 20, up to date"
        );
        remote.ranks = vec![rank(0, None, 1, 5)];
        assert_eq!(
            remote_summary(Some(&remote), "j"),
            "uploaded none, 1 step(s) / 5 s behind"
        );
    }

    #[test]
    fn the_pinning_column_says_unpinned_over_pinned_over_not_needed() {
        let host = AttachReport::new("host", PinState::NotNeeded);
        let pinned = AttachReport::new(
            "cuda:0",
            PinState::Pinned {
                bytes: 8192,
                pin_ns: 1,
            },
        );
        let unpinned = AttachReport::new(
            "cuda:1",
            PinState::Unpinned {
                reason: "refused".into(),
            },
        );
        assert_eq!(pinning_summary(&[]), "-");
        assert_eq!(pinning_summary(std::slice::from_ref(&host)), "not needed");
        assert_eq!(
            pinning_summary(&[host.clone(), pinned.clone()]),
            "pinned (8192 bytes)"
        );
        assert_eq!(pinning_summary(&[host, pinned, unpinned]), "unpinned");
    }
}

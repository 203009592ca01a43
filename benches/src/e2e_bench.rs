//! `gpusnap-bench e2e`: a trainer's snapshots, commits and restores through
//! the real `gpusnapd` (host backend), each figure beside its peer in the
//! same run (see benches/README.md).
//!
//! Order (each peer runs next to the figure it is compared with):
//!
//! ```text
//! fill the state (untimed); map and fault the memcpy destination
//! drop cache, fio write (its file stays for the read)
//! start gpusnapd #1 (hot tier on); connect, register
//! for step in 1..=N:
//!     memcpy peer (client's copy threads), memcpy peer (one thread)
//!     stamp step into the state (untimed)
//!     snapshot(step)        -> stall
//!     wait_committed(step)  -> persist (captured to committed)
//!     [after step 1 and after the loop: scrape /metrics]
//! free the memcpy destination
//! drop cache, naive: write(2) every tensor into one file, fsync  -> naive stall
//! 3 x: scribble the state, restore(latest) from the hot tier, verify
//! SIGTERM gpusnapd #1
//! drop cache, fio read; remove fio's file
//! start gpusnapd #2 on the same root (hot tier off); connect, register
//! scribble, drop cache, restore(latest) from disk, verify
//! again, the staging slot now faulted in (hot tier off: disk again)
//! 2 more snapshots on #2: persist with no hot-tier copy
//! SIGTERM gpusnapd #2
//! [unless --no-fio-sweep] the fio sweep (fio_sweep.rs): 6 settings, each
//!     drop cache, write, drop cache, read
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gpusnap::ClientConfig;
use gpusnap::proto::RestoreSource;
use gpusnap_proto::convert::{to_u64, to_usize};
use gpusnapd::config::ByteSize;
use gpusnapd_testkit::{DaemonProcess, SocketPath};

use crate::daemon::{
    JOB, binary, connect, daemon_config, restore_checked, snapshot_and_commit, start_daemon,
    stop_daemon, with_log,
};
use crate::e2e_report::{DaemonSums, E2eReport, NaiveRun, SnapshotRun, Targets};
use crate::fio::{self, Direction, Setting};
use crate::fio_sweep;
use crate::mapping::DataMapping;
use crate::state::TrainerState;
use crate::sys;
use crate::units::human_bytes;
use crate::workdir::{CacheDropper, WorkDir};

/// Restores from the hot tier, each after a scribble.
const MEMORY_RESTORES: usize = 3;
/// Snapshots on the restarted daemon (hot tier off), at most.
const NO_HOT_SNAPSHOTS_MAX: usize = 2;
/// Memory the run needs besides four copies of the state.
const MEMORY_MARGIN_BYTES: u64 = 1 << 30;

/// What `e2e` was asked to do.
#[derive(Debug, Clone)]
pub struct E2eBench {
    pub size_bytes: u64,
    pub snapshots: usize,
    pub keep: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub gpusnapd: Option<PathBuf>,
    /// fio's `--iodepth` at the single setting (1 MiB blocks).
    pub fio_iodepth: usize,
    /// Whether to run the fio sweep (the disk's limit) at the end.
    pub fio_sweep: bool,
    /// Skip the check that four copies of the state fit in MemAvailable.
    pub ignore_memory: bool,
}

/// Runs the benchmark. Any failure of gpusnap (a snapshot not captured, a
/// commit or restore failing, restored bytes that differ) is an `Err`;
/// a failed fio run is recorded in the report's `errors`.
pub fn run(args: &E2eBench) -> Result<E2eReport, String> {
    if args.snapshots == 0 {
        return Err("--snapshots must be at least 1".into());
    }
    let fio_version = fio::version()?;
    let binary = binary(args.gpusnapd.as_deref())?;
    let size_usize = to_usize(args.size_bytes);
    check_memory(args.size_bytes, args.ignore_memory)?;
    let work = WorkDir::choose(args.keep.as_deref(), args.dir.as_deref())?;
    let root = work.path.join("store");
    crate::workdir::refuse_existing(&root)?;

    let (specs, _) = crate::tensors::planned_tensor_set(args.size_bytes)?;
    eprintln!(
        "e2e bench: {} in {} tensors, host backend, in {}",
        human_bytes(args.size_bytes),
        specs.len(),
        work.path.display()
    );
    let started = Instant::now();
    let state = TrainerState::new(specs)?;
    assert_eq!(state.bytes, args.size_bytes, "the state is --size bytes");
    state.fill(0);
    let mut memcpy_dst = DataMapping::filled(size_usize)
        .map_err(|e| format!("mmap of the memcpy destination ({size_usize} bytes): {e}"))?;
    eprintln!(
        "state filled and memcpy destination faulted in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let cache = CacheDropper::new();
    // Both daemons listen here; a directory made under /tmp for it (a deep
    // --dir) goes when the run ends.
    let socket = SocketPath::in_dir(&work.path)
        .map_err(|e| format!("a socket path for {}: {e}", work.path.display()))?;
    let config = daemon_config(socket.path(), &root, args.size_bytes)?;
    let mut restart_config = config.clone();
    restart_config.hot_tier.budget_bytes = ByteSize(0);
    let copy_threads = ClientConfig::new(JOB).copy_threads;

    let mut report = E2eReport::new(args, &work.path, &binary, fio_version, &cache);
    report.tensors = state.tensors.len();
    report.client_copy_threads = copy_threads;
    report.memcpy_threads = copy_threads;
    report.config = serde_json::to_value(&config).map_err(|e| e.to_string())?;
    report.config_restart = serde_json::to_value(&restart_config).map_err(|e| e.to_string())?;

    // The peer of persist: the disk streaming the same bytes, O_DIRECT.
    cache.drop_cache();
    match fio::run(
        &work.path,
        Direction::Write,
        args.size_bytes,
        Setting::mib_blocks(args.fio_iodepth),
    ) {
        Ok(r) => {
            eprintln!("fio write: {:.1} MB/s", r.mb_per_s());
            report.fio_write = Some(r);
        }
        Err(e) => report.errors.push(format!("fio write: {e}")),
    }

    // ---- gpusnapd #1: snapshots, naive baseline, restores from memory ----
    let mut daemon = start_daemon(&binary, &work.path, "gpusnapd", &config)?;
    let mut client = connect(&daemon, copy_threads)?;
    state.register(&mut client)?;
    let t = Instant::now();
    let staging = client
        .sync_registration()
        .map_err(|e| format!("registering with gpusnapd: {e}"))?;
    report.register_s = t.elapsed().as_secs_f64();
    report.staging_slots = staging.slots;
    if staging.slots != 1 {
        return Err(format!(
            "staging has {} slots; the config asked for one",
            staging.slots
        ));
    }
    let status = client
        .status()
        .map_err(|e| format!("gpusnapd status: {e}"))?;
    report.io_backend = status.io_backend;
    eprintln!(
        "gpusnapd #1 up (store I/O backend {}), registered in {:.2} s",
        report.io_backend, report.register_s
    );

    let mut after_first = None;
    let last_step = to_u64(args.snapshots);
    for step in 1..=last_step {
        let t = Instant::now();
        state.memcpy_into(memcpy_dst.as_mut_slice(), copy_threads);
        let memcpy_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        state.memcpy_into(memcpy_dst.as_mut_slice(), 1);
        let memcpy_1thread_s = t.elapsed().as_secs_f64();
        let run = snapshot_and_commit(&mut client, &state, step, args.size_bytes)
            .map_err(|e| with_log(&e, &daemon))?;
        let run = SnapshotRun {
            memcpy_s: Some(memcpy_s),
            memcpy_1thread_s: Some(memcpy_1thread_s),
            ..run
        };
        eprintln!(
            "step {step}: stall {:.3} s (memcpy {:.3} s, one thread {:.3} s), persist {:.2} s = {:.1} MB/s",
            run.stall_s, memcpy_s, memcpy_1thread_s, run.persist_s, run.persist_mb_per_s
        );
        report.snapshots.push(run);
        if step == 1 {
            after_first = scrape(&daemon, &mut report);
        }
    }
    if let Some(all) = scrape(&daemon, &mut report) {
        (report.daemon_stall_mean_s, report.daemon_persist_mean_s) =
            all.means_since(&DaemonSums::default());
        if let Some(first) = after_first
            && args.snapshots > 1
        {
            (
                report.daemon_stall_mean_after_first_s,
                report.daemon_persist_mean_after_first_s,
            ) = all.means_since(&first);
        }
    }
    drop(memcpy_dst);

    cache.drop_cache();
    let naive = naive_write(&state, &work.path)?;
    eprintln!(
        "naive write + fsync: {:.2} s (write {:.2} s, fsync {:.2} s)",
        naive.total_s, naive.write_s, naive.fsync_s
    );
    report.naive = Some(naive);
    cache.drop_cache();

    for _ in 0..MEMORY_RESTORES {
        let run = restore_checked(&mut client, &state, last_step, RestoreSource::Memory)
            .map_err(|e| with_log(&e, &daemon))?;
        eprintln!(
            "restore from memory: {:.3} s (daemon fill {:.3} s, copy {:.3} s), verified",
            run.wall_s, run.daemon_fill_s, run.copy_s
        );
        report.restores_memory.push(run);
    }
    drop(client);
    stop_daemon(&mut daemon)?;
    drop(daemon);

    // ---- the disk: fio read, then gpusnapd #2 restoring from it ----
    cache.drop_cache();
    if report.fio_write.is_some() {
        match fio::run(
            &work.path,
            Direction::Read,
            args.size_bytes,
            Setting::mib_blocks(args.fio_iodepth),
        ) {
            Ok(r) => {
                eprintln!("fio read: {:.1} MB/s", r.mb_per_s());
                report.fio_read = Some(r);
            }
            Err(e) => report.errors.push(format!("fio read: {e}")),
        }
    }
    if let Err(e) = fio::remove_file(&work.path) {
        report.errors.push(format!("removing fio's file: {e}"));
    }

    let mut daemon = start_daemon(&binary, &work.path, "gpusnapd-restart", &restart_config)?;
    let mut client = connect(&daemon, copy_threads)?;
    state.register(&mut client)?;
    client
        .sync_registration()
        .map_err(|e| format!("registering with the restarted gpusnapd: {e}"))?;
    cache.drop_cache();
    let run = restore_checked(&mut client, &state, last_step, RestoreSource::Disk)
        .map_err(|e| with_log(&e, &daemon))?;
    eprintln!(
        "restore from disk after a restart: {:.3} s = {:.1} MB/s (daemon fill {:.3} s, copy {:.3} s), verified",
        run.wall_s, run.mb_per_s, run.daemon_fill_s, run.copy_s
    );
    report.restore_disk = Some(run);
    cache.drop_cache();
    let run = restore_checked(&mut client, &state, last_step, RestoreSource::Disk)
        .map_err(|e| with_log(&e, &daemon))?;
    eprintln!(
        "restore from disk again (staging slot faulted in): {:.3} s = {:.1} MB/s (daemon fill {:.3} s, copy {:.3} s), verified",
        run.wall_s, run.mb_per_s, run.daemon_fill_s, run.copy_s
    );
    report.restore_disk_warm = Some(run);

    let no_hot = to_u64(args.snapshots.min(NO_HOT_SNAPSHOTS_MAX));
    for step in last_step + 1..=last_step + no_hot {
        let run = snapshot_and_commit(&mut client, &state, step, args.size_bytes)
            .map_err(|e| with_log(&e, &daemon))?;
        eprintln!(
            "step {step} (hot tier off): stall {:.3} s, persist {:.2} s = {:.1} MB/s",
            run.stall_s, run.persist_s, run.persist_mb_per_s
        );
        report.snapshots_no_hot.push(run);
    }
    drop(client);
    stop_daemon(&mut daemon)?;
    drop(daemon);

    if args.fio_sweep {
        // The store is left as it is (keep_snapshots = 1: one snapshot);
        // the sweep needs room for one more --size file beside it.
        eprintln!(
            "fio sweep: {} settings, write and read",
            fio_sweep::SETTINGS.len()
        );
        let sweep = fio_sweep::run(&work.path, args.size_bytes, &cache);
        report.sweep = sweep.summary();
        eprintln!("{}", report.sweep.best_line());
        report.errors.extend(sweep.errors);
    }

    report.summarize(&Targets::default());
    Ok(report)
}

/// Refuses a size whose four copies (the state, the memcpy destination,
/// one staging slot, the hot tier) do not fit in MemAvailable.
fn check_memory(size_bytes: u64, ignore: bool) -> Result<(), String> {
    let need = size_bytes
        .saturating_mul(4)
        .saturating_add(MEMORY_MARGIN_BYTES);
    let Some(available) = sys::mem_available_bytes() else {
        eprintln!("warning: cannot read MemAvailable; not checking that the run fits");
        return Ok(());
    };
    if need > available && !ignore {
        return Err(format!(
            "the run holds four copies of the state (trainer, memcpy peer, one staging slot, \
             hot tier): {} plus a {} margin, but only {} is available; pass a smaller --size \
             (at most {}) or --ignore-memory",
            human_bytes(size_bytes.saturating_mul(4)),
            human_bytes(MEMORY_MARGIN_BYTES),
            human_bytes(available),
            human_bytes(available.saturating_sub(MEMORY_MARGIN_BYTES) / 4 / (1 << 20) * (1 << 20)),
        ));
    }
    Ok(())
}

/// The daemon's stall and persist histogram sums for the job; a failed
/// scrape is recorded in `errors`.
fn scrape(daemon: &DaemonProcess, report: &mut E2eReport) -> Option<DaemonSums> {
    let sums = daemon
        .metrics()
        .map_err(|e| e.to_string())
        .and_then(|body| DaemonSums::parse(&body, JOB));
    match sums {
        Ok(Some(sums)) => Some(sums),
        Ok(None) => {
            report.errors.push(format!(
                "/metrics has no gpusnap_stall_seconds or gpusnap_persist_seconds for job {JOB:?}"
            ));
            None
        }
        Err(e) => {
            report.errors.push(format!("scraping /metrics: {e}"));
            None
        }
    }
}

/// The naive baseline: the trainer writes every tensor into one file with
/// buffered `write(2)` and waits for `fsync` (a `torch.save` to local disk,
/// without the serialization).
fn naive_write(state: &TrainerState, dir: &Path) -> Result<NaiveRun, String> {
    let path = dir.join("naive-state.bin");
    let t = Instant::now();
    let mut file =
        std::fs::File::create(&path).map_err(|e| format!("naive: {}: {e}", path.display()))?;
    for (spec, tensor) in &state.tensors {
        file.write_all(&tensor.read())
            .map_err(|e| format!("naive: writing {:?}: {e}", spec.name))?;
    }
    let write_s = t.elapsed().as_secs_f64();
    file.sync_all()
        .map_err(|e| format!("naive: fsync {}: {e}", path.display()))?;
    drop(file);
    let total_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path).map_err(|e| format!("naive: removing {}: {e}", path.display()))?;
    Ok(NaiveRun {
        write_s,
        fsync_s: total_s - write_s,
        total_s,
        mb_per_s: state.bytes as f64 / 1e6 / total_s,
    })
}

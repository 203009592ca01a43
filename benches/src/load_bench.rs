//! `gpusnap-bench load`: many trainers at once against the real `gpusnapd`,
//! one daemon per staging policy (`block`, `skip`, `stream`: the policy is
//! the daemon's, so each policy needs a daemon of its own), half of each
//! daemon's trainers on the host copy device and half on CUDA (a GPU, or
//! the CUDA driver double). Each trainer is a process of its own
//! (`load_trainer`), so the CUDA half gets the double's `libcuda.so` on its
//! `LD_LIBRARY_PATH` and a stuck trainer cannot stall the others.
//!
//! Order:
//!
//! ```text
//! memcpy peer: one thread, each trainer size, best of 3 (nothing else runs)
//! start the 3 daemons (one slot per trainer, a hot tier that evicts)
//! sample each daemon's VmRSS every 100 ms (until the daemons stop)
//! start every trainer; wait until all registered
//! "go <ms>" to all; the watchdog checks every trainer's pending request
//! wait for every trainer's end (its commits awaited, its newest restored
//! and checked byte for byte)
//! scrape /metrics (streamed, outcomes), read VmHWM, SIGTERM the daemons
//! re-read every snapshot left on disk, every chunk's CRC32 checked
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpusnap::proto::BusyPolicy;
use gpusnapd::config::ByteSize;
use gpusnapd::store::{Store, StoreConfig};
use gpusnapd_testkit::{DaemonProcess, SocketPath};

use crate::daemon::{binary, daemon_config, start_daemon, stop_daemon};
use crate::load_events::Event;
use crate::load_plan::{self, Budgets, LoadDevice, POLICIES, TrainerPlan};
use crate::load_report::{LoadReport, TrainerRecord, VerifyRow, daemon_row};
use crate::load_watch::{Pending, RssSampler, overdue, status_bytes};
use crate::sys;
use crate::units::human_bytes;
use crate::workdir::WorkDir;

/// The smoke run's snapshot loop.
pub const SMOKE_DURATION: Duration = Duration::from_secs(3);
/// The smoke run's interval between snapshots: none, so each trainer's
/// one slot is still persisting when its next snapshot comes and every
/// policy acts even with the smoke run's small states.
pub const SMOKE_INTERVAL: Duration = Duration::ZERO;
/// How long every trainer together may take to register.
const REGISTER_WAIT: Duration = Duration::from_secs(180);
/// How long after the loop every trainer may take to finish (its commits
/// awaited, its restore checked); the watchdog bounds each request anyway.
const DRAIN_WAIT: Duration = Duration::from_secs(600);
/// How often the watchdog and the main loop look.
const POLL: Duration = Duration::from_millis(100);
/// Lines of a trainer's log an error carries.
const LOG_TAIL_LINES: usize = 20;

/// What `load` was asked to do.
#[derive(Debug, Clone)]
pub struct LoadBench {
    pub smoke: bool,
    pub duration: Duration,
    pub interval: Duration,
    pub watchdog: Duration,
    pub dir: Option<PathBuf>,
    pub gpusnapd: Option<PathBuf>,
    /// Prepended to the CUDA trainers' `LD_LIBRARY_PATH` (the driver
    /// double's directory); `None`: the system's driver.
    pub cuda_library_dir: Option<PathBuf>,
}

/// What the harness knows of one trainer while it runs.
#[derive(Debug)]
struct Live {
    record: TrainerRecord,
    pending: Option<Pending>,
    registered: bool,
    /// Its stdout ended (it exited, or closed it).
    ended: bool,
    failed: Option<String>,
}

type Shared = Arc<Mutex<Live>>;

fn lock(live: &Shared) -> std::sync::MutexGuard<'_, Live> {
    // A reader thread that panicked leaves the data as it was: still the
    // best account of the trainer.
    live.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The trainer processes; killed and reaped on drop, so no early return
/// leaves one running.
struct Trainers {
    children: Vec<Child>,
}

impl Trainers {
    fn kill_all(&mut self) {
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Trainers {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The daemons, one per policy, and where each lives.
struct Daemons {
    running: Vec<(BusyPolicy, DaemonProcess, Budgets, PathBuf)>,
    /// Their sockets' paths (a directory made under /tmp for a deep `--dir`
    /// goes when these drop, after the daemons).
    _sockets: Vec<SocketPath>,
}

/// Runs the benchmark; a failure of gpusnap (a stalled request, a failed
/// commit, a trainer that failed, a daemon over its memory limit, a
/// snapshot that does not verify) is in the report's `errors`, and one
/// that stops the run early is an `Err`.
pub fn run(args: &LoadBench) -> Result<LoadReport, String> {
    let binary = binary(args.gpusnapd.as_deref())?;
    let me = std::env::current_exe().map_err(|e| format!("locating gpusnap-bench: {e}"))?;
    let work = WorkDir::choose(None, args.dir.as_deref())?;
    let plans = load_plan::trainers(args.smoke);
    let total: u64 = plans.iter().map(|p| p.size_bytes).sum();
    eprintln!(
        "load bench: {} trainers, {} of state, {} s loop, in {}",
        plans.len(),
        human_bytes(total),
        args.duration.as_secs_f64(),
        work.path.display()
    );

    let memcpy_s = memcpy_peer(&plans);
    let mut daemons = start_daemons(&binary, &work.path, &plans)?;
    let pids: Vec<u32> = daemons
        .running
        .iter()
        .map(|(_, d, _, _)| d.pid().ok_or("a daemon has no pid"))
        .collect::<Result<_, _>>()?;
    let sampler = RssSampler::start(pids.clone());

    let lives: Vec<Shared> = plans
        .iter()
        .map(|&plan| {
            Arc::new(Mutex::new(Live {
                record: TrainerRecord {
                    plan,
                    slots: None,
                    pinned: None,
                    stalls_s: Vec::new(),
                    skipped: 0,
                    summary: None,
                },
                pending: None,
                registered: false,
                ended: false,
                failed: None,
            }))
        })
        .collect();
    let mut trainers = Trainers {
        children: Vec::new(),
    };
    let mut stdins = Vec::new();
    for (plan, live) in plans.iter().zip(&lives) {
        let socket = daemons
            .running
            .iter()
            .find(|(p, ..)| *p == plan.policy)
            .map(|(_, d, ..)| d.socket().to_path_buf())
            .ok_or("no daemon for a trainer's policy")?;
        let (child, stdin) = spawn_trainer(&me, &work.path, plan, &socket, plans.len(), args)?;
        let stdout = trainers_stdout(child, &mut trainers)?;
        stdins.push(stdin);
        let live = Arc::clone(live);
        std::thread::spawn(move || read_events(stdout, &live));
    }

    let mut errors = Vec::new();
    let registered = wait_until(REGISTER_WAIT, &lives, |l| l.registered, &|| false);
    if let Some(e) = first_failure(&lives, &work.path) {
        return Err(format!("before the start: {e}"));
    }
    if !registered {
        return Err(format!(
            "not every trainer registered within {} s",
            REGISTER_WAIT.as_secs()
        ));
    }
    eprintln!("all {} trainers registered; go", plans.len());
    let go = format!("go {}\n", args.duration.as_millis());
    for stdin in &mut stdins {
        stdin
            .write_all(go.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("starting a trainer: {e}"))?;
    }

    let watchdog = Watchdog::start(lives.clone(), args.watchdog);
    let bound = args.duration + DRAIN_WAIT;
    let done = wait_until(
        bound,
        &lives,
        |l| l.ended || l.record.summary.is_some(),
        &|| watchdog.tripped(),
    );
    let stalled = watchdog.finish();
    let any_failed = lives.iter().any(|l| lock(l).failed.is_some());
    if let Some(s) = &stalled {
        eprintln!("{s}");
        errors.push(s.clone());
    } else if !done && !any_failed {
        errors.push(format!(
            "not every trainer finished within {} s of the start",
            bound.as_secs()
        ));
        trainers.kill_all();
    }
    trainers.kill_all();
    for live in &lives {
        let l = lock(live);
        if let Some(e) = &l.failed {
            errors.push(format!(
                "{}: {e}\n{}",
                l.record.plan.label(),
                log_tail(&work.path, l.record.plan.id)
            ));
        } else if l.record.summary.is_none() && stalled.is_none() {
            errors.push(format!(
                "{} ended without its report\n{}",
                l.record.plan.label(),
                log_tail(&work.path, l.record.plan.id)
            ));
        }
    }

    // The daemons' own account, their peak memory, then an orderly stop.
    let mut streamed = BTreeMap::new();
    let mut outcomes = Vec::new();
    let mut hwm = Vec::new();
    for ((policy, daemon, _, _), pid) in daemons.running.iter().zip(&pids) {
        let (s, o) = scrape(daemon, *policy, &mut errors);
        streamed.extend(s);
        outcomes.push(o);
        hwm.push(status_bytes(*pid, "VmHWM"));
    }
    for (policy, daemon, _, _) in &mut daemons.running {
        if let Err(e) = stop_daemon(daemon) {
            errors.push(format!("the {} daemon: {e}", policy.name()));
        }
    }
    let rss = sampler.finish();

    let records: Vec<TrainerRecord> = lives.iter().map(|l| lock(l).record.clone()).collect();
    let mut report = LoadReport {
        benchmark: "load",
        smoke: args.smoke,
        caveat: caveat(args),
        trainers: 0,
        state_bytes: 0,
        duration_s: args.duration.as_secs_f64(),
        interval_s: args.interval.as_secs_f64(),
        watchdog_s: args.watchdog.as_secs_f64(),
        snapshots_per_s: 0.0,
        snapshots: 0,
        skipped: 0,
        streamed: None,
        stall_p50_s: None,
        stall_p99_s: None,
        groups: Vec::new(),
        sizes: Vec::new(),
        daemons: Vec::new(),
        verify: VerifyRow::default(),
        keep_snapshots: load_plan::KEEP_SNAPSHOTS,
        cuda_library_dir: args
            .cuda_library_dir
            .as_ref()
            .map(|d| d.display().to_string()),
        records,
        date: sys::utc_now(),
        host: sys::host(),
        kernel: sys::kernel(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        dir: work.path.display().to_string(),
        errors: Vec::new(),
    };
    for (i, (policy, _, budgets, _)) in daemons.running.iter().enumerate() {
        let row = daemon_row(
            policy.name(),
            plans.iter().filter(|p| p.policy == *policy).count(),
            *budgets,
            rss.get(i).copied().unwrap_or_default(),
            hwm.get(i).copied().flatten(),
            outcomes.get(i).cloned().unwrap_or_default(),
        );
        if !row.within_limit {
            errors.push(format!(
                "the {} daemon's resident memory (max sampled {}, peak {}) is over its limit {} \
                 (or was never sampled)",
                row.policy,
                human_bytes(row.rss_max_sampled_bytes),
                row.vm_hwm_bytes.map_or_else(|| "-".to_owned(), human_bytes),
                human_bytes(row.rss_limit_bytes)
            ));
        }
        report.daemons.push(row);
    }
    report.verify = verify(&daemons, &report.records, &report.daemons);
    errors.extend(report.verify.problems.iter().cloned());
    report.summarize(&memcpy_s, &streamed);
    errors.extend(unexercised(&report));
    report.errors = errors;
    Ok(report)
}

/// An error for each busy policy that never acted: staging is one slot per
/// trainer so that `skip` skips and `stream` streams; a run where either
/// never happened did not measure them.
fn unexercised(report: &LoadReport) -> Vec<String> {
    let sum = |policy: &str, f: &dyn Fn(&crate::load_report::GroupRow) -> u64| {
        report
            .groups
            .iter()
            .filter(|g| g.policy == policy)
            .map(f)
            .sum::<u64>()
    };
    let mut errors = Vec::new();
    if sum("skip", &|g| g.skipped) == 0 {
        errors.push("the skip daemon never skipped: its policy was not exercised".to_owned());
    }
    if sum("stream", &|g| g.streamed.unwrap_or(0)) == 0 {
        errors.push("the stream daemon never streamed: its policy was not exercised".to_owned());
    }
    errors
}

fn caveat(args: &LoadBench) -> Option<String> {
    let double = args
        .cuda_library_dir
        .as_ref()
        .is_some_and(|d| d.display().to_string().contains("cuda-double"));
    match (args.smoke, double) {
        (true, _) => Some("smoke run: a few small trainers for a few seconds".into()),
        (false, true) => Some(
            "the CUDA trainers ran on the CUDA driver double (host memory): their copies are \
             memcpys, not PCIe transfers"
                .into(),
        ),
        (false, false) => None,
    }
}

/// One thread's memcpy of each trainer size, best of 3, between two
/// pre-faulted buffers: the peer of a trainer's stall (its copy device
/// copies with one thread too).
fn memcpy_peer(plans: &[TrainerPlan]) -> BTreeMap<u64, f64> {
    let mut sizes: Vec<u64> = plans.iter().map(|p| p.size_bytes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
        .into_iter()
        .map(|size| {
            let len = gpusnap_proto::convert::to_usize(size);
            let src = vec![0x5Au8; len];
            let mut dst = vec![1u8; len];
            let best = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    dst.copy_from_slice(std::hint::black_box(&src));
                    std::hint::black_box(&mut dst);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            (size, best)
        })
        .collect()
}

/// One daemon per policy, each on its own directory, socket and store.
fn start_daemons(binary: &Path, dir: &Path, plans: &[TrainerPlan]) -> Result<Daemons, String> {
    let mut running = Vec::new();
    let mut sockets = Vec::new();
    for policy in POLICIES {
        let budgets = Budgets::for_daemon(policy, plans);
        let here = dir.join(policy.name());
        std::fs::create_dir_all(&here).map_err(|e| format!("mkdir {}: {e}", here.display()))?;
        let socket = SocketPath::in_dir(&here)
            .map_err(|e| format!("a socket path for {}: {e}", here.display()))?;
        let root = here.join("store");
        let mut config = daemon_config(socket.path(), &root, 0)?;
        config.daemon.log_level = "warn".into();
        config.staging.budget_bytes = ByteSize(budgets.staging_bytes);
        config.staging.double = false;
        config.staging.policy = policy;
        config.staging.stream_ring_bytes = ByteSize(load_plan::STREAM_RING_BYTES);
        config.hot_tier.budget_bytes = ByteSize(budgets.hot_tier_bytes);
        config.store.io_pool_bytes = gpusnap_proto::convert::to_usize(budgets.io_pool_bytes);
        config.store.keep_snapshots = load_plan::KEEP_SNAPSHOTS;
        let daemon = start_daemon(
            binary,
            &here,
            &format!("gpusnapd-{}", policy.name()),
            &config,
        )?;
        eprintln!(
            "gpusnapd ({}) up: staging {}, hot tier {}",
            policy.name(),
            human_bytes(budgets.staging_bytes),
            human_bytes(budgets.hot_tier_bytes)
        );
        running.push((policy, daemon, budgets, root));
        sockets.push(socket);
    }
    Ok(Daemons {
        running,
        _sockets: sockets,
    })
}

fn spawn_trainer(
    me: &Path,
    dir: &Path,
    plan: &TrainerPlan,
    socket: &Path,
    world: usize,
    args: &LoadBench,
) -> Result<(Child, ChildStdin), String> {
    let log_path = trainer_log(dir, plan.id);
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let mut command = Command::new(me);
    command
        .arg("load-trainer")
        .arg("--socket")
        .arg(socket)
        .args(["--rank", &plan.id.to_string()])
        .args(["--world", &world.to_string()])
        .args(["--size", &plan.size_bytes.to_string()])
        .args(["--device", plan.device.name()])
        .args(["--interval-ms", &args.interval.as_millis().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if plan.device == LoadDevice::Cuda
        && let Some(lib) = &args.cuda_library_dir
    {
        let mut path = lib.as_os_str().to_owned();
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|o| !o.is_empty()) {
            path.push(":");
            path.push(old);
        }
        command.env("LD_LIBRARY_PATH", path);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting {}: {e}", plan.label()))?;
    let stdin = child.stdin.take().ok_or("a trainer without stdin")?;
    Ok((child, stdin))
}

/// Takes `child`'s stdout and hands the child to the guard.
fn trainers_stdout(
    mut child: Child,
    trainers: &mut Trainers,
) -> Result<std::process::ChildStdout, String> {
    let stdout = child.stdout.take();
    trainers.children.push(child);
    stdout.ok_or_else(|| "a trainer without stdout".to_owned())
}

fn trainer_log(dir: &Path, id: usize) -> PathBuf {
    dir.join(format!("trainer-{id}.log"))
}

fn log_tail(dir: &Path, id: usize) -> String {
    let path = trainer_log(dir, id);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("--- {} ---\n{tail}", path.display())
}

/// Reads a trainer's events until its stdout ends.
fn read_events(stdout: std::process::ChildStdout, live: &Shared) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let event = Event::parse(&line);
        let mut l = lock(live);
        match event {
            Ok(Event::Request { what, step }) => {
                l.pending = Some(Pending {
                    since: Instant::now(),
                    what,
                    step,
                });
                continue;
            }
            Ok(Event::Registered { slots, pinned, .. }) => {
                l.registered = true;
                l.record.slots = Some(slots);
                l.record.pinned = Some(pinned);
            }
            Ok(Event::Snapshot {
                captured, stall_s, ..
            }) => {
                if captured {
                    l.record.stalls_s.push(stall_s);
                } else {
                    l.record.skipped += 1;
                }
            }
            Ok(Event::Committed { .. }) => {}
            Ok(Event::Done(summary)) => l.record.summary = Some(*summary),
            Ok(Event::Failed { error }) => l.failed = Some(error),
            Err(e) => l.failed = Some(format!("an unreadable line from the trainer: {e}")),
        }
        l.pending = None;
    }
    lock(live).ended = true;
}

/// Waits (bounded) until `ready` holds for every trainer, or one failed;
/// whether every one is ready.
fn wait_until(
    bound: Duration,
    lives: &[Shared],
    ready: impl Fn(&Live) -> bool,
    abort: &dyn Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if abort() {
            return false;
        }
        let (mut all, mut failed) = (true, false);
        for live in lives {
            let l = lock(live);
            all &= ready(&l);
            failed |= l.failed.is_some() || (l.ended && !ready(&l));
        }
        if all {
            return true;
        }
        if failed || Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

fn first_failure(lives: &[Shared], dir: &Path) -> Option<String> {
    lives.iter().find_map(|live| {
        let l = lock(live);
        let why = l
            .failed
            .clone()
            .or_else(|| (l.ended && !l.registered).then(|| "exited".to_owned()))?;
        Some(format!(
            "{}: {why}\n{}",
            l.record.plan.label(),
            log_tail(dir, l.record.plan.id)
        ))
    })
}

/// The watchdog: a thread that looks at every trainer's pending request
/// every 100 ms and stops at the first one unanswered for longer than its
/// bound, naming the trainer.
struct Watchdog {
    stop: Arc<std::sync::atomic::AtomicBool>,
    found: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(lives: Vec<Shared>, bound: Duration) -> Watchdog {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let found = Arc::new(Mutex::new(None));
        let (flag, out) = (Arc::clone(&stop), Arc::clone(&found));
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                let stalled = lives.iter().find_map(|live| {
                    let l = lock(live);
                    let p = l.pending.as_ref()?;
                    let waited = overdue(Some(p), now, bound)?;
                    Some(format!(
                        "watchdog: {}: its {} request (step {}) has gone unanswered for \
                         {:.1} s (bound {} s)",
                        l.record.plan.label(),
                        p.what,
                        p.step,
                        waited.as_secs_f64(),
                        bound.as_secs()
                    ))
                });
                if let Some(s) = stalled {
                    *out.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(s);
                    return;
                }
                std::thread::sleep(POLL);
            }
        });
        Watchdog {
            stop,
            found,
            thread: Some(thread),
        }
    }

    /// Whether it has found a stalled request.
    fn tripped(&self) -> bool {
        self.found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// Stops the thread; the stalled request it found, if any.
    fn finish(mut self) -> Option<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The daemon's streamed counts per job and its outcomes (both jobs
/// summed); a failed scrape is an error.
fn scrape(
    daemon: &DaemonProcess,
    policy: BusyPolicy,
    errors: &mut Vec<String>,
) -> (BTreeMap<(String, LoadDevice), u64>, BTreeMap<String, u64>) {
    let mut streamed = BTreeMap::new();
    let mut outcomes = BTreeMap::new();
    let body = match daemon.metrics() {
        Ok(b) => b,
        Err(e) => {
            errors.push(format!("scraping the {} daemon: {e}", policy.name()));
            return (streamed, outcomes);
        }
    };
    let get = |series: String| counter(&body, &series);
    for device in [LoadDevice::Host, LoadDevice::Cuda] {
        let job = device.job();
        let n = get(format!("gpusnap_streamed_snapshots_total{{job=\"{job}\"}}"));
        streamed.insert((policy.name().to_owned(), device), n.unwrap_or(0));
        for outcome in ["committed", "failed", "skipped", "aborted"] {
            let n = get(format!(
                "gpusnap_snapshots_total{{job=\"{job}\",outcome=\"{outcome}\"}}"
            ))
            .unwrap_or(0);
            *outcomes.entry(outcome.to_owned()).or_insert(0) += n;
        }
    }
    (streamed, outcomes)
}

/// The value of the integer sample `series` (`name{labels}`, labels as
/// exported) in a Prometheus text body: counters print as whole numbers.
fn counter(body: &str, series: &str) -> Option<u64> {
    body.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// After the daemons stopped: every snapshot left on disk re-read with its
/// CRC32s, every trainer's newest commit among them, the daemons' commit
/// counts equal to the trainers', every trainer's restore checked.
fn verify(
    daemons: &Daemons,
    records: &[TrainerRecord],
    rows: &[crate::load_report::DaemonRow],
) -> VerifyRow {
    let mut v = VerifyRow::default();
    let mut on_disk: BTreeMap<(String, u32), Vec<u64>> = BTreeMap::new();
    for (policy, _, _, root) in &daemons.running {
        let store = match Store::open_read_only(StoreConfig {
            root: root.clone(),
            ..StoreConfig::default()
        }) {
            Ok(s) => s,
            Err(e) => {
                v.problems
                    .push(format!("opening the {} store: {e}", policy.name()));
                continue;
            }
        };
        let listing = match store.list(None) {
            Ok(l) => l,
            Err(e) => {
                v.problems
                    .push(format!("listing the {} store: {e}", policy.name()));
                continue;
            }
        };
        for invalid in &listing.invalid {
            v.problems.push(format!(
                "{} is not a valid snapshot: {}",
                invalid.dir.display(),
                invalid.error
            ));
        }
        for snapshot in &listing.snapshots {
            v.on_disk += 1;
            let report = store.verify(&snapshot.dir);
            if report.is_ok() {
                v.verified += 1;
                let id = snapshot.id();
                on_disk.entry((id.job, id.rank)).or_default().push(id.step);
            } else {
                let problems: Vec<String> =
                    report.problems.iter().map(ToString::to_string).collect();
                v.problems.push(format!(
                    "{} does not verify: {}",
                    snapshot.dir.display(),
                    problems.join("; ")
                ));
            }
        }
    }
    for r in records {
        let label = r.plan.label();
        let Some(s) = &r.summary else { continue };
        v.commits_reported += s.committed;
        for e in &s.commit_errors {
            v.problems.push(format!("{label}: commit failed: {e}"));
        }
        if s.restore_verified {
            v.restores_verified += 1;
        } else if s.newest_committed.is_some() {
            v.problems
                .push(format!("{label}: its restore was not verified"));
        }
        if let Some(newest) = s.newest_committed {
            let steps = on_disk
                .get(&(r.plan.device.job(), rank_of(&r.plan)))
                .cloned()
                .unwrap_or_default();
            if !steps.contains(&newest) {
                v.problems.push(format!(
                    "{label}: its newest commit, step {newest}, is not on disk verified \
                     (there: {steps:?})"
                ));
            }
        } else if s.captured > 0 {
            v.problems
                .push(format!("{label}: {} captured, none committed", s.captured));
        }
    }
    v.commits_counted = rows
        .iter()
        .map(|d| d.outcomes.get("committed").copied().unwrap_or(0))
        .sum();
    if v.commits_counted != v.commits_reported {
        v.problems.push(format!(
            "the daemons counted {} commits, the trainers were told of {}",
            v.commits_counted, v.commits_reported
        ));
    }
    v
}

fn rank_of(plan: &TrainerPlan) -> u32 {
    u32::try_from(plan.id).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_whole_and_exactly_by_series() {
        let body = "# HELP x\n\
                    gpusnap_snapshots_total{job=\"load-host\",outcome=\"committed\"} 771\n\
                    gpusnap_snapshots_total{job=\"load-host\",outcome=\"skipped\"} 5296\n\
                    gpusnap_streamed_snapshots_total{job=\"load-cuda\"} 3 1700000000\n";
        let c = |s: &str| counter(body, s);
        assert_eq!(
            c("gpusnap_snapshots_total{job=\"load-host\",outcome=\"committed\"}"),
            Some(771)
        );
        assert_eq!(
            c("gpusnap_streamed_snapshots_total{job=\"load-cuda\"}"),
            Some(3),
            "a timestamp after the value"
        );
        assert_eq!(
            c("gpusnap_streamed_snapshots_total{job=\"load-host\"}"),
            None
        );
        assert_eq!(c("gpusnap_snapshots_total{job=\"load-host\"}"), None);
    }

    #[test]
    fn an_unexercised_policy_is_an_error() {
        let group = |policy: &str, skipped, streamed| crate::load_report::GroupRow {
            policy: policy.into(),
            device: LoadDevice::Host,
            trainers: 1,
            state_bytes: 1,
            snapshots: 1,
            skipped,
            streamed: Some(streamed),
            snapshots_per_s: 1.0,
            stall_p50_s: None,
            stall_p99_s: None,
            stall_max_s: None,
            stall_vs_memcpy_p50: None,
        };
        let mut report = crate::load_report::tests_support::empty_report();
        report.groups = vec![group("skip", 2, 0), group("stream", 0, 1)];
        assert!(unexercised(&report).is_empty());
        report.groups = vec![group("skip", 0, 0), group("stream", 0, 0)];
        assert_eq!(unexercised(&report).len(), 2);
    }
}

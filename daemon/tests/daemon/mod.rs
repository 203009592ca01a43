//! Runs the real `gpusnapd` binary for end-to-end tests, through
//! `gpusnapd-testkit` (the launcher the benchmarks and the Python tests
//! share): a scratch directory with its config, socket and store root; the
//! shared test defaults (`testkit/defaults.toml`) plus each test's
//! settings; start, stop (SIGTERM), kill (SIGKILL), restart on the same
//! root; scrape its metrics. Every failure here panics, naming the daemon's
//! log. Also the tests' trainer state and the waits they share.
#![allow(dead_code, reason = "each test file uses a different part")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gpusnapd_testkit::{DaemonProcess, Defaults, Launch};

/// One setting: (table, key, TOML value).
pub type Setting<'a> = (&'a str, &'a str, &'a str);

/// Puts `GPUSNAP_TESTING=1` in this process's environment, which the
/// daemons the tests start inherit (the launcher passes its environment on),
/// so their configs may have a `[testing]` table. Every test of a binary
/// that starts such a daemon calls this before it starts any daemon.
pub fn allow_testing_table() {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| {
        // SAFETY: every test of the binary calls this before it starts a
        // daemon or a child, and `Once` holds the others until it returns;
        // std's own environment readers (`Command`, `env::var`) take the
        // lock `set_var` takes, and nothing else in these tests reads the
        // environment through libc meanwhile.
        unsafe { std::env::set_var("GPUSNAP_TESTING", "1") };
    });
}

/// The `gpusnapd` to run: `GPUSNAP_DAEMON` where set (a test binary
/// carried to another machine, as `tests/gpu-suite` runs them, with the
/// daemon beside it), else the one cargo built with these tests.
pub fn daemon_binary() -> PathBuf {
    std::env::var_os("GPUSNAP_DAEMON")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_gpusnapd")),
            PathBuf::from,
        )
}

/// A scratch directory on the real disk (O_DIRECT must work).
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
    tempfile::Builder::new()
        .prefix("gpusnapd-e2e-")
        .tempdir_in(base)
        .expect("scratch dir")
}

/// The remote tier's metric families: they move only with an object store,
/// so `e2e_metrics` leaves them out and the remote tests move each one
/// (`e2e_remote`: uploads, lag, markers, the complete step, downloads,
/// walk-backs, errors, deletes; `e2e_remote_outage`: retries).
pub const REMOTE_FAMILIES: [&str; 14] = [
    "gpusnap_restore_walkbacks_total",
    "gpusnap_remote_up",
    "gpusnap_remote_errors_total",
    "gpusnap_remote_retries_total",
    "gpusnap_remote_uploads_total",
    "gpusnap_remote_upload_bytes_total",
    "gpusnap_remote_upload_seconds",
    "gpusnap_remote_upload_lag_steps",
    "gpusnap_remote_upload_lag_seconds",
    "gpusnap_remote_markers_total",
    "gpusnap_remote_complete_step",
    "gpusnap_remote_deletes_total",
    "gpusnap_remote_downloads_total",
    "gpusnap_remote_download_bytes_total",
];

/// A running (or stopped) daemon.
pub struct Daemon {
    /// Before `dir`: the daemon is killed and reaped before its directory
    /// goes.
    process: DaemonProcess,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub metrics_addr: String,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Daemon {
    /// Starts a daemon with the test defaults plus `settings`.
    pub fn start(settings: &[Setting<'_>]) -> Daemon {
        let dir = scratch();
        let root = dir.path().join("root");
        Daemon::start_with_root(dir, root, settings)
    }

    /// Starts a daemon whose store root is `root` (a tmpfs, a small disk).
    pub fn start_with_root(
        dir: tempfile::TempDir,
        root: PathBuf,
        settings: &[Setting<'_>],
    ) -> Daemon {
        let defaults = Defaults::load().expect("testkit/defaults.toml");
        let mut config = defaults.config;
        config.set_path("store", "root", &root).expect("store.root");
        config
            .apply(settings)
            .unwrap_or_else(|e| panic!("the test's settings: {e}"));
        let process = Launch::new(&daemon_binary(), dir.path(), config, defaults.waits)
            .start()
            .unwrap_or_else(|e| panic!("{e}"));
        Daemon {
            socket: process.socket().to_path_buf(),
            root: process.root().to_path_buf(),
            metrics_addr: process.metrics_addr().to_owned(),
            config_path: process.config_path().to_path_buf(),
            log_path: process.log_path().to_path_buf(),
            process,
            dir,
        }
    }

    /// Starts the binary on this config and waits until it answers.
    pub fn spawn(&mut self) {
        self.process.spawn().unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.process.pid().expect("running")).expect("pid")
    }

    /// SIGTERM and wait; the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.process.stop().unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.process.kill().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts again on the same root and socket.
    pub fn restart(&mut self) {
        self.spawn();
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// `GET path` on the metrics listener: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(&self.metrics_addr, path)
    }

    /// The value of one sample of /metrics (`name{labels}`, labels in name
    /// order). Its family must be exported (its `# TYPE` line; a
    /// histogram's for `_bucket`, `_sum` and `_count`), else this panics
    /// naming the family, so a misspelt name never reads as 0; a series of
    /// an exported family with no sample yet reads 0 (a labelled counter
    /// gets a series at its first increment).
    pub fn metric(&self, sample: &str) -> f64 {
        let body = self.process.metrics().unwrap_or_else(|e| panic!("{e}"));
        let family = exported_family(&body, sample).unwrap_or_else(|| {
            panic!(
                "the family of {sample} is not exported (no `# TYPE` line); exported: {:?}",
                exported_families(&body)
            )
        });
        gpusnapd_testkit::sample(&body, sample)
            .unwrap_or_else(|e| panic!("{family}: {e}"))
            .unwrap_or(0.0)
    }

    /// Whether the family `family` is exported now (its `# TYPE` line). A
    /// labelled family is exported once one of its series moved, so `false`
    /// says none has on this daemon. Panics when the daemon defines no such
    /// family (`daemon/src/metrics.rs`): a misspelt name is never "not
    /// exported".
    pub fn exports(&self, family: &str) -> bool {
        assert!(
            defined_families().contains(family),
            "the daemon defines no metric family {family}"
        );
        let body = self.process.metrics().unwrap_or_else(|e| panic!("{e}"));
        exported_families(&body).contains(family)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- gpusnapd log ---\n{}", self.log());
        }
    }
}

/// The families a `/metrics` body exports: the names of its `# TYPE` lines.
pub fn exported_families(body: &str) -> std::collections::BTreeSet<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The exported family a sample `name{labels}` belongs to: `name` itself,
/// or for a histogram's `_bucket`, `_sum` and `_count` the histogram.
fn exported_family(body: &str, sample: &str) -> Option<String> {
    let name = sample.split('{').next().unwrap_or(sample);
    let types: std::collections::HashMap<&str, &str> = body
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    if types.contains_key(name) {
        return Some(name.to_owned());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        (types.get(base) == Some(&"histogram")).then(|| base.to_owned())
    })
}

/// Every `"gpusnap_..."` family the daemon's metric definitions register
/// (`daemon/src/metrics.rs` outside its tests).
pub fn defined_families() -> std::collections::BTreeSet<String> {
    let source = include_str!("../../src/metrics.rs");
    let definitions = source.split("#[cfg(test)]").next().expect("source");
    definitions
        .split("\"gpusnap_")
        .skip(1)
        .filter_map(|rest| {
            let name = rest.split('"').next()?;
            (!name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .then(|| format!("gpusnap_{name}"))
        })
        .collect()
}

/// A bare HTTP/1.1 GET on loopback.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    gpusnapd_testkit::http_get(addr, path).unwrap_or_else(|e| panic!("{e}"))
}

/// A trainer's state for tests: named host tensors of mixed dtypes and
/// sizes, filled from `seed` so different steps hold different bytes.
pub struct State {
    pub tensors: Vec<(String, gpusnap::HostTensor)>,
}

impl State {
    /// `total_bytes` spread over `count` tensors (the first one takes the
    /// remainder), plus a scalar step counter.
    pub fn new(count: usize, total_bytes: u64) -> State {
        use gpusnap::{Dtype, HostTensor};
        let dtypes = [Dtype::F32, Dtype::BF16, Dtype::U8, Dtype::I64, Dtype::F16];
        let count = count.max(1);
        let per = total_bytes / count as u64;
        let mut tensors = Vec::with_capacity(count + 1);
        for i in 0..count {
            let dtype = dtypes[i % dtypes.len()];
            let mut bytes = if i == 0 {
                total_bytes - per * (count as u64 - 1)
            } else {
                per
            };
            bytes -= bytes % dtype.size_bytes();
            let elements = bytes / dtype.size_bytes();
            let shape: Vec<u64> = if i % 3 == 0 && elements.is_multiple_of(4) && elements > 0 {
                vec![4, elements / 4]
            } else {
                vec![elements]
            };
            tensors.push((
                format!("layer{i}.{}", dtype.name().to_lowercase()),
                HostTensor::zeros(dtype, shape).expect("tensor"),
            ));
        }
        tensors.push((
            "step".to_owned(),
            HostTensor::zeros(Dtype::I64, []).expect("scalar"),
        ));
        State { tensors }
    }

    /// Registers every tensor with `client`.
    pub fn register(&self, client: &mut gpusnap::Client) {
        for (name, t) in &self.tensors {
            client.register_host(name.as_str(), t).expect("register");
        }
    }

    /// Fills every byte from `seed`.
    pub fn fill(&self, seed: u64) {
        for (index, (_, t)) in self.tensors.iter().enumerate() {
            let mut w = t.write();
            for (i, b) in w.iter_mut().enumerate() {
                *b = pattern(seed, index, i);
            }
        }
    }

    pub fn zero(&self) {
        for (_, t) in &self.tensors {
            t.write().fill(0);
        }
    }

    /// The first tensor whose bytes differ from `fill(seed)`, if any.
    pub fn differs_from(&self, seed: u64) -> Option<String> {
        for (index, (name, t)) in self.tensors.iter().enumerate() {
            let r = t.read();
            if r.iter()
                .enumerate()
                .any(|(i, b)| *b != pattern(seed, index, i))
            {
                return Some(name.clone());
            }
        }
        None
    }

    pub fn byte_len(&self) -> u64 {
        self.tensors.iter().map(|(_, t)| t.byte_len() as u64).sum()
    }
}

/// Byte `i` of tensor `tensor` for `seed`.
pub fn pattern(seed: u64, tensor: usize, i: usize) -> u8 {
    let x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((tensor as u64) << 40)
        .wrapping_add(i as u64);
    let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x ^ (x >> 32)).to_le_bytes()[0]
}

/// A client of `daemon` for `job`/`rank` of `world`.
pub fn client(daemon: &Daemon, job: &str, rank: u32, world: u32) -> gpusnap::Client {
    let mut config = gpusnap::ClientConfig::new(job);
    config.socket = daemon.socket.clone();
    config.rank = rank;
    config.world_size = world;
    config.call_timeout = Duration::from_secs(60);
    config.commit_timeout = Duration::from_secs(120);
    config.connect_timeout = Duration::from_secs(10);
    gpusnap::Client::with_config(config).expect("connect")
}

/// Snapshots `step` and waits for its commit.
pub fn snapshot_committed(client: &mut gpusnap::Client, step: u64) -> gpusnap::CommitInfo {
    match client.snapshot(step).expect("snapshot") {
        gpusnap::SnapshotOutcome::Captured(_) => {}
        other => panic!("step {step} not captured: {other:?}"),
    }
    client.wait_committed(step).expect("commit")
}

/// Every listed snapshot under `root` re-read and verified.
pub fn verify_all(root: &Path) -> usize {
    let store = gpusnapd::store::Store::open_read_only(gpusnapd::store::StoreConfig {
        root: root.to_path_buf(),
        ..gpusnapd::store::StoreConfig::default()
    })
    .expect("open store");
    let listing = store.list(None).expect("list");
    for s in &listing.snapshots {
        let report = store.verify(&s.dir);
        assert!(report.is_ok(), "{}: {:?}", s.dir.display(), report.problems);
    }
    listing.snapshots.len()
}

/// Polls `done` every 10 ms until it holds; panics naming `what` after
/// `limit`.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until no connection holds `job`/`rank` (a dropped client's
/// connection is closed by the daemon shortly after).
pub fn wait_rank_free(daemon: &Daemon, job: &str, rank: u32) {
    let mut observer = client(daemon, "observer", 0, 1);
    wait_for(
        &format!("job {job} rank {rank} released"),
        Duration::from_secs(30),
        || {
            let status = observer.status().expect("status");
            !status
                .sessions
                .iter()
                .any(|s| s.job == job && s.rank == rank)
        },
    );
}

/// Waits until nothing is in flight and the staging memory in use is
/// exactly what the live registrations hold; returns that status.
pub fn staging_settled(daemon: &Daemon) -> gpusnap::proto::StatusInfo {
    let mut observer = client(daemon, "observer", 0, 1);
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = observer.status().expect("status");
        let held: u64 = status.sessions.iter().map(|s| s.staging_bytes).sum();
        if status.snapshots_in_flight == 0 && status.staging_bytes_used == held {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "staging never settled to what live clients hold: {last:#?}"
        );
        last = Some(status);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Names of the entries of `dir` (sorted; empty if it does not exist).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A copy of every tensor's bytes of a [`State`], to load back with a
/// plain copy (filling a large state from a seed is slow in debug builds,
/// slower than the persist a test races against).
pub struct Image(Vec<Vec<u8>>);

impl Image {
    /// The bytes `state.fill(seed)` gives (leaves `state` filled so).
    pub fn of(state: &State, seed: u64) -> Image {
        state.fill(seed);
        Image(
            state
                .tensors
                .iter()
                .map(|(_, t)| t.read().to_vec())
                .collect(),
        )
    }

    /// Copies the image into `state`.
    pub fn load(&self, state: &State) {
        for ((_, t), bytes) in state.tensors.iter().zip(&self.0) {
            t.write().copy_from_slice(bytes);
        }
    }

    /// The first tensor of `state` whose bytes differ from the image.
    pub fn differs(&self, state: &State) -> Option<String> {
        state
            .tensors
            .iter()
            .zip(&self.0)
            .find(|((_, t), bytes)| t.read()[..] != bytes[..])
            .map(|((name, _), _)| name.clone())
    }
}

/// Runs the `#[ignore]`d test `name` of this test binary as a child process
/// (a trainer that can be SIGKILLed), with `env`; its stdout comes back line
/// by line. libtest prints "test NAME ... " before the child's first line,
/// so match lines with `ends_with`.
pub fn spawn_child_test(
    name: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> (
    Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    use std::io::BufRead;
    let mut command = Command::new(std::env::current_exe().expect("exe"));
    command
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn child test");
    let stdout = child.stdout.take().expect("stdout");
    (child, std::io::BufReader::new(stdout).lines())
}

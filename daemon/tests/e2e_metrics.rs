//! Every metric the daemon exports moves in one end-to-end scenario, read
//! from its `/metrics` endpoint: commits (counters, histograms, gauges,
//! the slot waits of policy block), a step snapshotted twice (skipped), a
//! capture the trainer aborts, a snapshot the disk refuses (a full tmpfs,
//! when running as root: failed, counted by its errno), restores from
//! memory and disk and one that fails, a restart that seeds the newest
//! committed step from the store, and on a second daemon (policy stream) a
//! capture streamed while the only slot persists (its first persist made
//! slow by the latency backend, `[testing] delays`, so nothing races) and a
//! connection that panics (`[testing] panic_once_on_request`), counted;
//! the staging pinning a client reports (the host client's `not_needed`,
//! and through the raw protocol a CUDA client's pinned staging), given back
//! when the connection goes.
//!
//! [`METRICS`] lists every family once: a metric added to the daemon fails
//! this test until it is listed here and shown to move.

mod daemon;
mod raw;

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use daemon::{Daemon, Image, State, client, wait_for, wait_rank_free};
use gpusnap::device::{
    AttachedStaging, CaptureCopy, CopyTicket, RestoreCopy, StagingRegion, StreamOrder,
};
use gpusnap::proto::RestoreSource;
use gpusnap::{Device, Error, HostDevice, SnapshotOutcome, Step};

/// Every metric family the daemon exports.
const METRICS: [&str; 24] = [
    "gpusnap_bytes_read_total",
    "gpusnap_bytes_written_total",
    "gpusnap_capture_seconds",
    "gpusnap_clients_connected",
    "gpusnap_connections_closed_total",
    "gpusnap_hot_tier_budget_bytes",
    "gpusnap_hot_tier_bytes",
    "gpusnap_io_backend_info",
    "gpusnap_last_committed_step",
    "gpusnap_panics_total",
    "gpusnap_persist_seconds",
    "gpusnap_restore_seconds",
    "gpusnap_restores_total",
    "gpusnap_slot_wait_seconds",
    "gpusnap_snapshot_failures_total",
    "gpusnap_snapshots_in_flight",
    "gpusnap_snapshots_total",
    "gpusnap_staging_budget_bytes",
    "gpusnap_staging_bytes",
    "gpusnap_staging_clients",
    "gpusnap_staging_pin_seconds",
    "gpusnap_staging_pinned_bytes",
    "gpusnap_stall_seconds",
    "gpusnap_streamed_snapshots_total",
];

/// Families only a failed snapshot gives a series, which only root can
/// provoke here (a full tmpfs).
const NEEDS_ROOT: [&str; 1] = ["gpusnap_snapshot_failures_total"];

/// `[testing] delays` of the stream daemon: the first snapshot's fdatasync
/// takes two seconds longer, so the next one finds the only slot busy.
const FIRST_PERSIST_SLOW: &str = "[{ op = \"sync_data\", delay_ms = 2000, first_n = 1 }]";

/// One read of `/metrics`.
struct Scrape {
    samples: HashMap<String, f64>,
    families: BTreeSet<String>,
}

impl Scrape {
    fn of(daemon: &Daemon) -> Scrape {
        let (status, body) = daemon.http_get("/metrics");
        assert_eq!(status, 200, "{body}");
        let mut samples = HashMap::new();
        let mut families = BTreeSet::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.insert(rest.split_whitespace().next().expect("name").to_owned());
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let (key, value) = line.rsplit_once(' ').expect("sample line");
                samples.insert(key.to_owned(), value.parse().expect("a number"));
            }
        }
        Scrape { samples, families }
    }

    /// The sample `name{labels}` (labels in name order), or 0.
    fn get(&self, sample: &str) -> f64 {
        self.samples.get(sample).copied().unwrap_or(0.0)
    }
}

/// The families shown to move so far.
#[derive(Default)]
struct Moved(BTreeSet<&'static str>);

impl Moved {
    fn check(&mut self, family: &'static str, ok: bool, what: &str) {
        assert!(METRICS.contains(&family), "{family} is not in METRICS");
        assert!(ok, "{family}: {what}");
        self.0.insert(family);
    }
}

/// A copy device whose captures fail, so the client aborts the snapshot.
#[derive(Debug)]
struct FailingDevice(HostDevice);

impl Device for FailingDevice {
    fn name(&self) -> &'static str {
        "failing-host"
    }

    fn attach(&self, staging: &StagingRegion) -> gpusnap::Result<Box<dyn AttachedStaging>> {
        self.0.attach(staging)
    }

    fn capture(
        &self,
        _copies: Vec<CaptureCopy>,
        _order: &StreamOrder,
    ) -> gpusnap::Result<Box<dyn CopyTicket>> {
        Err(Error::Io(std::io::Error::other("injected copy failure")))
    }

    fn restore(
        &self,
        copies: Vec<RestoreCopy>,
        order: &StreamOrder,
    ) -> gpusnap::Result<Box<dyn CopyTicket>> {
        self.0.restore(copies, order)
    }
}

/// Stops the watcher however the scope ends (a panic too).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A 1 MiB tmpfs as the directory of `job` under the store root, if this
/// runs as root.
fn full_job_dir(daemon: &Daemon, job: &str) -> Option<Mount> {
    if !gpusnapd_testkit::root_or_skip(
        "the failed outcome: mounting a small tmpfs needs root (CI runs as root)",
    ) {
        return None;
    }
    let dir = daemon.root.join(job);
    std::fs::create_dir(&dir).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "gpusnap-test"])
        .arg(&dir)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount -t tmpfs failed");
    // A job directory made by hand needs its OWNER (root's: this test's uid).
    std::fs::write(dir.join("OWNER"), b"0\n").expect("write OWNER");
    Some(Mount(dir))
}

/// A daemon with a single slot whose first persist is slow (the latency
/// backend), under policy stream: steps 1 and 2 back to back, and the
/// second streams. Its `[testing]` table also makes the first `describe`
/// panic, which a raw connection then sends: a caught panic, counted.
/// Returns that daemon's exported families.
fn streamed_family(moved: &mut Moved) -> BTreeSet<String> {
    let daemon = Daemon::start(&[
        ("staging", "policy", "\"stream\""),
        ("staging", "double", "false"),
        ("staging", "stream_ring_bytes", "262144"),
        ("store", "io_buffer_bytes", "65536"),
        ("testing", "delays", FIRST_PERSIST_SLOW),
        ("testing", "panic_once_on_request", "\"describe\""),
    ]);
    let sample = "gpusnap_streamed_snapshots_total{job=\"met-stream\"}";
    let state = State::new(8, 1 << 20);
    let mut c = client(&daemon, "met-stream", 0, 1);
    state.register(&mut c);
    let images = [Image::of(&state, 1), Image::of(&state, 2)];
    for (step, image) in (1..=2).zip(&images) {
        image.load(&state);
        assert!(matches!(
            c.snapshot(step).expect("snapshot"),
            SnapshotOutcome::Captured(_)
        ));
    }
    c.wait_committed(2).expect("the streamed step commits");
    c.wait_committed(1).expect("the slow step commits");
    let m = Scrape::of(&daemon);
    moved.check(
        "gpusnap_streamed_snapshots_total",
        m.get(sample) == 1.0,
        "the capture that found the slot busy streamed",
    );
    let mut raw = raw::Raw::connect(&daemon.socket);
    raw.send(serde_json::json!({ "type": "describe", "job": "met-stream", "rank": 0, "step": 1 }));
    assert!(raw.next().is_none(), "the panicking connection is closed");
    let panics = "gpusnap_panics_total{site=\"connection\"}";
    wait_for(
        "the caught panic is counted",
        Duration::from_secs(30),
        || Scrape::of(&daemon).get(panics) == 1.0,
    );
    let m = Scrape::of(&daemon);
    moved.check(
        "gpusnap_panics_total",
        m.get(panics) == 1.0,
        "the connection that panicked handling describe, once",
    );
    m.families
}

#[test]
fn every_metric_moves() {
    // The stream daemon's config has a [testing] table.
    daemon::allow_testing_table();
    let mut daemon = Daemon::start(&[
        ("store", "io_buffer_bytes", "65536"),
        ("store", "queue_depth", "1"),
    ]);
    let mut moved = Moved::default();
    let job = "met";
    let s = |name: &str, labels: &str| format!("{name}{{job=\"{job}\"{labels}}}");

    // At start: the backend, the budgets.
    let mut c = client(&daemon, job, 0, 1);
    let backend = c.status().expect("status").io_backend;
    let m = Scrape::of(&daemon);
    moved.check(
        "gpusnap_io_backend_info",
        m.get(&format!("gpusnap_io_backend_info{{backend=\"{backend}\"}}")) == 1.0,
        "1 for the backend status names",
    );
    moved.check(
        "gpusnap_staging_budget_bytes",
        m.get("gpusnap_staging_budget_bytes") == f64::from(2u32 << 30),
        "the configured 2 GiB",
    );
    moved.check(
        "gpusnap_hot_tier_budget_bytes",
        m.get("gpusnap_hot_tier_budget_bytes") == f64::from(1u32 << 30),
        "the configured 1 GiB",
    );
    moved.check(
        "gpusnap_clients_connected",
        m.get("gpusnap_clients_connected") >= 1.0,
        "this client is connected",
    );

    // Registered: its staging is in use.
    let state = State::new(4, 8 << 20);
    state.register(&mut c);
    let held = c.sync_registration().expect("register").memfd_bytes;
    moved.check(
        "gpusnap_staging_bytes",
        Scrape::of(&daemon).get("gpusnap_staging_bytes") == held as f64,
        "the registration's memfd",
    );

    // The host client reported its staging needs no pinning; a CUDA
    // client's report (raw, as the real one sends it) is pinned staging.
    moved.check(
        "gpusnap_staging_clients",
        Scrape::of(&daemon).get(r#"gpusnap_staging_clients{pinning="not_needed"}"#) == 1.0,
        "the host client's report",
    );
    {
        let mut pin = raw::Raw::connect(&daemon.socket);
        let registered = pin.register("met-pin", 1024);
        let memfd = registered["memfd_bytes"].as_u64().expect("memfd_bytes");
        let noted = pin.call(serde_json::json!({ "type": "attached", "devices": [
            { "device": "cuda:0", "pin": { "state": "pinned", "bytes": memfd, "pin_ns": 3_000_000 } }
        ] }));
        assert_eq!(noted["type"], "attach_noted", "{noted}");
        let m = Scrape::of(&daemon);
        assert_eq!(m.get(r#"gpusnap_staging_clients{pinning="pinned"}"#), 1.0);
        moved.check(
            "gpusnap_staging_pinned_bytes",
            m.get("gpusnap_staging_pinned_bytes") == memfd as f64,
            "the pinned client's staging",
        );
        moved.check(
            "gpusnap_staging_pin_seconds",
            m.get(r#"gpusnap_staging_pin_seconds_count{job="met-pin"}"#) == 1.0
                && (m.get(r#"gpusnap_staging_pin_seconds_sum{job="met-pin"}"#) - 0.003).abs()
                    < 1e-9,
            "its pin time, once",
        );
    }
    wait_for("the pinned client gone", Duration::from_secs(30), || {
        let m = Scrape::of(&daemon);
        m.get(r#"gpusnap_staging_clients{pinning="pinned"}"#) == 0.0
            && m.get("gpusnap_staging_pinned_bytes") == 0.0
    });

    // Commits, while a watcher scrapes: each persist (8 MiB, one 64 KiB
    // write at a time) and its hot copy keep the step in flight for many
    // scrapes.
    let images = [Image::of(&state, 1), Image::of(&state, 2)];
    let mut written = 0;
    let done = AtomicBool::new(false);
    let in_flight_seen = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = 0.0f64;
            while !done.load(Ordering::SeqCst) {
                seen = seen.max(Scrape::of(&daemon).get("gpusnap_snapshots_in_flight"));
            }
            seen
        });
        let stop = StopOnDrop(&done);
        for step in 1..=2u64 {
            images[usize::try_from(step - 1).expect("index")].load(&state);
            match c.snapshot(step).expect("snapshot") {
                SnapshotOutcome::Captured(_) => {}
                other => panic!("step {step}: {other:?}"),
            }
            written += c.wait_committed(step).expect("commit").bytes;
        }
        drop(stop);
        watcher.join().expect("watcher")
    });
    wait_for("nothing in flight", Duration::from_secs(30), || {
        Scrape::of(&daemon).get("gpusnap_snapshots_in_flight") == 0.0
    });
    moved.check(
        "gpusnap_snapshots_in_flight",
        in_flight_seen >= 1.0,
        "a captured step is in flight until committed, then 0",
    );
    let m = Scrape::of(&daemon);
    moved.check(
        "gpusnap_snapshots_total",
        m.get(&s("gpusnap_snapshots_total", ",outcome=\"committed\"")) == 2.0,
        "2 committed",
    );
    moved.check(
        "gpusnap_bytes_written_total",
        m.get(&s("gpusnap_bytes_written_total", "")) == written as f64,
        "the committed files' bytes",
    );
    for family in [
        "gpusnap_persist_seconds",
        "gpusnap_capture_seconds",
        "gpusnap_stall_seconds",
    ] {
        moved.check(
            family,
            m.get(&s(&format!("{family}_count"), "")) == 2.0
                && m.get(&s(&format!("{family}_sum"), "")) > 0.0,
            "2 observations",
        );
    }
    moved.check(
        "gpusnap_last_committed_step",
        m.get(&s("gpusnap_last_committed_step", "")) == 2.0,
        "step 2",
    );
    moved.check(
        "gpusnap_hot_tier_bytes",
        m.get("gpusnap_hot_tier_bytes") == state.byte_len() as f64,
        "the newest step's data section is hot",
    );
    moved.check(
        "gpusnap_slot_wait_seconds",
        m.get(&s("gpusnap_slot_wait_seconds_count", "")) == 2.0,
        "each Begin under policy block, 2",
    );

    // A committed step again: skipped.
    match c.snapshot(2).expect("snapshot") {
        SnapshotOutcome::Skipped { reason, .. } => {
            assert!(reason.contains("already committed"), "{reason}");
        }
        other => panic!("step 2 again: {other:?}"),
    }
    assert_eq!(
        Scrape::of(&daemon).get(&s("gpusnap_snapshots_total", ",outcome=\"skipped\"")),
        1.0
    );

    // Restores: memory (the hot step 2), disk (step 1), a missing step.
    let mut restored = |step: Step, source: RestoreSource| {
        state.zero();
        let r = c.restore(step).expect("restore").expect("a step");
        assert_eq!(r.source, source, "{step:?}");
        assert_eq!(
            images[usize::try_from(r.step - 1).expect("index")].differs(&state),
            None
        );
        r.bytes
    };
    let from_memory = restored(Step::Latest, RestoreSource::Memory);
    let from_disk = restored(Step::At(1), RestoreSource::Disk);
    assert!(matches!(c.restore(Step::At(77)), Err(Error::NotFound(_))));
    let m = Scrape::of(&daemon);
    for (source, bytes) in [("memory", from_memory), ("disk", from_disk)] {
        let labels = format!(",source=\"{source}\"");
        moved.check(
            "gpusnap_restores_total",
            m.get(&s(
                "gpusnap_restores_total",
                &format!(",outcome=\"ok\"{labels}"),
            )) == 1.0,
            source,
        );
        moved.check(
            "gpusnap_bytes_read_total",
            m.get(&s("gpusnap_bytes_read_total", &labels)) == bytes as f64,
            source,
        );
        moved.check(
            "gpusnap_restore_seconds",
            m.get(&s("gpusnap_restore_seconds_count", &labels)) == 1.0,
            source,
        );
    }
    moved.check(
        "gpusnap_restores_total",
        m.get(&s(
            "gpusnap_restores_total",
            ",outcome=\"failed\",source=\"none\"",
        )) == 1.0,
        "the missing step",
    );

    // A capture whose copies fail: the client aborts it.
    let mut config = gpusnap::ClientConfig::new("met-abort");
    config.socket = daemon.socket.clone();
    let device = Arc::new(FailingDevice(HostDevice::new(1)));
    let mut a = gpusnap::Client::with_device(config, device).expect("connect");
    let small = State::new(2, 64 << 10);
    small.register(&mut a);
    assert!(a.snapshot(1).is_err(), "the injected copy failure");
    assert_eq!(
        Scrape::of(&daemon).get("gpusnap_snapshots_total{job=\"met-abort\",outcome=\"aborted\"}"),
        1.0
    );

    // A client that sends an empty frame: closed, and counted.
    {
        use std::io::{Read, Write};
        let mut bad = std::os::unix::net::UnixStream::connect(&daemon.socket).expect("connect");
        bad.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        bad.write_all(&0u32.to_le_bytes()).expect("an empty frame");
        let mut rest = Vec::new();
        let _ = bad.read_to_end(&mut rest);
        assert!(!rest.is_empty(), "the daemon says why it closes");
    }
    moved.check(
        "gpusnap_connections_closed_total",
        Scrape::of(&daemon).get("gpusnap_connections_closed_total{reason=\"bad_frame\"}") == 1.0,
        "the malformed frame's connection counted as closed for it",
    );

    // A snapshot the disk refuses.
    match full_job_dir(&daemon, "met-full") {
        Some(_mount) => {
            let big = State::new(2, 4 << 20);
            let mut f = client(&daemon, "met-full", 0, 1);
            big.register(&mut f);
            assert!(matches!(
                f.snapshot(1).expect("snapshot"),
                SnapshotOutcome::Captured(_)
            ));
            match f.wait_committed(1) {
                Err(Error::SnapshotFailed { step: 1, .. }) => {}
                other => panic!("4 MiB into a 1 MiB tmpfs: {other:?}"),
            }
            let m = Scrape::of(&daemon);
            assert_eq!(
                m.get("gpusnap_snapshots_total{job=\"met-full\",outcome=\"failed\"}"),
                1.0
            );
            moved.check(
                "gpusnap_snapshot_failures_total",
                m.get("gpusnap_snapshot_failures_total{errno=\"ENOSPC\",job=\"met-full\"}") == 1.0,
                "the failure counted by its errno, ENOSPC",
            );
            drop(f);
            wait_rank_free(&daemon, "met-full", 0);
        }
        None => eprintln!("failed snapshot not provoked: mounting a tmpfs needs root"),
    }

    // Everyone gone: no client, no staging.
    drop(c);
    drop(a);
    wait_for("clients gone", Duration::from_secs(30), || {
        let m = Scrape::of(&daemon);
        m.get("gpusnap_clients_connected") == 0.0
            && m.get("gpusnap_staging_bytes") == 0.0
            && m.get(r#"gpusnap_staging_clients{pinning="not_needed"}"#) == 0.0
    });
    // The stream counter, on a daemon of its own.
    let streamed = streamed_family(&mut moved);
    let mut families = Scrape::of(&daemon).families;
    families.extend(streamed);
    let listed: BTreeSet<String> = METRICS
        .iter()
        .chain(daemon::REMOTE_FAMILIES.iter())
        .map(|&f| f.to_owned())
        .collect();
    assert_eq!(
        daemon::defined_families(),
        listed,
        "daemon/src/metrics.rs defines METRICS"
    );
    let mut all: BTreeSet<&str> = METRICS.into_iter().collect();
    // The remote tier's families move only with an object store: the
    // e2e_remote tests move each one (`REMOTE_FAMILIES` there).
    for family in daemon::REMOTE_FAMILIES {
        all.remove(family);
        families.remove(family);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        for family in NEEDS_ROOT {
            all.remove(family);
        }
    }
    let expected: BTreeSet<String> = all.iter().map(|&f| f.to_owned()).collect();
    assert_eq!(families, expected, "the exported families are METRICS");
    assert_eq!(moved.0, all, "every metric moved");

    // A restart seeds the newest step from the store; the hot tier is gone.
    assert!(daemon.stop().success());
    daemon.restart();
    let m = Scrape::of(&daemon);
    assert_eq!(m.get(&s("gpusnap_last_committed_step", "")), 2.0);
    assert_eq!(m.get("gpusnap_hot_tier_bytes"), 0.0);
    let mut c = client(&daemon, job, 0, 1);
    state.register(&mut c);
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("step 2");
    assert_eq!((r.step, r.source), (2, RestoreSource::Disk));
    assert_eq!(images[1].differs(&state), None);
    let m = Scrape::of(&daemon);
    assert_eq!(
        m.get(&s(
            "gpusnap_restores_total",
            ",outcome=\"ok\",source=\"disk\""
        )),
        1.0
    );
    assert_eq!(
        m.get(&s("gpusnap_bytes_read_total", ",source=\"disk\"")),
        r.bytes as f64
    );
}

//! The remote tier against a real S3 server (SeaweedFS, started by the
//! testkit on loopback): daemons with separate roots stand in for the nodes
//! of one job and share its bucket. A node lost with its disk is replaced
//! by an empty one that restores byte for byte; a two-rank job across two
//! daemons resumes with one of them replaced; every corruption of a remote
//! object (a flipped byte, a data object cut short, a garbled manifest, a
//! marker naming a missing rank) and of a local one is detected, never
//! restored, and walked back past, reported; wrong credentials are a clear
//! error without a retry storm; retention keeps the newest complete steps.
//! The object store going down mid-upload is `e2e_remote_outage.rs`.

mod daemon;

use std::time::Duration;

use daemon::{Daemon, Setting, State, client, snapshot_committed, wait_for};
use gpusnap::proto::RestoreSource;
use gpusnap::{Error, Step};
use gpusnapd_testkit::S3Server;

/// Long enough for an upload of a few MiB and its marker on a loaded
/// 2-core machine.
const UPLOAD_WAIT: Duration = Duration::from_secs(90);

/// The test's S3 server, in its own scratch directory (kept until the
/// server is dropped).
struct Bucket {
    server: S3Server,
    _dir: tempfile::TempDir,
}

impl Bucket {
    fn start() -> Bucket {
        let dir = daemon::scratch();
        let server = S3Server::start(dir.path()).unwrap_or_else(|e| panic!("S3 server: {e}"));
        Bucket { server, _dir: dir }
    }

    /// A daemon (a node) whose `[remote]` table points at this server
    /// under `prefix`, with `extra` settings on top.
    fn node(&self, prefix: &str, extra: &[Setting<'_>]) -> Daemon {
        let remote = self.server.remote_settings(prefix);
        let mut settings: Vec<Setting<'_>> = remote
            .iter()
            .map(|(key, value)| ("remote", *key, value.as_str()))
            .collect();
        settings.extend_from_slice(extra);
        Daemon::start(&settings)
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.server
            .list_keys(prefix)
            .unwrap_or_else(|e| panic!("list {prefix}: {e}"))
    }

    fn has(&self, key: &str) -> bool {
        self.keys(key).iter().any(|k| k == key)
    }

    /// Waits until the step's COMPLETE marker is there.
    fn wait_complete(&self, prefix: &str, job: &str, step: u64) {
        let marker = marker_key(prefix, job, step);
        wait_for(&format!("{marker} to appear"), UPLOAD_WAIT, || {
            self.has(&marker)
        });
    }
}

fn marker_key(prefix: &str, job: &str, step: u64) -> String {
    format!("{prefix}/{job}/step-{step}/COMPLETE")
}

fn object_key(prefix: &str, job: &str, rank: u32, step: u64, file: &str) -> String {
    format!("{prefix}/{job}/{rank}/step-{step}/{file}")
}

/// A counter's value, 0 while its family has no series yet.
fn count(d: &Daemon, sample: &str) -> f64 {
    let series = sample.split('{').next().unwrap_or(sample);
    let family = ["_count", "_sum", "_bucket"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series);
    if d.exports(family) {
        d.metric(sample)
    } else {
        0.0
    }
}

const DATA: &str = "state.safetensors";
const MANIFEST: &str = "MANIFEST.json";

/// Snapshots `steps` of `state` (filled from the step as seed) through
/// `daemon` as (job, rank of world).
fn train(daemon: &Daemon, job: &str, rank: u32, world: u32, state: &State, steps: &[u64]) {
    let mut c = client(daemon, job, rank, world);
    state.register(&mut c);
    for &step in steps {
        state.fill(step + u64::from(rank) * 1000);
        snapshot_committed(&mut c, step);
    }
}

/// A fresh trainer on `daemon` restoring `step`: what it got, with its
/// buffers compared against `fill(seed)` of `expect_seed`'s step.
fn restore(
    daemon: &Daemon,
    job: &str,
    rank: u32,
    world: u32,
    state: &State,
    step: Step,
) -> Result<Option<gpusnap::RestoreInfo>, Error> {
    state.zero();
    let mut c = client(daemon, job, rank, world);
    state.register(&mut c);
    c.restore(step)
}

fn assert_bytes_of(state: &State, rank: u32, step: u64) {
    assert_eq!(
        state.differs_from(step + u64::from(rank) * 1000),
        None,
        "the restored bytes are those of step {step} of rank {rank}"
    );
}

#[test]
fn a_replaced_node_restores_the_lost_nodes_snapshot_byte_for_byte() {
    let bucket = Bucket::start();
    let state = State::new(4, 12 << 20);
    let mut a = bucket.node("nodeloss", &[]);
    train(&a, "train", 0, 1, &state, &[1, 2]);
    bucket.wait_complete("nodeloss", "train", 2);
    // The data object is the safetensors file unchanged: any S3 tool or
    // loader reads it.
    let data = bucket
        .server
        .get(&object_key("nodeloss", "train", 0, 2, DATA))
        .expect("data object");
    let local =
        std::fs::read(a.root.join("train/0").join("step-2").join(DATA)).expect("local data file");
    assert!(
        data == local,
        "the remote data object is the local file, byte for byte"
    );
    // A's uploader moved its metrics.
    let job = "{job=\"train\"}";
    assert_eq!(a.metric("gpusnap_remote_up"), 1.0);
    assert!(
        count(
            &a,
            "gpusnap_remote_uploads_total{job=\"train\",outcome=\"uploaded\"}"
        ) >= 1.0
    );
    assert!(count(&a, &format!("gpusnap_remote_upload_bytes_total{job}")) >= data.len() as f64);
    assert!(count(&a, &format!("gpusnap_remote_upload_seconds_count{job}")) >= 1.0);
    assert!(a.exports("gpusnap_remote_upload_lag_steps"));
    assert!(a.exports("gpusnap_remote_upload_lag_seconds"));
    assert!(count(&a, "gpusnap_remote_markers_total{outcome=\"created\"}") >= 1.0);
    wait_for("the complete-step gauge", UPLOAD_WAIT, || {
        count(&a, &format!("gpusnap_remote_complete_step{job}")) == 2.0
    });
    // Node A is lost with its disk.
    a.kill();
    std::fs::remove_dir_all(&a.root).expect("remove A's root");
    let b = bucket.node("nodeloss", &[]);
    let info = restore(&b, "train", 0, 1, &state, Step::Latest)
        .expect("restore")
        .expect("a snapshot");
    assert_eq!(info.step, 2);
    assert_eq!(info.source, RestoreSource::Remote);
    assert!(info.walked_back.is_empty(), "{:?}", info.walked_back);
    assert_bytes_of(&state, 0, 2);
    assert_eq!(
        b.metric("gpusnap_remote_downloads_total{job=\"train\",outcome=\"ok\"}"),
        1.0
    );
    assert!(b.metric("gpusnap_remote_download_bytes_total{job=\"train\"}") >= data.len() as f64);
    // The download is a local snapshot now: a second restore reads the disk.
    let again = restore(&b, "train", 0, 1, &state, Step::Latest)
        .expect("restore")
        .expect("a snapshot");
    assert_eq!((again.step, again.source), (2, RestoreSource::Disk));
    assert_bytes_of(&state, 0, 2);
    // An older step by number comes from the object store too.
    let older = restore(&b, "train", 0, 1, &state, Step::At(1))
        .expect("restore")
        .expect("a snapshot");
    assert_eq!((older.step, older.source), (1, RestoreSource::Remote));
    assert_bytes_of(&state, 0, 1);
    // A step nowhere is NotFound, as without the tier.
    match restore(&b, "train", 0, 1, &state, Step::At(7)) {
        Err(Error::NotFound(_)) => {}
        other => panic!("step 7 restored: {other:?}"),
    }
    // The listing says what is complete remotely.
    let mut c = client(&b, "train", 0, 1);
    state.register(&mut c);
    let listing = c.list_job(Some("train")).expect("list");
    let remote: Vec<u64> = listing
        .remote_complete
        .iter()
        .filter(|j| j.job == "train")
        .flat_map(|j| j.steps.clone())
        .collect();
    assert_eq!(remote, vec![1, 2]);
    assert_eq!(listing.remote_error, None);
}

#[test]
fn a_two_rank_job_across_two_nodes_resumes_with_one_node_replaced() {
    let bucket = Bucket::start();
    let state = State::new(3, 6 << 20);
    let a = bucket.node("tworank", &[]);
    let mut b = bucket.node("tworank", &[]);
    std::thread::scope(|s| {
        s.spawn(|| train(&a, "job", 0, 2, &State::new(3, 6 << 20), &[10, 20]));
        s.spawn(|| train(&b, "job", 1, 2, &State::new(3, 6 << 20), &[10, 20]));
    });
    bucket.wait_complete("tworank", "job", 20);
    let marker: serde_json::Value = serde_json::from_slice(
        &bucket
            .server
            .get(&marker_key("tworank", "job", 20))
            .expect("marker"),
    )
    .expect("the marker is JSON");
    assert_eq!(marker["world_size"], 2);
    assert_eq!(marker["ranks"].as_array().map(Vec::len), Some(2));
    // Exactly one of the two daemons wrote it; the other found it (or had
    // not finished its own upload when the first looked).
    let created = |d: &Daemon| count(d, "gpusnap_remote_markers_total{outcome=\"created\"}");
    let conflicts = |d: &Daemon| count(d, "gpusnap_remote_markers_total{outcome=\"conflict\"}");
    wait_for("a marker created per step", UPLOAD_WAIT, || {
        created(&a) + created(&b) >= 2.0
    });
    assert_eq!(
        created(&a) + created(&b),
        2.0,
        "one create per complete step"
    );
    assert_eq!(conflicts(&a) + conflicts(&b), 0.0);
    // Node B is replaced by an empty C.
    b.kill();
    std::fs::remove_dir_all(&b.root).expect("remove B's root");
    let c = bucket.node("tworank", &[]);
    let r1 = restore(&c, "job", 1, 2, &state, Step::Latest)
        .expect("rank 1 restores on the replacement")
        .expect("a snapshot");
    assert_eq!((r1.step, r1.source), (20, RestoreSource::Remote));
    assert_bytes_of(&state, 1, 20);
    let r0 = restore(&a, "job", 0, 2, &state, Step::Latest)
        .expect("rank 0 restores on its node")
        .expect("a snapshot");
    assert_eq!(r0.step, 20);
    assert_ne!(r0.source, RestoreSource::Remote);
    assert_bytes_of(&state, 0, 20);
}

/// What a test does to step 2's objects before a fresh node restores.
#[derive(Debug, Clone, Copy)]
enum Corruption {
    FlippedDataByte,
    DataCutShort,
    GarbledManifest,
    MarkerNamesMissingRank,
}

fn corrupt(bucket: &Bucket, prefix: &str, job: &str, how: Corruption) {
    let s = &bucket.server;
    let data = object_key(prefix, job, 0, 2, DATA);
    let manifest = object_key(prefix, job, 0, 2, MANIFEST);
    match how {
        Corruption::FlippedDataByte => {
            let mut bytes = s.get(&data).expect("data");
            let at = bytes.len() - 4096 - 17;
            bytes[at] ^= 0x40;
            s.put(&data, &bytes).expect("put");
        }
        Corruption::DataCutShort => {
            let bytes = s.get(&data).expect("data");
            s.put(&data, &bytes[..bytes.len() - (1 << 20)])
                .expect("put");
        }
        Corruption::GarbledManifest => {
            let mut bytes = s.get(&manifest).expect("manifest");
            let at = bytes.len() / 2;
            bytes[at] = b'#';
            s.put(&manifest, &bytes).expect("put");
        }
        Corruption::MarkerNamesMissingRank => s.delete(&manifest).expect("delete"),
    }
}

#[test]
fn every_corruption_of_a_remote_step_walks_back_to_the_previous_complete_step() {
    let bucket = Bucket::start();
    let state = State::new(4, 8 << 20);
    let mut a = bucket.node("corrupt", &[]);
    let all = [
        Corruption::FlippedDataByte,
        Corruption::DataCutShort,
        Corruption::GarbledManifest,
        Corruption::MarkerNamesMissingRank,
    ];
    for (i, _) in all.iter().enumerate() {
        train(&a, &format!("job{i}"), 0, 1, &state, &[1, 2]);
    }
    for (i, _) in all.iter().enumerate() {
        bucket.wait_complete("corrupt", &format!("job{i}"), 2);
    }
    a.kill();
    std::fs::remove_dir_all(&a.root).expect("remove A's root");
    for (i, how) in all.iter().enumerate() {
        corrupt(&bucket, "corrupt", &format!("job{i}"), *how);
    }
    let b = bucket.node("corrupt", &[]);
    for (i, how) in all.iter().enumerate() {
        let job = format!("job{i}");
        let info = restore(&b, &job, 0, 1, &state, Step::Latest)
            .unwrap_or_else(|e| panic!("{how:?}: {e}"))
            .unwrap_or_else(|| panic!("{how:?}: nothing restored"));
        assert_eq!(
            (info.step, info.source),
            (1, RestoreSource::Remote),
            "{how:?}"
        );
        assert_bytes_of(&state, 0, 1);
        assert_eq!(info.walked_back.len(), 1, "{how:?}: {:?}", info.walked_back);
        let passed = &info.walked_back[0];
        assert_eq!(
            (passed.step, passed.source),
            (2, RestoreSource::Remote),
            "{how:?}"
        );
        assert!(!passed.reason.is_empty());
        // Asked for by number, the corrupt step is refused, never restored.
        match restore(&b, &job, 0, 1, &state, Step::At(2)) {
            Err(Error::Corrupt(why)) => assert!(why.contains("step 2"), "{how:?}: {why}"),
            other => panic!("{how:?}: step 2 restored: {other:?}"),
        }
        assert!(
            state.differs_from(2).is_some(),
            "{how:?}: no byte of step 2 restored"
        );
    }
    assert_eq!(
        b.metric("gpusnap_restore_walkbacks_total{job=\"job0\",source=\"remote\"}"),
        2.0,
        "the walk-back and the refused step 2 are counted"
    );
    let log = b.log();
    assert!(log.contains("walking back"), "the walk-back is logged");
}

#[test]
fn a_local_snapshot_that_fails_verification_is_replaced_by_the_remote_copy() {
    let bucket = Bucket::start();
    let state = State::new(2, 4 << 20);
    let mut a = bucket.node("localbad", &[]);
    train(&a, "job", 0, 1, &state, &[5, 6]);
    bucket.wait_complete("localbad", "job", 6);
    // The hot tier would serve step 6 from memory: a restarted daemon has
    // only the disk.
    a.stop();
    let file = a.root.join("job/0").join("step-6").join(DATA);
    let mut bytes = std::fs::read(&file).expect("local data");
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&file, &bytes).expect("corrupt the local copy");
    a.restart();
    let info = restore(&a, "job", 0, 1, &state, Step::Latest)
        .expect("restore")
        .expect("a snapshot");
    assert_eq!((info.step, info.source), (6, RestoreSource::Remote));
    assert_bytes_of(&state, 0, 6);
    assert_eq!(info.walked_back.len(), 1, "{:?}", info.walked_back);
    assert_eq!(
        (info.walked_back[0].step, info.walked_back[0].source),
        (6, RestoreSource::Disk)
    );
    assert_eq!(
        daemon::verify_all(&a.root),
        2,
        "the corrupt local copy was replaced by the verified download"
    );
}

#[test]
fn wrong_credentials_are_a_clear_error_naming_the_endpoint_without_a_retry_storm() {
    let bucket = Bucket::start();
    let wrong_path = bucket.server.wrong_credentials_file();
    let wrong = format!("{:?}", wrong_path.display().to_string());
    let d = bucket.node("creds", &[("remote", "credentials_file", wrong.as_str())]);
    let state = State::new(2, 2 << 20);
    let mut c = client(&d, "job", 0, 1);
    state.register(&mut c);
    for step in 1..=3 {
        state.fill(step);
        let commit = snapshot_committed(&mut c, step);
        assert!(
            commit.bytes > 0,
            "local snapshots commit whatever the tier says"
        );
    }
    let endpoint = bucket.server.endpoint();
    wait_for("the refusal in status", Duration::from_secs(30), || {
        c.status()
            .ok()
            .and_then(|s| s.remote)
            .and_then(|r| r.last_error)
            .is_some_and(|e| e.contains(&endpoint) && e.contains("refused"))
    });
    let status = c.status().expect("status").remote.expect("remote status");
    assert!(!status.reachable || status.failures > 0);
    // Backoff, not a storm: a few failed passes in 8 s, each one request.
    std::thread::sleep(Duration::from_secs(8));
    let errors: f64 = d
        .http_get("/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with("gpusnap_remote_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        (1.0..=12.0).contains(&errors),
        "{errors} failed requests in ~10 s"
    );
    let log = d.log();
    assert!(log.contains(&endpoint), "the log names the endpoint");
    let creds = std::fs::read_to_string(&wrong_path).expect("creds");
    let secret = creds
        .lines()
        .find_map(|l| l.strip_prefix("secret_access_key"))
        .and_then(|v| v.split('"').nth(1))
        .expect("a secret in the file");
    assert!(!log.contains(secret), "the secret is never logged");
}

#[test]
fn retention_keeps_the_newest_complete_steps_and_deletes_marker_first() {
    let bucket = Bucket::start();
    let state = State::new(2, 1 << 20);
    let a = bucket.node("retain", &[("remote", "keep_steps", "2")]);
    let mut c = client(&a, "job", 0, 1);
    state.register(&mut c);
    for step in 1..=5 {
        state.fill(step);
        snapshot_committed(&mut c, step);
        bucket.wait_complete("retain", "job", step);
    }
    wait_for("retention to delete steps 1 to 3", UPLOAD_WAIT, || {
        bucket
            .keys("retain/job")
            .iter()
            .all(|k| !(1..=3).any(|s| k.contains(&format!("step-{s}/"))))
    });
    let keys = bucket.keys("retain/job");
    for step in [4, 5] {
        assert!(
            keys.contains(&marker_key("retain", "job", step)),
            "{keys:?}"
        );
        assert!(keys.contains(&object_key("retain", "job", 0, step, DATA)));
        assert!(keys.contains(&object_key("retain", "job", 0, step, MANIFEST)));
    }
    assert!(
        a.metric("gpusnap_remote_deletes_total{what=\"marker\"}") >= 3.0,
        "each old step's marker went"
    );
}

#[test]
fn bytes_the_local_disk_corrupted_never_reach_the_object_store() {
    let mut bucket = Bucket::start();
    bucket.server.kill().unwrap_or_else(|e| panic!("{e}"));
    let state = State::new(2, 8 << 20);
    let mut a = bucket.node("localrot", &[]);
    train(&a, "job", 0, 1, &state, &[1]);
    // The object store was down: step 1 is committed locally only. The
    // disk then corrupts it, and the store comes back.
    a.stop();
    let file = a.root.join("job/0/step-1").join(DATA);
    let mut bytes = std::fs::read(&file).expect("local data");
    let at = bytes.len() - (3 << 20);
    bytes[at] ^= 0x10;
    std::fs::write(&file, &bytes).expect("corrupt the local copy");
    bucket.server.restart().unwrap_or_else(|e| panic!("{e}"));
    a.restart();
    wait_for("the corrupt upload to be refused", UPLOAD_WAIT, || {
        count(
            &a,
            "gpusnap_remote_uploads_total{job=\"job\",outcome=\"local_corrupt\"}",
        ) >= 1.0
    });
    assert!(a.log().contains("fails verification; it is not uploaded"));
    let keys = bucket.keys("localrot/job");
    assert!(
        keys.iter().all(|k| !k.contains("/step-1/")),
        "nothing of the corrupt step is in the object store: {keys:?}"
    );
    // The next commit goes up as usual.
    let mut c = client(&a, "job", 0, 1);
    state.register(&mut c);
    state.fill(2);
    snapshot_committed(&mut c, 2);
    bucket.wait_complete("localrot", "job", 2);
    assert_eq!(
        count(
            &a,
            "gpusnap_remote_uploads_total{job=\"job\",outcome=\"local_corrupt\"}"
        ),
        1.0,
        "the corrupt step is never tried again"
    );
}

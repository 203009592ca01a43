//! The object store goes down in the middle of an upload (SIGKILL of the
//! real SeaweedFS server) and comes back later: local snapshots keep
//! committing as fast as before, nothing half-uploaded is ever listed (no
//! manifest without its whole data object, no marker without every rank's
//! manifest), and the uploads resume on their own once the server is back.

mod daemon;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use daemon::{Daemon, Setting, State, client, snapshot_committed, wait_for};
use gpusnapd_testkit::S3Server;

/// Every object of `prefix` and the invariants a reader relies on: each
/// manifest has its data object, each marker its manifest.
fn assert_nothing_half_listed(server: &S3Server, prefix: &str) -> Vec<String> {
    let keys = server
        .list_keys(prefix)
        .unwrap_or_else(|e| panic!("list: {e}"));
    let set: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
    for key in &keys {
        if let Some(dir) = key.strip_suffix("/MANIFEST.json") {
            assert!(
                set.contains(format!("{dir}/state.safetensors").as_str()),
                "{key} is listed without its data object: {keys:?}"
            );
        }
        if let Some(step_dir) = key.strip_suffix("/COMPLETE") {
            let (job, step) = step_dir.rsplit_once('/').expect("job/step-N");
            assert!(
                set.contains(format!("{job}/0/{step}/MANIFEST.json").as_str()),
                "{key} is listed without rank 0's manifest: {keys:?}"
            );
        }
    }
    keys
}

#[test]
fn the_object_store_down_mid_upload_never_slows_local_snapshots_and_uploads_resume() {
    let dir = daemon::scratch();
    let mut server = S3Server::start(&dir.path().join("s3")).unwrap_or_else(|e| panic!("{e}"));
    let remote = server.remote_settings("outage");
    let mut settings: Vec<Setting<'_>> = remote
        .iter()
        .map(|(key, value)| ("remote", *key, value.as_str()))
        .collect();
    // 24 MiB at 4 MiB/s: the first upload is in progress for ~6 s.
    settings.push(("remote", "bandwidth_bytes_per_s", "\"4MiB\""));
    let d = Daemon::start(&settings);
    let state = State::new(4, 24 << 20);
    let mut c = client(&d, "job", 0, 1);
    state.register(&mut c);
    state.fill(1);
    let first = snapshot_committed(&mut c, 1);
    // The upload of step 1 is under way once its multipart upload is
    // journalled.
    let journal = d.root.join(".remote-uploads");
    wait_for(
        "the upload of step 1 to start",
        Duration::from_secs(30),
        || std::fs::read_dir(&journal).is_ok_and(|mut entries| entries.next().is_some()),
    );
    server.kill().unwrap_or_else(|e| panic!("{e}"));
    // Local snapshots go on at full speed while the store is down.
    let mut persists = Vec::new();
    for step in 2..=6 {
        state.fill(step);
        let started = Instant::now();
        let commit = snapshot_committed(&mut c, step);
        persists.push((commit.persist, started.elapsed()));
    }
    let slowest = persists.iter().map(|(p, _)| *p).max().expect("five");
    assert!(
        slowest <= first.persist * 4 + Duration::from_millis(500),
        "persists while the store is down {persists:?}, before {:?}",
        first.persist
    );
    let status = c.status().expect("status").remote.expect("remote status");
    assert!(
        status.ranks.iter().any(|r| r.behind_steps >= 1),
        "the lag is reported: {status:?}"
    );
    assert!(d.metric("gpusnap_remote_upload_lag_steps{job=\"job\"}") >= 1.0);
    assert!(
        d.exports("gpusnap_remote_retries_total"),
        "the failing requests were retried"
    );
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    // Whatever the cut left, nothing is half-listed, now or later.
    assert_nothing_half_listed(&server, "outage");
    wait_for("the uploads to resume", Duration::from_secs(120), || {
        let keys = assert_nothing_half_listed(&server, "outage");
        keys.iter().any(|k| k == "outage/job/step-6/COMPLETE")
    });
    assert_nothing_half_listed(&server, "outage");
    wait_for("the lag to clear", Duration::from_secs(30), || {
        d.metric("gpusnap_remote_upload_lag_steps{job=\"job\"}") == 0.0
    });
    let status = c.status().expect("status").remote.expect("remote status");
    assert!(status.reachable, "{status:?}");
    assert_eq!(status.last_error, None, "{status:?}");
    assert!(
        daemon::verify_all(&d.root) >= 1,
        "the local snapshots are intact"
    );
}

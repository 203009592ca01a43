//! A full disk under the real daemon: a small tmpfs as the store root. The
//! snapshot that does not fit fails cleanly (the trainer is told, with the
//! OS error ENOSPC as a typed field, and the metrics count it by errno;
//! nothing of it is left), the older one stays listed, verified and
//! restorable, and the daemon goes on serving.

mod daemon;
mod raw;

use std::process::Command;

use daemon::{Daemon, State, client, snapshot_committed, verify_all};
use gpusnap::proto::{ErrorKind, OsError};
use gpusnap::{Error, SnapshotOutcome, Step};

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_that_snapshot_and_keeps_the_older_one() {
    if !gpusnapd_testkit::root_or_skip("mounting a small tmpfs needs root (CI runs as root)") {
        return;
    }
    let dir = daemon::scratch();
    let root = dir.path().join("small-disk");
    std::fs::create_dir(&root).expect("mkdir");
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=12m",
            "gpusnap-test",
            root.to_str().expect("utf-8"),
        ])
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount -t tmpfs failed");
    let _mount = Mount(root.clone());

    let daemon = Daemon::start_with_root(dir, root.clone(), &[]);
    let state = State::new(6, 7 << 20);
    let mut c = client(&daemon, "full", 0, 1);
    state.register(&mut c);
    state.fill(1);
    snapshot_committed(&mut c, 1);

    // Step 2 needs another 7 MiB of the 12: the reservation fails.
    state.fill(2);
    assert!(matches!(
        c.snapshot(2).expect("captured"),
        SnapshotOutcome::Captured(_)
    ));
    match c.wait_committed(2) {
        Err(Error::SnapshotFailed {
            step: 2,
            kind: ErrorKind::Storage,
            os_error,
            ..
        }) => assert_eq!(os_error, Some(OsError::ENOSPC), "the client sees the errno"),
        other => panic!("step 2 on a full disk: {other:?}"),
    }
    assert_eq!(
        daemon.metric("gpusnap_snapshot_failures_total{errno=\"ENOSPC\",job=\"full\"}"),
        1.0,
        "the failure is counted by its errno"
    );
    let rank_dir = root.join("full").join("0");
    let left: Vec<String> = std::fs::read_dir(&rank_dir)
        .expect("rank dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["step-1"], "nothing of the failed step is left");
    assert_eq!(verify_all(&root), 1);
    assert!(daemon.metric("gpusnap_snapshots_total{job=\"full\",outcome=\"failed\"}") >= 1.0);

    // The trainer was told; it goes on, and the older snapshot restores.
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("step 1");
    assert_eq!(r.step, 1);
    assert_eq!(state.differs_from(1), None);
    assert!(c.status().expect("status").snapshots_in_flight == 0);

    // On the wire: the `Failed` event carries the errno as a typed field.
    // 7 MiB more do not fit beside step 1.
    let mut wire = raw::Raw::connect(&daemon.socket);
    let registered = wire.register("full-wire", (7 << 20) / 4);
    assert_eq!(registered["type"], "registered", "{registered}");
    let accepted = wire.capture(1);
    assert_eq!(accepted["type"], "accepted", "{accepted}");
    let failed = wire.event();
    assert_eq!(failed["type"], "failed", "{failed}");
    assert_eq!(failed["kind"], "storage", "{failed}");
    assert_eq!(failed["os_error"], "ENOSPC", "{failed}");
    assert_eq!(
        daemon.metric("gpusnap_snapshot_failures_total{errno=\"ENOSPC\",job=\"full-wire\"}"),
        1.0
    );
    assert_eq!(verify_all(&root), 1, "still only step 1 of job full");
}

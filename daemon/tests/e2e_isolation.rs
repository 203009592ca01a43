//! Isolation between uids on one daemon: a trainer of another uid cannot
//! list, describe, restore or register on a job it does not own, and a process outside
//! the socket's group cannot connect at all. Root sees everything.
//!
//! The trainers are this test binary run again as other users (`--ignored
//! --exact isolation_child`), with their part in environment variables.

mod as_user;
mod daemon;

use std::time::Duration;

use as_user::ChildTest;
use daemon::{Daemon, State};
use gpusnap::{ClientConfig, Error, Step};

/// The socket's group; trainers "in the group" get it as their gid.
const TRAINERS_GID: u32 = 4242;
const OWNER_UID: u32 = 1000;
const NOBODY: u32 = 65534;

fn config(job: &str) -> ClientConfig {
    let mut c = ClientConfig::new(job);
    c.socket = as_user::socket();
    c.connect_timeout = Duration::from_millis(500);
    c
}

/// One trainer's part, run as another uid.
#[test]
#[ignore = "child process of the isolation tests"]
fn isolation_child() {
    let role = as_user::role();
    let state = State::new(3, 64 << 10);
    match role.as_str() {
        "owner" => {
            let mut c = gpusnap::Client::with_config(config("alpha")).expect("connect");
            assert_eq!(c.uid(), OWNER_UID);
            state.register(&mut c);
            state.fill(7);
            daemon::snapshot_committed(&mut c, 1);
            let listing = c.list().expect("list");
            assert_eq!(listing.snapshots.len(), 1, "the owner sees its snapshot");
            let described = c.describe(None, 0, 1).expect("describe own snapshot");
            assert_eq!(described.tensors.len(), state.tensors.len());
        }
        "intruder" => {
            let mut c = gpusnap::Client::with_config(config("alpha")).expect("connect");
            assert_eq!(c.uid(), NOBODY);
            let everything = c.list_job(None).expect("list");
            assert!(
                everything.snapshots.iter().all(|s| s.job != "alpha"),
                "another uid's snapshots are listed: {everything:?}"
            );
            let alpha = c.list_job(Some("alpha")).expect("list alpha");
            assert!(
                alpha.snapshots.is_empty() && alpha.complete.is_empty(),
                "{alpha:?}"
            );
            match c.describe(Some("alpha"), 0, 1) {
                Err(Error::PermissionDenied(message)) => {
                    assert!(message.contains("alpha"), "{message}");
                }
                other => panic!("describe of another uid's snapshot: {other:?}"),
            }
            let status = c.status().expect("status");
            assert!(status.jobs.iter().all(|j| j.job != "alpha"), "{status:?}");
            assert!(
                status.sessions.iter().all(|s| s.job != "alpha"),
                "{status:?}"
            );
            state.register(&mut c);
            match c.restore(Step::Latest) {
                Err(Error::PermissionDenied(message)) => {
                    assert!(message.contains("alpha"), "{message}");
                }
                other => panic!("restore of another uid's job: {other:?}"),
            }
            match c.snapshot(2) {
                Err(Error::PermissionDenied(_)) => {}
                other => panic!("snapshot into another uid's job: {other:?}"),
            }
            // Its own job works.
            let mut own = gpusnap::Client::with_config(config("beta")).expect("connect");
            state.register(&mut own);
            daemon::snapshot_committed(&mut own, 1);
        }
        "outsider" => match gpusnap::Client::with_config(config("gamma")) {
            Err(Error::DaemonUnavailable { source, .. }) => {
                assert_eq!(
                    source.kind(),
                    std::io::ErrorKind::PermissionDenied,
                    "{source}"
                );
            }
            Err(other) => panic!("expected permission denied, got {other}"),
            Ok(_) => panic!("a process outside the socket's group connected"),
        },
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn another_uid_cannot_list_describe_restore_or_register_and_outsiders_cannot_connect() {
    if !gpusnapd_testkit::root_or_skip("switching to other uids needs root (CI runs as root)") {
        return;
    }
    let daemon = Daemon::start(&[
        ("daemon", "socket_group", &format!("\"{TRAINERS_GID}\"")),
        ("daemon", "socket_mode", "\"0660\""),
    ]);
    let child = ChildTest::new(daemon.dir.path(), "isolation_child");
    child.run(&daemon.socket, "owner", OWNER_UID, TRAINERS_GID);
    child.run(&daemon.socket, "intruder", NOBODY, TRAINERS_GID);
    child.run(&daemon.socket, "outsider", NOBODY, NOBODY);

    // Root sees both jobs; ownership is on disk for the next daemon.
    let mut root = daemon::client(&daemon, "root-observer", 0, 1);
    let jobs: Vec<String> = root
        .list_job(None)
        .expect("list")
        .snapshots
        .into_iter()
        .map(|s| s.job)
        .collect();
    assert_eq!(jobs, ["alpha", "beta"]);
    let described = root
        .describe(Some("alpha"), 0, 1)
        .expect("root describes any job");
    assert_eq!((described.job.as_str(), described.step), ("alpha", 1));
    let owner = std::fs::read_to_string(daemon.root.join("alpha").join("OWNER")).expect("OWNER");
    assert_eq!(owner, format!("{OWNER_UID}\n"));
}

//! The remote tier and uids: a job's first upload records its owner in
//! the object store (`<prefix>/<job>/OWNER`), and on a replaced node (no
//! local record of the job) only that uid sees the job's remote steps,
//! describes them and restores them; another uid sees nothing and is
//! refused, even after it claimed the job's name on that node first.
//!
//! The trainers are this test binary run again as other users (`--ignored
//! --exact remote_uid_child`), as in `e2e_isolation.rs`.

mod as_user;
mod daemon;

use std::time::Duration;

use as_user::ChildTest;
use daemon::{Daemon, Setting, State, wait_for};
use gpusnap::proto::RestoreSource;
use gpusnap::{ClientConfig, Error, Step};
use gpusnapd_testkit::S3Server;

const OWNER_UID: u32 = 1000;
const NOBODY: u32 = 65534;

fn client(job: &str) -> gpusnap::Client {
    let mut c = ClientConfig::new(job);
    c.socket = as_user::socket();
    c.call_timeout = Duration::from_secs(60);
    c.commit_timeout = Duration::from_secs(120);
    gpusnap::Client::with_config(c).expect("connect")
}

fn remote_steps(c: &mut gpusnap::Client, job: &str) -> Vec<u64> {
    let listing = c.list_job(Some(job)).expect("list");
    assert_eq!(listing.remote_error, None);
    listing
        .remote_complete
        .into_iter()
        .filter(|j| j.job == job)
        .flat_map(|j| j.steps)
        .collect()
}

/// One trainer's part, run as another uid.
#[test]
#[ignore = "child process of the remote uid test"]
fn remote_uid_child() {
    let role = as_user::role();
    let state = State::new(2, 6 << 20);
    match role.as_str() {
        "train" => {
            let mut c = client("alpha");
            state.register(&mut c);
            for step in [1, 2] {
                state.fill(step);
                daemon::snapshot_committed(&mut c, step);
            }
        }
        "intruder" => {
            let mut c = client("alpha");
            assert!(
                remote_steps(&mut c, "alpha").is_empty(),
                "another uid's remote steps listed"
            );
            match c.describe(Some("alpha"), 0, 2) {
                Err(Error::NotFound(_)) => {}
                other => panic!("describe of another uid's remote step: {other:?}"),
            }
            // It may claim the name on this node, but never get the data.
            state.register(&mut c);
            match c.restore(Step::Latest) {
                Err(Error::PermissionDenied(message)) => {
                    assert!(message.contains("uid 1000"), "{message}");
                }
                other => panic!("restore of another uid's remote job: {other:?}"),
            }
            match c.restore(Step::At(2)) {
                Err(Error::NotFound(_) | Error::PermissionDenied(_)) => {}
                other => panic!("restore of another uid's remote step: {other:?}"),
            }
            assert!(state.differs_from(2).is_some(), "no byte of alpha restored");
        }
        "owner" => {
            let mut c = client("alpha");
            assert_eq!(remote_steps(&mut c, "alpha"), vec![1, 2]);
            let described = c
                .describe(Some("alpha"), 0, 2)
                .expect("describe the remote step");
            assert_eq!(described.tensors.len(), state.tensors.len());
            state.register(&mut c);
            let info = c
                .restore(Step::Latest)
                .expect("restore")
                .expect("a snapshot");
            assert_eq!((info.step, info.source), (2, RestoreSource::Remote));
            assert_eq!(state.differs_from(2), None);
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn only_the_jobs_owner_sees_and_restores_its_remote_steps_on_a_replaced_node() {
    if !gpusnapd_testkit::root_or_skip("switching to other uids needs root (CI runs as root)") {
        return;
    }
    let dir = daemon::scratch();
    let server = S3Server::start(&dir.path().join("s3")).unwrap_or_else(|e| panic!("{e}"));
    let remote = server.remote_settings("uids");
    let settings: Vec<Setting<'_>> = remote
        .iter()
        .map(|(key, value)| ("remote", *key, value.as_str()))
        .collect();
    let a = Daemon::start(&settings);
    ChildTest::new(a.dir.path(), "remote_uid_child").run(&a.socket, "train", OWNER_UID, OWNER_UID);
    wait_for("step 2 complete remotely", Duration::from_secs(90), || {
        server
            .list_keys("uids/alpha")
            .is_ok_and(|keys| keys.iter().any(|k| k == "uids/alpha/step-2/COMPLETE"))
    });
    assert_eq!(
        server.get("uids/alpha/OWNER").expect("OWNER object"),
        format!("{OWNER_UID}\n").into_bytes()
    );
    drop(a);
    let b = Daemon::start(&settings);
    ChildTest::new(b.dir.path(), "remote_uid_child").run(&b.socket, "intruder", NOBODY, NOBODY);
    let c = Daemon::start(&settings);
    ChildTest::new(c.dir.path(), "remote_uid_child").run(&c.socket, "owner", OWNER_UID, OWNER_UID);
}

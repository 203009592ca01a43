//! Hostile paths through the real daemon.
//!
//! * Symbolic links planted beneath the store root by someone else (this
//!   test, playing an intruder with write access to the root): at a job
//!   directory, at a rank directory, at a step directory, at names
//!   start-up recovery removes. Every request about those paths is
//!   refused with a clear error (a `Storage` error with `ELOOP` naming
//!   the path and the rule) or finds nothing (a link is never listed),
//!   nothing outside the root is created, written or removed, the daemon
//!   keeps serving the other jobs, and a restart with the links in place
//!   follows none of them.
//! * Job names that could escape a directory or mislead a reader (`..`,
//!   `/`, NUL, control characters, 129 and 600 bytes, a leading `.`,
//!   Unicode look-alikes, text that is not UTF-8): every request that
//!   names a job (`Register`, `List`, `Describe`) refuses each with
//!   `InvalidRegistration` and the naming rule, and nothing appears in the
//!   root.

mod daemon;
mod tree;

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use daemon::{Daemon, State};
use gpusnap::proto::{self, OsError, PROTOCOL_VERSION};
use gpusnap::{Error, Step};
use serde_json::{Value, json};
use tree::fingerprint;

/// A `Storage` error that says a link was refused at a path naming `job`.
#[track_caller]
fn assert_link_refused<T: std::fmt::Debug>(result: gpusnap::Result<T>, job: &str, what: &str) {
    match result {
        Err(Error::Storage { message, os_error }) => {
            assert_eq!(
                os_error,
                Some(OsError::from_raw(libc::ELOOP)),
                "{what}: {message}"
            );
            assert!(
                message.contains("symbolic link") && message.contains("never follows"),
                "{what}: the message does not say why: {message}"
            );
            assert!(
                message.contains(job),
                "{what}: the message does not name the path: {message}"
            );
        }
        other => panic!("{what}: expected a refused link, got {other:?}"),
    }
}

/// Every request of `client` (registered for `job`, rank 0) meets the link
/// at `linked`: a snapshot, a restore (which leaves the buffers as they
/// were) and a describe are refused naming it, and the listing is empty.
#[track_caller]
fn assert_every_request_refused(
    client: &mut gpusnap::Client,
    state: &State,
    job: &str,
    linked: &str,
) {
    assert_link_refused(client.snapshot(2), linked, "snapshot");
    state.zero();
    assert_link_refused(client.restore(Step::Latest), linked, "restore");
    assert!(all_zero(state), "a refused restore wrote the buffers");
    assert_link_refused(client.describe(Some(job), 0, 1), linked, "describe");
    assert_eq!(listed(client, job), [], "a linked path is listed");
}

/// Every byte of every tensor of `state` is zero (as `state.zero()` left it).
fn all_zero(state: &State) -> bool {
    state
        .tensors
        .iter()
        .all(|(_, t)| t.read().iter().all(|b| *b == 0))
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Every snapshot of `job` in the daemon's listing.
fn listed(client: &mut gpusnap::Client, job: &str) -> Vec<(u32, u64)> {
    client
        .list_job(Some(job))
        .expect("list")
        .snapshots
        .into_iter()
        .map(|s| {
            assert_eq!(s.job, job);
            (s.rank, s.step)
        })
        .collect()
}

#[test]
fn links_planted_beneath_the_root_are_refused_never_followed_even_by_recovery() {
    let mut d = Daemon::start(&[]);
    let root = d.root.clone();
    let outside = d.dir.path().join("outside");
    // What following each link would find: a job owned by this uid with a
    // rank directory, and (moved there below) a real rank and step.
    std::fs::create_dir_all(outside.join("job-target/0")).expect("mkdir");
    std::fs::write(outside.join("job-target/OWNER"), format!("{}\n", uid())).expect("OWNER");
    std::fs::create_dir_all(outside.join("rank-target")).expect("mkdir");
    std::fs::create_dir_all(outside.join("step-target")).expect("mkdir");
    std::fs::create_dir_all(outside.join("partial-target")).expect("mkdir");
    std::fs::write(outside.join("partial-target/keep"), b"keep").expect("write");
    std::fs::create_dir_all(outside.join("claim-target")).expect("mkdir");
    std::fs::write(outside.join("claim-target/OWNER"), b"0\n").expect("write");

    let state = State::new(3, 64 << 10);
    let mut good = daemon::client(&d, "good", 0, 1);
    state.register(&mut good);
    state.fill(1);
    daemon::snapshot_committed(&mut good, 1);

    // A link at a job directory, before anyone registered the job.
    symlink(outside.join("job-target"), root.join("linked-job")).expect("plant");
    let mut linked = daemon::client(&d, "linked-job", 0, 1);
    state.register(&mut linked);
    assert_every_request_refused(&mut linked, &state, "linked-job", "linked-job");

    // A link at a rank directory of a registered job: the real rank
    // directory (with its committed step) moved outside, linked back.
    let mut rank_linked = daemon::client(&d, "rank-linked", 0, 1);
    state.register(&mut rank_linked);
    state.fill(2);
    daemon::snapshot_committed(&mut rank_linked, 1);
    std::fs::rename(root.join("rank-linked/0"), outside.join("rank-target/0")).expect("move rank");
    symlink(outside.join("rank-target/0"), root.join("rank-linked/0")).expect("plant");
    let before = fingerprint(&outside);
    assert_every_request_refused(&mut rank_linked, &state, "rank-linked", "rank-linked/0");
    assert_eq!(fingerprint(&outside), before, "written outside the root");

    // A link at a step directory: a valid snapshot of exactly that step
    // lies behind it, so following it would restore it.
    let mut step_linked = daemon::client(&d, "step-linked", 0, 1);
    state.register(&mut step_linked);
    state.fill(3);
    daemon::snapshot_committed(&mut step_linked, 1);
    let step_dir = root.join("step-linked/0/step-1");
    std::fs::rename(&step_dir, outside.join("step-target/step-1")).expect("move step");
    symlink(outside.join("step-target/step-1"), &step_dir).expect("plant");
    let before = fingerprint(&outside);
    state.zero();
    match step_linked.restore(Step::At(1)) {
        Err(Error::NotFound(message)) => assert!(message.contains("step-linked"), "{message}"),
        other => panic!("restore of a linked step: {other:?}"),
    }
    assert_eq!(
        step_linked.restore(Step::Latest).expect("restore latest"),
        None,
        "a linked step was restored"
    );
    assert!(all_zero(&state), "a linked step reached the buffers");
    assert_link_refused(
        step_linked.describe(Some("step-linked"), 0, 1),
        "step-linked/0/step-1",
        "describe",
    );
    assert_link_refused(
        step_linked.snapshot(1),
        "step-linked/0/step-1",
        "snapshot over it",
    );
    assert_eq!(listed(&mut step_linked, "step-linked"), []);
    assert_eq!(fingerprint(&outside), before, "written outside the root");

    // The other job is served all along.
    state.fill(4);
    daemon::snapshot_committed(&mut good, 2);
    state.zero();
    let restored = good
        .restore(Step::Latest)
        .expect("restore")
        .expect("a step");
    assert_eq!(restored.step, 2);
    assert_eq!(state.differs_from(4), None);
    assert_eq!(listed(&mut good, "good"), [(0, 1), (0, 2)]);

    // Names start-up recovery removes, planted as links to outside.
    symlink(
        outside.join("partial-target"),
        root.join("step-linked/0/step-9.partial"),
    )
    .expect("plant");
    symlink(
        outside.join("partial-target"),
        root.join("good/0/step-7.trash"),
    )
    .expect("plant");
    symlink(outside.join("claim-target"), root.join(".claiming-evil")).expect("plant");
    let before = fingerprint(&outside);
    drop((good, linked, rank_linked, step_linked));
    assert!(d.stop().success(), "the daemon did not stop cleanly");
    d.restart();
    assert_eq!(
        fingerprint(&outside),
        before,
        "recovery reached outside the root"
    );
    for unlinked in ["step-linked/0/step-9.partial", "good/0/step-7.trash"] {
        assert!(
            std::fs::symlink_metadata(root.join(unlinked)).is_err(),
            "recovery left the link {unlinked}"
        );
    }
    assert!(
        std::fs::symlink_metadata(root.join(".claiming-evil"))
            .expect("the claim link")
            .file_type()
            .is_symlink(),
        "a link named like a claim is left for an operator, not followed"
    );

    // After the restart: the good job restores, the links are still refused.
    let mut good = daemon::client(&d, "good", 0, 1);
    state.register(&mut good);
    state.zero();
    let restored = good
        .restore(Step::Latest)
        .expect("restore")
        .expect("a step");
    assert_eq!(restored.step, 2);
    assert_eq!(state.differs_from(4), None);
    let mut linked = daemon::client(&d, "linked-job", 0, 1);
    state.register(&mut linked);
    assert_link_refused(
        linked.restore(Step::Latest),
        "linked-job",
        "register after restart",
    );
    let mut rank_linked = daemon::client(&d, "rank-linked", 0, 1);
    state.register(&mut rank_linked);
    assert_link_refused(
        rank_linked.restore(Step::Latest),
        "rank-linked/0",
        "restore after restart",
    );
    assert_eq!(fingerprint(&outside), before, "written outside the root");
}

/// A connection speaking raw frames, so any name (and bytes that are not
/// JSON text) can be sent.
struct Raw {
    s: UnixStream,
    id: u64,
}

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut raw = Raw { s, id: 0 };
        let welcome = raw.call(json!({
            "type": "hello", "protocol_version": PROTOCOL_VERSION, "client": "e2e-hostile"
        }));
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        raw
    }

    /// Sends a frame of exactly `body` bytes.
    fn send_bytes(&mut self, body: &[u8]) {
        let len = u32::try_from(body.len()).expect("len");
        self.s.write_all(&len.to_le_bytes()).expect("send");
        self.s.write_all(body).expect("send");
    }

    /// The next frame's body, `None` once the daemon closed.
    fn next(&mut self) -> Option<Value> {
        let mut header = [0u8; 4];
        self.s.read_exact(&mut header).ok()?;
        let mut body = vec![0u8; proto::frame_len(header).expect("frame")];
        self.s.read_exact(&mut body).ok()?;
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        Some(v["body"].clone())
    }

    fn call(&mut self, body: Value) -> Value {
        self.id += 1;
        let frame = serde_json::to_vec(&json!({ "id": self.id, "body": body })).expect("json");
        self.send_bytes(&frame);
        self.next().expect("a reply")
    }
}

/// Names that must never become a path component, each with why.
fn hostile_names() -> Vec<(String, &'static str)> {
    vec![
        ("..".into(), "the parent directory"),
        (".".into(), "the directory itself"),
        ("../escape".into(), "climbs out"),
        ("a/b".into(), "a slash"),
        ("/etc".into(), "an absolute path"),
        ("a\0b".into(), "a NUL byte"),
        ("line\nbreak".into(), "a newline (log injection)"),
        ("esc\x1b[31mred".into(), "a terminal escape"),
        ("tab\there".into(), "a tab"),
        ("x".repeat(129), "129 bytes, one over the limit"),
        ("y".repeat(600), "600 bytes"),
        (
            ".hidden".into(),
            "a leading dot (the root's own names start so)",
        ),
        (".claiming-good".into(), "a claim directory's name"),
        (".remote-uploads".into(), "the journal's name"),
        ("\u{0430}lpha".into(), "a Cyrillic look-alike"),
        ("\u{ff41}lpha".into(), "a fullwidth look-alike"),
        ("al\u{200b}pha".into(), "a zero-width space"),
        ("alpha\u{0301}".into(), "a combining accent"),
        ("".into(), "empty"),
        (" alpha".into(), "a space"),
        ("a\\b".into(), "a backslash"),
    ]
}

/// `reply` refuses `name` with `InvalidRegistration` and the naming rule,
/// with no raw control character in the message.
#[track_caller]
fn assert_name_refused(reply: &Value, name: &str, why: &str, request: &str) {
    assert_eq!(
        reply["type"], "error",
        "{request} of {why} ({name:?}): {reply}"
    );
    assert_eq!(
        reply["kind"], "invalid_registration",
        "{request} of {why} ({name:?}): {reply}"
    );
    let message = reply["message"].as_str().expect("message");
    assert!(
        message.contains("job name")
            && message.contains("A-Z a-z 0-9 '_' '-' '.'")
            && message.contains("not starting with '.'"),
        "{request} of {why}: the message does not state the rule: {message}"
    );
    assert!(
        !message.chars().any(char::is_control),
        "{request} of {why}: a raw control character in the message: {message:?}"
    );
}

#[test]
fn job_names_that_could_escape_or_mislead_are_refused_by_every_request_naming_a_job() {
    let d = Daemon::start(&[]);
    let mut raw = Raw::connect(&d.socket);
    for (name, why) in hostile_names() {
        let register = raw.call(json!({
            "type": "register", "job": name, "rank": 0, "world_size": 1,
            "tensors": [{ "name": "w", "dtype": "F32", "shape": [1024] }]
        }));
        assert_name_refused(&register, &name, why, "register");
        let list = raw.call(json!({ "type": "list", "job": name }));
        assert_name_refused(&list, &name, why, "list");
        let describe = raw.call(json!({ "type": "describe", "job": name, "rank": 0, "step": 1 }));
        assert_name_refused(&describe, &name, why, "describe");
    }
    // Text that is not UTF-8 cannot be a JSON string: a lone surrogate
    // escape, and a raw 0xFF byte, are malformed frames (the connection
    // closes, as for any protocol error).
    let register = |job: &[u8]| {
        let mut frame = br#"{"id":1,"body":{"type":"register","job":""#.to_vec();
        frame.extend_from_slice(job);
        frame.extend_from_slice(
            br#"","rank":0,"world_size":1,"tensors":[{"name":"w","dtype":"F32","shape":[1]}]}}"#,
        );
        frame
    };
    for job in [&br"\udc80"[..], &b"\xff\xfe"[..]] {
        let mut raw = Raw::connect(&d.socket);
        raw.send_bytes(&register(job));
        let reply = raw.next().expect("an error before the close");
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["kind"], "protocol", "{reply}");
        assert!(raw.next().is_none(), "the connection stays open");
    }
    // Nothing was made for any of them, and the daemon serves a good name.
    assert_eq!(daemon::dir_names(&d.root), Vec::<String>::new());
    let state = State::new(2, 16 << 10);
    let mut client = daemon::client(&d, "a..b", 0, 1);
    state.register(&mut client);
    daemon::snapshot_committed(&mut client, 1);
    assert_eq!(daemon::dir_names(&d.root), ["a..b"]);
    let again = raw.call(json!({ "type": "list", "job": "a..b" }));
    assert_eq!(again["type"], "listing", "{again}");
}

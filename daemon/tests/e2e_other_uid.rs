//! A client of another uid tries every request of the protocol against a
//! job it does not own, request by request, while the owner holds the job
//! registered: each is refused with its exact kind, or (the requests that
//! are not about one job: `List`, `Status`) answered with nothing of the
//! job, and the job's snapshots are unchanged afterwards (the same files,
//! byte for byte; listed and restored bit-for-bit by their owner).
//!
//! The request list is checked twice: [`expected`] matches every
//! `RequestBody` variant with no wildcard (a new variant does not compile
//! until it is given its answer here), and the test checks that every
//! name of `RequestBody::NAMES` was sent.
//!
//! The trainers are this test binary run again as other users (`--ignored
//! --exact other_uid_child`), as in `e2e_isolation.rs`.

mod as_user;
mod daemon;
mod tree;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use as_user::ChildTest;
use daemon::{Daemon, State};
use gpusnap::proto::{
    self, AttachReport, Dtype, ErrorKind, PROTOCOL_VERSION, PinState, Reply, ReplyBody, Request,
    RequestBody, TensorSpec,
};
use gpusnap::{ClientConfig, Step};

const TRAINERS_GID: u32 = 4242;
const OWNER_UID: u32 = 1000;
const OTHER_UID: u32 = 1001;
/// The job uid 1000 owns.
const JOB: &str = "jay";
/// What the owner's child prints once the job's steps are committed.
const READY: &str = "owner ready";

/// How the daemon must answer uid 1001's request on a connection whose
/// `Register` of the job was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// An error reply of this kind.
    Refused(ErrorKind),
    /// An answer (not an error) in which the job does not appear.
    NothingOfTheJob,
}

/// The answer to each request. No wildcard: a new request type does not
/// compile until it is decided here.
fn expected(body: &RequestBody) -> Expect {
    match body {
        // The handshake is done: a second hello is out of order.
        RequestBody::Hello { .. } => Expect::Refused(ErrorKind::Protocol),
        RequestBody::Register { .. } => Expect::Refused(ErrorKind::PermissionDenied),
        RequestBody::Begin { .. }
        | RequestBody::Captured { .. }
        | RequestBody::Abort { .. }
        | RequestBody::Restore { .. }
        | RequestBody::Release { .. }
        | RequestBody::Attached { .. } => Expect::Refused(ErrorKind::NotRegistered),
        // No streamed capture is open on the connection: out of order.
        RequestBody::ChunkFilled { .. } => Expect::Refused(ErrorKind::Protocol),
        RequestBody::List { .. } | RequestBody::Status => Expect::NothingOfTheJob,
        // Whatever the rank or step: a step's existence is not told.
        RequestBody::Describe { .. } => Expect::Refused(ErrorKind::PermissionDenied),
    }
}

/// Every request aimed at the job; the two answered with an error that
/// closes the connection last.
fn attempts() -> Vec<RequestBody> {
    let tensors = vec![TensorSpec {
        name: "layer0.f32".into(),
        dtype: Dtype::F32,
        shape: vec![1024],
    }];
    let mut all = vec![
        RequestBody::Register {
            job: JOB.into(),
            rank: 0,
            world_size: 1,
            tensors: tensors.clone(),
        },
        // Another rank of it, in a larger world.
        RequestBody::Register {
            job: JOB.into(),
            rank: 1,
            world_size: 2,
            tensors,
        },
        RequestBody::Begin { step: 3 },
        RequestBody::Captured {
            step: 2,
            capture_ns: 1,
            stall_ns: 1,
        },
        RequestBody::Abort {
            step: 2,
            reason: "an intruder".into(),
        },
        RequestBody::Restore { step: None },
        RequestBody::Restore { step: Some(1) },
        RequestBody::Release { slot: 0 },
        RequestBody::Release { slot: 1 },
        RequestBody::Attached {
            devices: vec![AttachReport {
                device: "host".into(),
                pin: PinState::NotNeeded,
            }],
        },
        RequestBody::List {
            job: Some(JOB.into()),
        },
        RequestBody::List { job: None },
        RequestBody::Status,
        RequestBody::Describe {
            job: JOB.into(),
            rank: 0,
            step: 1,
        },
        RequestBody::Describe {
            job: JOB.into(),
            rank: 0,
            step: 99,
        },
        RequestBody::Describe {
            job: JOB.into(),
            rank: 7,
            step: 2,
        },
    ];
    all.push(RequestBody::ChunkFilled { step: 2, seq: 0 });
    all.push(RequestBody::Hello {
        protocol_version: PROTOCOL_VERSION,
        client: "intruder".into(),
    });
    all
}

/// One connection speaking typed frames.
struct Conn {
    s: UnixStream,
    id: u64,
}

impl Conn {
    /// Connects and says hello; the welcome's uid must be `uid`.
    fn open(socket: &Path, uid: u32) -> Conn {
        let s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut conn = Conn { s, id: 0 };
        let welcome = conn
            .call(RequestBody::Hello {
                protocol_version: PROTOCOL_VERSION,
                client: "e2e-other-uid".into(),
            })
            .expect("welcome");
        match &welcome {
            ReplyBody::Welcome { uid: seen, .. } => assert_eq!(*seen, uid, "{welcome:?}"),
            other => panic!("not a welcome: {other:?}"),
        }
        assert_no_job(&welcome, "welcome");
        conn
    }

    /// The reply to `body` (this connection never commits anything, so no
    /// event comes first); `None` once the daemon closed.
    fn call(&mut self, body: RequestBody) -> Option<ReplyBody> {
        self.id += 1;
        let frame = proto::encode(&Request { id: self.id, body }).expect("encode");
        // A connection the daemon closed may refuse the write (EPIPE).
        self.s.write_all(&frame).ok()?;
        let mut header = [0u8; 4];
        self.s.read_exact(&mut header).ok()?;
        let mut bytes = vec![0u8; proto::frame_len(header).expect("frame")];
        self.s.read_exact(&mut bytes).expect("a whole frame");
        let reply: Reply = proto::decode(&bytes).expect("a valid reply");
        assert_eq!(
            reply.id, self.id,
            "not the reply to this request: {reply:?}"
        );
        Some(reply.body)
    }
}

/// `reply`, written out, does not name the job.
#[track_caller]
fn assert_no_job(reply: &ReplyBody, what: &str) {
    let text = serde_json::to_string(reply).expect("json");
    assert!(
        !text.contains(JOB),
        "{what}: the answer tells another uid of the job: {text}"
    );
}

/// uid 1001's part: every request against the job.
fn intrude(socket: &Path) {
    let mut sent = BTreeSet::new();
    let mut conn = Conn::open(socket, OTHER_UID);
    for body in attempts() {
        let name = body.name();
        let want = expected(&body);
        sent.insert(name);
        let described = format!("{body:?}");
        let reply = conn
            .call(body)
            .unwrap_or_else(|| panic!("{described}: the daemon closed without an answer"));
        match (want, &reply) {
            (
                Expect::Refused(kind),
                ReplyBody::Error {
                    kind: got, message, ..
                },
            ) => {
                assert_eq!(*got, kind, "{described}: {message}");
                if kind == ErrorKind::PermissionDenied {
                    assert!(
                        message.contains(JOB) && message.contains(&OTHER_UID.to_string()),
                        "{described}: the refusal does not say whose job it is not: {message}"
                    );
                }
                if kind.closes_connection() {
                    assert!(
                        conn.call(RequestBody::Status).is_none(),
                        "{described}: the connection stayed open after a {kind:?} error"
                    );
                    conn = Conn::open(socket, OTHER_UID);
                }
            }
            (
                Expect::NothingOfTheJob,
                ReplyBody::Listing {
                    snapshots,
                    complete,
                    remote_complete,
                    ..
                },
            ) => {
                assert!(
                    snapshots.is_empty() && complete.is_empty() && remote_complete.is_empty(),
                    "{described}: {reply:?}"
                );
                assert_no_job(&reply, &described);
            }
            (Expect::NothingOfTheJob, ReplyBody::Status(status)) => {
                assert!(
                    status.sessions.is_empty() && status.jobs.is_empty(),
                    "{described}: {status:?}"
                );
                assert_no_job(&reply, &described);
            }
            (want, other) => panic!("{described}: expected {want:?}, got {other:?}"),
        }
    }
    let all: BTreeSet<&str> = RequestBody::NAMES.into_iter().collect();
    assert_eq!(sent, all, "a request type was never tried");
}

fn client(job: &str) -> gpusnap::Client {
    let mut c = ClientConfig::new(job);
    c.socket = as_user::socket();
    c.call_timeout = Duration::from_secs(60);
    c.commit_timeout = Duration::from_secs(120);
    gpusnap::Client::with_config(c).expect("connect")
}

/// The owner's steps: 1 and 2, filled from their own seeds.
const STEPS: [u64; 2] = [1, 2];

/// The owner's snapshots are exactly as committed: listed, and restored
/// bit-for-bit.
fn check_owned(c: &mut gpusnap::Client, state: &State) {
    let listed: Vec<u64> = c
        .list_job(Some(JOB))
        .expect("list")
        .snapshots
        .iter()
        .map(|s| s.step)
        .collect();
    assert_eq!(listed, STEPS);
    for step in STEPS {
        state.zero();
        let restored = c.restore(Step::At(step)).expect("restore").expect("a step");
        assert_eq!(restored.step, step);
        assert_eq!(state.differs_from(step), None, "step {step} changed");
    }
}

/// One child's part, run as another uid.
#[test]
#[ignore = "child process of the other-uid test"]
fn other_uid_child() {
    let role = as_user::role();
    let state = State::new(3, 64 << 10);
    match role.as_str() {
        "owner" => {
            let mut c = client(JOB);
            assert_eq!(c.uid(), OWNER_UID);
            state.register(&mut c);
            for step in STEPS {
                state.fill(step);
                daemon::snapshot_committed(&mut c, step);
            }
            println!("{READY}");
            // Hold the job registered until the parent closes stdin.
            let mut rest = Vec::new();
            std::io::stdin().read_to_end(&mut rest).expect("stdin");
            check_owned(&mut c, &state);
        }
        "verify" => {
            let mut c = client(JOB);
            state.register(&mut c);
            check_owned(&mut c, &state);
            let described = c.describe(None, 0, 2).expect("describe");
            assert_eq!(described.tensors.len(), state.tensors.len());
        }
        "intruder" => {
            let socket = as_user::socket();
            intrude(&socket);
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn another_uid_is_refused_every_request_against_a_job_it_does_not_own() {
    if !gpusnapd_testkit::root_or_skip("switching to other uids needs root (CI runs as root)") {
        return;
    }
    let daemon = Daemon::start(&[
        ("daemon", "socket_group", &format!("\"{TRAINERS_GID}\"")),
        ("daemon", "socket_mode", "\"0660\""),
    ]);
    let child = ChildTest::new(daemon.dir.path(), "other_uid_child");

    let mut owner = child
        .command(&daemon.socket, "owner", OWNER_UID, TRAINERS_GID)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the owner");
    let mut lines = BufReader::new(owner.stdout.take().expect("stdout")).lines();
    // libtest prints "test NAME ... " before the child's first line.
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line.ends_with(READY));
    assert!(ready, "the owner exited before committing its steps");

    let job_dir = daemon.root.join(JOB);
    let before = tree::fingerprint(&job_dir);
    assert!(
        before.keys().any(|p| p.ends_with("step-2")),
        "the owner's steps are not on disk: {before:?}"
    );
    child.run(&daemon.socket, "intruder", OTHER_UID, TRAINERS_GID);
    assert_eq!(
        tree::fingerprint(&job_dir),
        before,
        "the job's files changed under another uid's requests"
    );
    assert_eq!(
        daemon::dir_names(&daemon.root),
        [JOB],
        "another uid's requests made something in the root"
    );

    drop(owner.stdin.take());
    let status = owner.wait().expect("wait for the owner");
    assert!(
        status.success(),
        "the owner failed after the intruder: {status}"
    );
    child.run(&daemon.socket, "verify", OWNER_UID, TRAINERS_GID);
}

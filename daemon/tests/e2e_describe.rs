//! `Describe` against the real daemon: the committed snapshot's tensor table
//! (exactly the registered specs, in data-file order) and world size, read
//! by a client that registered nothing, for its own rank or another; a
//! missing step, rank or job is `NotFound`; a garbled manifest is `Corrupt`;
//! the data file is not read. On a raw connection it is answered while a
//! capture is open and while a restored slot is lent, and a refusal leaves
//! the connection open.

mod daemon;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use daemon::{Daemon, State, client, snapshot_committed, wait_rank_free};
use gpusnap::proto::{self, ErrorKind, PROTOCOL_VERSION, Reply, ReplyBody, Request, RequestBody};
use gpusnap::{Error, TensorSpec};

fn specs(state: &State) -> Vec<TensorSpec> {
    state
        .tensors
        .iter()
        .map(|(name, t)| TensorSpec::new(name.as_str(), t.dtype(), t.shape().to_vec()))
        .collect()
}

fn by_name(mut specs: Vec<TensorSpec>) -> Vec<TensorSpec> {
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

#[test]
fn describe_reports_the_registered_specs_and_refuses_missing_or_garbled_snapshots() {
    let daemon = Daemon::start(&[]);
    let state = State::new(6, 512 << 10);
    let mut r0 = client(&daemon, "desc", 0, 2);
    state.register(&mut r0);
    for step in 1..=2 {
        state.fill(step);
        snapshot_committed(&mut r0, step);
    }
    let registered = specs(&state);
    let file_order: Vec<TensorSpec> = gpusnapd::store::Layout::plan(&registered)
        .expect("plan")
        .tensors
        .iter()
        .map(|t| t.spec())
        .collect();
    assert_ne!(
        file_order, registered,
        "the test needs a file order other than registration order"
    );

    // Rank 1 of the job, registered nothing: it reads rank 0's table.
    let mut r1 = client(&daemon, "desc", 1, 2);
    for step in 1..=2 {
        let d = r1.describe(None, 0, step).expect("describe rank 0");
        assert_eq!(
            (d.job.as_str(), d.rank, d.step, d.world_size),
            ("desc", 0, step, 2)
        );
        assert_eq!(d.tensors, file_order, "step {step}: data-file order");
        assert_eq!(by_name(d.tensors), by_name(registered.clone()));
    }
    // The owner itself, registered and live, asks about its own job too.
    assert_eq!(
        r0.describe(Some("desc"), 0, 2).expect("own").tensors,
        file_order
    );

    for (job, rank, step) in [(None, 0, 99), (None, 1, 1), (Some("nobody"), 0, 1)] {
        match r1.describe(job, rank, step) {
            Err(Error::NotFound(message)) => {
                assert!(message.contains(&step.to_string()), "{message}");
            }
            other => panic!("{job:?}/{rank}/{step}: {other:?}"),
        }
    }
    assert!(
        matches!(
            r1.describe(Some("../etc"), 0, 1),
            Err(Error::InvalidRegistration(_))
        ),
        "a job name that is not one"
    );

    // A garbled manifest is corrupt; the other step still describes.
    let step_dir = |step: u64| {
        daemon
            .root
            .join("desc")
            .join("0")
            .join(format!("step-{step}"))
    };
    let manifest = step_dir(1).join("MANIFEST.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(
        &manifest,
        text.replacen("\"world_size\": 2", "\"world_size\": 0", 1),
    )
    .expect("garble");
    match r1.describe(None, 0, 1) {
        Err(Error::Corrupt(message)) => assert!(message.contains("step-1"), "{message}"),
        other => panic!("garbled manifest: {other:?}"),
    }
    // Only the manifest is read: step 2 describes without its data file.
    std::fs::remove_file(step_dir(2).join("state.safetensors")).expect("rm data");
    assert_eq!(
        r1.describe(None, 0, 2).expect("manifest only").tensors,
        file_order
    );
    // Describing registered nothing.
    let status = r1.status().expect("status");
    assert_eq!(
        status.sessions.iter().filter(|s| s.job == "desc").count(),
        1,
        "only rank 0 is registered: {status:?}"
    );
}

/// A raw connection: requests framed by hand, replies read with a deadline.
struct Raw {
    s: UnixStream,
    id: u64,
}

impl Raw {
    fn connect(daemon: &Daemon) -> Raw {
        let s = UnixStream::connect(&daemon.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Raw { s, id: 0 }
    }

    /// Sends `body`, returns its reply (skipping events). A `Registered`
    /// reply's memfd is dropped by the plain read.
    fn call(&mut self, body: RequestBody) -> ReplyBody {
        self.id += 1;
        let frame = proto::encode(&Request { id: self.id, body }).expect("encode");
        self.s.write_all(&frame).expect("send");
        loop {
            let mut header = [0u8; 4];
            self.s.read_exact(&mut header).expect("reply header");
            let mut body = vec![0u8; proto::frame_len(header).expect("frame")];
            self.s.read_exact(&mut body).expect("reply body");
            let reply: Reply = proto::decode(&body).expect("reply");
            if reply.id != 0 {
                assert_eq!(reply.id, self.id, "{reply:?}");
                return reply.body;
            }
        }
    }
}

#[test]
fn describe_is_answered_while_a_capture_is_open_and_while_a_slot_is_lent() {
    let daemon = Daemon::start(&[]);
    let state = State::new(3, 128 << 10);
    {
        let mut c = client(&daemon, "raw", 0, 1);
        state.register(&mut c);
        state.fill(1);
        snapshot_committed(&mut c, 1);
    }
    wait_rank_free(&daemon, "raw", 0);
    let registered = by_name(specs(&state));
    let describe = |step| RequestBody::Describe {
        job: "raw".into(),
        rank: 0,
        step,
    };
    let check = |reply: ReplyBody, what: &str| match reply {
        ReplyBody::Described {
            step,
            world_size,
            tensors,
            ..
        } => {
            assert_eq!((step, world_size), (1, 1), "{what}");
            assert_eq!(by_name(tensors), registered, "{what}");
        }
        other => panic!("{what}: {other:?}"),
    };

    let mut raw = Raw::connect(&daemon);
    // Before the handshake it is out of order, like everything else.
    match raw.call(describe(1)) {
        ReplyBody::Error { kind, .. } => assert_eq!(kind, ErrorKind::Protocol),
        other => panic!("describe before hello: {other:?}"),
    }
    let mut raw = Raw::connect(&daemon);
    let welcome = raw.call(RequestBody::Hello {
        protocol_version: PROTOCOL_VERSION,
        client: "e2e-describe".into(),
    });
    assert!(matches!(welcome, ReplyBody::Welcome { .. }), "{welcome:?}");
    check(raw.call(describe(1)), "greeted, not registered");
    let registered_reply = raw.call(RequestBody::Register {
        job: "raw".into(),
        rank: 0,
        world_size: 1,
        tensors: specs(&state),
    });
    assert!(
        matches!(registered_reply, ReplyBody::Registered(_)),
        "{registered_reply:?}"
    );
    match raw.call(RequestBody::Begin { step: 2 }) {
        ReplyBody::Slot { step: 2, .. } => {}
        other => panic!("begin: {other:?}"),
    }
    check(raw.call(describe(1)), "mid-capture");
    match raw.call(describe(2)) {
        ReplyBody::Error { kind, message, .. } => {
            assert_eq!(kind, ErrorKind::NotFound, "{message}");
        }
        other => panic!("the step being captured is not committed: {other:?}"),
    }
    assert_eq!(
        raw.call(RequestBody::Abort {
            step: 2,
            reason: "test".into()
        }),
        ReplyBody::Aborted { step: 2 },
        "the capture is still open after describe"
    );
    let lent = match raw.call(RequestBody::Restore { step: Some(1) }) {
        ReplyBody::Restored { step: 1, slot, .. } => slot,
        other => panic!("restore: {other:?}"),
    };
    check(raw.call(describe(1)), "mid-restore");
    assert_eq!(
        raw.call(RequestBody::Release { slot: lent }),
        ReplyBody::Released
    );
}

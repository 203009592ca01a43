//! 10,000 random and malformed frames against the real daemon: each gets an
//! error reply or a closed connection, never a crash, and a client that was
//! connected all along (and one that connects afterwards) is still served.

mod daemon;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use gpusnap::proto::{self, ErrorKind, PROTOCOL_VERSION, Reply, ReplyBody, Request, RequestBody};
use proptest::prelude::*;

/// A raw connection: frames written as given, replies read with a deadline.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Raw { s }
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        // The daemon may close first; that is an allowed answer.
        let _ = self.s.write_all(bytes);
    }

    fn request(&mut self, id: u64, body: RequestBody) {
        self.send_bytes(&proto::encode(&Request { id, body }).expect("encode"));
    }

    /// The next reply, or `None` when the daemon closed the connection.
    fn reply(&mut self) -> Option<Reply> {
        let mut header = [0u8; 4];
        self.s.read_exact(&mut header).ok()?;
        let len = proto::frame_len(header).expect("the daemon sends valid frames");
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).expect("a whole frame");
        Some(proto::decode(&body).expect("the daemon sends valid replies"))
    }

    fn hello(&mut self) {
        self.request(
            1,
            RequestBody::Hello {
                protocol_version: PROTOCOL_VERSION,
                client: "fuzz".into(),
            },
        );
        let reply = self.reply().expect("welcome");
        assert!(matches!(reply.body, ReplyBody::Welcome { .. }), "{reply:?}");
    }

    /// Reads until the daemon closes; every reply must be well-formed.
    fn drain(&mut self) -> Vec<Reply> {
        let mut replies = Vec::new();
        while let Some(r) = self.reply() {
            replies.push(r);
            assert!(
                replies.len() < 64,
                "the daemon keeps talking to a broken client"
            );
        }
        replies
    }
}

/// Requests a client may send, in any order and with any ids.
fn any_request() -> impl Strategy<Value = RequestBody> {
    prop_oneof![
        (0u32..=PROTOCOL_VERSION + 1).prop_map(|v| RequestBody::Hello {
            protocol_version: v,
            client: "x".into()
        }),
        (any::<u64>()).prop_map(|step| RequestBody::Begin { step }),
        (any::<u64>(), any::<u64>()).prop_map(|(step, seq)| RequestBody::ChunkFilled { step, seq }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(step, capture_ns, stall_ns)| {
            RequestBody::Captured {
                step,
                capture_ns,
                stall_ns,
            }
        }),
        any::<u64>().prop_map(|step| RequestBody::Abort {
            step,
            reason: "fuzz".into()
        }),
        proptest::option::of(any::<u64>()).prop_map(|step| RequestBody::Restore { step }),
        any::<u32>().prop_map(|slot| RequestBody::Release { slot }),
        Just(RequestBody::Status),
        Just(RequestBody::List { job: None }),
        ("[a-z./]{0,12}", any::<u32>(), any::<u64>())
            .prop_map(|(job, rank, step)| RequestBody::Describe { job, rank, step }),
        ("[a-z./]{0,12}", 0u32..4, 0u32..4).prop_map(|(job, rank, world_size)| {
            RequestBody::Register {
                job,
                rank,
                world_size,
                tensors: vec![gpusnap::TensorSpec::new("t", gpusnap::Dtype::F32, [4])],
            }
        }),
    ]
}

/// What one fuzz case sends on a fresh connection.
#[derive(Debug, Clone)]
enum Case {
    /// Any bytes at all.
    Bytes(Vec<u8>),
    /// A length prefix with any value, then some bytes.
    Length(u32, Vec<u8>),
    /// A well-framed body that is not a valid request.
    BadJson(String),
    /// Valid requests in a random order with random ids, after a hello or not.
    Sequence(bool, Vec<(u64, RequestBody)>),
}

fn any_case() -> impl Strategy<Value = Case> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..96).prop_map(Case::Bytes),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(l, b)| Case::Length(l, b)),
        prop_oneof![
            Just("{}".to_owned()),
            Just("null".to_owned()),
            Just(r#"{"id":1}"#.to_owned()),
            Just(r#"{"id":1,"body":{"type":"begin"}}"#.to_owned()),
            Just(r#"{"id":-1,"body":{"type":"status"}}"#.to_owned()),
            Just(r#"{"id":1,"body":{"type":"status","extra":true}}"#.to_owned()),
            "[ -~]{1,80}",
        ]
        .prop_map(Case::BadJson),
        (
            any::<bool>(),
            proptest::collection::vec((0u64..6, any_request()), 1..6)
        )
            .prop_map(|(hello, reqs)| Case::Sequence(hello, reqs)),
    ]
}

fn run_case(socket: &std::path::Path, case: &Case) {
    let mut raw = Raw::connect(socket);
    match case {
        Case::Bytes(b) => {
            raw.send_bytes(b);
            let _ = raw.s.shutdown(std::net::Shutdown::Write);
        }
        Case::Length(len, b) => {
            raw.send_bytes(&len.to_le_bytes());
            raw.send_bytes(b);
            let _ = raw.s.shutdown(std::net::Shutdown::Write);
        }
        Case::BadJson(text) => {
            let body = text.as_bytes();
            let len = u32::try_from(body.len()).expect("short");
            raw.send_bytes(&len.to_le_bytes());
            raw.send_bytes(body);
            let replies = raw.drain();
            let last = replies.last().expect("an error reply before closing");
            assert!(
                matches!(
                    last.body,
                    ReplyBody::Error {
                        kind: ErrorKind::Protocol,
                        ..
                    }
                ),
                "{last:?}"
            );
            return;
        }
        Case::Sequence(hello, reqs) => {
            if *hello {
                raw.hello();
            }
            for (id, body) in reqs {
                raw.request(*id, body.clone());
            }
            let _ = raw.s.shutdown(std::net::Shutdown::Write);
        }
    }
    for reply in raw.drain() {
        // Whatever came back is a well-formed reply (checked in `reply`).
        if let ReplyBody::Error { kind, .. } = reply.body {
            assert_ne!(
                kind,
                ErrorKind::Internal,
                "fuzz input hit an internal error"
            );
        }
    }
}

#[test]
fn ten_thousand_malformed_frames_leave_the_daemon_serving_others() {
    let daemon = daemon::Daemon::start(&[("daemon", "frame_bytes_max", "65536")]);
    let mut bystander = Raw::connect(&daemon.socket);
    bystander.hello();

    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 10_000,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    });
    runner
        .run(&any_case(), |case| {
            run_case(&daemon.socket, &case);
            Ok(())
        })
        .expect("every malformed input is answered or closed");

    // The bystander, connected all along, is still served.
    bystander.request(2, RequestBody::Status);
    let status = bystander.reply().expect("status");
    assert!(matches!(status.body, ReplyBody::Status(_)), "{status:?}");
    // So is a newcomer, and an oversized frame is refused with TooLarge.
    let mut late = Raw::connect(&daemon.socket);
    late.hello();
    late.send_bytes(&(1u32 << 20).to_le_bytes());
    let refused = late.drain();
    assert!(
        matches!(
            refused.last().map(|r| &r.body),
            Some(ReplyBody::Error {
                kind: ErrorKind::TooLarge,
                ..
            })
        ),
        "{refused:?}"
    );
    let (code, _) = daemon.http_get("/healthz");
    assert_eq!(code, 200);
}

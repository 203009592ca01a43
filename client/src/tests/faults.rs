//! Bad input from the socket: always a clear error, never a panic or a hang.

use std::time::Duration;

use super::fake::{self, Fake, FakeConn, Handler, Layout, conn};
use crate::proto::{FRAME_BYTES_MAX, ReplyBody, RequestBody};
use crate::{Client, Dtype, Error, HostTensor};

type Check = fn(&Error) -> bool;

/// Runs a snapshot against a fake that says Hello and then runs `script`;
/// returns the error the snapshot ends in.
fn snapshot_error(script: impl FnOnce(&mut FakeConn) + Send + 'static) -> Error {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.hello();
            script(c);
            c.until_closed();
        })],
    );
    let mut config = fake::config(&path);
    config.reconnect = false;
    config.call_timeout = Duration::from_millis(500);
    let mut client = Client::with_config(config).expect("connect");
    let t = HostTensor::zeros(Dtype::F32, [64]).expect("t");
    client.register_host("t", &t).expect("register");
    let err = client.snapshot(1).expect_err("the snapshot must fail");
    drop(client);
    fake.join();
    err
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(body.len())
        .expect("len")
        .to_le_bytes()
        .to_vec();
    f.extend_from_slice(body);
    f
}

fn protocol_containing(err: &Error, text: &str) -> bool {
    matches!(err, Error::Protocol(m) if m.contains(text))
}

#[test]
fn malformed_frames_are_protocol_errors() {
    let cases: Vec<(&str, Handler, Check)> = vec![
        (
            "garbage json",
            Box::new(|c| {
                c.expect_register();
                c.raw(&frame(b"{not json"));
            }),
            |e| protocol_containing(e, "malformed"),
        ),
        (
            "unknown reply type",
            Box::new(|c| {
                let id = c.expect_register();
                c.raw(&frame(
                    format!(r#"{{"id":{id},"body":{{"type":"bogus"}}}}"#).as_bytes(),
                ));
            }),
            |e| protocol_containing(e, "malformed"),
        ),
        (
            "oversized length",
            Box::new(|c| {
                c.expect_register();
                c.raw(&(FRAME_BYTES_MAX + 1).to_le_bytes());
            }),
            |e| protocol_containing(e, "over the"),
        ),
        (
            "zero length",
            Box::new(|c| {
                c.expect_register();
                c.raw(&0u32.to_le_bytes());
            }),
            |e| protocol_containing(e, "bad frame"),
        ),
        (
            "reply with the wrong id",
            Box::new(|c| {
                let id = c.expect_register();
                c.reply(id + 5, ReplyBody::NoSnapshot);
            }),
            |e| protocol_containing(e, "reply id"),
        ),
        (
            "wrong reply type",
            Box::new(|c| {
                let id = c.expect_register();
                c.reply(id, ReplyBody::Released);
            }),
            |e| protocol_containing(e, "unexpected reply \"released\""),
        ),
        (
            "a non-event with id 0",
            Box::new(|c| {
                c.expect_register();
                c.event(ReplyBody::Released);
            }),
            |e| protocol_containing(e, "an event"),
        ),
    ];
    for (name, script, check) in cases {
        let err = snapshot_error(script);
        assert!(check(&err), "{name}: {err}");
    }
}

#[test]
fn bad_staging_handoffs_are_protocol_errors() {
    let cases: Vec<(&str, Handler, Check)> = vec![
        (
            "staging description that fails check",
            Box::new(|c| {
                let id = c.expect_register();
                let mut info = Layout::default().info(&c.tensors);
                info.data_bytes = 10;
                let len = info.memfd_bytes;
                c.registered_with(id, info, len, 1);
            }),
            |e| protocol_containing(e, "refused"),
        ),
        (
            "memfd smaller than described",
            Box::new(|c| {
                let id = c.expect_register();
                let info = Layout::default().info(&c.tensors);
                let len = info.memfd_bytes - 4096;
                c.registered_with(id, info, len, 1);
            }),
            |e| protocol_containing(e, "memfd is"),
        ),
        (
            "a memfd not sealed against resizing",
            Box::new(|c| {
                let id = c.expect_register();
                let info = Layout::default().info(&c.tensors);
                c.registered_unsealed(id, info);
            }),
            |e| protocol_containing(e, "missing F_SEAL_SHRINK and F_SEAL_GROW"),
        ),
        (
            "registered without a memfd",
            Box::new(|c| {
                let id = c.expect_register();
                let info = Layout::default().info(&c.tensors);
                let len = info.memfd_bytes;
                c.registered_with(id, info, len, 0);
            }),
            |e| protocol_containing(e, "without a staging memfd"),
        ),
        (
            "registered with two descriptors",
            Box::new(|c| {
                let id = c.expect_register();
                let info = Layout::default().info(&c.tensors);
                let len = info.memfd_bytes;
                c.registered_with(id, info, len, 2);
            }),
            |e| protocol_containing(e, "2 file descriptors"),
        ),
        (
            "slot out of range",
            Box::new(|c| {
                c.register(&Layout::default());
                c.begin_slot(7);
            }),
            |e| protocol_containing(e, "slot 7 of 2"),
        ),
        (
            "stream of the wrong chunk count",
            Box::new(|c| {
                c.register(&Layout::default());
                let r = c.expect("begin");
                c.reply(
                    r.id,
                    ReplyBody::Stream {
                        step: 1,
                        chunks: 99,
                    },
                );
            }),
            |e| protocol_containing(e, "stream of 99 chunks"),
        ),
    ];
    for (name, script, check) in cases {
        let err = snapshot_error(script);
        assert!(check(&err), "{name}: {err}");
    }
}

#[test]
fn a_descriptor_on_a_reply_that_carries_none_is_refused() {
    let err = snapshot_error(|c| {
        c.register(&Layout::default());
        let r = c.expect("begin");
        // Reuse the Registered helper's sendmsg path on a Slot reply.
        let frame = crate::proto::encode(&crate::proto::Reply {
            id: r.id,
            body: ReplyBody::Slot { step: 1, slot: 0 },
        })
        .expect("encode");
        let fd = nix::sys::memfd::memfd_create("stray", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        let raw = [std::os::fd::AsRawFd::as_raw_fd(&fd)];
        nix::sys::socket::sendmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&c.stream),
            &[std::io::IoSlice::new(&frame)],
            &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
    });
    assert!(
        protocol_containing(&err, "file descriptors on a reply to begin"),
        "{err}"
    );
}

#[test]
fn eof_and_silence_are_disconnects_and_timeouts() {
    let err = snapshot_error(|c| {
        c.register(&Layout::default());
        c.expect("begin");
        c.stream
            .shutdown(std::net::Shutdown::Both)
            .expect("shutdown");
    });
    assert!(
        matches!(&err, Error::Disconnected(m) if m.contains("closed the connection")),
        "{err}"
    );

    let err = snapshot_error(|c| {
        c.register(&Layout::default());
        c.expect("begin");
        c.raw(&100u32.to_le_bytes());
        c.raw(b"{\"id\":");
        c.stream
            .shutdown(std::net::Shutdown::Both)
            .expect("shutdown");
    });
    assert!(
        matches!(&err, Error::Disconnected(m) if m.contains("middle of a frame")),
        "{err}"
    );

    let err = snapshot_error(|c| {
        // Policy skip: Begin is bounded by call_timeout (block waits longer).
        c.register(&Layout {
            policy: crate::proto::BusyPolicy::Skip,
            ..Layout::default()
        });
        let r = c.expect("begin");
        assert!(matches!(r.body, RequestBody::Begin { step: 1 }));
        // Say nothing until the client gives up and closes.
    });
    assert!(
        matches!(&err, Error::Timeout { after, .. } if *after == Duration::from_millis(500)),
        "{err}"
    );
}

#[test]
fn a_closing_daemon_error_with_id_zero_ends_the_call() {
    let err = snapshot_error(|c| {
        c.register(&Layout::default());
        c.expect("begin");
        c.event(ReplyBody::Error {
            kind: crate::proto::ErrorKind::ShuttingDown,
            message: "stopping".into(),
            os_error: None,
        });
        c.stream
            .shutdown(std::net::Shutdown::Both)
            .expect("shutdown");
    });
    assert!(
        matches!(&err, Error::ShuttingDown(m) if m == "stopping"),
        "{err}"
    );
}

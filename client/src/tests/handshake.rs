use std::time::{Duration, Instant};

use super::fake::{self, Fake, conn};
use crate::proto::{PROTOCOL_VERSION, ReplyBody, StatusInfo};
use crate::{Buffer, Client, Dtype, Error, HostTensor, RawBuffer, TensorSpecError};

fn status_info() -> StatusInfo {
    StatusInfo {
        daemon_version: "fake".into(),
        uptime_s: 3,
        io_backend: "pwrite".into(),
        clients_connected: 1,
        staging_bytes_used: 0,
        staging_budget_bytes: 1 << 30,
        hot_tier_bytes: 0,
        hot_tier_budget_bytes: 0,
        snapshots_in_flight: 0,
        sessions: vec![],
        jobs: vec![],
        remote: None,
    }
}

#[test]
fn handshake_reports_the_uid_and_status_needs_no_registration() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![conn(|c| {
            c.hello();
            let r = c.expect("status");
            c.reply(r.id, ReplyBody::Status(Box::new(status_info())));
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    assert_eq!(client.uid(), fake::UID);
    assert!(client.staging().is_none());
    assert_eq!(client.status().expect("status"), status_info());
    drop(client);
    fake.join();
}

#[test]
fn a_daemon_of_another_protocol_version_is_refused() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                let r = c.expect("hello");
                c.reply(
                    r.id,
                    ReplyBody::Welcome {
                        protocol_version: PROTOCOL_VERSION + 1,
                        daemon_version: "future".into(),
                        uid: 1,
                    },
                );
            }),
            conn(|c| {
                let r = c.expect("hello");
                c.reply(
                    r.id,
                    ReplyBody::Error {
                        kind: crate::proto::ErrorKind::VersionMismatch,
                        message: "speak 7".into(),
                        os_error: None,
                    },
                );
            }),
        ],
    );
    let err = Client::with_config(fake::config(&path)).unwrap_err();
    assert!(
        matches!(&err, Error::VersionMismatch { message, .. } if message.contains("future")),
        "{err}"
    );
    let err = Client::with_config(fake::config(&path)).unwrap_err();
    assert!(
        matches!(&err, Error::VersionMismatch { message, .. } if message.contains("speak 7")),
        "{err}"
    );
    fake.join();
}

#[test]
fn a_missing_socket_is_daemon_unavailable_after_the_connect_timeout() {
    let (_dir, path) = fake::socket_dir();
    let mut config = fake::config(&path);
    config.connect_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = Client::with_config(config).unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "gave up early"
    );
    assert!(
        matches!(&err, Error::DaemonUnavailable { socket, .. } if socket == &path),
        "{err}"
    );
}

#[test]
fn a_daemon_that_starts_late_is_waited_for() {
    let (_dir, path) = fake::socket_dir();
    let late = {
        let path = path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            Fake::start(
                &path,
                vec![conn(|c| {
                    c.hello();
                    c.until_closed();
                })],
            )
        })
    };
    let client = Client::with_config(fake::config(&path)).expect("connect once the daemon is up");
    drop(client);
    late.join().expect("late fake").join();
}

/// The Busy retry reconnects, and the reconnect retries a missing socket:
/// both share the registration's deadline, so a Busy that comes late does
/// not buy a fresh `connect_timeout` (it used to wait about twice as long),
/// and the retry goes on until that deadline, not a moment less.
#[test]
fn a_late_busy_and_a_vanished_daemon_share_one_registration_deadline() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![conn(|c| {
            c.hello();
            let id = c.expect_register();
            std::thread::sleep(Duration::from_millis(1200));
            c.reply(
                id,
                ReplyBody::Error {
                    kind: crate::proto::ErrorKind::Busy,
                    message: "held".into(),
                    os_error: None,
                },
            );
            // Then the daemon is gone: the socket is removed.
            c.until_closed();
        })],
    );
    let bound = Duration::from_secs(2);
    let mut config = fake::config(&path);
    config.connect_timeout = bound;
    let mut client = Client::with_config(config).expect("connect");
    let t = HostTensor::zeros(Dtype::U8, [8]).expect("t");
    client.register_host("t", &t).expect("register");
    let started = Instant::now();
    let err = client.sync_registration().unwrap_err();
    let took = started.elapsed();
    // The Busy was retried: on a new connection, which found no daemon
    // (no socket; or, when the reconnect beat the fake's close, a reset
    // handshake), until the one deadline. Without the retry the answer
    // would be the Busy, at 1.2 s.
    assert!(
        matches!(
            &err,
            Error::DaemonUnavailable { .. } | Error::Disconnected(_)
        ),
        "the Busy was not retried on a new connection: {err}"
    );
    assert!(
        took >= bound - Duration::from_millis(50),
        "the retry gave up after {took:?}, before its {bound:?} deadline"
    );
    assert!(
        took < bound + Duration::from_millis(600),
        "the registration waited {took:?}, past its {bound:?} bound (a fresh connect_timeout after the Busy would end at 3.2 s)"
    );
    drop(client);
    fake.join();
}

#[test]
fn registration_is_validated_locally() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![conn(|c| {
            c.hello();
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    let w = HostTensor::zeros(Dtype::F32, [4, 4]).expect("w");
    client
        .register("w", Dtype::F32, [4, 4], &w)
        .expect("register w");
    let err = client
        .register(
            "w",
            Dtype::F32,
            [4, 4],
            HostTensor::zeros(Dtype::F32, [4, 4]).expect("t"),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateName { name } if name == "w"),
        "{err}"
    );
    let err = client
        .register(
            "b",
            Dtype::F32,
            [5],
            HostTensor::zeros(Dtype::F32, [4]).expect("t"),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferLength {
                expected: 20,
                actual: 16,
                ..
            }
        ),
        "{err}"
    );
    let err = client
        .register(
            "__meta__",
            Dtype::U8,
            [1],
            HostTensor::zeros(Dtype::U8, [1]).expect("t"),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::Spec(TensorSpecError::ReservedName { .. })),
        "{err}"
    );
    let err = client.register("w2", Dtype::F32, [4, 4], &w).unwrap_err();
    assert!(matches!(err, Error::InvalidRegistration(_)), "{err}");
    let mut mem = vec![0u8; 64];
    // SAFETY: `mem` outlives the client, and nothing else touches it.
    let (a, b) = unsafe {
        (
            RawBuffer::new(mem.as_mut_ptr(), 32),
            RawBuffer::new(mem.as_mut_ptr().add(16), 32),
        )
    };
    client
        .register("a", Dtype::U8, [32], Buffer::Raw(a))
        .expect("raw a");
    let err = client.register("b", Dtype::U8, [32], b).unwrap_err();
    assert!(matches!(err, Error::InvalidRegistration(_)), "{err}");
    assert_eq!(
        client
            .tensors()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["w", "a"]
    );
    drop(client);
    drop(mem);
    fake.join();
}

#[test]
fn snapshot_with_nothing_registered_is_refused_locally() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![conn(|c| {
            c.hello();
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    assert!(matches!(client.snapshot(1), Err(Error::NotRegistered(_))));
    assert!(matches!(
        client.restore(crate::Step::Latest),
        Err(Error::NotRegistered(_))
    ));
    drop(client);
    fake.join();
}

#[test]
fn after_registered_the_client_reports_what_attaching_did_before_anything_else() {
    use crate::proto::{AttachReport, PinState};
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![conn(|c| {
            c.open(&fake::Layout::default());
            // `expect` answers the `Attached` on the way; it came first.
            let r = c.expect("status");
            assert_eq!(
                c.attached,
                vec![vec![AttachReport::new("host", PinState::NotNeeded)]],
                "one report, of the host device"
            );
            c.reply(r.id, ReplyBody::Status(Box::new(status_info())));
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    let t = HostTensor::zeros(Dtype::F32, [4]).expect("t");
    client.register_host("t", &t).expect("register");
    client.sync_registration().expect("registered and reported");
    client.status().expect("status");
    drop(client);
    fake.join();
}

#[test]
fn a_refused_attach_report_ends_that_registration_like_any_refused_request() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                c.open(&fake::Layout::default());
                let r = c.try_recv_any().expect("the report");
                assert_eq!(r.body.name(), "attached");
                c.reply(
                    r.id,
                    ReplyBody::error(crate::proto::ErrorKind::Protocol, "attach report refused"),
                );
                // The client closes this connection.
                assert!(c.try_recv_any().is_none(), "nothing more on it");
            }),
            conn(|c| {
                c.open(&fake::Layout::default());
                let r = c.expect("status");
                assert_eq!(c.attached.len(), 1, "reported again on the new connection");
                c.reply(r.id, ReplyBody::Status(Box::new(status_info())));
                c.until_closed();
            }),
        ],
    );
    let mut config = fake::config(&path);
    config.reconnect = false;
    let mut client = Client::with_config(config).expect("connect");
    let t = HostTensor::zeros(Dtype::F32, [4]).expect("t");
    client.register_host("t", &t).expect("register");
    let err = client.sync_registration().unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("attach report refused")),
        "{err}"
    );
    assert!(client.staging().is_none(), "that registration is over");
    client
        .sync_registration()
        .expect("a new connection registers");
    client.status().expect("status");
    drop(client);
    fake.join();
}

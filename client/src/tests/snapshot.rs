use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fake::{self, Fake, Layout, conn, expected_data, pattern};
use crate::device::{CaptureCopy, Device, HostDevice, RestoreCopy};
use crate::proto::{ErrorKind, ReplyBody, RequestBody};
use crate::{Client, Dtype, Error, HostTensor, Result, SnapshotOutcome, Step};

/// Two host tensors (with the byte patterns they hold).
fn tensors() -> Vec<(String, HostTensor, Vec<u8>)> {
    [
        ("w", Dtype::F32, vec![16u64, 33], 1u8),
        ("b", Dtype::U8, vec![37], 2),
    ]
    .into_iter()
    .map(|(name, dtype, shape, seed)| {
        let t = HostTensor::zeros(dtype, shape).expect("zeros");
        let bytes = pattern(t.byte_len(), seed);
        t.write().copy_from_slice(&bytes);
        (name.to_owned(), t, bytes)
    })
    .collect()
}

fn register_all(client: &mut Client, ts: &[(String, HostTensor, Vec<u8>)]) {
    for (name, t, _) in ts {
        client.register_host(name.clone(), t).expect("register");
    }
}

#[test]
fn snapshot_copies_exact_bytes_into_the_slot_at_the_layout_offsets() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let want: Vec<Vec<u8>> = ts.iter().map(|t| t.2.clone()).collect();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            let step = c.begin_slot(1);
            assert_eq!(step, 7);
            let r = c.expect("captured");
            assert_eq!(
                c.slot_data(1),
                expected_data(&info, &want),
                "slot 1 holds the tensors"
            );
            assert!(c.slot_data(0).iter().all(|&b| b == 0), "slot 0 untouched");
            c.reply(r.id, ReplyBody::Accepted { step });
            c.event(ReplyBody::Committed {
                step,
                bytes: 999,
                persist_ns: 5_000,
            });
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    register_all(&mut client, &ts);
    let outcome = client.snapshot(7).expect("snapshot");
    let SnapshotOutcome::Captured(info) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!((info.step, info.bytes), (7, 16 * 33 * 4 + 37));
    let staging = client.staging().expect("registered").clone();
    assert_eq!(staging.offsets.len(), 2);
    let commit = client.wait_committed(7).expect("committed");
    assert_eq!(
        (commit.step, commit.bytes, commit.persist),
        (7, 999, Duration::from_micros(5))
    );
    drop(client);
    fake.join();
}

#[test]
fn a_large_tensor_is_copied_in_pieces_on_several_threads_byte_exact() {
    let (_dir, path) = fake::socket_dir();
    let big = HostTensor::zeros(Dtype::U8, [3 << 20]).expect("big");
    let bytes = pattern(big.byte_len(), 9);
    big.write().copy_from_slice(&bytes);
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout {
                gap: 0,
                ..Layout::default()
            });
            c.begin_slot(0);
            let r = c.expect("captured");
            assert!(
                c.slot_data(0) == expected_data(&info, &[bytes]),
                "bytes differ"
            );
            c.reply(r.id, ReplyBody::Accepted { step: 1 });
            c.until_closed();
        })],
    );
    let device = Arc::new(HostDevice::new(4).with_piece_bytes(64 << 10));
    let mut client = Client::with_device(fake::config(&path), device).expect("connect");
    client.register_host("big", &big).expect("register");
    assert!(matches!(
        client.snapshot(1),
        Ok(SnapshotOutcome::Captured(_))
    ));
    drop(client);
    fake.join();
}

/// Copies only once the test opens the gate.
#[derive(Debug, Default)]
struct GatedDevice {
    open: Mutex<bool>,
    opened: std::sync::Condvar,
    copying: AtomicBool,
}

impl GatedDevice {
    fn open(&self) {
        *self.open.lock().expect("gate") = true;
        self.opened.notify_all();
    }
}

impl Device for GatedDevice {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn capture(&self, copies: Vec<CaptureCopy<'_>>) -> Result<()> {
        self.copying.store(true, Ordering::SeqCst);
        let mut open = self.open.lock().expect("gate");
        while !*open {
            open = self.opened.wait(open).expect("gate");
        }
        HostDevice::new(1).capture(copies)
    }
    fn restore(&self, copies: Vec<RestoreCopy<'_>>) -> Result<()> {
        HostDevice::new(1).restore(copies)
    }
}

#[test]
fn snapshot_begin_returns_before_the_copies_and_writers_wait_for_the_capture() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let want: Vec<Vec<u8>> = ts.iter().map(|t| t.2.clone()).collect();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(0);
            let r = c.expect("captured");
            assert_eq!(
                c.slot_data(0),
                expected_data(&info, &want),
                "the capture saw the writer's bytes"
            );
            c.reply(r.id, ReplyBody::Accepted { step: 3 });
            c.until_closed();
        })],
    );
    let device = Arc::new(GatedDevice::default());
    let mut client =
        Client::with_device(fake::config(&path), Arc::clone(&device) as Arc<dyn Device>)
            .expect("connect");
    register_all(&mut client, &ts);
    let w = ts[0].1.clone();
    let mut handle = client.snapshot_begin(3).expect("begin");
    // The copies cannot have finished: the device waits for the gate.
    let wrote = Arc::new(AtomicBool::new(false));
    let writer = {
        let wrote = Arc::clone(&wrote);
        std::thread::spawn(move || {
            w.write().fill(0xEE);
            wrote.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !wrote.load(Ordering::SeqCst),
        "a trainer write went through during the capture"
    );
    device.open();
    let outcome = handle.wait_captured().expect("captured");
    assert!(
        matches!(outcome, SnapshotOutcome::Captured(_)),
        "{outcome:?}"
    );
    assert!(device.copying.load(Ordering::SeqCst));
    writer.join().expect("writer");
    assert!(wrote.load(Ordering::SeqCst));
    assert!(ts[0].1.read().iter().all(|&b| b == 0xEE));
    drop(handle);
    drop(client);
    fake.join();
}

#[test]
fn a_dropped_handle_still_finishes_the_capture() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.open(&Layout::default());
            c.begin_slot(1);
            let (step, _, _) = c.accept_captured();
            assert_eq!(step, 11);
            c.event(ReplyBody::Committed {
                step,
                bytes: 1,
                persist_ns: 1,
            });
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    register_all(&mut client, &ts);
    drop(client.snapshot_begin(11).expect("begin"));
    // The tensors are writable again, and the commit is reported.
    ts[0].1.write().fill(1);
    assert_eq!(client.wait_committed(11).expect("committed").step, 11);
    drop(client);
    fake.join();
}

#[test]
fn an_open_capture_without_a_handle_refuses_other_calls_until_finished() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.open(&Layout::default());
            c.begin_slot(0);
            let (step, _, _) = c.accept_captured();
            assert_eq!(step, 5);
            c.event(ReplyBody::Committed {
                step,
                bytes: 1,
                persist_ns: 1,
            });
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    register_all(&mut client, &ts);
    assert!(matches!(client.finish_snapshot(), Err(Error::NotFound(_))));
    client.begin_snapshot(5).expect("begin");
    assert_eq!(client.open_capture(), Some(5));
    for refused in [
        client.begin_snapshot(6).map(drop),
        client.restore(Step::Latest).map(drop),
        client.sync_registration().map(drop),
        client.wait_committed(5).map(drop),
        client.register_host("late", &HostTensor::zeros(Dtype::U8, [1]).expect("zeros")),
    ] {
        assert!(
            matches!(refused, Err(Error::CaptureInProgress { step: 5 })),
            "{refused:?}"
        );
    }
    let outcome = client.finish_snapshot().expect("finish");
    assert!(
        matches!(&outcome, SnapshotOutcome::Captured(info) if info.step == 5),
        "{outcome:?}"
    );
    assert_eq!(client.open_capture(), None);
    assert_eq!(client.wait_committed(5).expect("committed").step, 5);
    drop(client);
    fake.join();
}

#[test]
fn a_client_dropped_with_a_capture_open_finishes_it() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.open(&Layout::default());
            c.begin_slot(0);
            let (step, _, _) = c.accept_captured();
            assert_eq!(step, 8);
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    register_all(&mut client, &ts);
    client.begin_snapshot(8).expect("begin");
    drop(client);
    // The fake saw `Captured` before the connection closed, and the
    // tensors are writable again.
    fake.join();
    ts[0].1.write().fill(3);
}

#[test]
fn skipped_and_failed_snapshots_are_reported_as_such() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.open(&Layout::default());
            let r = c.expect("begin");
            c.reply(
                r.id,
                ReplyBody::Skipped {
                    step: 1,
                    reason: "slots busy".into(),
                },
            );
            c.begin_slot(0);
            let (step, _, _) = c.accept_captured();
            c.event(ReplyBody::Failed {
                step,
                kind: ErrorKind::Storage,
                message: "disk full".into(),
                os_error: None,
            });
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    register_all(&mut client, &ts);
    let outcome = client.snapshot(1).expect("snapshot");
    assert_eq!(
        outcome,
        SnapshotOutcome::Skipped {
            step: 1,
            reason: "slots busy".into()
        }
    );
    let err = client.wait_committed(1).unwrap_err();
    assert!(
        matches!(&err, Error::Skipped { step: 1, reason } if reason == "slots busy"),
        "{err}"
    );
    let err = client
        .snapshot_begin(2)
        .expect("begin")
        .wait_committed()
        .unwrap_err();
    assert!(
        matches!(&err, Error::SnapshotFailed { step: 2, kind: ErrorKind::Storage, message } if message == "disk full"),
        "{err}"
    );
    drop(client);
    fake.join();
}

#[test]
fn events_interleaved_with_replies_are_recorded_for_later() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.open(&Layout::default());
            c.begin_slot(0);
            c.accept_captured();
            let r = c.expect("begin");
            // Step 1's commit arrives before the reply to step 2's Begin,
            // and step 2's right after its Accepted.
            c.event(ReplyBody::Committed {
                step: 1,
                bytes: 10,
                persist_ns: 1,
            });
            c.reply(r.id, ReplyBody::Slot { step: 2, slot: 1 });
            c.accept_captured();
            c.event(ReplyBody::Committed {
                step: 2,
                bytes: 20,
                persist_ns: 2,
            });
            let r = c.expect("list");
            c.event(ReplyBody::Failed {
                step: 3,
                kind: ErrorKind::Internal,
                message: "x".into(),
                os_error: None,
            });
            c.reply(
                r.id,
                ReplyBody::Listing {
                    snapshots: vec![],
                    complete: vec![],
                },
            );
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    register_all(&mut client, &ts);
    client.snapshot(1).expect("snapshot 1");
    client.snapshot(2).expect("snapshot 2");
    assert!(client.list().expect("list").snapshots.is_empty());
    assert_eq!(client.wait_committed(1).expect("1").bytes, 10);
    assert_eq!(client.wait_committed(2).expect("2").bytes, 20);
    drop(client);
    fake.join();
}

/// A device whose capture fails.
#[derive(Debug)]
struct BrokenDevice;

impl Device for BrokenDevice {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn capture(&self, _: Vec<CaptureCopy<'_>>) -> Result<()> {
        Err(Error::BackendUnavailable {
            backend: "broken",
            reason: "copy engine fault".into(),
        })
    }
    fn restore(&self, _: Vec<RestoreCopy<'_>>) -> Result<()> {
        Err(Error::BackendUnavailable {
            backend: "broken",
            reason: "copy engine fault".into(),
        })
    }
}

#[test]
fn a_failed_copy_aborts_the_snapshot() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.open(&Layout::default());
            c.begin_slot(0);
            let r = c.expect("abort");
            let RequestBody::Abort { step, reason } = r.body else {
                unreachable!()
            };
            assert!(reason.contains("copy engine fault"), "{reason}");
            c.reply(r.id, ReplyBody::Aborted { step });
            let r = c.expect("status");
            c.reply(
                r.id,
                ReplyBody::Error {
                    kind: ErrorKind::Internal,
                    message: "still here".into(),
                    os_error: None,
                },
            );
            c.until_closed();
        })],
    );
    let mut client =
        Client::with_device(fake::config(&path), Arc::new(BrokenDevice)).expect("connect");
    register_all(&mut client, &ts);
    let err = client.snapshot(5).unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err}");
    // The conversation is still in step.
    assert!(matches!(client.status(), Err(Error::Internal(m)) if m == "still here"));
    drop(client);
    fake.join();
}

#[test]
fn a_busy_rank_is_retried_on_a_new_connection_until_it_is_free() {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors();
    let busy = conn(|c| {
        c.hello();
        let id = c.expect_register();
        c.reply(
            id,
            ReplyBody::Error {
                kind: ErrorKind::Busy,
                message: "held by a closing connection".into(),
                os_error: None,
            },
        );
        c.until_closed();
    });
    let free = conn(|c| {
        c.open(&Layout::default());
        c.until_closed();
    });
    let fake = Fake::start(&path, vec![busy, free]);
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    register_all(&mut client, &ts);
    client
        .sync_registration()
        .expect("registered on the second try");
    drop(client);
    fake.join();
}

//! Capture into a slot: the bytes, the overlap, the outcomes, the failures;
//! every body on every device ([`device_matrix!`]), then what only one
//! kind of memory has (host locks, device routing and attachment).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::fake::{self, Fake, Layout, conn, expected_data, pattern};
use super::matrix::{Memory, OnDouble, TestBuffer, device_matrix};
use crate::device::{
    AttachedStaging, CaptureCopy, CopyTicket, Device, HostDevice, RestoreCopy, StagingRegion,
    StreamOrder,
};
use crate::proto::{ErrorKind, OsError, ReplyBody, RequestBody};
use crate::{Buffer, Client, Dtype, Error, HostTensor, Result, SnapshotOutcome, Step};

/// A registered tensor of a test: name, dtype, shape, buffer, bytes.
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub memory: TestBuffer,
    pub bytes: Vec<u8>,
}

/// A tensor of `memory` holding a pattern seeded by `seed`.
pub fn tensor(memory: &dyn Memory, name: &str, dtype: Dtype, shape: &[u64], seed: u8) -> Tensor {
    let len = usize::try_from(shape.iter().product::<u64>() * dtype.size_bytes()).expect("len");
    let bytes = pattern(len, seed);
    Tensor {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        memory: memory.buffer(dtype, shape, &bytes),
        bytes,
    }
}

/// Two tensors of `memory`.
fn tensors(memory: &dyn Memory) -> Vec<Tensor> {
    vec![
        tensor(memory, "w", Dtype::F32, &[16, 33], 1),
        tensor(memory, "b", Dtype::U8, &[37], 2),
    ]
}

pub fn register_all(client: &mut Client, ts: &[Tensor]) {
    for t in ts {
        client
            .register(t.name.clone(), t.dtype, t.shape.clone(), t.memory.buffer())
            .expect("register");
    }
}

fn bytes_of(ts: &[Tensor]) -> Vec<Vec<u8>> {
    ts.iter().map(|t| t.bytes.clone()).collect()
}

device_matrix!(
    snapshot_copies_exact_bytes_into_the_slot_at_the_layout_offsets,
    a_large_tensor_is_copied_byte_exact,
    a_dropped_handle_still_finishes_the_capture,
    an_open_capture_without_a_handle_refuses_other_calls_until_finished,
    a_client_dropped_with_a_capture_open_finishes_it,
    skipped_and_failed_snapshots_are_reported_as_such_with_the_os_error,
    events_interleaved_with_replies_are_recorded_for_later,
    a_failed_copy_aborts_the_snapshot_and_a_second_wait_reports_the_same_error,
    a_busy_rank_is_retried_on_a_new_connection_until_it_is_free,
    the_copies_of_an_open_capture_finish_in_the_background_and_say_so,
    a_capture_handed_off_is_captured_committed_and_its_failure_kept,
    skips_never_push_out_an_outcome_the_trainer_has_not_collected,
);

/// Polls `done` until it is true (bounded: a copy that never finishes in
/// the background fails the test).
fn poll_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what} never became true");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn the_copies_of_an_open_capture_finish_in_the_background_and_say_so(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
    let want = bytes_of(&ts);
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            for step in [1, 2] {
                c.begin_slot(0);
                let r = c.expect("captured");
                assert_eq!(c.slot_data(0), expected_data(&info, &want));
                c.reply(r.id, ReplyBody::Accepted { step });
            }
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    assert_eq!(client.copies_done(), None, "no capture is open");
    // Without a handle: nobody waits, yet the copies finish.
    client.begin_snapshot(1).expect("begin");
    memory.let_copies_run();
    poll_until("copies_done", || client.copies_done() == Some(true));
    client.finish_snapshot().expect("finish");
    assert_eq!(client.copies_done(), None);
    // With a handle.
    let mut handle = client.snapshot_begin(2).expect("begin");
    memory.let_copies_run();
    poll_until("the handle's copies_done", || handle.copies_done());
    handle.wait_captured().expect("captured");
    assert!(handle.copies_done(), "still true once waited for");
    drop(handle);
    drop(client);
    fake.join();
}

fn a_capture_handed_off_is_captured_committed_and_its_failure_kept(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
    let want = bytes_of(&ts);
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(0);
            let r = c.expect("captured");
            assert_eq!(
                c.slot_data(0),
                expected_data(&info, &want),
                "the copies finished before Captured"
            );
            c.reply(r.id, ReplyBody::Accepted { step: 3 });
            c.event(ReplyBody::Committed {
                step: 3,
                bytes: 10,
                persist_ns: 1_000,
            });
            c.begin_slot(0);
            let r = c.expect("abort");
            let RequestBody::Abort { step, reason } = r.body else {
                unreachable!()
            };
            assert_eq!(step, 4);
            assert!(reason.contains("device lost"), "{reason}");
            c.reply(r.id, ReplyBody::Aborted { step });
            c.begin_slot(0);
            let r = c.expect("captured");
            c.reply(r.id, ReplyBody::Accepted { step: 5 });
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    client.begin_snapshot(3).expect("begin");
    client.finish_snapshot_in_background().expect("handed off");
    assert_eq!(
        client.open_capture(),
        None,
        "nothing is open on the trainer's side"
    );
    memory.let_copies_run();
    poll_until("copies_done", || client.copies_done() == Some(true));
    let commit = client.wait_committed(3).expect("committed");
    assert_eq!((commit.step, commit.bytes), (3, 10));
    assert!(
        client.background_outcome(3).is_none(),
        "wait_committed took it"
    );

    memory.fail_next_capture("device lost");
    client.begin_snapshot(4).expect("begin");
    client
        .finish_snapshot_in_background()
        .expect("handed off: the failure comes later");
    memory.let_copies_run();
    match client.background_outcome(4) {
        Some(Err(Error::BackendUnavailable { reason, .. })) => assert_eq!(reason, "device lost"),
        other => panic!("{other:?}"),
    }
    // The connection came back with the outcome: the next snapshot uses it.
    client.begin_snapshot(5).expect("begin");
    client.finish_snapshot_in_background().expect("handed off");
    memory.let_copies_run();
    assert!(matches!(
        client.background_outcome(5),
        Some(Ok(SnapshotOutcome::Captured(_)))
    ));
    drop(client);
    fake.join();
}

/// The regression: skips counted toward the window of outcomes kept for
/// the trainer, so under policy `skip` a commit's (or failure's) event, or
/// a handed-off capture's failure, was dropped after enough later skips,
/// and `wait_committed` of that step asked the daemon's listing and said
/// "not found" (or, for a commit retention had removed, lost its figures).
/// Step 1 fails in the daemon, then more skips than the events' window
/// holds; step `s` fails in the background, then more skips than the
/// background window holds; both failures are still what their waits say.
fn skips_never_push_out_an_outcome_the_trainer_has_not_collected(memory: &dyn Memory) {
    const SKIPS: u64 = crate::session::SETTLED_MAX as u64 + 1;
    const BACKGROUND_SKIPS: u64 = crate::background::OUTCOMES_MAX as u64 + 1;
    let s = 2 + SKIPS;
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
    let skip = |c: &mut fake::FakeConn| {
        let r = c.expect("begin");
        let RequestBody::Begin { step } = r.body else {
            unreachable!()
        };
        c.reply(
            r.id,
            ReplyBody::Skipped {
                step,
                reason: "slots busy".into(),
            },
        );
    };
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.open(&Layout {
                policy: crate::proto::BusyPolicy::Skip,
                ..Layout::default()
            });
            c.begin_slot(0);
            let (step, _, _) = c.accept_captured();
            c.event(ReplyBody::Failed {
                step,
                kind: ErrorKind::Storage,
                message: "disk full".into(),
                os_error: Some(OsError::ENOSPC),
            });
            for _ in 0..SKIPS {
                skip(c);
            }
            assert_eq!(c.begin_slot(0), s);
            let r = c.expect("abort");
            c.reply(r.id, ReplyBody::Aborted { step: s });
            for _ in 0..BACKGROUND_SKIPS {
                skip(c);
            }
            // No listing is asked for: the client still knows both outcomes.
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    assert!(matches!(
        client.snapshot(1).expect("snapshot"),
        SnapshotOutcome::Captured(_)
    ));
    for step in 2..s {
        assert!(matches!(
            client.snapshot(step).expect("snapshot"),
            SnapshotOutcome::Skipped { .. }
        ));
    }
    memory.fail_next_capture("device lost");
    client.begin_snapshot(s).expect("begin");
    client
        .finish_snapshot_in_background()
        .expect("handed off: the failure comes later");
    memory.let_copies_run();
    for step in (s + 1)..=(s + BACKGROUND_SKIPS) {
        client.begin_snapshot(step).expect("begin");
        client
            .finish_snapshot_in_background()
            .expect("a skip finishes at once");
    }
    let err = client.wait_committed(1).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::SnapshotFailed {
                step: 1,
                os_error: Some(OsError::ENOSPC),
                ..
            }
        ),
        "{err}"
    );
    let err = client.wait_committed(s).unwrap_err();
    assert!(
        matches!(&err, Error::BackendUnavailable { reason, .. } if reason == "device lost"),
        "{err}"
    );
    // The latest skips are kept too, in their own window.
    let last = s + BACKGROUND_SKIPS;
    assert!(matches!(
        client.wait_committed(last),
        Err(Error::Skipped { step, .. }) if step == last
    ));
    drop(client);
    fake.join();
}

/// Past the window of commits and failures nobody collected, the oldest
/// goes, and a wait for it that the listing cannot answer says so: step 1
/// failed, then more commits came than the window holds.
#[test]
fn a_dropped_outcome_the_listing_lacks_is_not_found_saying_it_was_dropped() {
    const COMMITS: u64 = crate::session::SETTLED_MAX as u64;
    let (_dir, path) = fake::socket_dir();
    let memory = super::matrix::OnHost::new();
    let ts = tensors(&memory);
    let empty = || ReplyBody::Listing {
        snapshots: vec![],
        complete: vec![],
        remote_complete: vec![],
        remote_error: None,
    };
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            c.open(&Layout::default());
            c.begin_slot(0);
            let (step, _, _) = c.accept_captured();
            c.event(ReplyBody::Failed {
                step,
                kind: ErrorKind::Storage,
                message: "disk full".into(),
                os_error: None,
            });
            for step in 2..(2 + COMMITS) {
                c.event(ReplyBody::Committed {
                    step,
                    bytes: 1,
                    persist_ns: 1,
                });
            }
            for _ in 0..2 {
                let r = c.expect("list");
                c.reply(r.id, empty());
            }
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    assert!(matches!(
        client.snapshot(1).expect("snapshot"),
        SnapshotOutcome::Captured(_)
    ));
    // Reading the listing's reply reads every event before it.
    assert!(client.list().expect("list").snapshots.is_empty());
    match client.wait_committed(1) {
        Err(Error::NotFound(message)) => assert!(
            message.contains("no longer known")
                && message.contains(&format!("latest {COMMITS} commit"))
                && message.contains("up to step 1"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    let last = client
        .wait_committed(1 + COMMITS)
        .expect("the newest is kept");
    assert_eq!(last.persist, Duration::from_nanos(1));
    drop(client);
    fake.join();
}

fn snapshot_copies_exact_bytes_into_the_slot_at_the_layout_offsets(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
    let want = bytes_of(&ts);
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
    let mut client = memory.client(fake::config(&path));
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

/// On the host device (pieces of 64 KiB, two threads) a 3 MiB tensor is
/// cut into pieces copied in parallel.
fn a_large_tensor_is_copied_byte_exact(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let big = tensor(memory, "big", Dtype::U8, &[3 << 20], 9);
    let want = big.bytes.clone();
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
                c.slot_data(0) == expected_data(&info, &[want]),
                "bytes differ"
            );
            c.reply(r.id, ReplyBody::Accepted { step: 1 });
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, std::slice::from_ref(&big));
    assert!(matches!(
        client.snapshot(1),
        Ok(SnapshotOutcome::Captured(_))
    ));
    drop(client);
    fake.join();
}

fn a_dropped_handle_still_finishes_the_capture(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
    let want = bytes_of(&ts);
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(1);
            let r = c.expect("captured");
            assert_eq!(c.slot_data(1), expected_data(&info, &want));
            let RequestBody::Captured { step, .. } = r.body else {
                unreachable!()
            };
            assert_eq!(step, 11);
            c.reply(r.id, ReplyBody::Accepted { step });
            c.event(ReplyBody::Committed {
                step,
                bytes: 1,
                persist_ns: 1,
            });
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    drop(client.snapshot_begin(11).expect("begin"));
    // The buffers are writable again, and the commit is reported.
    ts[0].memory.overwrite(&vec![1; ts[0].bytes.len()]);
    assert_eq!(client.wait_committed(11).expect("committed").step, 11);
    drop(client);
    fake.join();
}

fn an_open_capture_without_a_handle_refuses_other_calls_until_finished(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
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
    let mut client = memory.client(fake::config(&path));
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

fn a_client_dropped_with_a_capture_open_finishes_it(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
    let want = bytes_of(&ts);
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(0);
            let r = c.expect("captured");
            assert_eq!(c.slot_data(0), expected_data(&info, &want));
            c.reply(r.id, ReplyBody::Accepted { step: 8 });
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    client.begin_snapshot(8).expect("begin");
    drop(client);
    // The fake saw `Captured`, with the data, before the connection
    // closed, and the buffers are writable again.
    fake.join();
    ts[0].memory.overwrite(&vec![3; ts[0].bytes.len()]);
}

fn skipped_and_failed_snapshots_are_reported_as_such_with_the_os_error(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
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
                os_error: Some(OsError::ENOSPC),
            });
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
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
        matches!(&err, Error::SnapshotFailed { step: 2, kind: ErrorKind::Storage, message, os_error: Some(OsError::ENOSPC) } if message == "disk full"),
        "{err}"
    );
    assert_eq!(err.os_error(), Some(OsError::ENOSPC));
    drop(client);
    fake.join();
}

fn events_interleaved_with_replies_are_recorded_for_later(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
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
                    remote_complete: vec![],
                    remote_error: None,
                },
            );
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    client.snapshot(1).expect("snapshot 1");
    client.snapshot(2).expect("snapshot 2");
    assert!(client.list().expect("list").snapshots.is_empty());
    assert_eq!(client.wait_committed(1).expect("1").bytes, 10);
    assert_eq!(client.wait_committed(2).expect("2").bytes, 20);
    drop(client);
    fake.join();
}

fn a_failed_copy_aborts_the_snapshot_and_a_second_wait_reports_the_same_error(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
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
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    memory.fail_next_capture("copy engine fault");
    let mut handle = client.snapshot_begin(5).expect("begin");
    let first = handle.wait_captured().unwrap_err();
    assert!(
        matches!(&first, Error::BackendUnavailable { reason, .. } if reason == "copy engine fault"),
        "{first}"
    );
    let second = handle.wait_captured().unwrap_err();
    assert!(
        matches!(&second, Error::BackendUnavailable { reason, .. } if reason == "copy engine fault"),
        "the second wait reports the first error: {second}"
    );
    assert_eq!(second.to_string(), first.to_string());
    drop(handle);
    // The conversation is still in step.
    assert!(
        matches!(client.status(), Err(Error::Internal { message: m, .. }) if m == "still here")
    );
    drop(client);
    fake.join();
}

fn a_busy_rank_is_retried_on_a_new_connection_until_it_is_free(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let ts = tensors(memory);
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
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    client
        .sync_registration()
        .expect("registered on the second try");
    drop(client);
    fake.join();
}

// ---- host memory only: the locks ----

/// Copies only once the test opens the gate: its ticket's wait blocks
/// until then, and then runs the host device's copies.
#[derive(Debug, Default)]
struct GatedDevice {
    host: HostDevice,
    gate: Arc<(Mutex<bool>, Condvar)>,
    copying: AtomicBool,
}

impl GatedDevice {
    fn open(&self) {
        *self.gate.0.lock().expect("gate") = true;
        self.gate.1.notify_all();
    }
}

struct GatedTicket {
    gate: Arc<(Mutex<bool>, Condvar)>,
    copies: Vec<CaptureCopy>,
    host: HostDevice,
}

impl CopyTicket for GatedTicket {
    fn is_done(&self) -> bool {
        false
    }

    fn wait(self: Box<Self>) -> Result<Duration> {
        let GatedTicket { gate, copies, host } = *self;
        let mut open = gate.0.lock().expect("gate");
        while !*open {
            open = gate.1.wait(open).expect("gate");
        }
        host.capture(copies, &StreamOrder::legacy())?.wait()
    }
}

impl Device for GatedDevice {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn attach(&self, staging: &StagingRegion) -> Result<Box<dyn AttachedStaging>> {
        self.host.attach(staging)
    }
    fn capture(
        &self,
        copies: Vec<CaptureCopy>,
        _order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        self.copying.store(true, Ordering::SeqCst);
        Ok(Box::new(GatedTicket {
            gate: Arc::clone(&self.gate),
            copies,
            host: self.host.clone(),
        }))
    }
    fn restore(
        &self,
        copies: Vec<RestoreCopy>,
        order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        self.host.restore(copies, order)
    }
}

#[test]
fn snapshot_begin_returns_before_the_copies_and_host_writers_wait_for_the_capture() {
    let (_dir, path) = fake::socket_dir();
    let w = HostTensor::zeros(Dtype::F32, [16, 33]).expect("w");
    let bytes = pattern(w.byte_len(), 1);
    w.write().copy_from_slice(&bytes);
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(0);
            let r = c.expect("captured");
            assert_eq!(
                c.slot_data(0),
                expected_data(&info, &[bytes]),
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
    client.register_host("w", &w).expect("register");
    let writer_copy = w.clone();
    let mut handle = client.snapshot_begin(3).expect("begin");
    // The copies cannot have finished: the device waits for the gate.
    let wrote = Arc::new(AtomicBool::new(false));
    let writer = {
        let wrote = Arc::clone(&wrote);
        std::thread::spawn(move || {
            writer_copy.write().fill(0xEE);
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
    assert!(w.read().iter().all(|&b| b == 0xEE));
    drop(handle);
    drop(client);
    fake.join();
}

/// A device whose captures cannot even start.
#[derive(Debug)]
struct BrokenDevice(HostDevice);

impl Device for BrokenDevice {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn attach(&self, staging: &StagingRegion) -> Result<Box<dyn AttachedStaging>> {
        self.0.attach(staging)
    }
    fn capture(&self, _: Vec<CaptureCopy>, _: &StreamOrder) -> Result<Box<dyn CopyTicket>> {
        Err(Error::BackendUnavailable {
            backend: "broken",
            reason: "copy engine fault".into(),
        })
    }
    fn restore(
        &self,
        copies: Vec<RestoreCopy>,
        order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        self.0.restore(copies, order)
    }
}

#[test]
fn a_capture_that_cannot_start_aborts_the_snapshot() {
    let (_dir, path) = fake::socket_dir();
    let t = HostTensor::zeros(Dtype::U8, [64]).expect("t");
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
            c.until_closed();
        })],
    );
    let mut client = Client::with_device(
        fake::config(&path),
        Arc::new(BrokenDevice(HostDevice::new(1))),
    )
    .expect("connect");
    client.register_host("t", &t).expect("register");
    let err = client.snapshot(5).unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err}");
    drop(client);
    fake.join();
}

// ---- device memory: routing, overlap, attachment ----

#[test]
fn snapshot_begin_returns_while_the_device_still_copies() {
    let (_dir, path) = fake::socket_dir();
    let memory = OnDouble::new();
    let ts = tensors(&memory);
    let want = bytes_of(&ts);
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(0);
            let r = c.expect("captured");
            assert_eq!(c.slot_data(0), expected_data(&info, &want));
            c.reply(r.id, ReplyBody::Accepted { step: 1 });
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, &ts);
    client.begin_snapshot(1).expect("begin");
    assert_eq!(
        client.copies_done(),
        Some(false),
        "the double runs a job only once it is released"
    );
    let outcome = client.finish_snapshot().expect("finish");
    assert!(
        matches!(outcome, SnapshotOutcome::Captured(_)),
        "{outcome:?}"
    );
    drop(client);
    fake.join();
    memory.check();
}

#[test]
fn a_registration_mixing_memory_kinds_routes_each_buffer_to_its_device() {
    let (_dir, path) = fake::socket_dir();
    let memory = OnDouble::new();
    // Device weights, a host tensor (RNG state), raw host bytes (a blob).
    let weights = tensor(&memory, "weights", Dtype::BF16, &[64, 40], 3);
    let rng = HostTensor::from_slice(Dtype::U64, [4], &[1u64, 2, 3, 4]).expect("rng");
    let mut blob = pattern(100, 7);
    let rng_bytes = rng.read().to_vec();
    let blob_bytes = blob.clone();
    let (w_bytes, w_restored) = (weights.bytes.clone(), pattern(weights.bytes.len(), 8));
    let w_restored_fake = w_restored.clone();
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(1);
            let r = c.expect("captured");
            let data = c.slot_data(1);
            assert_eq!(
                data,
                expected_data(&info, &[w_bytes, rng_bytes.clone(), blob_bytes.clone()])
            );
            c.reply(r.id, ReplyBody::Accepted { step: 4 });
            let r = c.expect("restore");
            c.write_slot(
                0,
                &expected_data(&info, &[w_restored_fake, vec![9; 32], vec![5; 100]]),
            );
            c.reply(
                r.id,
                ReplyBody::Restored {
                    step: 4,
                    slot: 0,
                    source: crate::proto::RestoreSource::Memory,
                    bytes: info.data_bytes,
                    elapsed_ns: 1,
                    walked_back: Vec::new(),
                },
            );
            let r = c.expect("release");
            c.reply(r.id, ReplyBody::Released);
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, std::slice::from_ref(&weights));
    client.register_host("rng", &rng).expect("rng");
    // SAFETY: `blob` outlives the client and is not touched while it lives
    // except through the client's copies.
    let raw = unsafe { crate::RawBuffer::new(blob.as_mut_ptr(), blob.len()) };
    client
        .register("blob", Dtype::U8, [100u64], Buffer::Raw(raw))
        .expect("blob");
    assert_eq!(client.devices().len(), 2, "the double and the host device");
    assert_eq!(client.devices()[0].name(), "double");
    assert_eq!(client.devices()[1].name(), "host");
    client.snapshot(4).expect("snapshot");
    assert_eq!(memory.device.jobs(), 1, "one capture on the double");
    client
        .restore(Step::At(4))
        .expect("restore")
        .expect("a snapshot");
    assert_eq!(memory.device.jobs(), 2, "and one restore");
    assert_eq!(weights.memory.contents(), w_restored);
    assert_eq!(
        rng.read().as_slice::<u64>(),
        &[u64::from_le_bytes([9; 8]); 4]
    );
    drop(client);
    fake.join();
    assert_eq!(blob, vec![5; 100]);
    memory.check();
}

#[test]
fn a_hand_off_waits_for_the_host_copies_only_so_raw_host_memory_is_writable_after_it() {
    let (_dir, path) = fake::socket_dir();
    let memory = OnDouble::new();
    let weights = tensor(&memory, "weights", Dtype::F32, &[32, 32], 4);
    // Large enough that its copy (in 64 KiB pieces on two threads) is still
    // running when a hand-off that did not wait for it returns.
    let mut raw_bytes = pattern(32 << 20, 9);
    let want = vec![weights.bytes.clone(), raw_bytes.clone()];
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(0);
            let r = c.expect("captured");
            assert!(
                c.slot_data(0) == expected_data(&info, &want),
                "the slot holds the bytes of the moment of the capture"
            );
            c.reply(r.id, ReplyBody::Accepted { step: 1 });
            c.until_closed();
        })],
    );
    let host = Arc::new(HostDevice::new(2).with_piece_bytes(64 << 10));
    let mut client = Client::with_device(fake::config(&path), host).expect("connect");
    register_all(&mut client, std::slice::from_ref(&weights));
    let len = raw_bytes.len();
    // SAFETY: `raw_bytes` outlives the client; it is written below only
    // after the hand-off returned, which is the contract under test.
    let raw = unsafe { crate::RawBuffer::new(raw_bytes.as_mut_ptr(), len) };
    client
        .register(
            "raw",
            Dtype::U8,
            [u64::try_from(len).expect("len")],
            Buffer::Raw(raw),
        )
        .expect("raw");
    client.begin_snapshot(1).expect("begin");
    client.finish_snapshot_in_background().expect("handed off");
    assert_eq!(
        client.copies_done(),
        Some(false),
        "the device's copies are still held: the host did not wait for them"
    );
    // The trainer writes its host memory at once (the double's copies are
    // ordered on the device, the host ones were waited for).
    // SAFETY: the hand-off returned: no copy reads this memory any more.
    unsafe { std::ptr::write_bytes(raw_bytes.as_mut_ptr(), 0xEE, len) };
    memory.let_copies_run();
    assert!(matches!(
        client.background_outcome(1),
        Some(Ok(SnapshotOutcome::Captured(_)))
    ));
    drop(client);
    fake.join();
    memory.check();
}

#[test]
fn a_device_is_attached_once_per_registration_and_detached_when_it_ends() {
    let (_dir, path) = fake::socket_dir();
    let memory = OnDouble::new();
    let first = tensor(&memory, "a", Dtype::U8, &[300], 1);
    let second = tensor(&memory, "b", Dtype::U8, &[200], 2);
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                c.open(&Layout::default());
                for step in 1..=2 {
                    assert_eq!(c.begin_slot(0), step);
                    c.accept_captured();
                    c.event(ReplyBody::Committed {
                        step,
                        bytes: 1,
                        persist_ns: 1,
                    });
                }
                c.until_closed();
            }),
            conn(|c| {
                c.open(&Layout::default());
                assert_eq!(c.tensors.len(), 2);
                c.begin_slot(0);
                c.accept_captured();
                c.until_closed();
            }),
        ],
    );
    let device = &memory.device;
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, std::slice::from_ref(&first));
    assert_eq!((device.attaches(), device.detaches()), (0, 0));
    client.snapshot(1).expect("1");
    client.snapshot(2).expect("2");
    assert_eq!(
        (device.attaches(), device.detaches()),
        (1, 0),
        "one attach for the registration, none per snapshot"
    );
    register_all(&mut client, std::slice::from_ref(&second));
    client.snapshot(3).expect("3");
    assert_eq!(
        (device.attaches(), device.detaches()),
        (2, 1),
        "the new registration attached, the old one detached"
    );
    drop(client);
    assert_eq!((device.attaches(), device.detaches()), (2, 2));
    fake.join();
    memory.check();
}

#[test]
fn a_device_that_cannot_attach_fails_the_registration_with_its_error() {
    let (_dir, path) = fake::socket_dir();
    let memory = OnDouble::new();
    let t = tensor(&memory, "a", Dtype::U8, &[300], 1);
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                c.open(&Layout::default());
                // The client drops this connection: the registration is over.
                c.until_closed();
            }),
            conn(|c| {
                c.open(&Layout::default());
                c.until_closed();
            }),
        ],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, std::slice::from_ref(&t));
    memory
        .device
        .fail_next_attach("cuMemHostRegister: out of memory");
    let err = client.sync_registration().unwrap_err();
    assert!(
        matches!(&err, Error::BackendUnavailable { backend: "double", reason } if reason == "cuMemHostRegister: out of memory"),
        "{err}"
    );
    assert!(client.staging().is_none(), "no registration is left");
    // The next call registers again, on a new connection.
    client.sync_registration().expect("registered");
    assert_eq!(memory.device.attaches(), 1);
    drop(client);
    fake.join();
    memory.check();
}

/// Breaks `DeviceBuffer::device`'s contract: a new device object per call.
#[derive(Debug)]
struct Fickle;

impl crate::device::DeviceBuffer for Fickle {
    fn device(&self) -> Arc<dyn Device> {
        Arc::new(HostDevice::new(1))
    }
    fn byte_len(&self) -> usize {
        8
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn a_device_buffer_naming_a_new_device_on_each_call_is_refused_and_one_device_is_one_entry() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![conn(|c| {
            c.hello();
            c.until_closed();
        })],
    );
    let memory = OnDouble::new();
    let mut client = memory.client(fake::config(&path));
    let fickle: Arc<dyn crate::device::DeviceBuffer> = Arc::new(Fickle);
    let err = client
        .register("f", Dtype::U8, [8u64], Buffer::Device(fickle))
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidRegistration(m) if m.contains("must return one Arc")),
        "{err}"
    );
    assert_eq!(client.tensors().count(), 0);
    // Two buffers of one device: one device entry (attached once).
    register_all(
        &mut client,
        &[
            tensor(&memory, "a", Dtype::U8, &[8], 1),
            tensor(&memory, "b", Dtype::U8, &[8], 2),
        ],
    );
    assert_eq!(client.devices().len(), 1);
    drop(client);
    fake.join();
    memory.check();
}

/// A device buffer of another device than the one that copies it: its
/// copies are routed to the buffer's own device, never to the host.
#[test]
fn buffers_of_two_devices_in_one_registration_each_go_to_their_own() {
    let (_dir, path) = fake::socket_dir();
    let (one, two) = (OnDouble::new(), OnDouble::new());
    let a = tensor(&one, "a", Dtype::U8, &[100], 1);
    let b = tensor(&two, "b", Dtype::U8, &[120], 2);
    let want = vec![a.bytes.clone(), b.bytes.clone()];
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            c.begin_slot(0);
            let r = c.expect("captured");
            assert_eq!(c.slot_data(0), expected_data(&info, &want));
            c.reply(r.id, ReplyBody::Accepted { step: 1 });
            c.until_closed();
        })],
    );
    let mut client = one.client(fake::config(&path));
    register_all(&mut client, &[a, b]);
    assert_eq!(client.devices().len(), 2);
    let started = Instant::now();
    client.snapshot(1).expect("snapshot");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!((one.device.jobs(), two.device.jobs()), (1, 1));
    drop(client);
    fake.join();
    one.check();
    two.check();
}

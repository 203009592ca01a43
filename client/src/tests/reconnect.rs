use super::fake::{self, Fake, Layout, Script, conn, expected_data, pattern};
use crate::proto::{ReplyBody, SnapshotInfo};
use crate::{Client, Dtype, Error, HostTensor, SnapshotOutcome};

fn tensor(seed: u8) -> (HostTensor, Vec<u8>) {
    let t = HostTensor::zeros(Dtype::U32, [100]).expect("t");
    let bytes = pattern(t.byte_len(), seed);
    t.write().copy_from_slice(&bytes);
    (t, bytes)
}

#[test]
fn after_a_daemon_restart_the_client_registers_again_and_the_retried_snapshot_lands() {
    let (_dir, path) = fake::socket_dir();
    let (t, bytes) = tensor(1);
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                c.open(&Layout::default());
                c.expect("begin");
                // The daemon dies here.
            }),
            Script::Restart,
            conn(move |c| {
                let info = c.open(&Layout {
                    slots: 3,
                    ..Layout::default()
                });
                c.begin_slot(2);
                let r = c.expect("captured");
                assert_eq!(c.slot_data(2), expected_data(&info, &[bytes]));
                c.reply(r.id, ReplyBody::Accepted { step: 4 });
                c.until_closed();
            }),
        ],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    client.register_host("t", &t).expect("register");
    let outcome = client.snapshot(4).expect("snapshot after reconnecting");
    assert!(
        matches!(outcome, SnapshotOutcome::Captured(ref i) if i.step == 4),
        "{outcome:?}"
    );
    assert_eq!(
        client.staging().expect("staging").slots,
        3,
        "the new registration's staging"
    );
    drop(client);
    fake.join();
}

#[test]
fn a_step_in_flight_when_the_daemon_restarts_is_lost_unless_listed() {
    let (_dir, path) = fake::socket_dir();
    let (t, _) = tensor(2);
    let listed = SnapshotInfo {
        job: "job-a".into(),
        rank: 0,
        world_size: 1,
        step: 2,
        bytes: 400,
        tensors: 1,
        created_unix_ms: 1,
    };
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                c.open(&Layout::default());
                c.begin_slot(0);
                c.accept_captured();
                c.begin_slot(1);
                c.accept_captured();
            }),
            Script::Restart,
            conn(move |c| {
                c.hello();
                for _ in 0..2 {
                    let r = c.expect("list");
                    c.reply(
                        r.id,
                        ReplyBody::Listing {
                            snapshots: vec![listed.clone()],
                            complete: vec![],
                            remote_complete: vec![],
                            remote_error: None,
                        },
                    );
                }
                c.until_closed();
            }),
        ],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    client.register_host("t", &t).expect("register");
    client.snapshot(1).expect("snapshot 1");
    client.snapshot(2).expect("snapshot 2");
    let err = client.wait_committed(1).unwrap_err();
    assert!(matches!(err, Error::Lost { step: 1 }), "{err}");
    let info = client
        .wait_committed(2)
        .expect("step 2 was committed before the restart");
    assert_eq!((info.step, info.bytes), (2, 400));
    drop(client);
    fake.join();
}

#[test]
fn registering_more_after_the_first_snapshot_registers_again_on_a_new_connection() {
    let (_dir, path) = fake::socket_dir();
    let (a, ab) = tensor(3);
    let (b, bb) = tensor(4);
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                c.open(&Layout::default());
                let step = c.begin_slot(0);
                c.accept_captured();
                c.event(ReplyBody::Committed {
                    step,
                    bytes: 1,
                    persist_ns: 1,
                });
                c.until_closed();
            }),
            conn(move |c| {
                let info = c.open(&Layout::default());
                assert_eq!(c.tensors.len(), 2);
                c.begin_slot(0);
                let r = c.expect("captured");
                assert_eq!(c.slot_data(0), expected_data(&info, &[ab, bb]));
                c.reply(r.id, ReplyBody::Accepted { step: 2 });
                c.until_closed();
            }),
        ],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    client.register_host("a", &a).expect("a");
    client.snapshot(1).expect("snapshot 1");
    client.register_host("b", &b).expect("b");
    client.snapshot(2).expect("snapshot 2");
    // Step 1's commit was read before the first connection closed.
    assert_eq!(client.wait_committed(1).expect("1").step, 1);
    drop(client);
    fake.join();
}

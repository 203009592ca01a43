//! `describe`: another snapshot's tensor table without restoring it.

use super::fake::{self, Fake, Script, conn};
use crate::proto::{ErrorKind, ReplyBody, RequestBody};
use crate::{Client, Description, Dtype, Error, HostTensor, TensorSpec};

fn table() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("step", Dtype::I64, []),
        TensorSpec::new("w", Dtype::F32, [16, 8]),
        TensorSpec::new("emb", Dtype::BF16, [64, 4]),
    ]
}

fn described(job: &str, rank: u32, step: u64) -> ReplyBody {
    ReplyBody::Described {
        job: job.into(),
        rank,
        step,
        world_size: 4,
        tensors: table(),
    }
}

fn refusal(kind: ErrorKind, message: &str) -> ReplyBody {
    ReplyBody::Error {
        kind,
        message: message.into(),
        os_error: None,
    }
}

#[test]
fn describe_needs_no_registration_and_refusals_keep_the_connection() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                c.hello();
                // Registered tensors are not sent: describe registers nothing.
                let r = c.expect("describe");
                assert_eq!(
                    r.body,
                    RequestBody::Describe {
                        job: "job-a".into(),
                        rank: 0,
                        step: 5
                    }
                );
                c.reply(r.id, described("job-a", 0, 5));
                let r = c.expect("describe");
                assert_eq!(
                    r.body,
                    RequestBody::Describe {
                        job: "other".into(),
                        rank: 3,
                        step: 9
                    }
                );
                c.reply(r.id, described("other", 3, 9));
                for (kind, message) in [
                    (ErrorKind::NotFound, "snapshot job-a/1/step-6 not found"),
                    (ErrorKind::PermissionDenied, "job \"x\" belongs to uid 7"),
                    (ErrorKind::Corrupt, "MANIFEST.json: not valid JSON"),
                ] {
                    let r = c.expect("describe");
                    c.reply(r.id, refusal(kind, message));
                }
                // A reply about another snapshot is a protocol error.
                let r = c.expect("describe");
                c.reply(r.id, described("job-a", 0, 8));
                c.until_closed();
            }),
            conn(|c| {
                c.hello();
                let r = c.expect("describe");
                c.reply(r.id, described("job-a", 1, 2));
                c.until_closed();
            }),
        ],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    let t = HostTensor::zeros(Dtype::F32, [4]).expect("t");
    client.register_host("t", &t).expect("register");

    let d = client.describe(None, 0, 5).expect("describe own job");
    assert_eq!(
        d,
        Description {
            job: "job-a".into(),
            rank: 0,
            step: 5,
            world_size: 4,
            tensors: table(),
        }
    );
    let d = client.describe(Some("other"), 3, 9).expect("another job");
    assert_eq!((d.job.as_str(), d.rank, d.step), ("other", 3, 9));

    let err = client.describe(None, 1, 6).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("step-6")),
        "{err}"
    );
    let err = client.describe(Some("x"), 0, 1).unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    let err = client.describe(None, 0, 1).unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
    let err = client.describe(None, 0, 7).unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("step 8")),
        "{err}"
    );
    // The broken connection is replaced by the next call.
    let d = client.describe(None, 1, 2).expect("on a new connection");
    assert_eq!((d.rank, d.step), (1, 2));
    drop(client);
    fake.join();
}

#[test]
fn a_describe_cut_by_a_daemon_restart_is_retried_once() {
    let (_dir, path) = fake::socket_dir();
    let fake = Fake::start(
        &path,
        vec![
            conn(|c| {
                c.hello();
                c.expect("describe");
                // The daemon dies here.
            }),
            Script::Restart,
            conn(|c| {
                c.hello();
                let r = c.expect("describe");
                c.reply(r.id, described("job-a", 2, 11));
                c.until_closed();
            }),
        ],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    let d = client.describe(None, 2, 11).expect("retried");
    assert_eq!(d.tensors, table());
    drop(client);
    fake.join();
}

#[test]
fn describe_is_answered_while_a_capture_is_open() {
    let (_dir, path) = fake::socket_dir();
    let t = HostTensor::zeros(Dtype::U8, [1000]).expect("t");
    t.write().fill(7);
    let fake = Fake::start(
        &path,
        vec![conn(|c| {
            c.open(&fake::Layout::default());
            let step = c.begin_slot(1);
            let r = c.expect("describe");
            c.reply(r.id, described("job-a", 1, 3));
            let (captured, ..) = c.accept_captured();
            assert_eq!(captured, step);
            assert!(c.slot_data(1)[..1000].iter().all(|&b| b == 7));
            c.until_closed();
        })],
    );
    let mut client = Client::with_config(fake::config(&path)).expect("connect");
    client.register_host("t", &t).expect("register");
    client.begin_snapshot(4).expect("begin");
    let d = client.describe(None, 1, 3).expect("describe mid-capture");
    assert_eq!((d.rank, d.step), (1, 3));
    assert_eq!(client.open_capture(), Some(4), "the capture is still open");
    client.finish_snapshot().expect("finish");
    drop(client);
    fake.join();
}

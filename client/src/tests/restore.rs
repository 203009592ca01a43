use super::fake::{self, Fake, Layout, conn, expected_data, pattern};
use crate::proto::{ErrorKind, ReplyBody, RequestBody, RestoreSource};
use crate::{Client, Dtype, Error, HostTensor, Step};

#[test]
fn restore_copies_the_slot_back_and_a_mismatch_writes_nothing() {
    let (_dir, path) = fake::socket_dir();
    let w = HostTensor::zeros(Dtype::F64, [10, 3]).expect("w");
    let b = HostTensor::zeros(Dtype::I16, [7]).expect("b");
    let (wb, bb) = (pattern(w.byte_len(), 5), pattern(b.byte_len(), 6));
    let (wb2, bb2) = (wb.clone(), bb.clone());
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&Layout::default());
            let r = c.expect("restore");
            assert_eq!(r.body, RequestBody::Restore { step: Some(5) });
            c.write_slot(1, &expected_data(&info, &[wb2, bb2]));
            c.reply(
                r.id,
                ReplyBody::Restored {
                    step: 5,
                    slot: 1,
                    source: RestoreSource::Disk,
                    bytes: info.data_bytes,
                    elapsed_ns: 2_000,
                },
            );
            let r = c.expect("release");
            assert_eq!(r.body, RequestBody::Release { slot: 1 });
            c.reply(r.id, ReplyBody::Released);
            let r = c.expect("restore");
            assert_eq!(r.body, RequestBody::Restore { step: None });
            c.reply(r.id, ReplyBody::NoSnapshot);
            let r = c.expect("restore");
            // Even if the daemon scribbled into a slot, a refusal lends none.
            c.write_slot(
                0,
                &vec![0xFF; usize::try_from(info.data_bytes).expect("len")],
            );
            c.reply(
                r.id,
                ReplyBody::Error {
                    kind: ErrorKind::Mismatch,
                    message: "tensor \"w\": shape [10, 4] in the snapshot".into(),
                    os_error: None,
                },
            );
            let r = c.expect("list");
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
    client.register_host("w", &w).expect("w");
    client.register_host("b", &b).expect("b");
    let info = client
        .restore(Step::At(5))
        .expect("restore")
        .expect("a snapshot");
    assert_eq!((info.step, info.source), (5, RestoreSource::Disk));
    assert_eq!(info.daemon_fill.as_micros(), 2);
    assert_eq!(&*w.read(), &wb[..]);
    assert_eq!(&*b.read(), &bb[..]);
    assert_eq!(client.restore(Step::Latest).expect("restore"), None);
    let err = client.restore(Step::At(6)).unwrap_err();
    assert!(
        matches!(&err, Error::Mismatch(m) if m.contains("tensor \"w\"")),
        "{err}"
    );
    assert_eq!(
        &*w.read(),
        &wb[..],
        "buffers untouched by a refused restore"
    );
    assert_eq!(&*b.read(), &bb[..]);
    // The connection survives a non-closing error.
    client.list().expect("list");
    drop(client);
    fake.join();
}

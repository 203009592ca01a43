//! Restore out of a lent slot, on every device.

use super::fake::{self, Fake, Layout, conn, expected_data, pattern};
use super::matrix::{Memory, device_matrix};
use super::snapshot::{register_all, tensor};
use crate::proto::{ErrorKind, JobSteps, ReplyBody, RequestBody, RestoreSource, WalkBack};
use crate::{Dtype, Error, Step};

device_matrix!(restore_copies_the_slot_back_and_a_mismatch_writes_nothing);

fn restore_copies_the_slot_back_and_a_mismatch_writes_nothing(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    // Zeros now; the snapshot holds these patterns.
    let w = tensor(memory, "w", Dtype::F64, &[10, 3], 0);
    let b = tensor(memory, "b", Dtype::I16, &[7], 0);
    w.memory.overwrite(&vec![0; w.bytes.len()]);
    b.memory.overwrite(&vec![0; b.bytes.len()]);
    let (wb, bb) = (pattern(w.bytes.len(), 5), pattern(b.bytes.len(), 6));
    let (wb2, bb2) = (wb.clone(), bb.clone());
    let (wb3, bb3) = (wb.clone(), bb.clone());
    let walked = vec![
        WalkBack {
            step: 7,
            source: RestoreSource::Remote,
            reason: "checksum mismatch in the download".into(),
        },
        WalkBack {
            step: 6,
            source: RestoreSource::Disk,
            reason: "manifest truncated".into(),
        },
    ];
    let walked_fake = walked.clone();
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
                    source: RestoreSource::Remote,
                    bytes: info.data_bytes,
                    elapsed_ns: 2_000,
                    walked_back: Vec::new(),
                },
            );
            let r = c.expect("release");
            assert_eq!(r.body, RequestBody::Release { slot: 1 });
            c.reply(r.id, ReplyBody::Released);
            // The newest steps fail verification: the daemon walks back.
            let r = c.expect("restore");
            assert_eq!(r.body, RequestBody::Restore { step: None });
            c.write_slot(0, &expected_data(&info, &[wb3, bb3]));
            c.reply(
                r.id,
                ReplyBody::Restored {
                    step: 5,
                    slot: 0,
                    source: RestoreSource::Disk,
                    bytes: info.data_bytes,
                    elapsed_ns: 3_000,
                    walked_back: walked_fake,
                },
            );
            let r = c.expect("release");
            assert_eq!(r.body, RequestBody::Release { slot: 0 });
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
                    remote_complete: vec![JobSteps {
                        job: "j".into(),
                        steps: vec![5],
                    }],
                    remote_error: Some("slow down".into()),
                },
            );
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    let ts = [w, b];
    register_all(&mut client, &ts);
    let info = client
        .restore(Step::At(5))
        .expect("restore")
        .expect("a snapshot");
    assert_eq!((info.step, info.source), (5, RestoreSource::Remote));
    assert_eq!(info.daemon_fill.as_micros(), 2);
    assert!(info.walked_back.is_empty(), "{:?}", info.walked_back);
    let (w, b) = (&ts[0].memory, &ts[1].memory);
    assert_eq!(w.contents(), wb);
    assert_eq!(b.contents(), bb);
    w.overwrite(&vec![0; wb.len()]);
    b.overwrite(&vec![0; bb.len()]);
    let info = client
        .restore(Step::Latest)
        .expect("restore")
        .expect("a snapshot");
    assert_eq!((info.step, info.source), (5, RestoreSource::Disk));
    assert_eq!(info.walked_back, walked, "newest first, as the daemon said");
    assert_eq!(w.contents(), wb);
    assert_eq!(b.contents(), bb);
    assert_eq!(client.restore(Step::Latest).expect("restore"), None);
    let err = client.restore(Step::At(6)).unwrap_err();
    assert!(
        matches!(&err, Error::Mismatch(m) if m.contains("tensor \"w\"")),
        "{err}"
    );
    assert_eq!(w.contents(), wb, "buffers untouched by a refused restore");
    assert_eq!(b.contents(), bb);
    // The connection survives a non-closing error.
    let listing = client.list().expect("list");
    assert_eq!(
        listing.remote_complete,
        [JobSteps {
            job: "j".into(),
            steps: vec![5]
        }]
    );
    assert_eq!(listing.remote_error.as_deref(), Some("slow down"));
    drop(client);
    fake.join();
}

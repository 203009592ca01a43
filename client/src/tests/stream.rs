//! Capture through the stream ring, on every device.

use std::collections::VecDeque;
use std::time::Duration;

use super::fake::{self, Fake, Layout, conn, expected_data, pattern};
use super::matrix::{Memory, device_matrix};
use super::snapshot::{register_all, tensor};
use crate::proto::{BusyPolicy, ReplyBody, RequestBody};
use crate::{Dtype, HostTensor, SnapshotOutcome};

device_matrix!(a_stream_goes_chunk_by_chunk_through_the_ring_never_overrunning_it);

/// The device's tensor `w` and a host tensor `b` (on the double, one chunk
/// mixes both kinds): every chunk's copies finish before it is reported
/// filled (the fake reads the ring right then).
fn a_stream_goes_chunk_by_chunk_through_the_ring_never_overrunning_it(memory: &dyn Memory) {
    let (_dir, path) = fake::socket_dir();
    let w = tensor(memory, "w", Dtype::F32, &[16, 33], 3);
    let b = HostTensor::zeros(Dtype::U8, [37]).expect("b");
    let bb = pattern(b.byte_len(), 4);
    b.write().copy_from_slice(&bb);
    let wb = w.bytes.clone();
    let layout = Layout {
        ring_chunks: 2,
        chunk_bytes: 512,
        policy: BusyPolicy::Stream,
        ..Layout::default()
    };
    let fake = Fake::start(
        &path,
        vec![conn(move |c| {
            let info = c.open(&layout);
            c.dirty_ring(0xAB);
            let chunks = info.chunk_count();
            assert!(chunks >= 4, "{chunks} chunks");
            let r = c.expect("begin");
            c.reply(r.id, ReplyBody::Stream { step: 9, chunks });
            let mut data = Vec::new();
            let mut outstanding = VecDeque::new();
            for seq in 0..chunks {
                let r = c.expect("chunk_filled");
                assert_eq!(r.body, RequestBody::ChunkFilled { step: 9, seq });
                data.extend(c.ring_chunk(seq));
                outstanding.push_back((r.id, seq));
                if outstanding.len() == 2 {
                    if seq + 1 < chunks {
                        assert!(c.quiet_for(Duration::from_millis(50)), "ring overrun");
                    }
                    let (id, free) = outstanding.pop_front().expect("outstanding");
                    c.reply(id, ReplyBody::ChunkFree { step: 9, seq: free });
                }
            }
            for (id, free) in outstanding {
                c.reply(id, ReplyBody::ChunkFree { step: 9, seq: free });
            }
            assert_eq!(
                data,
                expected_data(&info, &[wb, bb]),
                "streamed data section (holes zero)"
            );
            let (step, _, _) = c.accept_captured();
            assert_eq!(step, 9);
            c.until_closed();
        })],
    );
    let mut client = memory.client(fake::config(&path));
    register_all(&mut client, std::slice::from_ref(&w));
    client.register_host("b", &b).expect("b");
    let outcome = client.snapshot(9).expect("snapshot");
    assert!(
        matches!(outcome, SnapshotOutcome::Captured(ref i) if i.step == 9),
        "{outcome:?}"
    );
    drop(client);
    fake.join();
}

//! The host backend: `memcpy` on a pool of threads the device keeps.

use std::sync::Arc;
use std::time::Duration;

use super::pool::{Batch, CopyPool, Piece};
use super::{
    AttachedStaging, CaptureCopy, CopyTicket, Device, RestoreCopy, Source, StagingRegion,
    StreamOrder, Target,
};
use crate::error::{Error, Result};

/// Copies host memory with `memcpy`. Copies longer than `piece_bytes` are
/// cut into pieces of at most that (so one huge tensor goes parallel too);
/// pieces are grouped into batches of about `piece_bytes`, which up to
/// `threads` pool threads (and the thread that waits) take one at a time.
/// [`capture_and_wait`](Device::capture_and_wait) and
/// [`restore_and_wait`](Device::restore_and_wait) copy on the calling
/// thread and wake a pool thread only for each batch after the first (a
/// stream chunk, one batch, wakes none).
///
/// The threads start at the first [`attach`](Device::attach) and live as
/// long as the device (clones share them); a capture or restore starts no
/// thread. Attaching pins nothing yet: the staging memfd is shared memory
/// the daemon allocated, and `memcpy` needs no registration.
///
/// A ticket dropped before it was waited for cancels the batches no thread
/// has taken and waits for the running ones (at most one batch per
/// thread). That wait is bounded by the batches themselves (a `memcpy` of
/// about `piece_bytes` always ends); it is never cut short, because
/// returning while a copy may still write memory its owner is about to free
/// (a [`RawBuffer`](crate::RawBuffer)) is not an option, and it never aborts
/// the trainer (a process stopped by a debugger or a job scheduler's
/// suspend resumes with its clock far ahead). A wait that takes long is
/// logged every few seconds.
#[derive(Debug, Clone)]
pub struct HostDevice {
    pool: Arc<CopyPool>,
    piece_bytes: usize,
}

/// The host device's attachment: nothing to undo.
#[derive(Debug)]
struct HostAttached;

impl AttachedStaging for HostAttached {}

impl HostDevice {
    /// Default piece size: 16 MiB.
    pub const PIECE_BYTES: usize = 16 << 20;

    /// A host device copying on up to `threads` threads (at least 1),
    /// started at the first attach.
    pub fn new(threads: usize) -> HostDevice {
        HostDevice {
            pool: Arc::new(CopyPool::new(threads)),
            piece_bytes: Self::PIECE_BYTES,
        }
    }

    /// The same device with another piece size (at least 1 byte).
    pub fn with_piece_bytes(mut self, piece_bytes: usize) -> HostDevice {
        self.piece_bytes = piece_bytes.max(1);
        self
    }

    /// Threads copies may use.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Copy threads running now (0 before the first attach).
    pub fn threads_started(&self) -> usize {
        self.pool.started()
    }
}

impl Default for HostDevice {
    fn default() -> HostDevice {
        HostDevice::new(default_threads())
    }
}

/// `min(4, available_parallelism)`.
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Groups pieces into batches of at least `piece_bytes` (the last may be
/// smaller), in order.
struct Batcher {
    piece_bytes: usize,
    batches: Vec<Batch>,
    current: Batch,
    current_bytes: usize,
}

impl Batcher {
    fn new(piece_bytes: usize) -> Batcher {
        Batcher {
            piece_bytes,
            batches: Vec::new(),
            current: Vec::new(),
            current_bytes: 0,
        }
    }

    fn push(&mut self, piece: Piece) {
        if piece.len() == 0 {
            return;
        }
        self.current_bytes += piece.len();
        self.current.push(piece);
        if self.current_bytes >= self.piece_bytes {
            self.batches.push(std::mem::take(&mut self.current));
            self.current_bytes = 0;
        }
    }

    fn finish(mut self) -> Vec<Batch> {
        if !self.current.is_empty() {
            self.batches.push(self.current);
        }
        self.batches
    }
}

fn misrouted(what: &str) -> Error {
    Error::internal(format!(
        "the host device was given a {what} of device memory (the client routes each buffer to its own device)"
    ))
}

impl Device for HostDevice {
    fn name(&self) -> &'static str {
        "host"
    }

    fn attach(&self, _staging: &StagingRegion) -> Result<Box<dyn AttachedStaging>> {
        self.pool.start()?;
        Ok(Box::new(HostAttached))
    }

    fn capture(&self, copies: Vec<CaptureCopy>, _: &StreamOrder) -> Result<Box<dyn CopyTicket>> {
        Ok(Box::new(self.pool.submit(self.capture_batches(copies)?)?))
    }

    fn restore(&self, copies: Vec<RestoreCopy>, _: &StreamOrder) -> Result<Box<dyn CopyTicket>> {
        Ok(Box::new(self.pool.submit(self.restore_batches(copies)?)?))
    }

    fn capture_and_wait(&self, copies: Vec<CaptureCopy>, _: &StreamOrder) -> Result<Duration> {
        self.pool.run(self.capture_batches(copies)?)
    }

    fn restore_and_wait(&self, copies: Vec<RestoreCopy>, _: &StreamOrder) -> Result<Duration> {
        self.pool.run(self.restore_batches(copies)?)
    }
}

impl HostDevice {
    /// The pieces of `copies`, in batches.
    fn capture_batches(&self, copies: Vec<CaptureCopy>) -> Result<Vec<Batch>> {
        let piece_bytes = self.piece_bytes;
        let mut batcher = Batcher::new(piece_bytes);
        for CaptureCopy { src, dst } in copies {
            let Source::Host(mut src) = src else {
                return Err(misrouted("capture source"));
            };
            let mut dst = dst;
            assert_eq!(src.len(), dst.len(), "capture copy of unequal lengths");
            while src.len() > piece_bytes {
                let (head, tail) = src.split_at(piece_bytes);
                let (dhead, dtail) = dst.split_at(piece_bytes);
                batcher.push(Piece::Capture {
                    src: head,
                    dst: dhead,
                });
                (src, dst) = (tail, dtail);
            }
            batcher.push(Piece::Capture { src, dst });
        }
        Ok(batcher.finish())
    }

    /// The pieces of `copies`, in batches.
    fn restore_batches(&self, copies: Vec<RestoreCopy>) -> Result<Vec<Batch>> {
        let piece_bytes = self.piece_bytes;
        let mut batcher = Batcher::new(piece_bytes);
        for RestoreCopy { src, dst } in copies {
            let Target::Host(mut dst) = dst else {
                return Err(misrouted("restore target"));
            };
            let mut src = src;
            assert_eq!(src.len(), dst.len(), "restore copy of unequal lengths");
            while dst.len() > piece_bytes {
                let (head, tail) = dst.split_at(piece_bytes);
                let (shead, stail) = src.split_at(piece_bytes);
                batcher.push(Piece::Restore {
                    src: shead,
                    dst: head,
                });
                (src, dst) = (stail, tail);
            }
            batcher.push(Piece::Restore { src, dst });
        }
        Ok(batcher.finish())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::device::PinPolicy;
    use crate::staging::{Staging, testing};
    use crate::{Buffer, Dtype, HostTensor};

    fn tensor(len: usize, seed: usize) -> HostTensor {
        let t = HostTensor::zeros(Dtype::U8, [len as u64]).expect("zeros");
        for (i, b) in t.write().iter_mut().enumerate() {
            *b = u8::try_from((i * 31 + seed) % 251).expect("byte");
        }
        t
    }

    /// Staging for `tensors` (one slot, back to back), attached to `device`.
    fn staging_for(tensors: &[&HostTensor], device: &HostDevice) -> (Staging, std::fs::File) {
        let lens: Vec<u64> = tensors.iter().map(|t| t.byte_len() as u64).collect();
        let info = testing::one_slot(&lens);
        let (fd, reader) = testing::memfd(info.memfd_bytes);
        let device: Arc<dyn Device> = Arc::new(device.clone());
        let staging = Staging::map(fd, info, lens, &[device], PinPolicy::Prefer).expect("map");
        (staging, reader)
    }

    fn captures(staging: &Staging, tensors: &[&HostTensor]) -> Vec<CaptureCopy> {
        // SAFETY: each test makes one set of spans at a time.
        let spans = unsafe { staging.slot_spans(0) }.expect("spans");
        spans
            .into_iter()
            .zip(tensors)
            .map(|(dst, t)| CaptureCopy {
                src: Buffer::from(*t).source(),
                dst,
            })
            .collect()
    }

    #[test]
    fn capture_and_restore_copy_exact_bytes_through_many_pieces() {
        let big = tensor(1_000_003, 1);
        let small = tensor(10, 2);
        let device = HostDevice::new(4).with_piece_bytes(4096);
        let (staging, reader) = staging_for(&[&big, &small], &device);
        let took = device
            .capture(captures(&staging, &[&big, &small]), &StreamOrder::legacy())
            .expect("capture")
            .wait()
            .expect("copied");
        assert!(took > Duration::ZERO);
        let mut slot = vec![0u8; big.byte_len() + small.byte_len()];
        reader.read_exact_at(&mut slot, 0).expect("read");
        assert!(slot[..big.byte_len()] == big.read()[..], "big differs");
        assert_eq!(&slot[big.byte_len()..], &small.read()[..]);

        let back = HostTensor::zeros(Dtype::U8, [big.byte_len() as u64]).expect("zeros");
        let back_small = HostTensor::zeros(Dtype::U8, [10]).expect("zeros");
        // SAFETY: the capture's spans are gone (its ticket was waited for).
        let spans = unsafe { staging.slot_spans(0) }.expect("spans");
        let copies = spans
            .into_iter()
            .zip([&back, &back_small])
            .map(|(src, t)| RestoreCopy {
                src,
                dst: Buffer::from(t).target(),
            })
            .collect();
        device
            .restore(copies, &StreamOrder::legacy())
            .expect("restore")
            .wait()
            .expect("restored");
        assert!(back.read()[..] == big.read()[..], "restored bytes differ");
        assert_eq!(&back_small.read()[..], &small.read()[..]);
    }

    #[test]
    fn the_copy_threads_start_at_the_first_attach_and_no_capture_starts_more() {
        let t = tensor(64 << 10, 3);
        let device = HostDevice::new(3).with_piece_bytes(4096);
        assert_eq!(device.threads_started(), 0);
        // Copies before any attach are refused (no thread would run them
        // until a wait).
        let (fd, _) = testing::memfd(64 << 10);
        let unattached = Staging::map(
            fd,
            testing::one_slot(&[64 << 10]),
            vec![64 << 10],
            &[],
            PinPolicy::Prefer,
        )
        .expect("map");
        let refused = device.capture(captures(&unattached, &[&t]), &StreamOrder::legacy());
        assert!(
            matches!(&refused, Err(Error::Internal { message: m, .. }) if m.contains("before attach")),
            "{:?}",
            refused.map(drop)
        );
        let (staging, _) = staging_for(&[&t], &device);
        assert_eq!(device.threads_started(), 3);
        for _ in 0..5 {
            device
                .capture(captures(&staging, &[&t]), &StreamOrder::legacy())
                .expect("capture")
                .wait()
                .expect("copied");
        }
        let (_again, _) = staging_for(&[&t], &device);
        assert_eq!(device.threads_started(), 3, "threads are per device");
    }

    #[test]
    fn a_copy_the_caller_waits_for_runs_its_first_batch_on_the_caller_and_wakes_no_worker_for_it() {
        let device = HostDevice::new(3).with_piece_bytes(4096);
        let small = tensor(1000, 6);
        let (staging, reader) = staging_for(&[&small], &device);
        let pool = &device.pool;
        // A stream chunk: one batch, copied by the waiting caller alone.
        let took = device
            .capture_and_wait(captures(&staging, &[&small]), &StreamOrder::legacy())
            .expect("copied");
        assert!(took > Duration::ZERO);
        assert_eq!(pool.woken(), 0, "a single-batch job woke a worker");
        let mut back = vec![0u8; 1000];
        reader.read_exact_at(&mut back, 0).expect("read");
        assert_eq!(&back[..], &small.read()[..]);
        // The same copy started in the background wakes one worker: the
        // caller may not wait for it soon.
        device
            .capture(captures(&staging, &[&small]), &StreamOrder::legacy())
            .expect("capture")
            .wait()
            .expect("copied");
        assert_eq!(pool.woken(), 1);
        // Five batches waited for at once: four more workers' worth, cut to
        // the pool's three; the bytes are exact.
        let big = tensor(5 * 4096, 7);
        let (staging, reader) = staging_for(&[&big], &device);
        device
            .capture_and_wait(captures(&staging, &[&big]), &StreamOrder::legacy())
            .expect("copied");
        assert_eq!(pool.woken(), 1 + 3);
        let mut back = vec![0u8; 5 * 4096];
        reader.read_exact_at(&mut back, 0).expect("read");
        assert!(back[..] == big.read()[..], "bytes differ");
        // A restore waited for at once: two batches, one worker.
        let into = HostTensor::zeros(Dtype::U8, [2 * 4096]).expect("zeros");
        let (staging, _) = staging_for(&[&into], &device);
        // SAFETY: the only spans of this staging.
        let spans = unsafe { staging.slot_spans(0) }.expect("spans");
        let copies = spans
            .into_iter()
            .map(|src| RestoreCopy {
                src,
                dst: Buffer::from(&into).target(),
            })
            .collect();
        device
            .restore_and_wait(copies, &StreamOrder::legacy())
            .expect("restored");
        assert_eq!(pool.woken(), 1 + 3 + 1);
    }

    #[test]
    fn a_ticket_dropped_unwaited_waits_for_its_running_copy_and_lets_go_of_the_buffers() {
        use crate::device::pool::{Batch, Gate};
        use std::sync::atomic::{AtomicBool, Ordering};

        let big = tensor(4 << 20, 4);
        // One worker: it takes the gated batch (taken first: batches are
        // taken from the back), the tensor's batches wait behind it.
        let device = HostDevice::new(1).with_piece_bytes(1 << 20);
        let (staging, _) = staging_for(&[&big], &device);
        let gate = Arc::new(Gate::default());
        let mut batches = device
            .capture_batches(captures(&staging, &[&big]))
            .expect("batches");
        assert_eq!(batches.len(), 4);
        let gated: Batch = vec![Piece::Gated(Arc::clone(&gate))];
        batches.push(gated);
        let ticket = device.pool.submit(batches).expect("submit");
        gate.wait_entered();
        // The drop must not return while the gated copy runs.
        let returned = Arc::new(AtomicBool::new(false));
        let dropper = {
            let (returned, gate) = (Arc::clone(&returned), Arc::clone(&gate));
            std::thread::spawn(move || {
                drop(ticket);
                returned.store(true, Ordering::SeqCst);
                gate.passed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !returned.load(Ordering::SeqCst),
            "the drop returned while a copy was still running"
        );
        gate.open();
        let passed_before_return = dropper.join().expect("dropper");
        assert!(
            passed_before_return,
            "the drop returned before the copy ended"
        );
        // The batches no thread took were cancelled and every lease went
        // with the drop: a writer gets in at once.
        let started = Instant::now();
        big.write().fill(0);
        assert!(started.elapsed() < Duration::from_millis(100));
        // And the ticket of an empty copy list is done at once.
        let empty = device
            .capture(Vec::new(), &StreamOrder::legacy())
            .expect("nothing");
        assert!(empty.is_done());
        assert_eq!(empty.wait().expect("nothing"), Duration::ZERO);
    }

    /// A buffer of another device (one `Arc`, as `DeviceBuffer::device`
    /// promises) handed to the host device by mistake.
    #[derive(Debug)]
    struct Elsewhere(Arc<dyn Device>);

    impl crate::device::DeviceBuffer for Elsewhere {
        fn device(&self) -> Arc<dyn Device> {
            Arc::clone(&self.0)
        }
        fn byte_len(&self) -> usize {
            64
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    #[test]
    fn device_memory_given_to_the_host_device_is_refused() {
        let device = HostDevice::new(1);
        let t = tensor(64, 5);
        let (staging, _) = staging_for(&[&t], &device);
        // SAFETY: the only spans of this staging.
        let span = unsafe { staging.slot_spans(0) }
            .expect("spans")
            .pop()
            .expect("one");
        let buffer: Arc<dyn crate::device::DeviceBuffer> =
            Arc::new(Elsewhere(Arc::new(HostDevice::new(1))));
        let refused = device.capture(
            vec![CaptureCopy {
                src: Buffer::Device(buffer).source(),
                dst: span,
            }],
            &StreamOrder::legacy(),
        );
        assert!(
            matches!(&refused, Err(Error::Internal { message: m, .. }) if m.contains("device memory")),
            "{:?}",
            refused.map(drop)
        );
    }
}

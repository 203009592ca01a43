//! The CUDA device against a driver: the project's double in CI (strict:
//! device memory the host cannot read, asynchronous streams with a delay
//! per operation, tracked host registrations, injected faults), or a real
//! GPU. Every test holds the CUDA test lock and skips, counted, where no
//! driver is usable (a failure under `GPUSNAP_REQUIRE_CUDA=1`).

use std::ffi::c_void;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult, CUstream};

use super::DeviceMemory;
use super::{CudaDevice, CudaError};
use crate::device::{
    CaptureCopy, Device, DeviceBuffer, PinPolicy, Pinning, RestoreCopy, StreamOrder,
};
use crate::staging::{Staging, testing};
use crate::tests::cuda::{
    cuda_buffer, cuda_lock, cuda_or_skip, double_calls, double_registered_bytes, double_violations,
    inject_fault, on_double, reset_double,
};
use crate::{Buffer, Error};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 31 + usize::from(seed)) % 251).expect("byte"))
        .collect()
}

/// Staging for tensors of `lens` bytes (one slot), attached to `device`.
fn staging_for(
    lens: &[usize],
    device: &Arc<CudaDevice>,
    policy: PinPolicy,
) -> crate::Result<(Staging, std::fs::File)> {
    let lens: Vec<u64> = lens.iter().map(|&l| l as u64).collect();
    let info = testing::one_slot(&lens);
    let (fd, reader) = testing::memfd(info.memfd_bytes);
    let device: Arc<dyn Device> = Arc::clone(device) as Arc<dyn Device>;
    Ok((Staging::map(fd, info, lens, &[device], policy)?, reader))
}

fn captures(staging: &Staging, buffers: &[&Arc<super::CudaBuffer>]) -> Vec<CaptureCopy> {
    // SAFETY: each test makes one set of spans at a time.
    let spans = unsafe { staging.slot_spans(0) }.expect("spans");
    spans
        .into_iter()
        .zip(buffers)
        .map(|(dst, b)| CaptureCopy {
            src: Buffer::Device(Arc::clone(b) as Arc<dyn DeviceBuffer>).source(),
            dst,
        })
        .collect()
}

fn restores(staging: &Staging, buffers: &[&Arc<super::CudaBuffer>]) -> Vec<RestoreCopy> {
    // SAFETY: as above.
    let spans = unsafe { staging.slot_spans(0) }.expect("spans");
    spans
        .into_iter()
        .zip(buffers)
        .map(|(src, b)| RestoreCopy {
            src,
            dst: Buffer::Device(Arc::clone(b) as Arc<dyn DeviceBuffer>).target(),
        })
        .collect()
}

fn slot_bytes(reader: &std::fs::File, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    reader.read_exact_at(&mut bytes, 0).expect("read staging");
    bytes
}

fn assert_clean() {
    let violations = double_violations();
    assert!(
        violations.is_empty(),
        "the CUDA double saw violations: {violations:#?}"
    );
}

/// A stream of the trainer's (blocking, as PyTorch's side streams are),
/// destroyed when dropped.
struct TrainerStream {
    device: Arc<CudaDevice>,
    raw: CUstream,
}

impl TrainerStream {
    fn new(device: &Arc<CudaDevice>) -> TrainerStream {
        let _current = device.context().enter().expect("context");
        let mut raw: CUstream = std::ptr::null_mut();
        // SAFETY: a context is current; the out-pointer is a live local.
        let code = unsafe { sys::cuStreamCreate(&mut raw, 0) };
        assert_eq!(code, CUresult::CUDA_SUCCESS, "cuStreamCreate");
        TrainerStream {
            device: Arc::clone(device),
            raw,
        }
    }

    fn handle(&self) -> u64 {
        self.raw as usize as u64
    }

    fn order(&self) -> StreamOrder {
        StreamOrder::legacy().with(self.device.ordinal(), self.handle())
    }

    /// Queues a host function that holds the stream until `gate` opens.
    fn block_on(&self, gate: &Arc<Gate>) {
        let _current = self.device.context().enter().expect("context");
        let data = Arc::into_raw(Arc::clone(gate)).cast_mut().cast::<c_void>();
        // SAFETY: `data` is a leaked `Arc<Gate>` that `gate_host_fn`
        // reclaims exactly once when the stream runs it.
        let code = unsafe { sys::cuLaunchHostFunc(self.raw, Some(gate_host_fn), data) };
        assert_eq!(code, CUresult::CUDA_SUCCESS, "cuLaunchHostFunc");
    }

    /// Queues a fill of `len` bytes at `ptr` with `value`.
    fn fill(&self, allocation: &DeviceMemory, value: u8) {
        let _current = self.device.context().enter().expect("context");
        // SAFETY: the range is the allocation; the stream is live.
        let code = unsafe {
            sys::cuMemsetD8Async(allocation.device_ptr(), value, allocation.len(), self.raw)
        };
        assert_eq!(code, CUresult::CUDA_SUCCESS, "cuMemsetD8Async");
    }

    fn synchronize(&self) {
        // SAFETY: the stream is live.
        let code = unsafe { sys::cuStreamSynchronize(self.raw) };
        assert_eq!(code, CUresult::CUDA_SUCCESS, "cuStreamSynchronize");
    }

    fn is_idle(&self) -> bool {
        // SAFETY: the stream is live.
        (unsafe { sys::cuStreamQuery(self.raw) }) == CUresult::CUDA_SUCCESS
    }
}

impl Drop for TrainerStream {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        unsafe { sys::cuStreamDestroy_v2(self.raw) };
    }
}

/// What a host function on a stream waits for.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().expect("gate") = true;
        self.opened.notify_all();
    }
}

unsafe extern "C" fn gate_host_fn(data: *mut c_void) {
    // SAFETY: `block_on` leaked this Arc for this one call.
    let gate = unsafe { Arc::from_raw(data.cast_const().cast::<Gate>()) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open = gate.open.lock().expect("gate");
    while !*open && Instant::now() < deadline {
        open = gate
            .opened
            .wait_timeout(open, Duration::from_millis(50))
            .expect("gate")
            .0;
    }
}

#[test]
fn capture_and_restore_copy_exact_bytes_through_pinned_staging() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    let a = pattern(1 << 20, 1);
    let b = pattern(4099, 2);
    let (ba, _) = cuda_buffer(&device, "a", &a);
    let (bb, _) = cuda_buffer(&device, "b", &b);
    let (staging, reader) =
        staging_for(&[a.len(), b.len()], &device, PinPolicy::Require).expect("staging");
    let pinning = staging.pinning();
    assert!(
        matches!(pinning.as_slice(), [Pinning::Pinned { .. }]),
        "{pinning:?}"
    );
    if on_double() {
        assert_eq!(double_registered_bytes(), staging.info().memfd_bytes);
    }
    let took = device
        .capture(captures(&staging, &[&ba, &bb]), &StreamOrder::legacy())
        .expect("capture")
        .wait()
        .expect("copied");
    assert!(took > Duration::ZERO);
    let slot = slot_bytes(&reader, a.len() + b.len());
    assert!(slot[..a.len()] == a[..], "a differs in staging");
    assert!(slot[a.len()..] == b[..], "b differs in staging");

    let (fresh_a, alloc_a) = cuda_buffer(&device, "a", &vec![0; a.len()]);
    let (fresh_b, alloc_b) = cuda_buffer(&device, "b", &vec![0; b.len()]);
    device
        .restore_and_wait(
            restores(&staging, &[&fresh_a, &fresh_b]),
            &StreamOrder::legacy(),
        )
        .expect("restored");
    assert!(
        alloc_a.read(0, a.len()).expect("read") == a,
        "a restored wrong"
    );
    assert!(
        alloc_b.read(0, b.len()).expect("read") == b,
        "b restored wrong"
    );
    drop(staging);
    assert_eq!(
        double_registered_bytes(),
        0,
        "staging still page-locked after unmap"
    );
    assert_clean();
}

#[test]
fn a_capture_follows_the_trainers_queued_work_and_never_synchronizes_the_context() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    let len = 256 << 10;
    let allocation = Arc::new(DeviceMemory::new(&device, len).expect("alloc"));
    allocation.write(0, &vec![1; len]).expect("write");
    let buffer = allocation.buffer("w").expect("buffer");
    let (staging, reader) = staging_for(&[len], &device, PinPolicy::Prefer).expect("staging");

    // The trainer's stream: held by a gate, then a write of 2s.
    let trainer = TrainerStream::new(&device);
    let gate = Arc::new(Gate::default());
    trainer.block_on(&gate);
    trainer.fill(&allocation, 2);
    // Another of the trainer's streams, busy with a long operation the
    // snapshot must not wait for.
    let other = TrainerStream::new(&device);
    let other_gate = Arc::new(Gate::default());
    other.block_on(&other_gate);

    let syncs_before = double_calls("cuCtxSynchronize");
    let ticket = device
        .capture(captures(&staging, &[&buffer]), &trainer.order())
        .expect("capture");
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !ticket.is_done(),
        "the copies ran before the trainer's queued work"
    );
    gate.open();
    ticket.wait().expect("copied");
    assert!(
        slot_bytes(&reader, len).iter().all(|&b| b == 2),
        "captured the state before the trainer's write"
    );
    assert!(
        !other.is_idle(),
        "the other stream's long operation is still running"
    );
    assert_eq!(
        double_calls("cuCtxSynchronize"),
        syncs_before,
        "a snapshot synchronized the context"
    );
    other_gate.open();
    other.synchronize();
    trainer.synchronize();
    assert_clean();
}

#[test]
fn the_trainers_next_work_waits_for_the_copies_on_the_device() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    let len = 1 << 20;
    let allocation = Arc::new(DeviceMemory::new(&device, len).expect("alloc"));
    allocation.write(0, &vec![7; len]).expect("write");
    let buffer = allocation.buffer("w").expect("buffer");
    let (staging, reader) = staging_for(&[len], &device, PinPolicy::Prefer).expect("staging");
    let trainer = TrainerStream::new(&device);
    // Hold the copy stream's work behind the trainer's gate, so the
    // trainer's write below would surely win without the ordering.
    let gate = Arc::new(Gate::default());
    trainer.block_on(&gate);
    let ticket = device
        .capture(captures(&staging, &[&buffer]), &trainer.order())
        .expect("capture");
    assert!(
        ticket.order_streams_after().expect("ordered"),
        "a CUDA ticket orders streams"
    );
    // The optimizer step: it must wait for the copies.
    trainer.fill(&allocation, 9);
    gate.open();
    ticket.wait().expect("copied");
    assert!(
        slot_bytes(&reader, len).iter().all(|&b| b == 7),
        "the next step's write reached the snapshot"
    );
    trainer.synchronize();
    assert!(
        allocation
            .read(0, len)
            .expect("read")
            .iter()
            .all(|&b| b == 9),
        "the trainer's write ran"
    );
    assert_clean();
}

#[test]
fn registration_refuses_what_is_not_this_devices_memory_naming_the_tensor() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    let allocation = DeviceMemory::new(&device, 4096).expect("alloc");
    let host = vec![0u8; 4096];
    let refused = |name: &str, ptr: u64, len: usize| {
        // SAFETY: refused before any copy could use it.
        match unsafe { device.buffer(name, ptr, len, None) } {
            Err(CudaError::InvalidPointer { tensor, reason }) => {
                assert_eq!(tensor, name);
                reason
            }
            other => panic!("{name}: {other:?}"),
        }
    };
    let reason = refused("host", host.as_ptr() as u64, host.len());
    assert!(
        reason.contains("not memory the CUDA driver knows"),
        "{reason}"
    );
    let reason = refused("garbage", 0xdead_0000, 16);
    assert!(
        reason.contains("not memory the CUDA driver knows"),
        "{reason}"
    );
    let reason = refused("long", allocation.device_ptr(), 4097);
    assert!(reason.contains("run 1 bytes past the end"), "{reason}");
    let reason = refused("tail", allocation.device_ptr() + 4000, 200);
    assert!(reason.contains("past the end"), "{reason}");
    // SAFETY: the allocation outlives the buffer.
    let inside = unsafe { device.buffer("inside", allocation.device_ptr() + 1024, 1024, None) }
        .expect("inside");
    assert_eq!(inside.byte_len(), 1024);
    // An empty tensor needs no memory at all.
    // SAFETY: nothing is ever copied from an empty buffer.
    unsafe { device.buffer("empty", 0, 0, None) }.expect("empty");
    if CudaDevice::count().expect("count") > 1 {
        let other = CudaDevice::get(1).expect("device 1");
        let theirs = DeviceMemory::new(&other, 4096).expect("alloc");
        let reason = refused("theirs", theirs.device_ptr(), 4096);
        assert!(
            reason.contains("memory of CUDA device 1, not of device 0"),
            "{reason}"
        );
    }
    assert_clean();
}

#[test]
fn a_snapshot_during_graph_capture_is_refused_and_the_graph_left_intact() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    let (buffer, _alloc) = cuda_buffer(&device, "g", &pattern(4096, 3));
    let (staging, _reader) = staging_for(&[4096], &device, PinPolicy::Prefer).expect("staging");
    let trainer = TrainerStream::new(&device);
    let _current = device.context().enter().expect("context");
    // SAFETY: a live stream of the current context.
    let code = unsafe {
        sys::cuStreamBeginCapture_v2(
            trainer.raw,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
    };
    assert_eq!(code, CUresult::CUDA_SUCCESS, "cuStreamBeginCapture_v2");
    let refused = device.capture(captures(&staging, &[&buffer]), &trainer.order());
    assert!(
        matches!(
            refused,
            Err(Error::Cuda(CudaError::GraphCapture { device: 0, .. }))
        ),
        "{:?}",
        refused.as_ref().err()
    );
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    // SAFETY: the stream is capturing; the out-pointer is a live local.
    let code = unsafe { sys::cuStreamEndCapture(trainer.raw, &mut graph) };
    assert_eq!(
        code,
        CUresult::CUDA_SUCCESS,
        "the capture was not invalidated"
    );
    // SAFETY: the graph was just made.
    unsafe { sys::cuGraphDestroy(graph) };
    // Outside capture the same snapshot works.
    device
        .capture(captures(&staging, &[&buffer]), &trainer.order())
        .expect("capture")
        .wait()
        .expect("copied");
    assert_clean();
}

#[test]
fn a_stream_of_another_device_or_none_at_all_is_refused() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    let (buffer, _alloc) = cuda_buffer(&device, "s", &pattern(4096, 4));
    let (staging, _reader) = staging_for(&[4096], &device, PinPolicy::Prefer).expect("staging");
    if CudaDevice::count().expect("count") > 1 {
        let other = CudaDevice::get(1).expect("device 1");
        let theirs = TrainerStream::new(&other);
        let order = StreamOrder::legacy().with(0, theirs.handle());
        let refused = device.capture(captures(&staging, &[&buffer]), &order);
        assert!(
            matches!(&refused, Err(Error::Cuda(CudaError::InvalidStream { device: 0, reason, .. })) if reason.contains("another context")),
            "{:?}",
            refused.as_ref().err()
        );
    }
    if on_double() {
        // A real driver may crash on a handle that is no stream; the
        // double answers as the driver documents.
        let order = StreamOrder::legacy().with(0, 0xbad_0000);
        let refused = device.capture(captures(&staging, &[&buffer]), &order);
        assert!(
            matches!(refused, Err(Error::Cuda(CudaError::InvalidStream { .. }))),
            "{:?}",
            refused.as_ref().err()
        );
    }
    assert_clean();
}

#[test]
fn staging_is_page_locked_in_pieces_and_unlocked_at_the_end() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    let page = 4096;
    super::pinned::set_piece_bytes(16 * page);
    let calls = double_calls("cuMemHostRegister_v2");
    let staged = staging_for(&[100 * page], &device, PinPolicy::Require);
    super::pinned::set_piece_bytes(super::pinned::DEFAULT_PIECE_BYTES);
    let (staging, _reader) = staged.expect("staging");
    if let Some(before) = calls {
        // 100 pages in pieces of 16: 7 calls.
        assert_eq!(double_calls("cuMemHostRegister_v2"), Some(before + 7));
        assert_eq!(double_registered_bytes(), 100 * 4096);
    }
    drop(staging);
    assert_eq!(double_registered_bytes(), 0);
    assert_clean();
}

#[test]
fn a_refused_page_lock_goes_on_unpinned_or_fails_when_pinning_is_required() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    if !on_double() {
        eprintln!("a real driver cannot be made to refuse: checked on the double only");
        return;
    }
    let a = pattern(64 << 10, 5);
    let (buffer, _alloc) = cuda_buffer(&device, "u", &a);
    assert!(inject_fault(
        "cuMemHostRegister_v2",
        1,
        CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        false
    ));
    let (staging, reader) =
        staging_for(&[a.len()], &device, PinPolicy::Prefer).expect("goes on unpinned");
    match staging.pinning().as_slice() {
        [Pinning::Unpinned { reason }] => {
            assert!(reason.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(double_registered_bytes(), 0);
    device
        .capture(captures(&staging, &[&buffer]), &StreamOrder::legacy())
        .expect("capture")
        .wait()
        .expect("copied from pageable staging");
    assert!(slot_bytes(&reader, a.len()) == a);
    drop(staging);

    assert!(inject_fault(
        "cuMemHostRegister_v2",
        1,
        CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        false
    ));
    let refused = staging_for(&[a.len()], &device, PinPolicy::Require);
    assert!(
        matches!(&refused, Err(Error::Cuda(CudaError::PinningRequired { reason })) if reason.contains("CUDA_ERROR_OUT_OF_MEMORY")),
        "{:?}",
        refused.map(drop)
    );
    reset_double();
    assert_clean();
}

#[test]
fn a_failed_copy_is_an_error_naming_the_call_and_nothing_is_left_running() {
    let _lock = cuda_lock();
    let Some(device) = cuda_or_skip() else { return };
    if !on_double() {
        eprintln!("faults are injected by the double only");
        return;
    }
    let (a, _alloc_a) = cuda_buffer(&device, "a", &pattern(8192, 6));
    let (b, _alloc_b) = cuda_buffer(&device, "b", &pattern(8192, 7));
    let (staging, _reader) =
        staging_for(&[8192, 8192], &device, PinPolicy::Prefer).expect("staging");
    // Refused when enqueued: the first copy is already queued, and is
    // drained before the error returns.
    assert!(inject_fault(
        "cuMemcpyDtoHAsync_v2",
        2,
        CUresult::CUDA_ERROR_INVALID_VALUE,
        false
    ));
    let refused = device.capture(captures(&staging, &[&a, &b]), &StreamOrder::legacy());
    match refused {
        Err(Error::Cuda(CudaError::Driver { call, name, .. })) => {
            assert_eq!(call, "cuMemcpyDtoHAsync_v2");
            assert_eq!(name, "CUDA_ERROR_INVALID_VALUE");
        }
        other => panic!("{:?}", other.map(drop)),
    }
    // A device fault while the copy runs: the ticket reports it.
    assert!(inject_fault(
        "cuMemcpyDtoHAsync_v2",
        1,
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        true
    ));
    let failed = device
        .capture(captures(&staging, &[&a, &b]), &StreamOrder::legacy())
        .and_then(|t| t.wait());
    assert!(
        matches!(&failed, Err(Error::Cuda(CudaError::Driver { name, .. })) if name == "CUDA_ERROR_ILLEGAL_ADDRESS"),
        "{failed:?}"
    );
    reset_double();
    assert_clean();
}

#[test]
fn buffers_of_two_devices_go_to_their_own_copy_streams() {
    let _lock = cuda_lock();
    let Some(zero) = cuda_or_skip() else { return };
    if CudaDevice::count().expect("count") < 2 {
        eprintln!("one device: nothing to route");
        return;
    }
    let one = CudaDevice::get(1).expect("device 1");
    assert!(!Arc::ptr_eq(&zero, &one));
    assert!(
        Arc::ptr_eq(&one, &CudaDevice::get(1).expect("again")),
        "one handle per device"
    );
    let a = pattern(10_000, 8);
    let b = pattern(20_000, 9);
    let (ba, _) = cuda_buffer(&zero, "a", &a);
    let (bb, _) = cuda_buffer(&one, "b", &b);
    let lens = [a.len() as u64, b.len() as u64];
    let info = testing::one_slot(&lens);
    let (fd, reader) = testing::memfd(info.memfd_bytes);
    let devices: Vec<Arc<dyn Device>> = vec![
        Arc::clone(&zero) as Arc<dyn Device>,
        Arc::clone(&one) as Arc<dyn Device>,
    ];
    let staging = Staging::map(fd, info, lens.to_vec(), &devices, PinPolicy::Require).expect("map");
    // One registration of the mapping, shared by both devices.
    assert_eq!(
        double_registered_bytes(),
        if on_double() {
            staging.info().memfd_bytes
        } else {
            0
        }
    );
    let mut copies = captures(&staging, &[&ba, &bb]).into_iter();
    let first = copies.next().expect("a");
    let second = copies.next().expect("b");
    let t0 = zero
        .capture(vec![first], &StreamOrder::legacy())
        .expect("device 0");
    let t1 = one
        .capture(vec![second], &StreamOrder::legacy())
        .expect("device 1");
    t0.wait().expect("copied");
    t1.wait().expect("copied");
    let slot = slot_bytes(&reader, a.len() + b.len());
    assert!(slot[..a.len()] == a[..] && slot[a.len()..] == b[..]);
    drop(staging);
    assert_eq!(double_registered_bytes(), 0);
    assert_clean();
}

//! Stream capture. A global-mode capture forbids unsafe calls to every
//! thread of the process, so every test here takes the file's lock.

#[macro_use]
mod common;

use std::ffi::c_void;

use common::*;
use cudarc::driver::sys::{CUgraph, CUstreamCaptureMode as Mode, CUstreamCaptureStatus as Status};

const GLOBAL: u32 = Mode::CU_STREAM_CAPTURE_MODE_GLOBAL as u32;
const THREAD_LOCAL: u32 = Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL as u32;
const RELAXED: u32 = Mode::CU_STREAM_CAPTURE_MODE_RELAXED as u32;

fn status(s: CUstream) -> Status {
    let mut st = Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED;
    ck!(dbl::cuStreamIsCapturing(s, &mut st));
    st
}

fn end(s: CUstream) -> (CUresult, CUgraph) {
    let mut g: CUgraph = std::ptr::without_provenance_mut(1);
    // SAFETY: an out-pointer to a local.
    let r = unsafe { dbl::cuStreamEndCapture(s, &mut g) };
    (r, g)
}

/// Runs `f` on another thread bound to `ctx`.
fn on_other_thread<T: Send + 'static>(ctx: &Ctx, f: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = ctx.handle.addr();
    std::thread::spawn(move || {
        ck!(dbl::cuCtxSetCurrent(std::ptr::without_provenance_mut(
            handle
        )));
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn captured_work_is_recorded_not_run() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let d = alloc(4096);
    let mut host = HostMap::new(4096);
    host.fill(0);
    ck!(dbl::cuMemHostRegister_v2(host.void(), 4096, 0));
    assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_NONE);
    ck!(dbl::cuStreamBeginCapture_v2(s, GLOBAL));
    assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_ACTIVE);
    expect_err!(
        CUDA_ERROR_ILLEGAL_STATE,
        dbl::cuStreamBeginCapture_v2(s, GLOBAL)
    );
    ck!(dbl::cuMemsetD8Async(d, 1, 4096, s));
    ck!(dbl::cuMemcpyDtoHAsync_v2(host.void(), d, 4096, s));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuStreamEndCapture(s, std::ptr::null_mut())
    );
    let (r, g) = end(s);
    assert_eq!(r, CUresult::CUDA_SUCCESS);
    assert!(!g.is_null());
    assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_NONE);
    ck!(dbl::cuStreamSynchronize(s));
    assert!(host.snapshot().iter().all(|b| *b == 0), "captured work ran");
    assert!(
        download(d, 4096).iter().all(|b| *b == 0xA5),
        "captured work ran"
    );
    ck!(dbl::cuGraphDestroy(g));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuGraphDestroy(g));
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_ILLEGAL_STATE);
    // The legacy stream cannot capture; modes are checked.
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuStreamBeginCapture_v2(legacy(), GLOBAL)
    );
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuStreamBeginCapture_v2(std::ptr::without_provenance_mut(1), RELAXED)
    );
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuStreamBeginCapture_v2(s, 3));
    ck!(dbl::cuMemHostUnregister(host.void()));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn a_capturing_stream_refuses_synchronize_and_query_and_is_invalidated() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    for query in [false, true] {
        let s = stream(1);
        ck!(dbl::cuStreamBeginCapture_v2(s, RELAXED));
        if query {
            expect_err!(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, dbl::cuStreamQuery(s));
        } else {
            expect_err!(
                CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                dbl::cuStreamSynchronize(s)
            );
        }
        assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED);
        let d = alloc(16);
        expect_err!(
            CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
            dbl::cuMemsetD8Async(d, 0, 16, s)
        );
        let (r, g) = end(s);
        assert_eq!(r, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
        assert!(g.is_null());
        assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_NONE);
        ck!(dbl::cuStreamDestroy_v2(s));
        ck!(dbl::cuMemFree_v2(d));
    }
}

#[test]
fn a_global_capture_makes_synchronous_copies_and_legacy_work_implicit() {
    let _serial = serial();
    let ctx = Ctx::enter(0);
    let d = alloc(64);
    let s = stream(1);
    ck!(dbl::cuStreamBeginCapture_v2(s, GLOBAL));
    let results = on_other_thread(&ctx, move || {
        let mut host = [0u8; 64];
        // SAFETY: a local buffer of 64 bytes; a device allocation of 64.
        unsafe {
            (
                dbl::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), d, 64),
                dbl::cuMemsetD8Async(d, 0, 64, std::ptr::null_mut()),
                dbl::cuMemcpyHtoD_v2(d, host.as_ptr().cast(), 64),
            )
        }
    });
    assert_eq!(
        results,
        (
            CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
            CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
            CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
        )
    );
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    // Once the capture is over the same calls work.
    download(d, 64);
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn a_relaxed_capture_of_a_non_blocking_stream_leaves_the_legacy_stream_alone() {
    let _serial = serial();
    let ctx = Ctx::enter(0);
    let d = alloc(64);
    let s = stream(1);
    ck!(dbl::cuStreamBeginCapture_v2(s, RELAXED));
    let r = on_other_thread(&ctx, move || {
        let mut host = [0u8; 64];
        // SAFETY: a local buffer of 64 bytes.
        unsafe { dbl::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), d, 64) }
    });
    assert_eq!(r, CUresult::CUDA_SUCCESS);
    let mut p = 0;
    ck!(dbl::cuMemAlloc_v2(&mut p, 16));
    let (r, g) = end(s);
    assert_eq!(r, CUresult::CUDA_SUCCESS);
    ck!(dbl::cuGraphDestroy(g));
    ck!(dbl::cuMemFree_v2(p));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn capturing_a_blocking_stream_makes_legacy_work_implicit_in_any_mode() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let d = alloc(64);
    let s = stream(0);
    ck!(dbl::cuStreamBeginCapture_v2(s, RELAXED));
    let mut st = Status::CU_STREAM_CAPTURE_STATUS_NONE;
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
        dbl::cuStreamIsCapturing(legacy(), &mut st)
    );
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
        dbl::cuMemsetD8_v2(d, 0, 64)
    );
    assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED);
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    ck!(dbl::cuMemsetD8_v2(d, 0, 64));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn modes_decide_which_threads_may_make_unsafe_calls() {
    let _serial = serial();
    let ctx = Ctx::enter(0);
    let e = event(2);
    // Global: no thread may.
    let s = stream(1);
    ck!(dbl::cuStreamBeginCapture_v2(s, GLOBAL));
    let other = on_other_thread(&ctx, || {
        let mut p = 0;
        // SAFETY: an out-pointer to a local.
        unsafe { dbl::cuMemAlloc_v2(&mut p, 16) }
    });
    assert_eq!(other, CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    // Thread-local: only the capturing thread may not.
    ck!(dbl::cuStreamBeginCapture_v2(s, THREAD_LOCAL));
    let ev = e.addr();
    let other = on_other_thread(&ctx, move || {
        let mut p = 0;
        // SAFETY: an out-pointer to a local; an event of this test.
        unsafe {
            let r = dbl::cuMemAlloc_v2(&mut p, 16);
            assert_eq!(dbl::cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
            (r, dbl::cuEventQuery(std::ptr::without_provenance_mut(ev)))
        }
    });
    assert_eq!(other, (CUresult::CUDA_SUCCESS, CUresult::CUDA_SUCCESS));
    assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_ACTIVE);
    expect_err!(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, dbl::cuEventQuery(e));
    assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED);
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    ck!(dbl::cuStreamBeginCapture_v2(s, THREAD_LOCAL));
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuCtxSynchronize()
    );
    // The invalidated capture still forbids them until it ends.
    let other_stream = stream(1);
    let d = {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = ctx.handle.addr();
        std::thread::spawn(move || {
            ck!(dbl::cuCtxSetCurrent(std::ptr::without_provenance_mut(
                handle
            )));
            tx.send(alloc(16)).unwrap();
        });
        rx.recv().unwrap()
    };
    expect_err!(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, dbl::cuMemFree_v2(d));
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuStreamSynchronize(other_stream)
    );
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuStreamQuery(other_stream)
    );
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuEventSynchronize(e)
    );
    let mut p = 0;
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuMemAlloc_v2(&mut p, 16)
    );
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    ck!(dbl::cuMemFree_v2(d));
    ck!(dbl::cuStreamDestroy_v2(other_stream));
    // Ending a non-relaxed capture from another thread.
    ck!(dbl::cuStreamBeginCapture_v2(s, GLOBAL));
    let sh = s.addr();
    let r = on_other_thread(&ctx, move || end(std::ptr::without_provenance_mut(sh)).0);
    assert_eq!(r, CUresult::CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD);
    let (r, g) = end(s);
    assert_eq!(r, CUresult::CUDA_SUCCESS);
    ck!(dbl::cuGraphDestroy(g));
    ck!(dbl::cuEventDestroy_v2(e));
    ck!(dbl::cuStreamDestroy_v2(s));
}

#[test]
fn captured_events_and_isolation() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let outside = stream(1);
    let (e, before) = (event(2), event(2));
    ck!(dbl::cuEventRecord(before, outside));
    ck!(dbl::cuStreamBeginCapture_v2(s, RELAXED));
    ck!(dbl::cuEventRecord(e, s));
    expect_err!(CUDA_ERROR_CAPTURED_EVENT, dbl::cuEventQuery(e));
    expect_err!(CUDA_ERROR_CAPTURED_EVENT, dbl::cuEventSynchronize(e));
    // The legacy stream cannot join a capture.
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
        dbl::cuStreamWaitEvent(legacy(), e, 0)
    );
    // Waiting on uncaptured work: allowed only as an external dependency.
    ck!(dbl::cuStreamWaitEvent(s, before, 1));
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
        dbl::cuStreamWaitEvent(s, before, 0)
    );
    assert_eq!(status(s), Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED);
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    // After the capture the event is still a captured one.
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
        dbl::cuStreamWaitEvent(outside, e, 0)
    );
    for ev in [e, before] {
        ck!(dbl::cuEventDestroy_v2(ev));
    }
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuStreamDestroy_v2(outside));
}

#[test]
fn fork_and_join_through_events() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let d = alloc(64);
    // Ending the capture from a stream that joined it but did not begin it.
    let (s1, s2) = (stream(1), stream(1));
    let fork = event(2);
    ck!(dbl::cuStreamBeginCapture_v2(s1, RELAXED));
    ck!(dbl::cuMemsetD8Async(d, 1, 64, s1));
    ck!(dbl::cuEventRecord(fork, s1));
    ck!(dbl::cuStreamWaitEvent(s2, fork, 0));
    assert_eq!(
        status(s2),
        Status::CU_STREAM_CAPTURE_STATUS_ACTIVE,
        "s2 joined the capture"
    );
    ck!(dbl::cuMemsetD8Async(d, 2, 64, s2));
    assert_eq!(end(s2).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_UNMATCHED);
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
        dbl::cuMemsetD8Async(d, 2, 64, s2)
    );
    let (r, g) = end(s1);
    assert_eq!(r, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    assert!(g.is_null());
    assert_eq!(
        status(s2),
        Status::CU_STREAM_CAPTURE_STATUS_NONE,
        "ending the capture ends it for s2 too"
    );
    ck!(dbl::cuEventDestroy_v2(fork));
    for s in [s1, s2] {
        ck!(dbl::cuStreamDestroy_v2(s));
    }
    // Unjoined work fails the end; joined work makes a graph.
    for join in [false, true] {
        let (s1, s2) = (stream(1), stream(1));
        let (fork, back) = (event(2), event(2));
        ck!(dbl::cuStreamBeginCapture_v2(s1, RELAXED));
        ck!(dbl::cuEventRecord(fork, s1));
        ck!(dbl::cuStreamWaitEvent(s2, fork, 0));
        ck!(dbl::cuMemsetD8Async(d, 2, 64, s2));
        if join {
            ck!(dbl::cuEventRecord(back, s2));
            ck!(dbl::cuStreamWaitEvent(s1, back, 0));
        }
        let (r, g) = end(s1);
        if join {
            assert_eq!(r, CUresult::CUDA_SUCCESS);
            ck!(dbl::cuGraphDestroy(g));
        } else {
            assert_eq!(r, CUresult::CUDA_ERROR_STREAM_CAPTURE_UNJOINED);
            assert!(g.is_null());
        }
        assert_eq!(status(s2), Status::CU_STREAM_CAPTURE_STATUS_NONE);
        for e in [fork, back] {
            ck!(dbl::cuEventDestroy_v2(e));
        }
        for s in [s1, s2] {
            ck!(dbl::cuStreamDestroy_v2(s));
        }
    }
    assert!(
        download(d, 64).iter().all(|b| *b == 0xA5),
        "captured work ran"
    );
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn waiting_on_another_captures_event_is_a_merge() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let (s1, s2) = (stream(1), stream(1));
    let e = event(2);
    ck!(dbl::cuStreamBeginCapture_v2(s1, RELAXED));
    ck!(dbl::cuStreamBeginCapture_v2(s2, RELAXED));
    ck!(dbl::cuEventRecord(e, s1));
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_MERGE,
        dbl::cuStreamWaitEvent(s2, e, 0)
    );
    assert_eq!(end(s1).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    assert_eq!(end(s2).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    ck!(dbl::cuEventDestroy_v2(e));
    for s in [s1, s2] {
        ck!(dbl::cuStreamDestroy_v2(s));
    }
}

#[test]
fn destroying_the_capturing_stream_ends_its_capture() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let (s, joined) = (stream(1), stream(1));
    let fork = event(2);
    ck!(dbl::cuStreamBeginCapture_v2(s, GLOBAL));
    ck!(dbl::cuEventRecord(fork, s));
    ck!(dbl::cuStreamWaitEvent(joined, fork, 0));
    ck!(dbl::cuStreamDestroy_v2(s));
    // No capture is left to forbid unsafe calls, or to hold the joined stream.
    let a = alloc(16);
    ck!(dbl::cuMemFree_v2(a));
    assert_eq!(status(joined), Status::CU_STREAM_CAPTURE_STATUS_NONE);
    ck!(dbl::cuEventDestroy_v2(fork));
    ck!(dbl::cuStreamDestroy_v2(joined));
}

#[test]
fn pageable_memory_cannot_be_captured() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let d = alloc(64);
    let mut host = vec![0u8; 64];
    ck!(dbl::cuStreamBeginCapture_v2(s, RELAXED));
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuMemcpyDtoHAsync_v2(host.as_mut_ptr().cast::<c_void>(), d, 64, s)
    );
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    ck!(dbl::cuStreamBeginCapture_v2(s, RELAXED));
    expect_err!(
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        dbl::cuMemcpyHtoDAsync_v2(d, host.as_ptr().cast::<c_void>(), 64, s)
    );
    assert_eq!(end(s).0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

//! Events: record, query, synchronize, cross-stream waits, timing, handles.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

const DISABLE_TIMING: u32 = 2;

#[test]
fn record_query_and_synchronize() {
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let e = event(DISABLE_TIMING);
    // Never recorded: complete.
    ck!(dbl::cuEventQuery(e));
    ck!(dbl::cuEventSynchronize(e));
    let gate = block(s);
    ck!(dbl::cuEventRecord(e, s));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuEventQuery(e));
    drop(gate);
    ck!(dbl::cuEventSynchronize(e));
    ck!(dbl::cuEventQuery(e));
    ck!(dbl::cuEventDestroy_v2(e));
    ck!(dbl::cuStreamDestroy_v2(s));
}

/// Stream `a` (blocked) writes `x` to `d`; stream `b` copies `d` to the
/// host, with or without waiting for an event recorded on `a`.
fn copy_across(wait: bool) -> Vec<u8> {
    let (a, b) = (stream(1), stream(1));
    let d = alloc(4096);
    let mut src = HostMap::new(4096);
    let mut dst = HostMap::new(4096);
    src.write(0, &pattern(4096, 9));
    dst.fill(0);
    ck!(dbl::cuMemHostRegister_v2(src.void(), 4096, 0));
    ck!(dbl::cuMemHostRegister_v2(dst.void(), 4096, 0));
    let e = event(DISABLE_TIMING);
    let gate = block(a);
    ck!(dbl::cuMemcpyHtoDAsync_v2(d, src.void(), 4096, a));
    ck!(dbl::cuEventRecord(e, a));
    if wait {
        ck!(dbl::cuStreamWaitEvent(b, e, 0));
    }
    ck!(dbl::cuMemcpyDtoHAsync_v2(dst.void(), d, 4096, b));
    // Let `b` run ahead if nothing holds it back.
    std::thread::sleep(Duration::from_millis(50));
    drop(gate);
    ck!(dbl::cuStreamSynchronize(b));
    ck!(dbl::cuStreamSynchronize(a));
    let got = dst.snapshot();
    ck!(dbl::cuMemHostUnregister(src.void()));
    ck!(dbl::cuMemHostUnregister(dst.void()));
    ck!(dbl::cuEventDestroy_v2(e));
    ck!(dbl::cuStreamDestroy_v2(a));
    ck!(dbl::cuStreamDestroy_v2(b));
    ck!(dbl::cuMemFree_v2(d));
    got
}

#[test]
fn a_missing_wait_reads_wrong_bytes_and_the_wait_fixes_it() {
    let _ctx = Ctx::enter(0);
    assert_ne!(
        copy_across(false),
        pattern(4096, 9),
        "without the wait stream b ran first"
    );
    assert_eq!(copy_across(true), pattern(4096, 9));
}

#[test]
fn a_missing_wait_reads_wrong_bytes_under_a_raised_delay() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let (a, b) = (stream(1), stream(1));
    let (d, scratch) = (alloc(4096), alloc(4096));
    let mut src = HostMap::new(4096);
    let mut dst = HostMap::new(4096);
    src.write(0, &pattern(4096, 10));
    ck!(dbl::cuMemHostRegister_v2(src.void(), 4096, 0));
    ck!(dbl::cuMemHostRegister_v2(dst.void(), 4096, 0));
    let e = event(DISABLE_TIMING);
    // SAFETY: no pointers.
    unsafe { dbl::gpusnapDoubleSetOpDelayUs(300_000) };
    for wait in [false, true] {
        dst.fill(0);
        // Stream a: 300 ms of other work, then the write, done at 600 ms.
        ck!(dbl::cuMemsetD8Async(scratch, 0, 4096, a));
        ck!(dbl::cuMemcpyHtoDAsync_v2(d, src.void(), 4096, a));
        ck!(dbl::cuEventRecord(e, a));
        if wait {
            ck!(dbl::cuStreamWaitEvent(b, e, 0));
        }
        // Stream b reads at 300 ms unless it waits.
        ck!(dbl::cuMemcpyDtoHAsync_v2(dst.void(), d, 4096, b));
        ck!(dbl::cuStreamSynchronize(b));
        ck!(dbl::cuStreamSynchronize(a));
        if wait {
            assert_eq!(dst.snapshot(), pattern(4096, 10));
        } else {
            assert_ne!(dst.snapshot(), pattern(4096, 10), "b read before a wrote");
        }
    }
    // SAFETY: no pointers.
    unsafe { dbl::gpusnapDoubleSetOpDelayUs(200) };
    ck!(dbl::cuMemHostUnregister(src.void()));
    ck!(dbl::cuMemHostUnregister(dst.void()));
    ck!(dbl::cuEventDestroy_v2(e));
    for s in [a, b] {
        ck!(dbl::cuStreamDestroy_v2(s));
    }
    ck!(dbl::cuMemFree_v2(d));
    ck!(dbl::cuMemFree_v2(scratch));
}

#[test]
fn a_later_record_changes_what_queries_see_but_not_earlier_waits() {
    let _ctx = Ctx::enter(0);
    let (a, b, c) = (stream(1), stream(1), stream(1));
    let e = event(DISABLE_TIMING);
    let gate = block(a);
    ck!(dbl::cuEventRecord(e, a));
    ck!(dbl::cuStreamWaitEvent(b, e, 0));
    ck!(dbl::cuEventRecord(e, c));
    ck!(dbl::cuStreamSynchronize(c));
    ck!(dbl::cuEventQuery(e));
    // `b` still waits for what `e` captured when it waited: `a`'s latch.
    std::thread::sleep(Duration::from_millis(50));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(b));
    drop(gate);
    ck!(dbl::cuStreamSynchronize(b));
    // Waiting on an event never recorded does nothing.
    let never = event(0);
    ck!(dbl::cuStreamWaitEvent(b, never, 0));
    ck!(dbl::cuStreamQuery(b));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuStreamWaitEvent(b, never, 2)
    );
    for ev in [e, never] {
        ck!(dbl::cuEventDestroy_v2(ev));
    }
    for s in [a, b, c] {
        ck!(dbl::cuStreamDestroy_v2(s));
    }
}

#[test]
fn recording_on_the_legacy_stream_includes_blocking_streams_work() {
    let _ctx = Ctx::enter(0);
    let blocking = stream(0);
    let e = event(DISABLE_TIMING);
    let gate = block(blocking);
    ck!(dbl::cuEventRecord(e, legacy()));
    std::thread::sleep(Duration::from_millis(30));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuEventQuery(e));
    drop(gate);
    ck!(dbl::cuEventSynchronize(e));
    ck!(dbl::cuEventDestroy_v2(e));
    ck!(dbl::cuStreamDestroy_v2(blocking));
}

#[test]
fn elapsed_time_between_timing_events() {
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let (start, end) = (event(0), event(0));
    let untimed = event(DISABLE_TIMING);
    let mut ms = 0f32;
    expect_err!(
        CUDA_ERROR_INVALID_HANDLE,
        dbl::cuEventElapsedTime_v2(&mut ms, start, end)
    );
    ck!(dbl::cuEventRecord(start, s));
    let gate = block(s);
    ck!(dbl::cuEventRecord(end, s));
    ck!(dbl::cuEventRecord(untimed, s));
    expect_err!(
        CUDA_ERROR_NOT_READY,
        dbl::cuEventElapsedTime_v2(&mut ms, start, end)
    );
    std::thread::sleep(Duration::from_millis(100));
    drop(gate);
    ck!(dbl::cuEventSynchronize(end));
    ck!(dbl::cuEventElapsedTime_v2(&mut ms, start, end));
    assert!(ms >= 90.0, "{ms} ms");
    expect_err!(
        CUDA_ERROR_INVALID_HANDLE,
        dbl::cuEventElapsedTime_v2(&mut ms, start, untimed)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuEventElapsedTime_v2(std::ptr::null_mut(), start, end)
    );
    for e in [start, end, untimed] {
        ck!(dbl::cuEventDestroy_v2(e));
    }
    ck!(dbl::cuStreamDestroy_v2(s));
}

#[test]
fn flags_destruction_and_handles() {
    let _ctx = Ctx::enter(0);
    let mut e = std::ptr::null_mut();
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuEventCreate(&mut e, 8));
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuEventCreate(&mut e, 4));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuEventCreate(std::ptr::null_mut(), 0)
    );
    ck!(dbl::cuEventCreate(&mut e, 4 | DISABLE_TIMING | 1));
    let s = stream(1);
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuEventRecordWithFlags(e, s, 2)
    );
    ck!(dbl::cuEventRecordWithFlags(e, s, 0));
    // Destroyed while pending: allowed; the stream goes on.
    let gate = block(s);
    ck!(dbl::cuEventRecord(e, s));
    ck!(dbl::cuEventDestroy_v2(e));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuEventQuery(e));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuEventSynchronize(e));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuEventRecord(e, s));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamWaitEvent(s, e, 0));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuEventDestroy_v2(e));
    drop(gate);
    ck!(dbl::cuStreamSynchronize(s));
    // A stream handle is not an event handle.
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuEventQuery(s.cast()));
    // Event and stream of different contexts.
    let c1 = Ctx::enter(1);
    let other = event(0);
    _ctx.bind();
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuEventRecord(other, s));
    // A stream may wait for another context's event.
    c1.bind();
    let s1 = stream(1);
    let gate = block(s1);
    ck!(dbl::cuEventRecord(other, s1));
    _ctx.bind();
    ck!(dbl::cuStreamWaitEvent(s, other, 0));
    std::thread::sleep(Duration::from_millis(30));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(s));
    drop(gate);
    ck!(dbl::cuStreamSynchronize(s));
    c1.bind();
    ck!(dbl::cuStreamDestroy_v2(s1));
    ck!(dbl::cuEventDestroy_v2(other));
    drop(c1);
    _ctx.bind();
    ck!(dbl::cuStreamDestroy_v2(s));
}

//! Stream ordering: in order on one stream, the legacy default stream's
//! implicit synchronization with blocking streams, non-blocking streams,
//! host functions, destruction and handles.

#[macro_use]
mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// Runs `call` on another thread (bound to `ctx`) and says whether it
/// returned within `within`.
fn returns_within(
    ctx: &Ctx,
    within: Duration,
    call: impl FnOnce() -> CUresult + Send + 'static,
) -> Option<CUresult> {
    let (tx, rx) = mpsc::channel();
    let handle = ctx.handle.addr();
    std::thread::spawn(move || {
        ck!(dbl::cuCtxSetCurrent(std::ptr::without_provenance_mut(
            handle
        )));
        let _ = tx.send(call());
    });
    rx.recv_timeout(within).ok()
}

fn sync(s: CUstream) -> CUresult {
    // SAFETY: a stream handle of this test.
    unsafe { dbl::cuStreamSynchronize(s) }
}

#[test]
fn operations_on_one_stream_run_in_order() {
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let len = 256 << 10;
    let (a, b) = (alloc(len), alloc(len));
    let mut host = HostMap::new(len);
    ck!(dbl::cuMemHostRegister_v2(host.void(), len, 0));
    host.write(0, &pattern(len, 7));
    // Everything is queued behind the latch before anything runs.
    let gate = block(s);
    ck!(dbl::cuMemcpyHtoDAsync_v2(a, host.void(), len, s));
    ck!(dbl::cuMemcpyDtoDAsync_v2(b, a, len, s));
    ck!(dbl::cuMemsetD8Async(a, 0, len, s));
    ck!(dbl::cuMemsetD8Async(b, 1, 10, s));
    ck!(dbl::cuMemcpyDtoHAsync_v2(host.void(), b, len, s));
    drop(gate);
    ck!(dbl::cuStreamSynchronize(s));
    let mut want = pattern(len, 7);
    want[..10].fill(1);
    assert_eq!(host.snapshot(), want);
    assert!(download(a, len).iter().all(|x| *x == 0));
    ck!(dbl::cuMemHostUnregister(host.void()));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(a));
    ck!(dbl::cuMemFree_v2(b));
}

#[test]
fn legacy_stream_waits_for_blocking_streams_but_not_non_blocking_ones() {
    let ctx = Ctx::enter(0);
    let d = alloc(64);
    let blocking = stream(0);
    let gate = block(blocking);
    gate.0.wait_entered();
    ck!(dbl::cuMemsetD8Async(d, 1, 64, legacy()));
    std::thread::sleep(Duration::from_millis(50));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(legacy()));
    assert!(returns_within(&ctx, Duration::from_millis(200), || sync(legacy())).is_none());
    drop(gate);
    ck!(dbl::cuStreamSynchronize(legacy()));
    assert_eq!(download(d, 64), vec![1u8; 64]);

    let non_blocking = stream(1);
    let gate = block(non_blocking);
    gate.0.wait_entered();
    ck!(dbl::cuMemsetD8Async(d, 2, 64, legacy()));
    let r = returns_within(&ctx, PATIENCE, || sync(legacy()));
    assert_eq!(
        r,
        Some(CUresult::CUDA_SUCCESS),
        "the legacy stream waited for a non-blocking stream"
    );
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(non_blocking));
    drop(gate);
    assert_eq!(download(d, 64), vec![2u8; 64]);
    ck!(dbl::cuStreamDestroy_v2(blocking));
    ck!(dbl::cuStreamDestroy_v2(non_blocking));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn blocking_streams_wait_for_prior_legacy_work_and_non_blocking_ones_do_not() {
    let ctx = Ctx::enter(0);
    let d = alloc(64);
    let blocking = stream(0);
    let non_blocking = stream(1);
    let legacy_handle: CUstream = std::ptr::without_provenance_mut(1); // CU_STREAM_LEGACY
    let gate = block(legacy_handle);
    gate.0.wait_entered();
    ck!(dbl::cuMemsetD8Async(d, 3, 64, non_blocking));
    let nb = non_blocking.addr();
    let r = returns_within(&ctx, PATIENCE, move || {
        sync(std::ptr::without_provenance_mut(nb))
    });
    assert_eq!(r, Some(CUresult::CUDA_SUCCESS));
    ck!(dbl::cuMemsetD8Async(d, 4, 64, blocking));
    let b = blocking.addr();
    assert!(
        returns_within(&ctx, Duration::from_millis(200), move || sync(
            std::ptr::without_provenance_mut(b)
        ))
        .is_none()
    );
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(blocking));
    drop(gate);
    ck!(dbl::cuStreamSynchronize(blocking));
    assert_eq!(download(d, 64), vec![4u8; 64]);
    ck!(dbl::cuStreamDestroy_v2(blocking));
    ck!(dbl::cuStreamDestroy_v2(non_blocking));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn the_per_thread_stream_is_a_blocking_stream() {
    let ctx = Ctx::enter(0);
    let per_thread: CUstream = std::ptr::without_provenance_mut(2);
    let gate = block(per_thread);
    gate.0.wait_entered();
    let d = alloc(16);
    ck!(dbl::cuMemsetD8Async(d, 5, 16, legacy()));
    assert!(returns_within(&ctx, Duration::from_millis(200), || sync(legacy())).is_none());
    drop(gate);
    ck!(dbl::cuStreamSynchronize(per_thread));
    ck!(dbl::cuStreamSynchronize(legacy()));
    // And it waits for prior legacy-stream work.
    let gate = block(legacy());
    gate.0.wait_entered();
    ck!(dbl::cuMemsetD8Async(d, 6, 16, per_thread));
    std::thread::sleep(Duration::from_millis(50));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(per_thread));
    drop(gate);
    ck!(dbl::cuStreamSynchronize(per_thread));
    assert_eq!(download(d, 16), vec![6u8; 16]);
    let mut flags = 9;
    ck!(dbl::cuStreamGetFlags(per_thread, &mut flags));
    assert_eq!(flags, 0);
    expect_err!(
        CUDA_ERROR_INVALID_HANDLE,
        dbl::cuStreamDestroy_v2(per_thread)
    );
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamDestroy_v2(legacy()));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn a_host_function_blocks_its_stream_while_another_proceeds() {
    let ctx = Ctx::enter(0);
    let (s1, s2) = (stream(1), stream(1));
    let d = alloc(1024);
    let gate = block(s1);
    gate.0.wait_entered();
    ck!(dbl::cuMemsetD8Async(d, 6, 1024, s1));
    ck!(dbl::cuMemsetD8Async(d, 7, 512, s2));
    let other = s2.addr();
    let r = returns_within(&ctx, PATIENCE, move || {
        sync(std::ptr::without_provenance_mut(other))
    });
    assert_eq!(r, Some(CUresult::CUDA_SUCCESS));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(s1));
    let mut host = vec![0u8; 1024];
    ck!(dbl::cuMemcpyDtoHAsync_v2(
        host.as_mut_ptr().cast(),
        d,
        1024,
        s2
    ));
    assert_eq!(&host[..512], &[7u8; 512][..]);
    assert_eq!(
        &host[512..],
        &[0xA5u8; 512][..],
        "s1's memset ran while s1 was blocked"
    );
    drop(gate);
    ck!(dbl::cuStreamSynchronize(s1));
    assert_eq!(download(d, 1024), vec![6u8; 1024]);
    for s in [s1, s2] {
        ck!(dbl::cuStreamDestroy_v2(s));
    }
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn a_destroyed_stream_finishes_its_work_and_its_handle_dies() {
    let ctx = Ctx::enter(0);
    let d = alloc(64);
    let s = stream(0);
    let gate = block(s);
    gate.0.wait_entered();
    ck!(dbl::cuMemsetD8Async(d, 8, 64, s));
    ck!(dbl::cuStreamDestroy_v2(s));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamQuery(s));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamSynchronize(s));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuMemsetD8Async(d, 0, 64, s));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamDestroy_v2(s));
    // The legacy stream still waits for the destroyed blocking stream's work.
    let waited = returns_within(&ctx, Duration::from_millis(200), move || {
        let mut host = [0u8; 64];
        // SAFETY: a local buffer of 64 bytes.
        unsafe { dbl::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), d, 64) }
    });
    assert!(
        waited.is_none(),
        "the legacy stream did not wait: {waited:?}"
    );
    drop(gate);
    ck!(dbl::cuCtxSynchronize());
    assert_eq!(download(d, 64), vec![8u8; 64]);
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn stream_flags_contexts_and_handles() {
    let ctx = Ctx::enter(0);
    let (a, b) = (stream(0), stream(1));
    let mut p = std::ptr::null_mut();
    ck!(dbl::cuStreamCreateWithPriority(&mut p, 1, -1));
    assert!(a != b && b != p && a != p);
    for (s, want) in [(a, 0), (b, 1), (p, 1), (legacy(), 0)] {
        let mut flags = 9;
        ck!(dbl::cuStreamGetFlags(s, &mut flags));
        assert_eq!(flags, want);
        let mut owner = std::ptr::null_mut();
        ck!(dbl::cuStreamGetCtx(s, &mut owner));
        assert_eq!(owner, ctx.handle);
        let mut green = std::ptr::without_provenance_mut(1);
        ck!(dbl::cuStreamGetCtx_v2(s, &mut owner, &mut green));
        assert!(green.is_null());
    }
    let mut s = std::ptr::null_mut();
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuStreamCreate(&mut s, 2));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuStreamCreate(std::ptr::null_mut(), 0)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuStreamGetFlags(a, std::ptr::null_mut())
    );
    let garbage: CUstream = std::ptr::without_provenance_mut(0x7777_0000);
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamQuery(garbage));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamSynchronize(garbage));
    let mut flags = 0;
    expect_err!(
        CUDA_ERROR_INVALID_HANDLE,
        dbl::cuStreamGetFlags(garbage, &mut flags)
    );
    // A destroyed handle is never handed out again.
    ck!(dbl::cuStreamDestroy_v2(a));
    let c = stream(0);
    assert_ne!(c, a);
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamQuery(a));
    for s in [b, p, c] {
        ck!(dbl::cuStreamDestroy_v2(s));
    }
}

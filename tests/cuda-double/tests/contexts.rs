//! Primary contexts, the current-context stack, context-wide
//! synchronization, and what a reset invalidates (in a child process, on
//! device 1).

#[macro_use]
mod common;

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::*;

#[test]
fn primary_context_is_one_stable_counted_handle_per_device() {
    init();
    let (mut a, mut b) = (std::ptr::null_mut(), std::ptr::null_mut());
    ck!(dbl::cuDevicePrimaryCtxRetain(&mut a, 0));
    ck!(dbl::cuDevicePrimaryCtxRetain(&mut b, 0));
    assert!(!a.is_null());
    assert_eq!(a, b);
    let (mut flags, mut active): (c_uint, c_int) = (7, 0);
    ck!(dbl::cuDevicePrimaryCtxGetState(0, &mut flags, &mut active));
    assert_eq!((flags, active), (0, 1));
    ck!(dbl::cuDevicePrimaryCtxRelease_v2(0));
    ck!(dbl::cuDevicePrimaryCtxRelease_v2(0));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuDevicePrimaryCtxRetain(std::ptr::null_mut(), 0)
    );
    expect_err!(
        CUDA_ERROR_INVALID_DEVICE,
        dbl::cuDevicePrimaryCtxRetain(&mut a, 2)
    );
    expect_err!(
        CUDA_ERROR_INVALID_DEVICE,
        dbl::cuDevicePrimaryCtxRelease_v2(9)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuDevicePrimaryCtxGetState(0, std::ptr::null_mut(), &mut active)
    );
}

#[test]
fn current_context_stack_set_push_pop() {
    let ctx = Ctx::enter(0);
    let mut cur = std::ptr::null_mut();
    ck!(dbl::cuCtxGetCurrent(&mut cur));
    assert_eq!(cur, ctx.handle);
    // Null pops the top.
    ck!(dbl::cuCtxSetCurrent(std::ptr::null_mut()));
    ck!(dbl::cuCtxGetCurrent(&mut cur));
    assert!(cur.is_null());
    ck!(dbl::cuCtxSetCurrent(std::ptr::null_mut()));
    // Push and pop.
    ck!(dbl::cuCtxPushCurrent_v2(ctx.handle));
    ck!(dbl::cuCtxPushCurrent_v2(ctx.handle));
    let mut popped = std::ptr::null_mut();
    ck!(dbl::cuCtxPopCurrent_v2(&mut popped));
    assert_eq!(popped, ctx.handle);
    ck!(dbl::cuCtxPopCurrent_v2(std::ptr::null_mut()));
    expect_err!(
        CUDA_ERROR_INVALID_CONTEXT,
        dbl::cuCtxPopCurrent_v2(&mut popped)
    );
    // Unknown handles.
    let bogus: CUcontext = std::ptr::without_provenance_mut(0xdead0);
    expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuCtxSetCurrent(bogus));
    expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuCtxPushCurrent_v2(bogus));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuCtxPushCurrent_v2(std::ptr::null_mut())
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuCtxGetCurrent(std::ptr::null_mut())
    );
    ctx.bind();
    let mut dev = -1;
    ck!(dbl::cuCtxGetDevice(&mut dev));
    assert_eq!(dev, 0);
}

#[test]
fn calls_that_need_a_context_refuse_a_thread_without_one() {
    let ctx = Ctx::enter(0);
    let s = stream(0);
    let dptr = alloc(64);
    let mut host = HostMap::new(4096);
    let created = s.addr();
    let e = event(0);
    ck!(dbl::cuEventRecord(e, s));
    let ev_handle = e.addr();
    let t = std::thread::spawn(move || {
        let s: CUstream = std::ptr::without_provenance_mut(created);
        let recorded: CUevent = std::ptr::without_provenance_mut(ev_handle);
        let (mut base, mut size) = (0, 0usize);
        let mut pinned = std::ptr::null_mut();
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemGetAddressRange_v2(&mut base, &mut size, dptr)
        );
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemHostAlloc(&mut pinned, 64, 0)
        );
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemAllocHost_v2(&mut pinned, 64)
        );
        // An event carries its context too.
        ck!(dbl::cuEventSynchronize(recorded));
        ck!(dbl::cuEventQuery(recorded));
        let mut p = 0;
        let mut st = std::ptr::null_mut();
        let mut ev = std::ptr::null_mut();
        let mut buf = [0u8; 64];
        let (mut free, mut total) = (0usize, 0usize);
        let mut dev = 0;
        let legacy1: CUstream = std::ptr::without_provenance_mut(1);
        let per_thread: CUstream = std::ptr::without_provenance_mut(2);
        expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuMemAlloc_v2(&mut p, 64));
        expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuMemFree_v2(dptr));
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemGetInfo_v2(&mut free, &mut total)
        );
        expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuStreamCreate(&mut st, 0));
        expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuEventCreate(&mut ev, 0));
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemHostRegister_v2(buf.as_mut_ptr().cast(), 4096, 0)
        );
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemHostUnregister(buf.as_mut_ptr().cast())
        );
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemcpyDtoH_v2(buf.as_mut_ptr().cast(), dptr, 64)
        );
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemcpyHtoD_v2(dptr, buf.as_ptr().cast(), 64)
        );
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemcpyDtoD_v2(dptr, dptr, 64)
        );
        expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuMemsetD8_v2(dptr, 1, 64));
        expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuCtxSynchronize());
        expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuCtxGetDevice(&mut dev));
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuMemcpyDtoHAsync_v2(buf.as_mut_ptr().cast(), dptr, 64, legacy())
        );
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuStreamSynchronize(legacy())
        );
        expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuStreamQuery(legacy1));
        expect_err!(
            CUDA_ERROR_INVALID_CONTEXT,
            dbl::cuStreamSynchronize(per_thread)
        );
        // A created stream carries its context: no current one needed.
        ck!(dbl::cuMemcpyDtoHAsync_v2(
            buf.as_mut_ptr().cast(),
            dptr,
            64,
            s
        ));
        ck!(dbl::cuStreamSynchronize(s));
        let mut owner = std::ptr::null_mut();
        ck!(dbl::cuStreamGetCtx(s, &mut owner));
        owner.addr()
    });
    assert_eq!(t.join().unwrap(), ctx.handle.addr());
    host.fill(0);
    ck!(dbl::cuEventDestroy_v2(e));
    ck!(dbl::cuMemFree_v2(dptr));
    ck!(dbl::cuStreamDestroy_v2(s));
}

#[test]
fn ctx_synchronize_waits_for_every_stream_of_the_context() {
    let ctx = Ctx::enter(0);
    let blocking = stream(0);
    let non_blocking = stream(1);
    let gate_a = block(blocking);
    let gate_b = block(non_blocking);
    gate_a.0.wait_entered();
    gate_b.0.wait_entered();
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let (handle, flag) = (ctx.handle.addr(), std::sync::Arc::clone(&done));
    let t = std::thread::spawn(move || {
        ck!(dbl::cuCtxSetCurrent(std::ptr::without_provenance_mut(
            handle
        )));
        ck!(dbl::cuCtxSynchronize());
        flag.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "returned while both streams were blocked"
    );
    gate_a.0.open();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "returned while the non-blocking stream was blocked"
    );
    gate_b.0.open();
    t.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    ck!(dbl::cuStreamDestroy_v2(blocking));
    ck!(dbl::cuStreamDestroy_v2(non_blocking));
}

static HOST_FN_RESULT: AtomicU32 = AtomicU32::new(u32::MAX);

unsafe extern "C" fn calls_cuda(_: *mut c_void) {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: an out-pointer to a local.
    let r = unsafe { dbl::cuCtxGetCurrent(&mut ctx) };
    HOST_FN_RESULT.store(r as u32, Ordering::SeqCst);
}

#[test]
fn cuda_calls_inside_a_host_function_are_not_permitted() {
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    ck!(dbl::cuLaunchHostFunc(
        s,
        Some(calls_cuda),
        std::ptr::null_mut()
    ));
    ck!(dbl::cuStreamSynchronize(s));
    assert_eq!(
        HOST_FN_RESULT.load(Ordering::SeqCst),
        CUresult::CUDA_ERROR_NOT_PERMITTED as u32
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuLaunchHostFunc(s, None, std::ptr::null_mut())
    );
    ck!(dbl::cuStreamDestroy_v2(s));
}

#[test]
fn release_to_zero_resets_the_context() {
    // In a child: the test checks that an address is unmapped, which a
    // concurrent test's mapping could make untrue.
    if !is_child("release_to_zero_resets_the_context") {
        child_passes("release_to_zero_resets_the_context", &[]);
        return;
    }
    init();
    let mut h = std::ptr::null_mut();
    ck!(dbl::cuDevicePrimaryCtxRetain(&mut h, 1));
    ck!(dbl::cuCtxSetCurrent(h));
    let s = stream(0);
    let e = event(0);
    let dptr = alloc(4096);
    let mut mine = HostMap::new(8192);
    ck!(dbl::cuMemHostRegister_v2(mine.void(), 8192, 0));
    let mut pinned: *mut c_void = std::ptr::null_mut();
    ck!(dbl::cuMemHostAlloc(&mut pinned, 100, 0));
    // SAFETY: no pointers.
    let locked_before = unsafe { dbl::gpusnapDoubleRegisteredBytes() };
    assert_eq!(locked_before, 8192 + 4096);

    // The release waits for pending work before the reset.
    let gate = block(s);
    gate.0.wait_entered();
    let released = std::sync::Arc::new(AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&released);
    let t = std::thread::spawn(move || {
        ck!(dbl::cuDevicePrimaryCtxRelease_v2(1));
        flag.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !released.load(Ordering::SeqCst),
        "the reset did not wait for the blocked stream"
    );
    gate.0.open();
    t.join().unwrap();

    let (mut flags, mut active): (c_uint, c_int) = (0, 1);
    ck!(dbl::cuDevicePrimaryCtxGetState(1, &mut flags, &mut active));
    assert_eq!(active, 0);
    expect_err!(
        CUDA_ERROR_INVALID_CONTEXT,
        dbl::cuDevicePrimaryCtxRelease_v2(1)
    );
    // The thread still names the context, which is no longer active.
    let mut p = 0;
    expect_err!(CUDA_ERROR_INVALID_CONTEXT, dbl::cuMemAlloc_v2(&mut p, 16));
    // Its handles are dead.
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamQuery(s));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuStreamDestroy_v2(s));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuEventQuery(e));
    expect_err!(CUDA_ERROR_INVALID_HANDLE, dbl::cuEventDestroy_v2(e));
    // SAFETY: no pointers.
    let r = unsafe { dbl::gpusnapDoubleRegisteredBytes() };
    assert_eq!(r, locked_before - 8192 - 4096);

    // Retained again: the same handle, a fresh context without the old memory.
    let mut again = std::ptr::null_mut();
    ck!(dbl::cuDevicePrimaryCtxRetain(&mut again, 1));
    assert_eq!(again, h);
    let (mut base, mut size) = (0, 0usize);
    expect_err!(
        CUDA_ERROR_NOT_FOUND,
        dbl::cuMemGetAddressRange_v2(&mut base, &mut size, dptr)
    );
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemFree_v2(dptr));
    expect_err!(
        CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
        dbl::cuMemHostUnregister(mine.void())
    );
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemFreeHost(pinned));
    assert!(
        !dbl::host::is_mapped(pinned.addr(), 4096),
        "the reset unmaps host allocations"
    );
    // The caller's memory is untouched; the registration can be made again.
    mine.fill(3);
    ck!(dbl::cuMemHostRegister_v2(mine.void(), 8192, 0));
    ck!(dbl::cuMemHostUnregister(mine.void()));
    let (mut free, mut total) = (0usize, 0usize);
    ck!(dbl::cuMemGetInfo_v2(&mut free, &mut total));
    assert_eq!(free, total, "the reset freed every allocation");
    ck!(dbl::cuDevicePrimaryCtxRelease_v2(1));
}

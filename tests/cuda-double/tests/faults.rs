//! Fault injection (control API and environment), sticky errors, call
//! counts. Faults and sticky errors are process-wide: every test here takes
//! the file's lock and resets the double.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

fn inject(name: &str, nth: u64, code: CUresult, asynchronous: bool) -> CUresult {
    let n = cstr(name);
    // SAFETY: a NUL-terminated string.
    unsafe { dbl::gpusnapDoubleInjectFault(n.as_ptr(), nth, code as u32, i32::from(asynchronous)) }
}

unsafe extern "C" fn noop(_: *mut std::ffi::c_void) {}

fn reset() {
    // SAFETY: no pointers.
    unsafe { dbl::gpusnapDoubleReset() };
}

#[test]
fn the_nth_call_fails_and_only_that_one() {
    let _serial = serial();
    reset();
    let _ctx = Ctx::enter(0);
    let a = alloc(16);
    assert_eq!(
        inject(
            "cuMemAlloc_v2",
            2,
            CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            false
        ),
        CUresult::CUDA_SUCCESS
    );
    let b = alloc(16);
    let mut p = 0;
    expect_err!(CUDA_ERROR_OUT_OF_MEMORY, dbl::cuMemAlloc_v2(&mut p, 16));
    let c = alloc(16);
    // A non-sticky error leaves the context healthy.
    for x in [a, b, c] {
        ck!(dbl::cuMemFree_v2(x));
    }
    reset();
}

#[test]
fn cleared_faults_never_fire() {
    let _serial = serial();
    reset();
    let _ctx = Ctx::enter(0);
    assert_eq!(
        inject(
            "cuMemAlloc_v2",
            1,
            CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            false
        ),
        CUresult::CUDA_SUCCESS
    );
    // SAFETY: no pointers.
    unsafe { dbl::gpusnapDoubleClearFaults() };
    let a = alloc(16);
    ck!(dbl::cuMemFree_v2(a));
    reset();
}

#[test]
fn an_async_fault_fails_when_it_runs_and_breaks_the_context() {
    let _serial = serial();
    reset();
    let ctx = Ctx::enter(0);
    let s = stream(1);
    let d = alloc(4096);
    let mut host = HostMap::new(4096);
    host.fill(0);
    ck!(dbl::cuMemHostRegister_v2(host.void(), 4096, 0));
    let e = event(2);
    assert_eq!(
        inject(
            "cuMemcpyDtoHAsync_v2",
            1,
            CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
            true
        ),
        CUresult::CUDA_SUCCESS
    );
    let gate = block(s);
    ck!(dbl::cuMemcpyDtoHAsync_v2(host.void(), d, 4096, s));
    ck!(dbl::cuEventRecord(e, s));
    let mut later = HostMap::new(4096);
    later.fill(0);
    ck!(dbl::cuMemHostRegister_v2(later.void(), 4096, 0));
    ck!(dbl::cuMemcpyDtoHAsync_v2(later.void(), d, 4096, s));
    // Nothing has failed yet: the operation has not run.
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuEventQuery(e));
    drop(gate);
    expect_err!(CUDA_ERROR_ILLEGAL_ADDRESS, dbl::cuEventSynchronize(e));
    expect_err!(CUDA_ERROR_ILLEGAL_ADDRESS, dbl::cuEventQuery(e));
    expect_err!(CUDA_ERROR_ILLEGAL_ADDRESS, dbl::cuStreamSynchronize(s));
    expect_err!(CUDA_ERROR_ILLEGAL_ADDRESS, dbl::cuCtxSynchronize());
    let mut p = 0;
    expect_err!(CUDA_ERROR_ILLEGAL_ADDRESS, dbl::cuMemAlloc_v2(&mut p, 16));
    expect_err!(
        CUDA_ERROR_ILLEGAL_ADDRESS,
        dbl::cuMemsetD8Async(d, 0, 16, s)
    );
    assert!(
        host.snapshot().iter().all(|b| *b == 0),
        "the failed copy wrote"
    );
    assert!(
        later.snapshot().iter().all(|b| *b == 0),
        "a copy after the fault ran"
    );
    // Another device's context is not broken.
    let c1 = Ctx::enter(1);
    let other = alloc(16);
    ck!(dbl::cuMemFree_v2(other));
    drop(c1);
    ctx.bind();
    reset();
    ck!(dbl::cuMemHostUnregister(host.void()));
    ck!(dbl::cuMemHostUnregister(later.void()));
    ck!(dbl::cuEventDestroy_v2(e));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn a_call_that_waits_reports_its_operations_failure() {
    let _serial = serial();
    reset();
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let d = alloc(64);
    let mut pageable = vec![0u8; 64];
    assert_eq!(
        inject(
            "cuMemcpyDtoHAsync_v2",
            1,
            CUresult::CUDA_ERROR_ECC_UNCORRECTABLE,
            true
        ),
        CUresult::CUDA_SUCCESS
    );
    expect_err!(
        CUDA_ERROR_ECC_UNCORRECTABLE,
        dbl::cuMemcpyDtoHAsync_v2(pageable.as_mut_ptr().cast(), d, 64, s)
    );
    expect_err!(CUDA_ERROR_ECC_UNCORRECTABLE, dbl::cuStreamSynchronize(s));
    reset();
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn host_functions_still_run_in_a_broken_context() {
    let _serial = serial();
    reset();
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    assert_eq!(
        inject(
            "cuStreamQuery",
            1,
            CUresult::CUDA_ERROR_MISALIGNED_ADDRESS,
            false
        ),
        CUresult::CUDA_SUCCESS
    );
    expect_err!(CUDA_ERROR_MISALIGNED_ADDRESS, dbl::cuStreamQuery(s));
    // Enqueuing in a broken context is refused; work enqueued before runs
    // its host functions.
    expect_err!(
        CUDA_ERROR_MISALIGNED_ADDRESS,
        dbl::cuLaunchHostFunc(s, Some(noop), std::ptr::null_mut())
    );
    reset();
    let gate = block(s);
    assert_eq!(
        inject(
            "cuStreamQuery",
            1,
            CUresult::CUDA_ERROR_MISALIGNED_ADDRESS,
            false
        ),
        CUresult::CUDA_SUCCESS
    );
    expect_err!(CUDA_ERROR_MISALIGNED_ADDRESS, dbl::cuStreamQuery(s));
    gate.0.wait_entered();
    drop(gate);
    expect_err!(CUDA_ERROR_MISALIGNED_ADDRESS, dbl::cuStreamSynchronize(s));
    reset();
    ck!(dbl::cuStreamDestroy_v2(s));
}

#[test]
fn a_synchronously_injected_sticky_error_breaks_the_context() {
    let _serial = serial();
    reset();
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    assert_eq!(
        inject(
            "cuStreamQuery",
            1,
            CUresult::CUDA_ERROR_LAUNCH_FAILED,
            false
        ),
        CUresult::CUDA_SUCCESS
    );
    expect_err!(CUDA_ERROR_LAUNCH_FAILED, dbl::cuStreamQuery(s));
    let mut p = 0;
    expect_err!(CUDA_ERROR_LAUNCH_FAILED, dbl::cuMemAlloc_v2(&mut p, 16));
    expect_err!(CUDA_ERROR_LAUNCH_FAILED, dbl::cuStreamSynchronize(s));
    reset();
    ck!(dbl::cuStreamQuery(s));
    ck!(dbl::cuStreamDestroy_v2(s));
}

#[test]
fn a_context_reset_clears_its_sticky_error() {
    const NAME: &str = "a_context_reset_clears_its_sticky_error";
    if !is_child(NAME) {
        child_passes(NAME, &[]);
        return;
    }
    let ctx = Ctx::enter(0);
    let s = stream(1);
    assert_eq!(
        inject(
            "cuLaunchHostFunc",
            1,
            CUresult::CUDA_ERROR_HARDWARE_STACK_ERROR,
            true
        ),
        CUresult::CUDA_SUCCESS
    );
    let gate = block(s);
    assert!(!gate.0.entered());
    expect_err!(CUDA_ERROR_HARDWARE_STACK_ERROR, dbl::cuStreamSynchronize(s));
    std::thread::sleep(Duration::from_millis(20));
    assert!(!gate.0.entered(), "a failing host function does not run");
    drop(ctx);
    let _again = Ctx::enter(0);
    let a = alloc(16);
    ck!(dbl::cuMemFree_v2(a));
}

#[test]
fn inject_fault_refuses_bad_arguments() {
    let _serial = serial();
    let good = CUresult::CUDA_ERROR_UNKNOWN;
    assert_eq!(
        inject("cuMemcpy", 1, good, false),
        CUresult::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        inject("cuInit", 0, good, false),
        CUresult::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        inject("cuInit", 1, CUresult::CUDA_SUCCESS, false),
        CUresult::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        inject("cuMemAlloc_v2", 1, good, true),
        CUresult::CUDA_ERROR_INVALID_VALUE
    );
    // SAFETY: a null name; a code outside the enum.
    unsafe {
        assert_eq!(
            dbl::gpusnapDoubleInjectFault(std::ptr::null(), 1, 999, 0),
            CUresult::CUDA_ERROR_INVALID_VALUE
        );
        let n = cstr("cuInit");
        assert_eq!(
            dbl::gpusnapDoubleInjectFault(n.as_ptr(), 1, 12345, 0),
            CUresult::CUDA_ERROR_INVALID_VALUE
        );
    }
}

#[test]
fn call_counts() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let before = call_count("cuCtxSynchronize");
    let queries = call_count("cuStreamQuery");
    ck!(dbl::cuStreamQuery(legacy()));
    assert_eq!(call_count("cuCtxSynchronize"), before);
    assert_eq!(call_count("cuStreamQuery"), queries + 1);
    ck!(dbl::cuCtxSynchronize());
    assert_eq!(call_count("cuCtxSynchronize"), before + 1);
    assert_eq!(call_count("cuNoSuchFunction"), 0);
    // SAFETY: a null name.
    assert_eq!(unsafe { dbl::gpusnapDoubleCallCount(std::ptr::null()) }, 0);
    // SAFETY: an index past the end with no buffer.
    let r = unsafe { dbl::gpusnapDoubleViolationMessage(u64::MAX, std::ptr::null_mut(), 0) };
    assert_eq!(r, 0);
}

#[test]
fn faults_from_the_environment() {
    const NAME: &str = "faults_from_the_environment";
    if !is_child(NAME) {
        child_passes(
            NAME,
            &[(
                "GPUSNAP_CUDA_DOUBLE_FAULTS",
                "cuMemHostRegister_v2:1=CUDA_ERROR_OUT_OF_MEMORY,cuMemcpyDtoHAsync_v2:3=CUDA_ERROR_ILLEGAL_ADDRESS@async",
            )],
        );
        return;
    }
    let _ctx = Ctx::enter(0);
    let host = HostMap::new(4096);
    expect_err!(
        CUDA_ERROR_OUT_OF_MEMORY,
        dbl::cuMemHostRegister_v2(host.void(), 4096, 0)
    );
    ck!(dbl::cuMemHostRegister_v2(host.void(), 4096, 0));
    let s = stream(1);
    let d = alloc(4096);
    for _ in 0..3 {
        ck!(dbl::cuMemcpyDtoHAsync_v2(host.void(), d, 4096, s));
    }
    expect_err!(CUDA_ERROR_ILLEGAL_ADDRESS, dbl::cuStreamSynchronize(s));
}

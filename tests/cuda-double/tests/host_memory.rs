//! Page-locked host memory: registration rules, host allocations, the
//! accounting, and the violations the real driver would punish later.
//! Every test here takes the file's lock: they count page-locked bytes and
//! violations, which are process-wide.

#[macro_use]
mod common;

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

const PAGE: usize = 4096;

fn locked_bytes() -> u64 {
    // SAFETY: no pointers.
    unsafe { dbl::gpusnapDoubleRegisteredBytes() }
}

#[test]
fn registration_refusals() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let mut m = HostMap::new(4 * PAGE);
    let base = m.void();
    // SAFETY: inside the mapping.
    let at = |off: usize| unsafe { m.ptr.add(off) }.cast::<c_void>();
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostRegister_v2(base, 0, 0)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostRegister_v2(std::ptr::null_mut(), PAGE, 0)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostRegister_v2(at(8), PAGE, 0)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostRegister_v2(base, PAGE + 1, 0)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostRegister_v2(base, PAGE, 16)
    );
    // Device memory is not host memory.
    let d = alloc(PAGE);
    let dev = std::ptr::with_exposed_provenance_mut(usize::try_from(d).unwrap());
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostRegister_v2(dev, PAGE, 0)
    );
    ck!(dbl::cuMemFree_v2(d));
    // More than the per-call maximum (512 GiB by default), checked first.
    expect_err!(
        CUDA_ERROR_OUT_OF_MEMORY,
        dbl::cuMemHostRegister_v2(base, (512 << 30) + PAGE, 0)
    );
    // Overlaps.
    ck!(dbl::cuMemHostRegister_v2(base, 2 * PAGE, 1 | 2));
    expect_err!(
        CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,
        dbl::cuMemHostRegister_v2(base, 2 * PAGE, 0)
    );
    expect_err!(
        CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,
        dbl::cuMemHostRegister_v2(at(PAGE), 2 * PAGE, 0)
    );
    ck!(dbl::cuMemHostRegister_v2(at(2 * PAGE), PAGE, 8));
    ck!(dbl::cuMemHostRegister_v2(at(3 * PAGE), PAGE, 4));
    ck!(dbl::cuMemHostUnregister(at(3 * PAGE)));
    // Unregistering wants the base.
    expect_err!(
        CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
        dbl::cuMemHostUnregister(at(PAGE))
    );
    ck!(dbl::cuMemHostUnregister(base));
    expect_err!(
        CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
        dbl::cuMemHostUnregister(base)
    );
    ck!(dbl::cuMemHostUnregister(at(2 * PAGE)));
    m.fill(0);
}

#[test]
fn an_unmapped_range_cannot_be_registered() {
    // In a child: another test's mapping could fill the unmapped page.
    if !is_child("an_unmapped_range_cannot_be_registered") {
        child_passes("an_unmapped_range_cannot_be_registered", &[]);
        return;
    }
    let _ctx = Ctx::enter(0);
    let m = HostMap::new(3 * PAGE);
    // SAFETY: the last page of our mapping; nothing uses it.
    unsafe { libc::munmap(m.ptr.add(2 * PAGE).cast(), PAGE) };
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostRegister_v2(m.void(), 3 * PAGE, 0)
    );
    ck!(dbl::cuMemHostRegister_v2(m.void(), 2 * PAGE, 0));
    ck!(dbl::cuMemHostUnregister(m.void()));
}

#[test]
fn the_per_call_maximum_comes_from_the_environment() {
    const NAME: &str = "the_per_call_maximum_comes_from_the_environment";
    if !is_child(NAME) {
        child_passes(NAME, &[("GPUSNAP_CUDA_DOUBLE_HOST_REGISTER_MAX", "8192")]);
        return;
    }
    let _ctx = Ctx::enter(0);
    let m = HostMap::new(3 * PAGE);
    expect_err!(
        CUDA_ERROR_OUT_OF_MEMORY,
        dbl::cuMemHostRegister_v2(m.void(), 3 * PAGE, 0)
    );
    ck!(dbl::cuMemHostRegister_v2(m.void(), 2 * PAGE, 0));
    ck!(dbl::cuMemHostUnregister(m.void()));
}

#[test]
fn page_locked_bytes_are_counted() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let before = locked_bytes();
    let m = HostMap::new(3 * PAGE);
    ck!(dbl::cuMemHostRegister_v2(m.void(), 3 * PAGE, 0));
    assert_eq!(locked_bytes(), before + 3 * 4096);
    let mut p = std::ptr::null_mut();
    ck!(dbl::cuMemAllocHost_v2(&mut p, 100));
    assert_eq!(locked_bytes(), before + 4 * 4096);
    ck!(dbl::cuMemFreeHost(p));
    ck!(dbl::cuMemHostUnregister(m.void()));
    assert_eq!(locked_bytes(), before);
}

#[test]
fn unregistering_after_munmap_is_a_violation() {
    // In a child, where no other test maps memory: a mapping made in the
    // freed range meanwhile would hide the violation, or take the copy's bytes.
    if !is_child("unregistering_after_munmap_is_a_violation") {
        let _serial = serial();
        child_passes("unregistering_after_munmap_is_a_violation", &[]);
        return;
    }
    let _ctx = Ctx::enter(0);
    let before = violations().len();
    let locked = locked_bytes();
    let mut m = HostMap::new(2 * PAGE);
    ck!(dbl::cuMemHostRegister_v2(m.void(), 2 * PAGE, 0));
    m.unmap();
    ck!(dbl::cuMemHostUnregister(m.void()));
    let v = violations();
    assert_eq!(v.len(), before + 1, "{v:?}");
    assert!(
        v[before].contains("unmapped before it was unregistered"),
        "{}",
        v[before]
    );
    assert_eq!(locked_bytes(), locked, "unregistered all the same");
}

#[test]
fn a_copy_into_an_unmapped_registration_is_a_violation_not_a_crash() {
    // In a child, where no other test maps memory: a mapping made in the
    // freed range meanwhile would hide the violation, or take the copy's bytes.
    if !is_child("a_copy_into_an_unmapped_registration_is_a_violation_not_a_crash") {
        let _serial = serial();
        child_passes(
            "a_copy_into_an_unmapped_registration_is_a_violation_not_a_crash",
            &[],
        );
        return;
    }
    let _ctx = Ctx::enter(0);
    let before = violations().len();
    let d = alloc(64 << 10);
    let mut m = HostMap::new(64 << 10);
    ck!(dbl::cuMemHostRegister_v2(m.void(), 64 << 10, 0));
    let s = stream(1);
    let gate = block(s);
    ck!(dbl::cuMemcpyDtoHAsync_v2(m.void(), d, 64 << 10, s));
    m.unmap();
    drop(gate);
    ck!(dbl::cuStreamSynchronize(s));
    let v = violations();
    assert_eq!(v.len(), before + 1, "{v:?}");
    assert!(
        v[before].contains("cuMemcpyDtoHAsync_v2") && v[before].contains("no longer mapped"),
        "{}",
        v[before]
    );
    ck!(dbl::cuMemHostUnregister(m.void()));
    assert_eq!(violations().len(), before + 2);
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn unregistering_under_a_pending_copy_waits_and_is_a_violation() {
    let _serial = serial();
    let ctx = Ctx::enter(0);
    let before = violations().len();
    let d = alloc(PAGE);
    let m = HostMap::new(PAGE);
    ck!(dbl::cuMemHostRegister_v2(m.void(), PAGE, 0));
    let s = stream(1);
    let gate = block(s);
    ck!(dbl::cuMemcpyDtoHAsync_v2(m.void(), d, PAGE, s));
    let done = Arc::new(AtomicBool::new(false));
    let (flag, handle, addr) = (
        Arc::clone(&done),
        ctx.handle.addr(),
        m.ptr.expose_provenance(),
    );
    let t = std::thread::spawn(move || {
        ck!(dbl::cuCtxSetCurrent(std::ptr::without_provenance_mut(
            handle
        )));
        ck!(dbl::cuMemHostUnregister(
            std::ptr::with_exposed_provenance_mut(addr)
        ));
        flag.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "unregistered under a pending copy without waiting"
    );
    drop(gate);
    t.join().unwrap();
    let v = violations();
    assert_eq!(v.len(), before + 1, "{v:?}");
    assert!(v[before].contains("still pending"), "{}", v[before]);
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn freeing_host_memory_under_a_pending_copy_waits_and_is_a_violation() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let before = violations().len();
    let d = alloc(PAGE);
    let mut p: *mut c_void = std::ptr::null_mut();
    ck!(dbl::cuMemAllocHost_v2(&mut p, PAGE));
    let s = stream(1);
    let gate = block(s);
    ck!(dbl::cuMemcpyDtoHAsync_v2(p, d, PAGE, s));
    let latch = Arc::clone(&gate.0);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        latch.open();
    });
    ck!(dbl::cuMemFreeHost(p));
    assert!(gate.0.entered());
    ck!(dbl::cuStreamQuery(s));
    t.join().unwrap();
    let v = violations();
    assert_eq!(v.len(), before + 1, "{v:?}");
    assert!(
        v[before].starts_with("cuMemFreeHost") && v[before].contains("still pending"),
        "{}",
        v[before]
    );
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn host_allocations() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let mut p: *mut c_void = std::ptr::null_mut();
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemHostAlloc(&mut p, 0, 0));
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemHostAlloc(&mut p, 10, 8));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostAlloc(std::ptr::null_mut(), 10, 0)
    );
    ck!(dbl::cuMemHostAlloc(&mut p, 10_000, 1 | 2 | 4));
    assert_eq!(p.addr() % PAGE, 0);
    // SAFETY: 10 000 bytes the double just allocated.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, 10_000) };
    let mut dp = 0;
    ck!(dbl::cuMemHostGetDevicePointer_v2(&mut dp, p, 0));
    assert_eq!(usize::try_from(dp).unwrap(), p.addr(), "unified addressing");
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostGetDevicePointer_v2(&mut dp, p, 1)
    );
    let plain = [0u8; 64];
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemHostGetDevicePointer_v2(&mut dp, plain.as_ptr().cast_mut().cast(), 0)
    );
    // A copy into page-locked memory returns at once.
    let s = stream(1);
    let d = alloc(10_000);
    ck!(dbl::cuMemsetD8Async(d, 0x5A, 10_000, s));
    let gate = block(s);
    ck!(dbl::cuMemcpyDtoHAsync_v2(p, d, 10_000, s));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(s));
    drop(gate);
    ck!(dbl::cuStreamSynchronize(s));
    // SAFETY: the copy is done; 10 000 bytes of the allocation.
    let got = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 10_000) }.to_vec();
    assert!(got.iter().all(|b| *b == 0x5A));
    // Freeing wants the start of a host allocation.
    // SAFETY: inside the allocation.
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemFreeHost(p.cast::<u8>().add(PAGE).cast())
    );
    expect_err!(
        CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
        dbl::cuMemHostUnregister(p)
    );
    let m = HostMap::new(PAGE);
    ck!(dbl::cuMemHostRegister_v2(m.void(), PAGE, 0));
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemFreeHost(m.void()));
    ck!(dbl::cuMemHostUnregister(m.void()));
    ck!(dbl::cuMemFreeHost(p));
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemFreeHost(p));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

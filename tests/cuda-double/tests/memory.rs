//! Device memory: the allocator, poison, PROT_NONE, memset, device-to-device
//! copies, range checks and address ranges.

#[macro_use]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

const POISON: u8 = 0xA5;

#[test]
fn allocations_are_aligned_first_fit_and_counted() {
    let _ctx = Ctx::enter(0);
    let a = alloc(1);
    let b = alloc(1000);
    assert_eq!(a % 512, 0);
    assert_eq!(b % 512, 0);
    assert_ne!(a, b);
    let mut p = 0;
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemAlloc_v2(&mut p, 0));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemAlloc_v2(std::ptr::null_mut(), 16)
    );
    expect_err!(
        CUDA_ERROR_OUT_OF_MEMORY,
        dbl::cuMemAlloc_v2(&mut p, (4 << 30) + 1)
    );
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemFree_v2(b + 1));
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemFree_v2(0));
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemFree_v2(0x1234));
    ck!(dbl::cuMemFree_v2(b));
    ck!(dbl::cuMemFree_v2(a));
}

#[test]
fn mem_get_info_counts_rounded_allocations() {
    // Alone on device memory accounting would race other tests, so this one
    // allocates from a child process.
    if !is_child("mem_get_info_counts_rounded_allocations") {
        child_passes("mem_get_info_counts_rounded_allocations", &[]);
        return;
    }
    let _ctx = Ctx::enter(0);
    let (mut free, mut total) = (0usize, 0usize);
    ck!(dbl::cuMemGetInfo_v2(&mut free, &mut total));
    assert_eq!((free, total), (4 << 30, 4 << 30));
    let a = alloc(100);
    ck!(dbl::cuMemGetInfo_v2(&mut free, &mut total));
    assert_eq!(free, (4 << 30) - 512);
    ck!(dbl::cuMemFree_v2(a));
    // A second free (only in a child: in the parent another test may have
    // been given the same address meanwhile).
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemFree_v2(a));
    ck!(dbl::cuMemGetInfo_v2(&mut free, &mut total));
    assert_eq!(free, 4 << 30);
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemGetInfo_v2(std::ptr::null_mut(), &mut total)
    );
}

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn freed_device_memory_goes_back_to_the_kernel() {
    if !is_child("freed_device_memory_goes_back_to_the_kernel") {
        child_passes("freed_device_memory_goes_back_to_the_kernel", &[]);
        return;
    }
    let _ctx = Ctx::enter(0);
    let len = 64 << 20;
    let before = resident_bytes();
    let a = alloc(len);
    ck!(dbl::cuMemsetD8_v2(a, 1, len));
    ck!(dbl::cuCtxSynchronize());
    let used = resident_bytes();
    assert!(used >= before + len, "{before} -> {used}");
    ck!(dbl::cuMemFree_v2(a));
    let after = resident_bytes();
    assert!(after + len / 2 < used, "{used} -> {after}");
}

#[test]
fn fresh_memory_reads_as_poison_even_where_freed_bytes_were() {
    if !is_child("fresh_memory_reads_as_poison_even_where_freed_bytes_were") {
        child_passes(
            "fresh_memory_reads_as_poison_even_where_freed_bytes_were",
            &[],
        );
        return;
    }
    let _ctx = Ctx::enter(0);
    let a = alloc(8192);
    assert!(download(a, 8192).iter().all(|b| *b == POISON));
    upload(a, &[7u8; 8192]);
    assert!(download(a, 8192).iter().all(|b| *b == 7));
    ck!(dbl::cuMemFree_v2(a));
    let again = alloc(8192);
    assert_eq!(again, a, "first fit reuses the freed range");
    assert!(download(again, 8192).iter().all(|b| *b == POISON));
}

fn protection_of(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let (range, rest) = line.split_once(' ').unwrap();
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (
            usize::from_str_radix(s, 16).unwrap(),
            usize::from_str_radix(e, 16).unwrap(),
        );
        if s <= addr && addr < e {
            return rest[..4].to_owned();
        }
    }
    panic!("{addr:#x} is not mapped");
}

#[test]
fn device_memory_is_not_host_accessible() {
    let _ctx = Ctx::enter(0);
    let a = alloc(4096);
    upload(a, &[1u8; 4096]);
    assert_eq!(protection_of(usize::try_from(a).unwrap()), "---p");
    ck!(dbl::cuMemFree_v2(a));
}

#[test]
fn dereferencing_device_memory_on_the_host_crashes() {
    const NAME: &str = "dereferencing_device_memory_on_the_host_crashes";
    if is_child(NAME) {
        let _ctx = Ctx::enter(0);
        let a = alloc(64);
        let p = std::ptr::with_exposed_provenance::<u8>(usize::try_from(a).unwrap());
        // SAFETY: none: this child is meant to die here of SIGSEGV.
        let b = unsafe { p.read_volatile() };
        println!("read {b} from device memory: the double is not strict");
        return;
    }
    let out = run_child(NAME, &[]);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn memset_and_device_to_device_copies() {
    let _ctx = Ctx::enter(0);
    let a = alloc(10_000);
    let b = alloc(10_000);
    // cuMemsetD8 returns before it runs: here it waits behind a blocked
    // blocking stream.
    let blocking = stream(0);
    let gate = block(blocking);
    gate.0.wait_entered();
    ck!(dbl::cuMemsetD8_v2(a, 0x11, 10_000));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(legacy()));
    drop(gate);
    // cuMemsetD8 is asynchronous on the legacy stream, which a
    // non-blocking stream does not wait for.
    ck!(dbl::cuStreamSynchronize(legacy()));
    let s = stream(1);
    ck!(dbl::cuMemsetD8Async(a, 0x22, 100, s));
    ck!(dbl::cuStreamSynchronize(s));
    ck!(dbl::cuMemcpyDtoDAsync_v2(b, a, 10_000, s));
    ck!(dbl::cuStreamSynchronize(s));
    let got = download(b, 10_000);
    assert!(got[..100].iter().all(|x| *x == 0x22));
    assert!(got[100..].iter().all(|x| *x == 0x11));
    ck!(dbl::cuMemcpyDtoD_v2(a + 5000, b, 100));
    ck!(dbl::cuCtxSynchronize());
    assert!(download(a + 5000, 100).iter().all(|x| *x == 0x22));
    // Ranges must lie in one live allocation.
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemsetD8_v2(a, 0, 10_001));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemsetD8Async(a + 9_999, 0, 2, s)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemcpyDtoDAsync_v2(b, a + 1, 10_000, s)
    );
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuMemsetD8_v2(0x10, 0, 1));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuStreamDestroy_v2(blocking));
    ck!(dbl::cuMemFree_v2(a));
    ck!(dbl::cuMemFree_v2(b));
}

#[test]
fn copies_outside_a_live_allocation_are_refused_at_the_call() {
    let _ctx = Ctx::enter(0);
    let a = alloc(1000);
    let s = stream(1);
    let mut host = vec![0u8; 2048];
    let h = host.as_mut_ptr().cast();
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemcpyDtoHAsync_v2(h, a, 1001, s)
    );
    // The padding past 1000 bytes is not the allocation.
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemcpyDtoHAsync_v2(h, a + 1000, 1, s)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemcpyHtoDAsync_v2(a + 1, h, 1000, s)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemcpyDtoH_v2(h, a + (1 << 31), 16)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemcpyDtoH_v2(std::ptr::null_mut(), a, 16)
    );
    // A device pointer passed as the host side.
    let other = alloc(16);
    let as_host = std::ptr::with_exposed_provenance_mut(usize::try_from(other).unwrap());
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemcpyDtoH_v2(as_host, a, 16)
    );
    // Memory of another device.
    let c1 = Ctx::enter(1);
    let on_one = alloc(64);
    _ctx.bind();
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuMemcpyDtoDAsync_v2(a, on_one, 16, s)
    );
    ck!(dbl::cuMemcpyDtoHAsync_v2(h, a + 999, 1, s));
    ck!(dbl::cuMemcpyDtoHAsync_v2(h, a + 1000, 0, s));
    ck!(dbl::cuStreamSynchronize(s));
    ck!(dbl::cuMemFree_v2(other));
    ck!(dbl::cuMemFree_v2(a));
    ck!(dbl::cuStreamDestroy_v2(s));
    c1.bind();
    ck!(dbl::cuMemFree_v2(on_one));
}

#[test]
fn address_ranges() {
    let _ctx = Ctx::enter(0);
    let a = alloc(3000);
    let (mut base, mut size) = (0, 0usize);
    ck!(dbl::cuMemGetAddressRange_v2(&mut base, &mut size, a + 2999));
    assert_eq!((base, size), (a, 3000));
    ck!(dbl::cuMemGetAddressRange_v2(
        std::ptr::null_mut(),
        &mut size,
        a + 7
    ));
    ck!(dbl::cuMemGetAddressRange_v2(
        &mut base,
        std::ptr::null_mut(),
        a + 7
    ));
    expect_err!(
        CUDA_ERROR_NOT_FOUND,
        dbl::cuMemGetAddressRange_v2(&mut base, &mut size, a + 3000)
    );
    let host = [0u8; 16];
    let h = dbl::ffi::dptr(host.as_ptr().expose_provenance());
    expect_err!(
        CUDA_ERROR_NOT_FOUND,
        dbl::cuMemGetAddressRange_v2(&mut base, &mut size, h)
    );
    ck!(dbl::cuMemFree_v2(a));
}

#[test]
fn free_waits_for_pending_work() {
    let ctx = Ctx::enter(0);
    let a = alloc(4096);
    let s = stream(1);
    let gate = block(s);
    gate.0.wait_entered();
    ck!(dbl::cuMemsetD8Async(a, 9, 4096, s));
    let freed = std::sync::Arc::new(AtomicBool::new(false));
    let (handle, flag) = (ctx.handle.addr(), std::sync::Arc::clone(&freed));
    let t = std::thread::spawn(move || {
        ck!(dbl::cuCtxSetCurrent(std::ptr::without_provenance_mut(
            handle
        )));
        ck!(dbl::cuMemFree_v2(a));
        flag.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !freed.load(Ordering::SeqCst),
        "cuMemFree did not wait for the stream"
    );
    gate.0.open();
    t.join().unwrap();
    ck!(dbl::cuStreamDestroy_v2(s));
}

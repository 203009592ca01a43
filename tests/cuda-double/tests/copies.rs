//! When copies read and write the host: pageable against page-locked
//! memory, synchronous against asynchronous, and in pieces under a delay.

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Opens `gate` after `after`, setting `opened` first.
fn open_later(gate: &Blocked, after: Duration) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let opened = Arc::new(AtomicBool::new(false));
    let (flag, latch) = (Arc::clone(&opened), Arc::clone(&gate.0));
    let t = std::thread::spawn(move || {
        std::thread::sleep(after);
        flag.store(true, Ordering::SeqCst);
        latch.open();
    });
    (opened, t)
}

#[test]
fn pageable_device_to_host_async_returns_only_when_done() {
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let d = alloc(5000);
    let want = pattern(5000, 1);
    upload(d, &want);
    let gate = block(s);
    gate.0.wait_entered();
    let (opened, t) = open_later(&gate, Duration::from_millis(150));
    let mut host = vec![0u8; 5000];
    ck!(dbl::cuMemcpyDtoHAsync_v2(
        host.as_mut_ptr().cast(),
        d,
        5000,
        s
    ));
    assert!(
        opened.load(Ordering::SeqCst),
        "returned before the stream ran the copy"
    );
    assert_eq!(host, want);
    t.join().unwrap();
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn page_locked_device_to_host_async_returns_at_once_and_writes_later() {
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let d = alloc(8192);
    let want = pattern(8192, 2);
    upload(d, &want);
    let mut host = HostMap::new(8192);
    host.fill(0);
    ck!(dbl::cuMemHostRegister_v2(host.void(), 8192, 0));
    let gate = block(s);
    gate.0.wait_entered();
    ck!(dbl::cuMemcpyDtoHAsync_v2(host.void(), d, 8192, s));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        host.snapshot().iter().all(|b| *b == 0),
        "the copy ran while its stream was blocked"
    );
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(s));
    gate.0.open();
    ck!(dbl::cuStreamSynchronize(s));
    ck!(dbl::cuStreamQuery(s));
    assert_eq!(host.snapshot(), want);
    ck!(dbl::cuMemHostUnregister(host.void()));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn pageable_host_to_device_async_is_staged_at_the_call() {
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let d = alloc(4096);
    let gate = block(s);
    gate.0.wait_entered();
    let mut host = pattern(4096, 3);
    let want = host.clone();
    ck!(dbl::cuMemcpyHtoDAsync_v2(d, host.as_ptr().cast(), 4096, s));
    // Returned while the stream is still blocked.
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(s));
    // The caller may reuse pageable memory at once: the bytes were staged.
    host.fill(0xEE);
    gate.0.open();
    ck!(dbl::cuStreamSynchronize(s));
    assert_eq!(download(d, 4096), want);
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn page_locked_host_to_device_reads_the_host_when_it_runs() {
    let _ctx = Ctx::enter(0);
    let s = stream(1);
    let d = alloc(4096);
    let mut host = HostMap::new(4096);
    host.write(0, &pattern(4096, 4));
    ck!(dbl::cuMemHostRegister_v2(host.void(), 4096, 0));
    let gate = block(s);
    gate.0.wait_entered();
    ck!(dbl::cuMemcpyHtoDAsync_v2(d, host.void(), 4096, s));
    let later = pattern(4096, 5);
    host.write(0, &later);
    gate.0.open();
    ck!(dbl::cuStreamSynchronize(s));
    assert_eq!(
        download(d, 4096),
        later,
        "the copy read the host when it ran, not at the call"
    );
    ck!(dbl::cuMemHostUnregister(host.void()));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

#[test]
fn synchronous_copies_wait_for_blocking_streams_but_not_non_blocking_ones() {
    let _ctx = Ctx::enter(0);
    let d = alloc(256);
    upload(d, &[5u8; 256]);
    let non_blocking = stream(1);
    let gate = block(non_blocking);
    gate.0.wait_entered();
    let mut host = vec![0u8; 256];
    ck!(dbl::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), d, 256));
    // Returned while the non-blocking stream is still blocked.
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(non_blocking));
    assert_eq!(host, vec![5u8; 256]);
    drop(gate);

    let blocking = stream(0);
    let gate = block(blocking);
    gate.0.wait_entered();
    let (opened, t) = open_later(&gate, Duration::from_millis(150));
    let mut host = vec![0u8; 256];
    ck!(dbl::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), d, 256));
    assert!(
        opened.load(Ordering::SeqCst),
        "the sync copy did not wait for the blocking stream"
    );
    t.join().unwrap();

    // Pageable host-to-device synchronizes first, then returns once staged.
    let gate = block(blocking);
    gate.0.wait_entered();
    let (opened, t) = open_later(&gate, Duration::from_millis(150));
    let src = [6u8; 256];
    ck!(dbl::cuMemcpyHtoD_v2(d, src.as_ptr().cast(), 256));
    assert!(
        opened.load(Ordering::SeqCst),
        "the sync copy did not wait for the blocking stream"
    );
    t.join().unwrap();
    ck!(dbl::cuCtxSynchronize());
    assert_eq!(download(d, 256), vec![6u8; 256]);

    // Host-to-device from page-locked memory returns once the copy is done.
    let mut pinned = HostMap::new(4096);
    pinned.fill(7);
    ck!(dbl::cuMemHostRegister_v2(pinned.void(), 4096, 0));
    let gate = block(blocking);
    gate.0.wait_entered();
    let (opened, t) = open_later(&gate, Duration::from_millis(150));
    ck!(dbl::cuMemcpyHtoD_v2(d, pinned.void(), 256));
    assert!(
        opened.load(Ordering::SeqCst),
        "returned before the copy ran"
    );
    t.join().unwrap();
    ck!(dbl::cuStreamQuery(legacy()));
    ck!(dbl::cuMemHostUnregister(pinned.void()));
    upload(d, &[6u8; 256]);

    // Device-to-device returns without waiting; the copy lands in order.
    let e = alloc(256);
    let gate = block(blocking);
    gate.0.wait_entered();
    ck!(dbl::cuMemcpyDtoD_v2(e, d, 256));
    expect_err!(CUDA_ERROR_NOT_READY, dbl::cuStreamQuery(legacy()));
    gate.0.open();
    ck!(dbl::cuStreamSynchronize(legacy()));
    assert_eq!(download(e, 256), vec![6u8; 256]);

    for s in [non_blocking, blocking] {
        ck!(dbl::cuStreamDestroy_v2(s));
    }
    ck!(dbl::cuMemFree_v2(d));
    ck!(dbl::cuMemFree_v2(e));
}

#[test]
fn large_copies_land_in_pieces_under_a_raised_delay() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let len = 1 << 20;
    let d = alloc(len);
    let want = pattern(len, 6);
    upload(d, &want);
    let mut host = HostMap::new(len);
    host.fill(0);
    ck!(dbl::cuMemHostRegister_v2(host.void(), len, 0));
    let s = stream(1);
    // SAFETY: no pointers.
    unsafe { dbl::gpusnapDoubleSetOpDelayUs(800_000) };
    ck!(dbl::cuMemcpyDtoHAsync_v2(host.void(), d, len, s));
    // Four pieces, 200 ms apart: wait for the first, then the last must be missing.
    let deadline = Instant::now() + PATIENCE;
    while host.byte(0) != want[0] || host.byte(1) != want[1] {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let seen = host.snapshot();
    // SAFETY: no pointers.
    unsafe { dbl::gpusnapDoubleSetOpDelayUs(200) };
    assert_eq!(&seen[..len / 4], &want[..len / 4]);
    assert!(
        seen[len - 1] == 0 && seen[len - 2] == 0,
        "the whole copy landed at once"
    );
    ck!(dbl::cuStreamSynchronize(s));
    assert_eq!(host.snapshot(), want);
    ck!(dbl::cuMemHostUnregister(host.void()));
    ck!(dbl::cuStreamDestroy_v2(s));
    ck!(dbl::cuMemFree_v2(d));
}

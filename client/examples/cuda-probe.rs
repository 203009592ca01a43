//! What the CUDA backend relies on, measured on this machine (the first
//! step of `tests/gpu-suite`): the driver's version and devices, and
//! `cuMemHostRegister` of a shared memfd mapping, the way the client
//! page-locks the daemon's staging, in two processes at once (the trainer
//! and, for GPU staging later, the daemon), with its rate and the
//! device-to-host rate into that memory, pinned and not.
//!
//! `cargo run --example cuda-probe -- [bytes]` (default 1 GiB); prints one
//! JSON object per line and exits non-zero if a step failed.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Instant;

use cudarc::driver::sys::{self, CUresult};
use gpusnap::device::cuda::{CudaDevice, DeviceMemory};

const CHILD_ENV: &str = "GPUSNAP_PROBE_CHILD_FD";

fn main() {
    if let Ok(fd) = std::env::var(CHILD_ENV) {
        let fd: i32 = fd.parse().expect("fd");
        let bytes: usize = std::env::args()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .expect("bytes");
        // SAFETY: the parent passed this descriptor open for this process.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::process::exit(i32::from(!register_in_this_process(
            &fd,
            bytes,
            "second process",
        )));
    }
    let bytes: usize = std::env::args()
        .nth(1)
        .map_or(1 << 30, |a| a.parse().expect("bytes: a number"));
    let device = match CudaDevice::get(0) {
        Ok(d) => d,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"probe": "driver", "ok": false, "error": e.to_string()})
            );
            std::process::exit(1);
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "probe": "driver",
            "ok": true,
            "version": CudaDevice::driver_version().ok(),
            "library": CudaDevice::driver_library().ok(),
            "devices": CudaDevice::count().ok(),
            "device0": device.device_name(),
        })
    );
    let fd = nix::sys::memfd::memfd_create("gpusnap-probe", nix::sys::memfd::MFdFlags::empty())
        .expect("memfd");
    nix::unistd::ftruncate(&fd, i64::try_from(bytes).expect("size")).expect("ftruncate");
    nix::fcntl::fallocate(
        &fd,
        nix::fcntl::FallocateFlags::empty(),
        0,
        i64::try_from(bytes).expect("size"),
    )
    .expect("fallocate");
    let mut ok = register_in_this_process(&fd, bytes, "first process");
    // A second process registers the same pages while this one holds them.
    let status = Command::new(std::env::current_exe().expect("exe"))
        .arg(bytes.to_string())
        .env(CHILD_ENV, fd.as_raw_fd().to_string())
        .status()
        .expect("spawn the second process");
    ok &= status.success();
    ok &= copy_rates(&device, &fd, bytes);
    std::process::exit(i32::from(!ok));
}

/// Maps `fd` shared, registers it (portable), reports the rate, and keeps
/// it registered while a second process does the same.
fn register_in_this_process(fd: &OwnedFd, bytes: usize, who: &str) -> bool {
    make_current(&CudaDevice::get(0).expect("device"));
    let map = map(fd, bytes);
    let started = Instant::now();
    // SAFETY: `map` is a live shared mapping of `bytes` bytes; unregistered
    // below before it is unmapped.
    let code = unsafe { sys::cuMemHostRegister_v2(map, bytes, sys::CU_MEMHOSTREGISTER_PORTABLE) };
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "probe": "cuMemHostRegister of a shared memfd mapping",
            "process": who,
            "ok": code == CUresult::CUDA_SUCCESS,
            "result": format!("{code:?}"),
            "bytes": bytes,
            "seconds": seconds,
            "gb_per_s": bytes as f64 / seconds / 1e9,
        })
    );
    if who == "first process" {
        // Hold it while the second process registers (the caller spawns it
        // after this returns; the registration stays until `unregister`).
        std::mem::forget(Registered { map, bytes });
    } else {
        drop(Registered { map, bytes });
    }
    code == CUresult::CUDA_SUCCESS
}

struct Registered {
    map: *mut c_void,
    bytes: usize,
}

impl Drop for Registered {
    fn drop(&mut self) {
        // SAFETY: registered by this process, still mapped.
        unsafe { sys::cuMemHostUnregister(self.map) };
        // SAFETY: the mapping made by `map`, unregistered above.
        unsafe { libc::munmap(self.map, self.bytes) };
    }
}

/// Makes the device's primary context current on this thread (the probe's
/// raw driver calls need one).
fn make_current(device: &CudaDevice) {
    // SAFETY: the device's retained primary context.
    let code = unsafe { sys::cuCtxSetCurrent(device.cu_context()) };
    assert_eq!(code, CUresult::CUDA_SUCCESS, "cuCtxSetCurrent");
}

fn map(fd: &OwnedFd, bytes: usize) -> *mut c_void {
    // SAFETY: a fresh shared mapping of a file this process holds.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "mmap");
    map
}

/// Device-to-host into a freshly registered mapping and into a pageable
/// one, timed on the legacy stream.
fn copy_rates(device: &std::sync::Arc<CudaDevice>, fd: &OwnedFd, bytes: usize) -> bool {
    let memory = DeviceMemory::new(device, bytes).expect("device memory");
    make_current(device);
    let mut ok = true;
    for pinned in [true, false] {
        let target = map(fd, bytes);
        if pinned {
            // SAFETY: as in `register_in_this_process`.
            let code = unsafe {
                sys::cuMemHostRegister_v2(target, bytes, sys::CU_MEMHOSTREGISTER_PORTABLE)
            };
            ok &= code == CUresult::CUDA_SUCCESS;
        }
        let started = Instant::now();
        // SAFETY: `target` is `bytes` writable bytes; the source is the
        // device allocation of that size.
        let code = unsafe { sys::cuMemcpyDtoH_v2(target, memory.device_ptr(), bytes) };
        let seconds = started.elapsed().as_secs_f64();
        ok &= code == CUresult::CUDA_SUCCESS;
        println!(
            "{}",
            serde_json::json!({
                "probe": "device-to-host copy",
                "pinned": pinned,
                "ok": code == CUresult::CUDA_SUCCESS,
                "bytes": bytes,
                "gb_per_s": bytes as f64 / seconds / 1e9,
            })
        );
        if pinned {
            // SAFETY: registered above, still mapped.
            unsafe { sys::cuMemHostUnregister(target) };
        }
        // SAFETY: mapped above.
        unsafe { libc::munmap(target, bytes) };
    }
    ok
}

//! The built library, loaded the way the client loads the driver: by
//! cudarc's lazy dynamic loader, from the directory `tests/cuda-double/build`
//! puts it in (`${CARGO_TARGET_DIR:-target}/cuda-double`, or
//! `GPUSNAP_CUDA_DOUBLE_DIR`). The test re-runs itself as a child with
//! `LD_LIBRARY_PATH` set there. It skips when the library was never built,
//! unless `GPUSNAP_REQUIRE_CUDA_DOUBLE=1` (then it fails); a library older
//! than cargo's last build of the crate is stale and fails the test.
//!
//! This file must not use the double's Rust crate: the child would then hold
//! a second copy of the double, linked in, beside the loaded one.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, DriverError, result};

const NAME: &str = "cudarc_drives_the_built_library";
const CHILD: &str = "GPUSNAP_CUDA_DOUBLE_LOADER_CHILD";

/// `<target>/<profile>/deps/<this test>` → `<target>`, `<profile>`.
fn target_and_profile() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    (profile.parent().unwrap().to_path_buf(), profile)
}

#[test]
fn cudarc_drives_the_built_library() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let (target, profile) = target_and_profile();
    let dir = std::env::var_os("GPUSNAP_CUDA_DOUBLE_DIR")
        .map_or_else(|| target.join("cuda-double"), PathBuf::from);
    let lib = dir.join("libcuda.so");
    if !lib.exists() {
        assert_ne!(
            std::env::var("GPUSNAP_REQUIRE_CUDA_DOUBLE").as_deref(),
            Ok("1"),
            "{} is missing: run tests/cuda-double/build first",
            lib.display()
        );
        eprintln!(
            "skipped: {} is not built (tests/cuda-double/build builds it; GPUSNAP_REQUIRE_CUDA_DOUBLE=1 makes this a failure)",
            lib.display()
        );
        return;
    }
    // The copy must be the library `build` made (cargo's `<profile>/`
    // output, which `cargo build` refreshes): a different one is stale.
    // cargo test relinks its own copy under deps/ on every run, so only the
    // build output is compared, by content.
    let built = profile.join("libgpusnap_cuda_double.so");
    if let Ok(fresh) = std::fs::read(&built) {
        assert!(
            std::fs::read(&lib).unwrap() == fresh,
            "{} differs from {}: rerun tests/cuda-double/build",
            lib.display(),
            built.display()
        );
    }
    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) if !old.is_empty() => {
            let mut p = dir.clone().into_os_string();
            p.push(":");
            p.push(old);
            p
        }
        _ => dir.clone().into_os_string(),
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", path)
        .env_remove("GPUSNAP_CUDA_DOUBLE_FAULTS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The control API, found by `dlsym` on the library cudarc loaded.
struct Control {
    handle: *mut c_void,
}

impl Control {
    fn find() -> Self {
        // SAFETY: RTLD_NOLOAD only returns the library cudarc already loaded.
        let handle =
            unsafe { libc::dlopen(c"libcuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        assert!(!handle.is_null(), "libcuda.so is not loaded");
        Self { handle }
    }

    fn symbol(&self, name: &CStr) -> *mut c_void {
        // SAFETY: a handle from dlopen, a NUL-terminated name.
        let p = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        assert!(!p.is_null(), "{name:?} is not exported");
        p
    }

    fn is_double(&self) -> c_int {
        // SAFETY: the double's signature for this symbol.
        let f: unsafe extern "C" fn() -> c_int =
            unsafe { std::mem::transmute(self.symbol(c"gpusnapDoubleIsDouble")) };
        // SAFETY: no arguments.
        unsafe { f() }
    }

    fn u64_query(&self, name: &CStr) -> u64 {
        // SAFETY: the double's signature for these symbols.
        let f: unsafe extern "C" fn() -> u64 = unsafe { std::mem::transmute(self.symbol(name)) };
        // SAFETY: no arguments.
        unsafe { f() }
    }

    fn call_count(&self, function: &CStr) -> u64 {
        // SAFETY: the double's signature for this symbol.
        let f: unsafe extern "C" fn(*const c_char) -> u64 =
            unsafe { std::mem::transmute(self.symbol(c"gpusnapDoubleCallCount")) };
        // SAFETY: a NUL-terminated name.
        unsafe { f(function.as_ptr()) }
    }
}

fn child() {
    // SAFETY: only dlopens candidates.
    let present = unsafe { sys::is_culib_present() };
    assert!(present, "cudarc finds no libcuda.so");
    let ctx = CudaContext::new(0).unwrap();
    let control = Control::find();
    assert_eq!(
        control.is_double(),
        1,
        "cudarc loaded a real driver, not the double"
    );
    let mut version = 0;
    // SAFETY: an out-pointer to a local.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .unwrap();
    assert_eq!(version, 13000);
    // SAFETY: this test makes its streams wait for what they need.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();

    // An event round trip.
    let event = ctx.new_event(None).unwrap();
    event.record(&stream).unwrap();
    event.synchronize().unwrap();
    assert!(event.is_complete());

    // Host to device from pageable memory, device to host into page-locked memory.
    let data: Vec<u8> = (0..1usize << 16)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let device = stream.clone_htod(&data).unwrap();
    // SAFETY: the copy below writes every byte before it is read.
    let mut pinned = unsafe { ctx.alloc_pinned::<u8>(data.len()) }.unwrap();
    stream.memcpy_dtoh(&device, &mut pinned).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(pinned.as_slice().unwrap(), &data[..]);

    // Registered memory, the client's way: raw calls on a mapping.
    let len = 1 << 16;
    // SAFETY: a fresh anonymous mapping.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: the mapping made above.
    unsafe { sys::cuMemHostRegister_v2(map, len, 1 | 2) }
        .result()
        .unwrap();
    assert_eq!(
        control.u64_query(c"gpusnapDoubleRegisteredBytes"),
        u64::try_from(len + (1 << 16)).unwrap()
    );
    {
        // SAFETY: `len` bytes of the mapping, written only by the copy.
        let host = unsafe { std::slice::from_raw_parts_mut(map.cast::<u8>(), len) };
        let (src, _sync) = cudarc::driver::DevicePtr::device_ptr(&device, &stream);
        // SAFETY: `host` stays valid until the stream is synchronized below.
        unsafe { result::memcpy_dtoh_async(host, src, stream.cu_stream()) }.unwrap();
        stream.synchronize().unwrap();
        assert_eq!(&host[..], &data[..]);
    }
    // SAFETY: the registration made above.
    unsafe { sys::cuMemHostUnregister(map) }.result().unwrap();
    // SAFETY: our mapping, unregistered.
    unsafe { libc::munmap(map, len) };

    // Errors format through cuGetErrorString.
    // SAFETY: a zero-size registration is refused before the pointer is used.
    let e = unsafe { sys::cuMemHostRegister_v2(std::ptr::null_mut(), 0, 0) }
        .result()
        .unwrap_err();
    assert_eq!(e, DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    let shown = format!("{e:?}");
    assert!(
        shown.contains("CUDA_ERROR_INVALID_VALUE") && shown.contains("invalid argument"),
        "{shown}"
    );
    assert_eq!(
        e.error_name().unwrap().to_str().unwrap(),
        "CUDA_ERROR_INVALID_VALUE"
    );

    drop(pinned);
    drop(device);
    drop(event);
    drop(stream);
    ctx.check_err().unwrap();
    drop(ctx);
    assert_eq!(control.u64_query(c"gpusnapDoubleRegisteredBytes"), 0);
    assert_eq!(control.u64_query(c"gpusnapDoubleViolationCount"), 0);
    assert_eq!(
        control.call_count(c"cuCtxSynchronize"),
        0,
        "cudarc synchronized the whole context"
    );
    assert_eq!(control.call_count(c"cuDevicePrimaryCtxRelease_v2"), 1);
}

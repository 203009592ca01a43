//! The CUDA device under test: on a real GPU, or on the project's CUDA
//! driver double (`tests/cuda-double`, found as `libcuda.so` on
//! `LD_LIBRARY_PATH`, which `tests/run` sets).
//!
//! Every test that touches CUDA holds [`cuda_lock`]: the double's fault
//! injection and its counters are process-wide, and a test that injects a
//! fault must not hand it to another test's call.
//!
//! Where no CUDA driver or device is usable, a CUDA test skips through
//! [`cuda_or_skip`]: it prints `skipped: <reason>` and appends
//! `<test>\t<reason>` to the file `GPUSNAP_SKIP_LOG` names, unless
//! `GPUSNAP_REQUIRE_CUDA=1` (set where a driver is known to be: `tests/run`
//! with the double, a GPU machine's suite), which fails it instead.

use std::ffi::{CString, c_int};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::sys::{self, CUresult};

use super::matrix::{Faulty, Memory, TestBuffer};
use crate::device::cuda::{CudaBuffer, CudaDevice, DeviceMemory};
use crate::device::{Device, DeviceBuffer, HostDevice};
use crate::{Client, ClientConfig, Dtype};

static CUDA_TESTS: Mutex<()> = Mutex::new(());

/// Serializes the tests that touch CUDA (see the module's doc).
pub fn cuda_lock() -> MutexGuard<'static, ()> {
    CUDA_TESTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Device 0, or the skip (or failure) the protocol asks for.
#[track_caller]
pub fn cuda_or_skip() -> Option<Arc<CudaDevice>> {
    match CudaDevice::get(0) {
        Ok(device) => Some(device),
        Err(e) => {
            let skipped = !gpusnapd_testkit::cuda_or_skip(Some(&e.to_string()));
            assert!(skipped, "a failed device is never usable");
            None
        }
    }
}

/// A control function of the driver double, when the loaded driver is the
/// double (`None` on a real driver).
fn double_fn<F: Copy>(name: &str) -> Option<F> {
    // SAFETY: a driver loaded (the caller got a device), so cudarc's
    // library handle exists; looking a symbol up runs no code. `F` is the
    // control function's documented type (the caller names it).
    unsafe { sys::culib().get::<F>(name.as_bytes()).ok().map(|s| *s) }
}

/// Whether the loaded driver is the double.
pub fn on_double() -> bool {
    double_fn::<unsafe extern "C" fn() -> c_int>("gpusnapDoubleIsDouble")
        // SAFETY: the double's documented signature.
        .is_some_and(|f| unsafe { f() } == 1)
}

/// The double's violations so far (none on a real driver).
pub fn double_violations() -> Vec<String> {
    let (Some(count), Some(message)) = (
        double_fn::<unsafe extern "C" fn() -> u64>("gpusnapDoubleViolationCount"),
        double_fn::<unsafe extern "C" fn(u64, *mut std::ffi::c_char, usize) -> usize>(
            "gpusnapDoubleViolationMessage",
        ),
    ) else {
        return Vec::new();
    };
    // SAFETY: the double's documented signature.
    (0..unsafe { count() })
        .map(|i| {
            let mut buf = vec![0 as std::ffi::c_char; 512];
            // SAFETY: the double's documented signature; the buffer is live
            // and `len` bytes long.
            unsafe { message(i, buf.as_mut_ptr(), buf.len()) };
            // SAFETY: the double NUL-terminates within `len`.
            unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Host bytes the double has page-locked now (0 on a real driver).
pub fn double_registered_bytes() -> u64 {
    double_fn::<unsafe extern "C" fn() -> u64>("gpusnapDoubleRegisteredBytes")
        // SAFETY: the double's documented signature.
        .map_or(0, |f| unsafe { f() })
}

/// Calls of driver function `name` so far (the double counts them).
pub fn double_calls(name: &str) -> Option<u64> {
    let f = double_fn::<unsafe extern "C" fn(*const std::ffi::c_char) -> u64>(
        "gpusnapDoubleCallCount",
    )?;
    let name = CString::new(name).expect("no NUL");
    // SAFETY: the double's documented signature; `name` is NUL-terminated.
    Some(unsafe { f(name.as_ptr()) })
}

/// Makes the `nth` next call of `function` return `code` (asynchronously,
/// from its stream operation, when `asynchronous`); false on a real
/// driver, which cannot.
pub fn inject_fault(function: &str, nth: u64, code: CUresult, asynchronous: bool) -> bool {
    let Some(f) = double_fn::<
        unsafe extern "C" fn(*const std::ffi::c_char, u64, CUresult, c_int) -> CUresult,
    >("gpusnapDoubleInjectFault") else {
        return false;
    };
    let name = CString::new(function).expect("no NUL");
    // SAFETY: the double's documented signature.
    let result = unsafe { f(name.as_ptr(), nth, code, c_int::from(asynchronous)) };
    assert_eq!(result, CUresult::CUDA_SUCCESS, "injecting into {function}");
    true
}

/// Clears the double's faults and sticky errors (after a fault test).
pub fn reset_double() {
    if let Some(f) = double_fn::<unsafe extern "C" fn()>("gpusnapDoubleReset") {
        // SAFETY: the double's documented signature.
        unsafe { f() }
    }
}

/// A registered CUDA buffer and the allocation behind it.
pub fn cuda_buffer(
    device: &Arc<CudaDevice>,
    name: &str,
    bytes: &[u8],
) -> (Arc<CudaBuffer>, Arc<DeviceMemory>) {
    let memory = Arc::new(DeviceMemory::new(device, bytes.len()).expect("cuMemAlloc"));
    memory.write(0, bytes).expect("fill");
    let buffer = memory.buffer(name).expect("a valid device buffer");
    (buffer, memory)
}

/// Device memory of CUDA device 0, copied by the CUDA backend (through a
/// wrapper that can fail a capture's ticket); host buffers of the same
/// client go to a host device. Holds [`cuda_lock`] while it lives.
pub struct OnCuda {
    device: Arc<FaultyCuda>,
    _lock: MutexGuard<'static, ()>,
}

impl OnCuda {
    /// `None` when the test skipped (no usable CUDA driver or device).
    #[track_caller]
    pub fn new() -> Option<OnCuda> {
        let lock = cuda_lock();
        let cuda = cuda_or_skip()?;
        Some(OnCuda {
            device: Arc::new(Faulty::new(cuda, "cuda")),
            _lock: lock,
        })
    }
}

impl Memory for OnCuda {
    fn client(&self, config: ClientConfig) -> Client {
        let host = Arc::new(HostDevice::new(config.copy_threads));
        Client::with_device(config, host).expect("connect")
    }

    fn buffer(&self, _dtype: Dtype, _shape: &[u64], bytes: &[u8]) -> TestBuffer {
        let (buffer, memory) = cuda_buffer(&self.device.inner, "t", bytes);
        TestBuffer::Cuda(Arc::new(FaultyCudaBuffer {
            device: Arc::clone(&self.device),
            inner: buffer,
            memory,
        }))
    }

    fn fail_next_capture(&self, reason: &str) {
        self.device.fail_next(reason);
    }

    fn let_copies_run(&self) {}

    fn check(&self) {
        let violations = double_violations();
        assert!(
            violations.is_empty(),
            "the CUDA double saw violations: {violations:#?}"
        );
        assert_eq!(
            double_registered_bytes(),
            0,
            "staging is still page-locked after every client went"
        );
    }
}

/// The CUDA device behind [`Faulty`].
pub type FaultyCuda = Faulty<Arc<CudaDevice>>;

/// A CUDA buffer routed to a [`FaultyCuda`].
#[derive(Debug)]
pub struct FaultyCudaBuffer {
    device: Arc<FaultyCuda>,
    inner: Arc<CudaBuffer>,
    memory: Arc<DeviceMemory>,
}

impl FaultyCudaBuffer {
    pub fn contents(&self) -> Vec<u8> {
        self.memory.read(0, self.memory.len()).expect("read")
    }

    pub fn overwrite(&self, bytes: &[u8]) {
        self.memory.write(0, bytes).expect("write");
    }
}

impl DeviceBuffer for FaultyCudaBuffer {
    fn device(&self) -> Arc<dyn Device> {
        Arc::clone(&self.device) as Arc<dyn Device>
    }

    fn byte_len(&self) -> usize {
        self.inner.byte_len()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        // The CUDA device finds its own buffer type behind the wrapper.
        &*self.inner
    }

    fn overlaps(&self, other: &dyn DeviceBuffer) -> bool {
        self.inner.overlaps(other)
    }
}

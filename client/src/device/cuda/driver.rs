//! Finding the CUDA driver, once per process, without ever letting cudarc
//! panic.
//!
//! cudarc (with `dynamic-loading`) opens `libcuda.so` on its first call and
//! resolves each function on that function's first call; a missing library
//! or symbol is a panic there, not an error. So before any other cudarc
//! call this module asks [`is_culib_present`](sys::is_culib_present) (which
//! only `dlopen`s), then checks that the library cudarc will use exports
//! every function this backend calls ([`SYMBOLS`]; a test keeps that list
//! complete), then reads the driver's version (older than the CUDA 13.0
//! this build binds is [`CudaError::CudaDriverTooOld`]) and initializes it.
//! What it finds is kept for the life of the process: one answer, whoever
//! asks first, and the same error for every later caller.
//!
//! Anything cudarc might still panic on is caught at the backend's boundary
//! by [`guarded`].

use std::ffi::{CStr, c_int};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys::{self, CUresult};

use super::error::{Check, CudaError};

/// The CUDA version this build binds (`cuda-13000`).
pub const REQUIRED_DRIVER_VERSION: i32 = 13000;

/// Every driver function this backend calls, by its ABI name (the name
/// cudarc resolves). A test checks that every `sys::cu*` call in the
/// backend's sources is listed.
pub(crate) const SYMBOLS: &[&str] = &[
    "cuCtxGetCurrent",
    "cuCtxPopCurrent_v2",
    "cuCtxPushCurrent_v2",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDevicePrimaryCtxRelease_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDriverGetVersion",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventElapsedTime_v2",
    "cuEventQuery",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuInit",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetAddressRange_v2",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyHtoD_v2",
    "cuPointerGetAttribute",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamGetCtx",
    "cuStreamIsCapturing",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
];

/// The driver this process found.
#[derive(Debug)]
pub(crate) struct Driver {
    /// `cuDriverGetVersion`: 13000 for CUDA 13.0.
    pub(crate) version: i32,
    /// Devices it sees.
    pub(crate) devices: u32,
    /// The library file, as the dynamic loader resolved it.
    pub(crate) library: String,
}

static DRIVER: OnceLock<Result<Driver, CudaError>> = OnceLock::new();

/// Set once every symbol in [`SYMBOLS`] was found: from then on the
/// driver's own error strings may be asked for.
static SYMBOLS_PRESENT: AtomicBool = AtomicBool::new(false);

/// The driver, loaded and initialized on the first call.
pub(crate) fn driver() -> Result<&'static Driver, CudaError> {
    DRIVER
        .get_or_init(|| guarded("loading the CUDA driver", load).and_then(|r| r))
        .as_ref()
        .map_err(Clone::clone)
}

fn load() -> Result<Driver, CudaError> {
    // SAFETY: `is_culib_present` only tries to `dlopen` the candidate
    // library names; it resolves no symbol and calls nothing in them.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NoCudaDriver {
            reason: "no CUDA driver library (libcuda.so) on the library path".into(),
        });
    }
    // SAFETY: a candidate library loaded just above, so cudarc's loader
    // finds one (it tries the same names in the same order) and does not
    // panic; resolving symbols calls no code in the library.
    let library = unsafe { sys::culib() };
    let missing: Vec<&str> = SYMBOLS
        .iter()
        .copied()
        // SAFETY: looking a symbol up runs no code of the library; the
        // resolved address is only tested for presence, never called
        // through this type.
        .filter(|name| unsafe { library.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err())
        .collect();
    let path = library_path();
    if !missing.is_empty() {
        return Err(CudaError::NoCudaDriver {
            reason: format!(
                "{path} lacks {} of the driver functions this build calls: {}",
                missing.len(),
                missing.join(", ")
            ),
        });
    }
    SYMBOLS_PRESENT.store(true, Ordering::Release);

    let mut version: c_int = 0;
    // SAFETY: the symbol exists (checked above); the out-pointer is a live
    // local.
    unsafe { sys::cuDriverGetVersion(&mut version) }.check("cuDriverGetVersion")?;
    if version < REQUIRED_DRIVER_VERSION {
        return Err(CudaError::CudaDriverTooOld {
            found: version,
            required: REQUIRED_DRIVER_VERSION,
        });
    }
    // SAFETY: as above; cuInit takes flags 0.
    match unsafe { sys::cuInit(0) } {
        CUresult::CUDA_SUCCESS => {}
        CUresult::CUDA_ERROR_NO_DEVICE => {
            return Err(CudaError::NoDevice {
                reason: format!("the driver ({path}) reports no CUDA-capable device"),
            });
        }
        CUresult::CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER
        | CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
            return Err(CudaError::CudaDriverTooOld {
                found: version,
                required: REQUIRED_DRIVER_VERSION,
            });
        }
        code => return Err(CudaError::driver("cuInit", code)),
    }
    let mut count: c_int = 0;
    // SAFETY: as above; the driver is initialized.
    unsafe { sys::cuDeviceGetCount(&mut count) }.check("cuDeviceGetCount")?;
    let devices = u32::try_from(count).unwrap_or(0);
    if devices == 0 {
        return Err(CudaError::NoDevice {
            reason: format!("the driver ({path}) counts no devices"),
        });
    }
    tracing::info!(
        library = %path,
        version = %format!("{}.{}", version / 1000, (version % 1000) / 10),
        devices,
        "CUDA driver loaded"
    );
    Ok(Driver {
        version,
        devices,
        library: path,
    })
}

/// The file the dynamic loader resolved the driver's `cuInit` from.
fn library_path() -> String {
    // SAFETY: as in `load`: a candidate library is loaded, so this finds it.
    let library = unsafe { sys::culib() };
    // SAFETY: resolving a symbol runs no library code; the address is only
    // given to `dladdr`, never called.
    let Ok(symbol) = (unsafe { library.get::<unsafe extern "C" fn()>(b"cuInit") }) else {
        return "the CUDA driver library".into();
    };
    let address = *symbol as *const libc::c_void;
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `dladdr` reads the loader's tables for `address` and fills
    // `info`, a live local.
    let found = unsafe { libc::dladdr(address, info.as_mut_ptr()) };
    // SAFETY: zero-initialized, and filled by `dladdr` when it succeeded.
    let info = unsafe { info.assume_init() };
    if found == 0 || info.dli_fname.is_null() {
        return "the CUDA driver library".into();
    }
    // SAFETY: `dli_fname` is a NUL-terminated string the loader owns for as
    // long as the library stays loaded (cudarc never unloads it).
    unsafe { CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned()
}

/// The driver's description of `code`, or a note why there is none.
pub(crate) fn error_string(code: CUresult) -> String {
    if !SYMBOLS_PRESENT.load(Ordering::Acquire) {
        return "the driver was not asked: it is not loaded".into();
    }
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the symbol exists (SYMBOLS_PRESENT); the out-pointer is a
    // live local.
    let result = unsafe { sys::cuGetErrorString(code, &mut text) };
    if result != CUresult::CUDA_SUCCESS || text.is_null() {
        return "the driver has no description for it".into();
    }
    // SAFETY: the driver returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// Runs `f`, turning a panic inside it (cudarc panics where a library or
/// symbol is missing) into [`CudaError::Panicked`]: a CUDA failure never
/// takes the trainer down.
pub(crate) fn guarded<T>(call: &'static str, f: impl FnOnce() -> T) -> Result<T, CudaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        tracing::error!(call, %message, "the CUDA bindings panicked");
        CudaError::Panicked { call, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every driver function the backend's sources call is in `SYMBOLS`,
    /// so the probe checks it before cudarc could panic on its absence.
    #[test]
    fn every_driver_call_of_the_backend_is_probed() {
        let sources = [
            include_str!("mod.rs"),
            include_str!("driver.rs"),
            include_str!("context.rs"),
            include_str!("buffer.rs"),
            include_str!("pinned.rs"),
            include_str!("device.rs"),
            include_str!("ticket.rs"),
            include_str!("memory.rs"),
        ];
        let mut called = std::collections::BTreeSet::new();
        for source in sources {
            let mut rest = source;
            while let Some(at) = rest.find("sys::cu") {
                let name: String = rest[at + "sys::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `cu` then a capital: a driver function (not `culib`).
                if name.chars().nth(2).is_some_and(|c| c.is_ascii_uppercase()) {
                    called.insert(name);
                }
                rest = &rest[at + 1..];
            }
        }
        assert!(called.len() > 10, "found only {called:?}");
        let missing: Vec<&String> = called
            .iter()
            .filter(|name| !SYMBOLS.contains(&name.as_str()))
            .collect();
        assert!(missing.is_empty(), "called but not probed: {missing:?}");
    }

    #[test]
    fn a_panic_inside_is_an_error_naming_the_call() {
        let caught = guarded("cuTest", || -> u32 { panic!("Missing symbol cuTest") });
        assert_eq!(
            caught,
            Err(CudaError::Panicked {
                call: "cuTest",
                message: "Missing symbol cuTest".into()
            })
        );
        assert_eq!(guarded("cuTest", || 7), Ok(7));
    }
}

//! Initialization and devices: `cuInit`, `cuDriverGetVersion`, `cuDevice*`.

use std::ffi::{c_char, c_int, c_uint};

use cudarc::driver::sys::{CUdevice, CUdevice_attribute as A, CUresult, CUuuid};

use super::{entry, entry_uninit};
use crate::config;
use crate::driver::{self, Driver};
use crate::ffi::put;

/// The name every device of the double reports.
pub const DEVICE_NAME: &str = "gpusnap CUDA driver double";
const UUID_PREFIX: &[u8; 12] = b"gpusnap-dbl-";

/// The device index of ordinal `dev`, or `CUDA_ERROR_INVALID_DEVICE`.
pub fn device_index(d: &Driver, dev: CUdevice) -> Result<usize, CUresult> {
    usize::try_from(dev)
        .ok()
        .filter(|i| *i < d.config.devices)
        .ok_or(CUresult::CUDA_ERROR_INVALID_DEVICE)
}

/// The value of attribute `attrib` (its raw number) for a device of the
/// double; `None` if the number is not a `CUdevice_attribute` (they are
/// contiguous from 1 to `CU_DEVICE_ATTRIBUTE_MAX - 1` in the cuda-13000 bindings).
pub fn attribute(attrib: u32, ordinal: c_int) -> Option<c_int> {
    if attrib == 0 || attrib >= A::CU_DEVICE_ATTRIBUTE_MAX as u32 {
        return None;
    }
    let is = |a: A| attrib == a as u32;
    Some(if is(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) {
        9
    } else if is(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) {
        132
    } else if is(A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT) {
        2
    } else if is(A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)
        || is(A::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM)
        || is(A::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED)
        || is(A::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED)
    {
        1
    } else if is(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID) || is(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID) {
        ordinal
    } else {
        // Compute capability minor 0, memory pools and virtual memory
        // management unsupported, and every other attribute 0.
        0
    })
}

/// `cuInit`: flags must be 0. With no devices configured it fails with
/// `CUDA_ERROR_NO_DEVICE`, as the real driver does.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    entry_uninit("cuInit", |_| {
        if flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        driver::init().map(|_| ())
    })
}

/// `cuDriverGetVersion`: 13000 unless `GPUSNAP_CUDA_DOUBLE_DRIVER_VERSION`
/// says otherwise; works before `cuInit`.
///
/// # Safety
/// `driver_version` must be null or valid for a write of an `int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(driver_version: *mut c_int) -> CUresult {
    entry_uninit("cuDriverGetVersion", |_| {
        let c = config::config()?;
        // SAFETY: null is refused; otherwise valid by the caller's contract.
        unsafe { put(driver_version, c.driver_version) }
    })
}

/// `cuDeviceGetCount`.
///
/// # Safety
/// `count` must be null or valid for a write of an `int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    entry("cuDeviceGetCount", |d, _| {
        let n = c_int::try_from(d.config.devices).map_err(|_| CUresult::CUDA_ERROR_UNKNOWN)?;
        // SAFETY: null is refused; otherwise valid by the caller's contract.
        unsafe { put(count, n) }
    })
}

/// `cuDeviceGet`: the device of an ordinal (the same number).
///
/// # Safety
/// `device` must be null or valid for a write of a `CUdevice`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    entry("cuDeviceGet", |d, _| {
        crate::ffi::non_null(device)?;
        device_index(d, ordinal)?;
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(device, ordinal) }
    })
}

/// `cuDeviceGetAttribute`: compute capability 9.0, unified addressing,
/// host registration (and read-only registration) supported, host pointers
/// usable for registered memory, 2 copy engines, 132 multiprocessors, PCI
/// bus and device id equal to the ordinal; memory pools and virtual memory
/// management unsupported; every other attribute 0.
///
/// # Safety
/// `pi` must be null or valid for a write of an `int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: u32,
    dev: CUdevice,
) -> CUresult {
    entry("cuDeviceGetAttribute", |d, _| {
        crate::ffi::non_null(pi)?;
        device_index(d, dev)?;
        let v = attribute(attrib, dev).ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(pi, v) }
    })
}

/// `cuDeviceGetName`: writes at most `len - 1` bytes of the name and a NUL.
///
/// # Safety
/// `name` must be null or valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetName", |d, _| {
        crate::ffi::non_null(name)?;
        let ordinal = device_index(d, dev)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l > 0)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let full = format!("{DEVICE_NAME} {ordinal}");
        let n = full.len().min(len - 1);
        // SAFETY: `name` is valid for `len` bytes by the caller's contract and
        // `n + 1 <= len`; the source is a live String.
        unsafe {
            std::ptr::copy_nonoverlapping(full.as_ptr().cast::<c_char>(), name, n);
            name.add(n).write(0);
        }
        Ok(())
    })
}

/// `cuDeviceTotalMem_v2`: the configured device memory size.
///
/// # Safety
/// `bytes` must be null or valid for a write of a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    entry("cuDeviceTotalMem_v2", |d, _| {
        crate::ffi::non_null(bytes)?;
        device_index(d, dev)?;
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(bytes, d.config.memory_bytes) }
    })
}

/// The stable 16-byte UUID of a device ordinal: `gpusnap-dbl-` and the
/// ordinal as 4 big-endian bytes.
pub fn uuid_bytes(ordinal: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..12].copy_from_slice(UUID_PREFIX);
    b[12..].copy_from_slice(&ordinal.to_be_bytes());
    b
}

/// `cuDeviceGetUuid_v2`.
///
/// # Safety
/// `uuid` must be null or valid for a write of a `CUuuid`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetUuid_v2", |d, _| {
        crate::ffi::non_null(uuid)?;
        let ordinal = device_index(d, dev)?;
        let raw =
            uuid_bytes(u32::try_from(ordinal).map_err(|_| CUresult::CUDA_ERROR_INVALID_DEVICE)?);
        let bytes = raw.map(|b| c_char::from_ne_bytes([b]));
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(uuid, CUuuid { bytes }) }
    })
}

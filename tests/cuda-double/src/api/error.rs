//! `cuGetErrorName` and `cuGetErrorString`: static NUL-terminated strings
//! for every `CUresult`; work before `cuInit`.

use std::ffi::c_char;

use cudarc::driver::sys::CUresult;

use super::entry_uninit;
use crate::errors;
use crate::ffi::put;

fn describe(
    error: u32,
    out: *mut *const c_char,
    pick: fn(&errors::ErrorEntry) -> *const c_char,
) -> Result<(), CUresult> {
    let Some(code) = errors::from_raw(error) else {
        if !out.is_null() {
            // SAFETY: non-null; valid by the caller's contract.
            unsafe { put(out, std::ptr::null())? };
        }
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    };
    // SAFETY: null is refused; otherwise valid by the caller's contract.
    unsafe { put(out, pick(errors::entry(code))) }
}

/// `cuGetErrorName`: e.g. `CUDA_ERROR_INVALID_VALUE`. A number outside the
/// enum is `CUDA_ERROR_INVALID_VALUE` with `*pStr = NULL`.
///
/// # Safety
/// `pStr` must be null or valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: u32, pStr: *mut *const c_char) -> CUresult {
    entry_uninit("cuGetErrorName", |_| {
        describe(error, pStr, |e| e.name.as_ptr())
    })
}

/// `cuGetErrorString`: e.g. `invalid argument`. A number outside the enum is
/// `CUDA_ERROR_INVALID_VALUE` with `*pStr = NULL`.
///
/// # Safety
/// `pStr` must be null or valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: u32, pStr: *mut *const c_char) -> CUresult {
    entry_uninit("cuGetErrorString", |_| {
        describe(error, pStr, |e| e.description.as_ptr())
    })
}

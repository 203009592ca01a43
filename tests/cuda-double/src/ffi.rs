//! Small helpers at the C boundary: out-pointers, handles as pointers,
//! numbers the C side passes.

use std::ffi::{CStr, c_char};

use cudarc::driver::sys::CUresult;

/// Writes `value` through the caller's out-pointer; a null one is
/// `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// `out` must be null or valid for a write of a `T` (it need not be aligned).
pub unsafe fn put<T>(out: *mut T, value: T) -> Result<(), CUresult> {
    if out.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: non-null, and valid for the write by the caller's contract.
    unsafe { out.write_unaligned(value) };
    Ok(())
}

/// Refuses a null out-pointer before any work is done.
pub fn non_null<T>(out: *mut T) -> Result<(), CUresult> {
    if out.is_null() {
        Err(CUresult::CUDA_ERROR_INVALID_VALUE)
    } else {
        Ok(())
    }
}

/// A handle value as the opaque pointer type the C API uses.
pub fn as_handle<T>(handle: usize) -> *mut T {
    std::ptr::without_provenance_mut(handle)
}

/// A C string argument, if it is non-null and UTF-8.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string that stays valid for `'a`.
pub unsafe fn str_arg<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// A device pointer (`CUdeviceptr`) as an address; on a 64-bit build every
/// value fits.
pub fn addr(dptr: u64) -> Result<usize, CUresult> {
    usize::try_from(dptr).map_err(|_| CUresult::CUDA_ERROR_INVALID_VALUE)
}

/// An address as a `CUdeviceptr`.
pub fn dptr(addr: usize) -> u64 {
    const _: () = assert!(
        usize::BITS <= u64::BITS,
        "the double assumes a 64-bit build"
    );
    u64::try_from(addr).unwrap_or(u64::MAX)
}

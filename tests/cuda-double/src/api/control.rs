//! The control API for tests, found by `dlsym` on the loaded library (or
//! called from Python with ctypes). None of these is a driver function: they
//! are not counted and work before `cuInit`.

use std::ffi::{c_char, c_int};

use cudarc::driver::sys::CUresult;

use crate::config::FaultRule;
use crate::control::control;
use crate::driver;
use crate::ffi::str_arg;
use crate::{errors, functions};

/// Sets the delay each stream operation waits before it runs, in microseconds.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleSetOpDelayUs(us: u64) {
    control().set_op_delay_us(us);
}

/// Installs a fault: the `nth` call (1-based, from now) of the driver
/// function `name` returns `code`; with `asynchronous` non-zero the call
/// succeeds and its stream operation fails when it runs, breaking the
/// context. `CUDA_ERROR_INVALID_VALUE` for a name the double does not
/// export, `nth` 0, a `code` outside the enum or `CUDA_SUCCESS`, or
/// `asynchronous` on a function that enqueues nothing.
///
/// # Safety
/// `name` must be null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleInjectFault(
    name: *const c_char,
    nth: u64,
    code: u32,
    asynchronous: c_int,
) -> CUresult {
    // SAFETY: null or NUL-terminated by the caller's contract; used only
    // during this call.
    let Some(function) = unsafe { str_arg(name) }.and_then(functions::lookup) else {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    };
    let Some(code) = errors::from_raw(code).filter(|c| *c != CUresult::CUDA_SUCCESS) else {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    };
    let asynchronous = asynchronous != 0;
    if nth == 0 || (asynchronous && !functions::is_enqueuing(function)) {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    control().install(FaultRule {
        function,
        nth,
        code,
        asynchronous,
    });
    CUresult::CUDA_SUCCESS
}

/// Removes every fault rule not yet fired (the environment's too).
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleClearFaults() {
    control().clear_faults();
}

/// Clears the fault rules and every context's sticky error. Test use only:
/// a real driver has no way back from a sticky error but a context reset.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleReset() {
    control().clear_faults();
    if let Ok(d) = driver::driver() {
        let st = d.lock();
        for c in &st.contexts {
            if let Some(ctx) = &c.active {
                ctx.clear_sticky();
            }
        }
    }
}

/// How many violations have been recorded (uses the real driver would
/// punish: a registered range unmapped before unregistering, a copy into one).
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleViolationCount() -> u64 {
    control().violation_count()
}

/// Copies violation `index`'s message into `buf` (at most `len - 1` bytes and
/// a NUL) and returns the message's full length in bytes; 0 for an index out
/// of range. `buf` may be null when `len` is 0, to ask for the length.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleViolationMessage(
    index: u64,
    buf: *mut c_char,
    len: usize,
) -> usize {
    let message = control().violation_message(index).unwrap_or_default();
    if !buf.is_null() && len > 0 {
        let n = message.len().min(len - 1);
        // SAFETY: `buf` is valid for `len` bytes by the caller's contract
        // and `n + 1 <= len`; the source is a live String.
        unsafe {
            std::ptr::copy_nonoverlapping(message.as_ptr().cast::<c_char>(), buf, n);
            buf.add(n).write(0);
        }
    }
    message.len()
}

/// Host bytes page-locked now (registered and allocated).
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleRegisteredBytes() -> u64 {
    driver::driver().map_or(0, |d| d.lock().host.locked_bytes())
}

/// How many times the driver function `name` has been called (0 for a null
/// or unknown name).
///
/// # Safety
/// `name` must be null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleCallCount(name: *const c_char) -> u64 {
    // SAFETY: null or NUL-terminated by the caller's contract.
    unsafe { str_arg(name) }.map_or(0, |n| control().call_count(n))
}

/// 1: this library is the double, not a real driver.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpusnapDoubleIsDouble() -> c_int {
    1
}

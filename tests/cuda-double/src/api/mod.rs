//! The exported functions, under their ABI names, grouped as the driver
//! API's documentation groups them.
//!
//! Every exported driver function goes through [`entry`] (or
//! [`entry_uninit`] for the few that work before `cuInit`): the call is
//! counted, an injected fault fires, a call from inside a host function is
//! refused, a panic of the double becomes `CUDA_ERROR_UNKNOWN` instead of
//! unwinding into C. Enum-typed parameters (`CUdevice_attribute`,
//! `CUpointer_attribute`, `CUstreamCaptureMode`, `CUresult`) are taken as
//! their `u32` representation, the same ABI (the enums are `repr(u32)`), so a
//! value outside the enum is an error rather than undefined behaviour; only
//! values of the enum are ever returned.

#[expect(non_snake_case, reason = "parameter names as in the driver's header")]
pub mod capture;
pub mod context;
pub mod control;
#[expect(non_snake_case, reason = "parameter names as in the driver's header")]
pub mod copy;
pub mod device;
#[expect(non_snake_case, reason = "parameter names as in the driver's header")]
pub mod error;
#[expect(non_snake_case, reason = "parameter names as in the driver's header")]
pub mod event;
#[expect(non_snake_case, reason = "parameter names as in the driver's header")]
pub mod host;
#[expect(non_snake_case, reason = "parameter names as in the driver's header")]
pub mod memory;
#[expect(non_snake_case, reason = "parameter names as in the driver's header")]
pub mod pointer;
#[expect(non_snake_case, reason = "parameter names as in the driver's header")]
pub mod stream;

use std::panic::AssertUnwindSafe;

use cudarc::driver::sys::CUresult;

use crate::control::control;
use crate::driver::{self, Driver};
use crate::{errors, functions, stream as streams};

const _: () = {
    use cudarc::driver::sys as s;
    assert!(size_of::<s::CUdevice_attribute>() == size_of::<u32>());
    assert!(size_of::<s::CUpointer_attribute>() == size_of::<u32>());
    assert!(size_of::<s::CUstreamCaptureMode>() == size_of::<u32>());
    assert!(size_of::<s::CUresult>() == size_of::<u32>());
};

/// An `@async` fault that fired on this call: the operation it enqueues
/// fails when it runs.
pub type AsyncFault = Option<CUresult>;

/// The common prologue of a driver function that needs `cuInit`.
pub fn entry(
    name: &'static str,
    body: impl FnOnce(&'static Driver, AsyncFault) -> Result<(), CUresult>,
) -> CUresult {
    entry_uninit(name, |fault| body(driver::driver()?, fault))
}

/// The prologue of a driver function that works before `cuInit`.
pub fn entry_uninit(
    name: &'static str,
    body: impl FnOnce(AsyncFault) -> Result<(), CUresult>,
) -> CUresult {
    debug_assert!(
        functions::lookup(name).is_some(),
        "{name} is missing from functions::EXPORTED"
    );
    let count = control().count(name);
    if streams::in_host_fn() {
        return CUresult::CUDA_ERROR_NOT_PERMITTED;
    }
    let injected = control().fire(name, count);
    let mut fault = None;
    if let Some(inj) = injected {
        if !inj.asynchronous {
            if errors::is_sticky(inj.code) {
                break_current_context(inj.code);
            }
            return inj.code;
        }
        fault = Some(inj.code);
    }
    match std::panic::catch_unwind(AssertUnwindSafe(|| body(fault))) {
        Ok(Ok(())) => CUresult::CUDA_SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => {
            control().violation(format!("{name}: the double panicked"));
            CUresult::CUDA_ERROR_UNKNOWN
        }
    }
}

/// A synchronously injected sticky error breaks the calling thread's
/// current context.
fn break_current_context(code: CUresult) {
    if let Ok(d) = driver::driver()
        && let Ok(ctx) = d.lock().current_ctx_unchecked()
    {
        ctx.break_with(code);
    }
}

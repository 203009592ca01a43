//! Contexts: the primary context of each device and the thread's current
//! context.

use std::ffi::{c_int, c_uint};
use std::sync::Arc;

use cudarc::driver::sys::{CUcontext, CUdevice, CUresult};

use super::device::device_index;
use super::entry;
use crate::completion::wait_all;
use crate::context::{self, CtxShared};
use crate::driver::{Driver, State};
use crate::ffi::{as_handle, non_null, put};
use crate::host::HostKind;

/// `cuDevicePrimaryCtxRetain`: one primary context per device, with a stable
/// handle, reference counted.
///
/// # Safety
/// `pctx` must be null or valid for a write of a `CUcontext`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRetain", |d, _| {
        non_null(pctx)?;
        let device = device_index(d, dev)?;
        let mut st = d.lock();
        let pc = &mut st.contexts[device];
        pc.refcount = pc
            .refcount
            .checked_add(1)
            .ok_or(CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
        if pc.active.is_none() {
            pc.active = Some(Arc::new(CtxShared::new(pc.handle, device)));
        }
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(pctx, as_handle(pc.handle)) }
    })
}

/// `cuDevicePrimaryCtxRelease_v2`: when the count reaches zero the context is
/// reset once its pending work has run: its streams, events and graphs
/// become invalid handles, its device allocations are freed, its host
/// registrations end and its host allocations are unmapped, and its sticky
/// error is gone. A release without a retain is `CUDA_ERROR_INVALID_CONTEXT`.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRelease_v2", |d, _| {
        let device = device_index(d, dev)?;
        let pending = {
            let mut st = d.lock();
            let pc = &mut st.contexts[device];
            pc.refcount = pc
                .refcount
                .checked_sub(1)
                .ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)?;
            if pc.refcount > 0 {
                return Ok(());
            }
            st.pending_work(device)
        };
        wait_all(&pending);
        let mut st = d.lock();
        if st.contexts[device].refcount == 0 {
            reset(d, &mut st, device);
        }
        Ok(())
    })
}

/// Tears down `device`'s primary context.
fn reset(d: &Driver, st: &mut State, device: usize) {
    let pc = &mut st.contexts[device];
    let handle = pc.handle;
    pc.active = None;
    pc.legacy = None;
    pc.per_thread.clear();
    pc.retired.clear();
    st.streams.retain(|_, s| s.ctx.device != device);
    st.events.retain(|_, e| e.ctx.device != device);
    st.graphs.retain(|_, g| g.ctx_handle != handle);
    st.captures.active.retain(|_, c| c.ctx.device != device);
    for a in st.allocators[device].free_all() {
        d.spaces[device].release(a.offset, a.reserved);
    }
    for r in st.host.remove_context(handle) {
        if r.kind == HostKind::Allocated {
            // SAFETY: the double mapped this range in cuMemHostAlloc and owns
            // it; destroying the context frees it, as the driver does. This
            // context's pending work has run, so none of its copies uses it.
            unsafe { libc::munmap(std::ptr::with_exposed_provenance_mut(r.start), r.len) };
        }
    }
}

/// `cuDevicePrimaryCtxGetState`: flags 0, active while retained.
///
/// # Safety
/// `flags` and `active` must be null or valid for writes of their types.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    entry("cuDevicePrimaryCtxGetState", |d, _| {
        non_null(flags)?;
        non_null(active)?;
        let device = device_index(d, dev)?;
        let is_active = d.lock().contexts[device].refcount > 0;
        // SAFETY: both non-null; valid by the caller's contract.
        unsafe {
            put(flags, 0)?;
            put(active, c_int::from(is_active))
        }
    })
}

/// `cuCtxGetCurrent`: null when the thread has none.
///
/// # Safety
/// `pctx` must be null or valid for a write of a `CUcontext`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    entry("cuCtxGetCurrent", |_, _| {
        let current = context::current().unwrap_or(0);
        // SAFETY: null is refused; otherwise valid by the caller's contract.
        unsafe { put(pctx, as_handle(current)) }
    })
}

fn known_context(d: &Driver, ctx: CUcontext) -> Result<usize, CUresult> {
    let handle = ctx.addr();
    d.lock()
        .context_by_handle(handle)
        .map(|c| c.handle)
        .ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)
}

/// `cuCtxSetCurrent`: replaces the top of the thread's context stack; null
/// pops it.
///
/// # Safety
/// None beyond the C ABI (the handle is only compared).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    entry("cuCtxSetCurrent", |d, _| {
        if ctx.is_null() {
            context::set_current(None);
        } else {
            context::set_current(Some(known_context(d, ctx)?));
        }
        Ok(())
    })
}

/// `cuCtxPushCurrent_v2`.
///
/// # Safety
/// None beyond the C ABI (the handle is only compared).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    entry("cuCtxPushCurrent_v2", |d, _| {
        if ctx.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        context::push(known_context(d, ctx)?);
        Ok(())
    })
}

/// `cuCtxPopCurrent_v2`: `pctx` may be null; an empty stack is
/// `CUDA_ERROR_INVALID_CONTEXT`.
///
/// # Safety
/// `pctx` must be null or valid for a write of a `CUcontext`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    entry("cuCtxPopCurrent_v2", |_, _| {
        let popped = context::pop().ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)?;
        if !pctx.is_null() {
            // SAFETY: non-null; valid by the caller's contract.
            unsafe { put(pctx, as_handle(popped))? };
        }
        Ok(())
    })
}

/// `cuCtxGetDevice`.
///
/// # Safety
/// `device` must be null or valid for a write of a `CUdevice`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    entry("cuCtxGetDevice", |d, _| {
        non_null(device)?;
        let ctx = d.lock().current_ctx()?;
        let ordinal = CUdevice::try_from(ctx.device).map_err(|_| CUresult::CUDA_ERROR_UNKNOWN)?;
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(device, ordinal) }
    })
}

/// `cuCtxSynchronize`: waits for every stream of the current context, then
/// reports its sticky error if it broke. Refused while one of its streams
/// captures, or while a capture forbids this thread unsafe calls.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    entry("cuCtxSynchronize", |d, _| {
        let (ctx, pending) = {
            let mut st = d.lock();
            let ctx = st.current_ctx()?;
            let capturing: Vec<_> = st
                .context_streams(ctx.device)
                .iter()
                .filter_map(|(_, s)| s.capture)
                .collect();
            if !capturing.is_empty() {
                st.captures.invalidate(&capturing);
                return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
            }
            st.captures.check_unsafe_call()?;
            let pending = st.pending_work(ctx.device);
            (ctx, pending)
        };
        wait_all(&pending);
        ctx.check()
    })
}

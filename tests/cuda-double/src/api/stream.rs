//! Streams: creation, destruction, synchronization, waits, host functions.

use std::ffi::{c_int, c_uint, c_void};

use cudarc::driver::sys::{CUcontext, CUevent, CUgreenCtx, CUhostFn, CUresult, CUstream};

use super::entry;
use crate::driver::Driver;
use crate::event::Recorded;
use crate::ffi::{as_handle, non_null, put};
use crate::stream::{self, Enqueued, StreamEntry, StreamKey, Work};

/// `CU_STREAM_NON_BLOCKING`.
pub const NON_BLOCKING: u32 = 0x1;
/// `CU_EVENT_WAIT_EXTERNAL`.
const WAIT_EXTERNAL: u32 = 0x1;

fn create(d: &Driver, ph: *mut CUstream, flags: u32, priority: i32) -> Result<(), CUresult> {
    non_null(ph)?;
    if flags & !NON_BLOCKING != 0 {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let mut st = d.lock();
    let ctx = st.current_ctx()?;
    let handle = st.new_handle();
    let entry = StreamEntry::new(handle, ctx, flags, priority, flags & NON_BLOCKING == 0)?;
    st.streams.insert(handle, entry);
    // SAFETY: non-null; valid by the caller's contract.
    unsafe { put(ph, as_handle(handle)) }
}

/// `cuStreamCreate`: `CU_STREAM_DEFAULT` (0) makes a blocking stream, which
/// synchronizes with the legacy stream; `CU_STREAM_NON_BLOCKING` (1) one
/// that does not. Each stream is a worker thread.
///
/// # Safety
/// `phStream` must be null or valid for a write of a `CUstream`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(phStream: *mut CUstream, Flags: c_uint) -> CUresult {
    entry("cuStreamCreate", |d, _| create(d, phStream, Flags, 0))
}

/// `cuStreamCreateWithPriority`: the priority is kept, not acted on.
///
/// # Safety
/// `phStream` must be null or valid for a write of a `CUstream`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    phStream: *mut CUstream,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    entry("cuStreamCreateWithPriority", |d, _| {
        create(d, phStream, flags, priority)
    })
}

/// `cuStreamDestroy_v2`: returns at once; work already enqueued still runs
/// (and the legacy stream still waits for it). The handle is dead at once.
/// The stream's default and per-thread handles cannot be destroyed.
///
/// # Safety
/// None beyond the C ABI (the handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(hStream: CUstream) -> CUresult {
    entry("cuStreamDestroy_v2", |d, _| {
        let mut st = d.lock();
        let handle = hStream.addr();
        let s = st
            .streams
            .remove(&handle)
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        if let Some(id) = s.capture {
            let origin = st.captures.active.get(&id).map(|c| c.origin);
            if origin == Some(StreamKey::Created { handle }) {
                // Nobody can end this capture any more: it ends here, so it
                // forbids no further calls.
                let (members, _) = st.captures.end(id);
                for m in members {
                    if let Some(other) = st.stream_mut(&m) {
                        other.capture = None;
                    }
                }
            } else {
                st.captures.invalidate(&[id]);
            }
        }
        if let (true, Some(last)) = (s.blocking, s.last.clone())
            && !last.is_done()
        {
            st.contexts[s.ctx.device].retired.push(last);
        }
        s.ctx.check()
    })
}

/// `cuStreamSynchronize`: waits for the stream's work, then reports the
/// context's sticky error if it broke. A capturing stream is
/// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` (and its capture invalidated).
///
/// # Safety
/// None beyond the C ABI (the handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(hStream: CUstream) -> CUresult {
    entry("cuStreamSynchronize", |d, _| {
        let (ctx, last) = {
            let mut st = d.lock();
            let (key, ctx) = st.resolve_stream(hStream.addr())?;
            refuse_capturing(&mut st, &key)?;
            st.captures.check_unsafe_call()?;
            (ctx, st.stream(&key).and_then(|s| s.last.clone()))
        };
        if let Some(c) = last {
            c.wait();
        }
        ctx.check()
    })
}

fn refuse_capturing(st: &mut crate::driver::State, key: &StreamKey) -> Result<(), CUresult> {
    if let Some(id) = st.stream(key).and_then(|s| s.capture) {
        st.captures.invalidate(&[id]);
        return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    }
    Ok(())
}

/// `cuStreamQuery`: `CUDA_SUCCESS` once everything enqueued has run,
/// `CUDA_ERROR_NOT_READY` before; capture rules as `cuStreamSynchronize`.
///
/// # Safety
/// None beyond the C ABI (the handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery(hStream: CUstream) -> CUresult {
    entry("cuStreamQuery", |d, _| {
        let mut st = d.lock();
        let (key, ctx) = st.resolve_stream(hStream.addr())?;
        refuse_capturing(&mut st, &key)?;
        st.captures.check_unsafe_call()?;
        let idle = st.stream(&key).is_none_or(|s| s.is_idle());
        ctx.check()?;
        if idle {
            Ok(())
        } else {
            Err(CUresult::CUDA_ERROR_NOT_READY)
        }
    })
}

/// `cuStreamWaitEvent`: later work on the stream waits for the work the
/// event captured at its last record (a later record does not change this
/// wait). An event never recorded: no-op. During capture: a captured event
/// joins the waiting stream to its capture (fork/join); a capturing stream
/// waiting on uncaptured work is `CUDA_ERROR_STREAM_CAPTURE_ISOLATION` unless
/// `CU_EVENT_WAIT_EXTERNAL`; events of another capture
/// `CUDA_ERROR_STREAM_CAPTURE_MERGE`; the legacy stream cannot join a capture
/// (`CUDA_ERROR_STREAM_CAPTURE_ISOLATION`). The event may belong to another context.
///
/// # Safety
/// None beyond the C ABI (the handles are only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamWaitEvent(
    hStream: CUstream,
    hEvent: CUevent,
    Flags: c_uint,
) -> CUresult {
    entry("cuStreamWaitEvent", |d, fault| {
        if Flags & !WAIT_EXTERNAL != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let mut st = d.lock();
        let (key, _) = st.resolve_stream(hStream.addr())?;
        let recorded = st
            .events
            .get(&hEvent.addr())
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?
            .recorded
            .clone();
        let capture = st.stream(&key).and_then(|s| s.capture);
        match (recorded, capture) {
            (Recorded::Never, _) => Ok(()),
            (Recorded::Captured { capture: c, clock }, Some(mine)) if c == mine => {
                st.captures.merge(c, key, &clock);
                Ok(())
            }
            (Recorded::Captured { capture: c, .. }, Some(mine)) => {
                st.captures.invalidate(&[c, mine]);
                Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_MERGE)
            }
            (Recorded::Captured { capture: c, clock }, None) => {
                if key.is_legacy() || !st.captures.active.contains_key(&c) {
                    return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_ISOLATION);
                }
                if let Some(s) = st.stream_mut(&key) {
                    s.capture = Some(c);
                }
                st.captures.merge(c, key, &clock);
                Ok(())
            }
            (Recorded::Work(_), Some(mine)) => {
                if Flags & WAIT_EXTERNAL != 0 {
                    st.captures.record_op(mine, key)
                } else {
                    st.captures.invalidate(&[mine]);
                    Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_ISOLATION)
                }
            }
            (Recorded::Work(c), None) => stream::enqueue(
                &mut st,
                key,
                Work::Marker,
                vec![c],
                fault,
                "cuStreamWaitEvent",
            )
            .map(|_| ()),
        }
    })
}

/// `cuStreamGetCtx`: the stream's context (the current one for the legacy
/// and per-thread handles).
///
/// # Safety
/// `pctx` must be null or valid for a write of a `CUcontext`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetCtx(hStream: CUstream, pctx: *mut CUcontext) -> CUresult {
    entry("cuStreamGetCtx", |d, _| {
        non_null(pctx)?;
        let (_, ctx) = d.lock().resolve_stream(hStream.addr())?;
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(pctx, as_handle(ctx.handle)) }
    })
}

/// `cuStreamGetCtx_v2`: the context, and no green context.
///
/// # Safety
/// `pCtx` and `pGreenCtx` must be null or valid for writes of their types.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetCtx_v2(
    hStream: CUstream,
    pCtx: *mut CUcontext,
    pGreenCtx: *mut CUgreenCtx,
) -> CUresult {
    entry("cuStreamGetCtx_v2", |d, _| {
        non_null(pCtx)?;
        non_null(pGreenCtx)?;
        let (_, ctx) = d.lock().resolve_stream(hStream.addr())?;
        // SAFETY: both non-null; valid by the caller's contract.
        unsafe {
            put(pCtx, as_handle(ctx.handle))?;
            put(pGreenCtx, std::ptr::null_mut())
        }
    })
}

/// `cuStreamGetFlags`: the creation flags (0 for the legacy and per-thread
/// streams).
///
/// # Safety
/// `flags` must be null or valid for a write of an `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetFlags(hStream: CUstream, flags: *mut c_uint) -> CUresult {
    entry("cuStreamGetFlags", |d, _| {
        non_null(flags)?;
        let mut st = d.lock();
        let (key, _) = st.resolve_stream(hStream.addr())?;
        let f = st.stream(&key).map_or(0, |s| s.flags);
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(flags, f) }
    })
}

/// `cuLaunchHostFunc`: runs `fn_(userData)` on the stream's worker, in
/// order. CUDA calls from inside it are `CUDA_ERROR_NOT_PERMITTED`.
///
/// # Safety
/// `fn_` must be callable once, from another thread, with `userData`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchHostFunc(
    hStream: CUstream,
    fn_: CUhostFn,
    userData: *mut c_void,
) -> CUresult {
    entry("cuLaunchHostFunc", |d, fault| {
        let func = fn_.ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let mut st = d.lock();
        let (key, _) = st.resolve_stream(hStream.addr())?;
        let work = Work::HostFn {
            func,
            data: userData.expose_provenance(),
        };
        match stream::enqueue(&mut st, key, work, Vec::new(), fault, "cuLaunchHostFunc")? {
            Enqueued::Queued(_) | Enqueued::Captured => Ok(()),
        }
    })
}

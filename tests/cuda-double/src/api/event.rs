//! Events: create, record, query, synchronize, destroy, elapsed time.

use std::ffi::c_uint;

use cudarc::driver::sys::{CUevent, CUresult, CUstream};

use super::{AsyncFault, entry};
use crate::driver::Driver;
use crate::event::{DISABLE_TIMING, EventEntry, FLAGS_KNOWN, INTERPROCESS, Recorded};
use crate::ffi::{as_handle, non_null, put};
use crate::stream::{self, Enqueued, Work};

/// `CU_EVENT_RECORD_EXTERNAL`.
const RECORD_EXTERNAL: u32 = 0x1;

/// `cuEventCreate`: flags DEFAULT, BLOCKING_SYNC, DISABLE_TIMING and
/// INTERPROCESS (which requires DISABLE_TIMING, as documented).
///
/// # Safety
/// `phEvent` must be null or valid for a write of a `CUevent`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(phEvent: *mut CUevent, Flags: c_uint) -> CUresult {
    entry("cuEventCreate", |d, _| {
        non_null(phEvent)?;
        if Flags & !FLAGS_KNOWN != 0 || (Flags & INTERPROCESS != 0 && Flags & DISABLE_TIMING == 0) {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let mut st = d.lock();
        let ctx = st.current_ctx()?;
        let handle = st.new_handle();
        st.events.insert(
            handle,
            EventEntry {
                ctx,
                flags: Flags,
                recorded: Recorded::Never,
            },
        );
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(phEvent, as_handle(handle)) }
    })
}

fn record(
    d: &Driver,
    event: usize,
    stream_raw: usize,
    fault: AsyncFault,
    label: &'static str,
) -> Result<(), CUresult> {
    let mut st = d.lock();
    let (key, ctx) = st.resolve_stream(stream_raw)?;
    let e = st
        .events
        .get(&event)
        .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    if e.ctx.handle != ctx.handle || e.ctx.device != ctx.device {
        return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
    }
    let recorded = match st.stream(&key).and_then(|s| s.capture) {
        Some(c) => {
            if st.captures.active.get(&c).is_none_or(|cap| cap.invalidated) {
                return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
            }
            Recorded::Captured {
                capture: c,
                clock: st.captures.clock(c, key),
            }
        }
        None => match stream::enqueue(&mut st, key, Work::Marker, Vec::new(), fault, label)? {
            Enqueued::Queued(c) => Recorded::Work(c),
            Enqueued::Captured => return Err(CUresult::CUDA_ERROR_UNKNOWN),
        },
    };
    if let Some(e) = st.events.get_mut(&event) {
        e.recorded = recorded;
    }
    Ok(())
}

/// `cuEventRecord`: captures the stream's work so far (for the legacy
/// stream, with its implicit synchronization); a later record replaces what
/// later queries and waits see, not earlier waits. The event and stream must
/// share a context (`CUDA_ERROR_INVALID_HANDLE`).
///
/// # Safety
/// None beyond the C ABI (the handles are only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(hEvent: CUevent, hStream: CUstream) -> CUresult {
    entry("cuEventRecord", |d, fault| {
        record(d, hEvent.addr(), hStream.addr(), fault, "cuEventRecord")
    })
}

/// `cuEventRecordWithFlags`: flags `CU_EVENT_RECORD_DEFAULT` or
/// `CU_EVENT_RECORD_EXTERNAL` (treated alike).
///
/// # Safety
/// None beyond the C ABI (the handles are only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecordWithFlags(
    hEvent: CUevent,
    hStream: CUstream,
    flags: c_uint,
) -> CUresult {
    entry("cuEventRecordWithFlags", |d, fault| {
        if flags & !RECORD_EXTERNAL != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        record(
            d,
            hEvent.addr(),
            hStream.addr(),
            fault,
            "cuEventRecordWithFlags",
        )
    })
}

/// What a query or synchronize of `event` must wait for, after the checks
/// common to both.
fn recorded_work(
    d: &Driver,
    event: usize,
) -> Result<(std::sync::Arc<crate::context::CtxShared>, Recorded), CUresult> {
    let mut st = d.lock();
    let e = st
        .events
        .get(&event)
        .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    let (ctx, recorded) = (std::sync::Arc::clone(&e.ctx), e.recorded.clone());
    ctx.check()?;
    st.captures.check_unsafe_call()?;
    if matches!(recorded, Recorded::Captured { .. }) {
        return Err(CUresult::CUDA_ERROR_CAPTURED_EVENT);
    }
    Ok((ctx, recorded))
}

/// `cuEventQuery`: `CUDA_SUCCESS` when the recorded work has run or the
/// event was never recorded, `CUDA_ERROR_NOT_READY` before; the sticky error
/// of a broken context; `CUDA_ERROR_CAPTURED_EVENT` for an event recorded in
/// a capture.
///
/// # Safety
/// None beyond the C ABI (the handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventQuery(hEvent: CUevent) -> CUresult {
    entry("cuEventQuery", |d, _| {
        let (ctx, recorded) = recorded_work(d, hEvent.addr())?;
        match recorded {
            Recorded::Work(c) if !c.is_done() => Err(CUresult::CUDA_ERROR_NOT_READY),
            _ => ctx.check(),
        }
    })
}

/// `cuEventSynchronize`: waits for the recorded work.
///
/// # Safety
/// None beyond the C ABI (the handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventSynchronize(hEvent: CUevent) -> CUresult {
    entry("cuEventSynchronize", |d, _| {
        let (ctx, recorded) = recorded_work(d, hEvent.addr())?;
        if let Recorded::Work(c) = recorded {
            c.wait();
        }
        ctx.check()
    })
}

/// `cuEventDestroy_v2`: allowed while the recorded work is pending (it
/// still runs); the handle is dead at once.
///
/// # Safety
/// None beyond the C ABI (the handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(hEvent: CUevent) -> CUresult {
    entry("cuEventDestroy_v2", |d, _| {
        let e = d
            .lock()
            .events
            .remove(&hEvent.addr())
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        e.ctx.check()
    })
}

/// `cuEventElapsedTime_v2`: milliseconds between the two events' recorded
/// work completing. Either event with DISABLE_TIMING, or never recorded:
/// `CUDA_ERROR_INVALID_HANDLE`; not complete: `CUDA_ERROR_NOT_READY`.
///
/// # Safety
/// `pMilliseconds` must be null or valid for a write of a `float`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    pMilliseconds: *mut f32,
    hStart: CUevent,
    hEnd: CUevent,
) -> CUresult {
    entry("cuEventElapsedTime_v2", |d, _| {
        non_null(pMilliseconds)?;
        let (start, end) = {
            let st = d.lock();
            let get = |h: CUevent| {
                st.events
                    .get(&h.addr())
                    .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
            };
            let (s, e) = (get(hStart)?, get(hEnd)?);
            if !s.timing() || !e.timing() {
                return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
            }
            s.ctx.check()?;
            e.ctx.check()?;
            (s.recorded.clone(), e.recorded.clone())
        };
        let at = |r: Recorded| match r {
            Recorded::Never => Err(CUresult::CUDA_ERROR_INVALID_HANDLE),
            Recorded::Captured { .. } => Err(CUresult::CUDA_ERROR_CAPTURED_EVENT),
            Recorded::Work(c) => c.peek().map(|o| o.at).ok_or(CUresult::CUDA_ERROR_NOT_READY),
        };
        let (s, e) = (at(start)?, at(end)?);
        let ms = if e >= s {
            (e - s).as_secs_f32() * 1000.0
        } else {
            -((s - e).as_secs_f32() * 1000.0)
        };
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(pMilliseconds, ms) }
    })
}

//! Stream capture and graphs.

use cudarc::driver::sys::{CUgraph, CUresult, CUstream, CUstreamCaptureStatus as Status};

use super::entry;
use crate::capture::{GraphEntry, Mode};
use crate::ffi::{as_handle, non_null, put};

/// `cuStreamBeginCapture_v2`: the legacy stream cannot capture
/// (`CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`); a stream already capturing is
/// `CUDA_ERROR_ILLEGAL_STATE`; an unknown mode `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// None beyond the C ABI (the handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(hStream: CUstream, mode: u32) -> CUresult {
    entry("cuStreamBeginCapture_v2", |d, _| {
        let mode = Mode::from_raw(mode).ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let mut st = d.lock();
        let (key, ctx) = st.resolve_stream(hStream.addr())?;
        if key.is_legacy() {
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        }
        if st.stream(&key).and_then(|s| s.capture).is_some() {
            return Err(CUresult::CUDA_ERROR_ILLEGAL_STATE);
        }
        let id = st
            .captures
            .begin(key, mode, std::thread::current().id(), ctx);
        if let Some(s) = st.stream_mut(&key) {
            s.capture = Some(id);
        }
        Ok(())
    })
}

/// `cuStreamIsCapturing`: NONE, ACTIVE or INVALIDATED. Asked of the legacy
/// stream while a blocking stream of its context captures, it is
/// `CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`, as documented.
///
/// # Safety
/// `captureStatus` must be null or valid for a write of a `CUstreamCaptureStatus`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamIsCapturing(
    hStream: CUstream,
    captureStatus: *mut Status,
) -> CUresult {
    entry("cuStreamIsCapturing", |d, _| {
        non_null(captureStatus)?;
        let mut st = d.lock();
        let (key, ctx) = st.resolve_stream(hStream.addr())?;
        if key.is_legacy() && st.blocking_streams(ctx.device).any(|s| s.capture.is_some()) {
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT);
        }
        let status = match st.stream(&key).and_then(|s| s.capture) {
            None => Status::CU_STREAM_CAPTURE_STATUS_NONE,
            Some(id) if st.captures.active.get(&id).is_some_and(|c| !c.invalidated) => {
                Status::CU_STREAM_CAPTURE_STATUS_ACTIVE
            }
            Some(_) => Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED,
        };
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(captureStatus, status) }
    })
}

/// `cuStreamEndCapture`: ends the capture begun on this stream and returns
/// its graph. Not capturing: `CUDA_ERROR_ILLEGAL_STATE`; a stream that joined
/// the capture but did not begin it: `CUDA_ERROR_STREAM_CAPTURE_UNMATCHED`;
/// another thread ending a non-relaxed capture:
/// `CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD`; an invalidated capture:
/// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`; a member stream whose work is not
/// joined back: `CUDA_ERROR_STREAM_CAPTURE_UNJOINED`. On an error after the
/// capture ends, `*phGraph` is null.
///
/// # Safety
/// `phGraph` must be null or valid for a write of a `CUgraph`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamEndCapture(hStream: CUstream, phGraph: *mut CUgraph) -> CUresult {
    entry("cuStreamEndCapture", |d, _| {
        non_null(phGraph)?;
        let mut st = d.lock();
        let (key, ctx) = st.resolve_stream_unchecked(hStream.addr())?;
        let id = st
            .stream(&key)
            .and_then(|s| s.capture)
            .ok_or(CUresult::CUDA_ERROR_ILLEGAL_STATE)?;
        let c = st
            .captures
            .active
            .get(&id)
            .ok_or(CUresult::CUDA_ERROR_ILLEGAL_STATE)?;
        if c.origin != key {
            st.captures.invalidate(&[id]);
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNMATCHED);
        }
        if c.mode != Mode::Relaxed && c.thread != std::thread::current().id() {
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD);
        }
        let (members, result) = st.captures.end(id);
        for m in members {
            if let Some(s) = st.stream_mut(&m)
                && s.capture == Some(id)
            {
                s.capture = None;
            }
        }
        let graph = match result {
            Ok(nodes) => {
                let handle = st.new_handle();
                st.graphs.insert(
                    handle,
                    GraphEntry {
                        ctx_handle: ctx.handle,
                        nodes,
                    },
                );
                handle
            }
            Err(_) => 0,
        };
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(phGraph, as_handle(graph))? };
        result.map(|_| ())?;
        ctx.check()
    })
}

/// `cuGraphDestroy`.
///
/// # Safety
/// None beyond the C ABI (the handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphDestroy(hGraph: CUgraph) -> CUresult {
    entry("cuGraphDestroy", |d, _| {
        d.lock()
            .graphs
            .remove(&hGraph.addr())
            .map(|_| ())
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
    })
}

//! Copies between host and device memory, synchronous and asynchronous.
//!
//! What the driver documents, kept here:
//! * device ranges must lie inside one live allocation of the stream's
//!   device, checked at call time;
//! * asynchronous copies run on the stream's worker, so their host side is
//!   read or written when the operation runs, not at the call;
//! * a host side outside page-locked memory is pageable: device-to-host
//!   returns only once the copy completed; host-to-device copies the bytes to
//!   staging memory at the call and returns (the transfer runs later, in
//!   stream order); a capturing stream refuses pageable memory;
//! * the synchronous copies run on the legacy stream (waiting for prior
//!   legacy and blocking-stream work): device-to-host and pinned host-to-device
//!   return when done, pageable host-to-device synchronizes the stream first
//!   and returns once staged, device-to-device does not wait.

use std::ffi::c_void;

use cudarc::driver::sys::{CUdeviceptr, CUresult, CUstream};

use super::{AsyncFault, entry};
use crate::completion::Completion;
use crate::driver::{Driver, State};
use crate::ffi::addr;
use crate::stream::{self, Enqueued, Source, StreamKey, Work};

#[derive(Debug, Clone, Copy)]
enum Direction {
    DtoH {
        dst_host: usize,
        src_dev: CUdeviceptr,
    },
    HtoD {
        dst_dev: CUdeviceptr,
        src_host: usize,
    },
    DtoD {
        dst_dev: CUdeviceptr,
        src_dev: CUdeviceptr,
    },
}

/// One copy call's arguments.
#[derive(Debug, Clone, Copy)]
struct CopyCall {
    label: &'static str,
    stream: usize,
    dir: Direction,
    len: usize,
    fault: AsyncFault,
    /// The synchronous API (`cuMemcpyDtoH_v2` and its kin).
    synchronous: bool,
}

/// Whether the call returns before the operation ran (`Some(c)`: wait for it).
type Wait = Option<std::sync::Arc<Completion>>;

fn host_side(d: &Driver, st: &mut State, host: usize, n: usize) -> Result<bool, CUresult> {
    if n == 0 {
        return Ok(true);
    }
    if host == 0 || d.overlaps_device_memory(host, n) {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    Ok(st.host.containing(host, n).is_some())
}

fn refuse_pageable_in_capture(st: &mut State, key: &StreamKey) -> Result<(), CUresult> {
    if let Some(id) = st.stream(key).and_then(|s| s.capture) {
        st.captures.invalidate(&[id]);
        return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    }
    Ok(())
}

fn note_pending(st: &mut State, host: usize, n: usize, enq: &Enqueued) {
    if let (Enqueued::Queued(c), Some(r)) = (enq, st.host.containing(host, n)) {
        r.pending.retain(|p| !p.is_done());
        r.pending.push(std::sync::Arc::clone(c));
    }
}

fn queued(enq: Enqueued) -> Wait {
    match enq {
        Enqueued::Queued(c) => Some(c),
        Enqueued::Captured => None,
    }
}

/// Validates and enqueues one copy; returns what the call must wait for.
fn enqueue_copy(d: &'static Driver, st: &mut State, call: &CopyCall) -> Result<Wait, CUresult> {
    let CopyCall {
        label,
        stream: stream_raw,
        dir,
        len: n,
        fault,
        synchronous,
    } = *call;
    let (key, ctx) = st.resolve_stream(stream_raw)?;
    let device = ctx.device;
    match dir {
        Direction::DtoH { dst_host, src_dev } => {
            let (_, src) = st.device_range(d, device, addr(src_dev)?, n)?;
            let locked = host_side(d, st, dst_host, n)?;
            if !locked {
                refuse_pageable_in_capture(st, &key)?;
            }
            let work = Work::Copy {
                dst: dst_host,
                src: Source::Addr(src),
                len: n,
                locked_host: (locked && n > 0).then_some((dst_host, n)),
            };
            let enq = stream::enqueue(st, key, work, Vec::new(), fault, label)?;
            note_pending(st, dst_host, n, &enq);
            let done = queued(enq);
            Ok(if synchronous || !locked { done } else { None })
        }
        Direction::HtoD { dst_dev, src_host } => {
            let (_, dst) = st.device_range(d, device, addr(dst_dev)?, n)?;
            let locked = host_side(d, st, src_host, n)?;
            let src = if locked {
                Source::Addr(src_host)
            } else {
                refuse_pageable_in_capture(st, &key)?;
                // SAFETY: the caller passes `n` readable bytes at `src_host`
                // (non-null, checked above), valid for the call's duration.
                let bytes = unsafe {
                    std::slice::from_raw_parts(std::ptr::with_exposed_provenance::<u8>(src_host), n)
                };
                Source::Staged(bytes.to_vec())
            };
            let work = Work::Copy {
                dst,
                src,
                len: n,
                locked_host: (locked && n > 0).then_some((src_host, n)),
            };
            let enq = stream::enqueue(st, key, work, Vec::new(), fault, label)?;
            note_pending(st, src_host, n, &enq);
            let done = queued(enq);
            Ok(if synchronous && locked { done } else { None })
        }
        Direction::DtoD { dst_dev, src_dev } => {
            let (_, dst) = st.device_range(d, device, addr(dst_dev)?, n)?;
            let (_, src) = st.device_range(d, device, addr(src_dev)?, n)?;
            let work = Work::Copy {
                dst,
                src: Source::Addr(src),
                len: n,
                locked_host: None,
            };
            stream::enqueue(st, key, work, Vec::new(), fault, label)?;
            Ok(None)
        }
    }
}

fn copy(d: &'static Driver, call: CopyCall) -> Result<(), CUresult> {
    if call.synchronous
        && let Direction::HtoD { src_host, .. } = call.dir
    {
        // Pageable host-to-device: "a stream sync is performed before the
        // copy is initiated".
        let marker = {
            let mut st = d.lock();
            if host_side(d, &mut st, src_host, call.len)? {
                None
            } else {
                let (key, _) = st.resolve_stream(call.stream)?;
                queued(stream::enqueue(
                    &mut st,
                    key,
                    Work::Marker,
                    Vec::new(),
                    None,
                    call.label,
                )?)
            }
        };
        if let Some(m) = marker {
            m.wait().result?;
        }
    }
    let wait = {
        let mut st = d.lock();
        enqueue_copy(d, &mut st, &call)?
    };
    match wait {
        Some(c) => c.wait().result,
        None => Ok(()),
    }
}

/// `cuMemcpyDtoH_v2`: on the legacy stream; returns when the copy is done.
///
/// # Safety
/// `dstHost` must be valid for writes of `ByteCount` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dstHost: *mut c_void,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    let dir = Direction::DtoH {
        dst_host: dstHost.expose_provenance(),
        src_dev: srcDevice,
    };
    entry("cuMemcpyDtoH_v2", |d, fault| {
        copy(
            d,
            CopyCall {
                label: "cuMemcpyDtoH_v2",
                stream: 0,
                dir,
                len: ByteCount,
                fault,
                synchronous: true,
            },
        )
    })
}

/// `cuMemcpyHtoD_v2`: on the legacy stream; see the module doc for when it
/// returns.
///
/// # Safety
/// `srcHost` must be valid for reads of `ByteCount` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dstDevice: CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
) -> CUresult {
    let dir = Direction::HtoD {
        dst_dev: dstDevice,
        src_host: srcHost.expose_provenance(),
    };
    entry("cuMemcpyHtoD_v2", |d, fault| {
        copy(
            d,
            CopyCall {
                label: "cuMemcpyHtoD_v2",
                stream: 0,
                dir,
                len: ByteCount,
                fault,
                synchronous: true,
            },
        )
    })
}

/// `cuMemcpyDtoD_v2`: on the legacy stream; returns without waiting.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(
    dstDevice: CUdeviceptr,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    let dir = Direction::DtoD {
        dst_dev: dstDevice,
        src_dev: srcDevice,
    };
    entry("cuMemcpyDtoD_v2", |d, fault| {
        copy(
            d,
            CopyCall {
                label: "cuMemcpyDtoD_v2",
                stream: 0,
                dir,
                len: ByteCount,
                fault,
                synchronous: true,
            },
        )
    })
}

/// `cuMemcpyDtoHAsync_v2`.
///
/// # Safety
/// `dstHost` must be valid for writes of `ByteCount` bytes until the copy
/// completes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dstHost: *mut c_void,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    let dir = Direction::DtoH {
        dst_host: dstHost.expose_provenance(),
        src_dev: srcDevice,
    };
    entry("cuMemcpyDtoHAsync_v2", |d, fault| {
        copy(
            d,
            CopyCall {
                label: "cuMemcpyDtoHAsync_v2",
                stream: hStream.addr(),
                dir,
                len: ByteCount,
                fault,
                synchronous: false,
            },
        )
    })
}

/// `cuMemcpyHtoDAsync_v2`.
///
/// # Safety
/// `srcHost` must be valid for reads of `ByteCount` bytes until the copy
/// completes (pageable memory: for the call).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dstDevice: CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    let dir = Direction::HtoD {
        dst_dev: dstDevice,
        src_host: srcHost.expose_provenance(),
    };
    entry("cuMemcpyHtoDAsync_v2", |d, fault| {
        copy(
            d,
            CopyCall {
                label: "cuMemcpyHtoDAsync_v2",
                stream: hStream.addr(),
                dir,
                len: ByteCount,
                fault,
                synchronous: false,
            },
        )
    })
}

/// `cuMemcpyDtoDAsync_v2`.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dstDevice: CUdeviceptr,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    let dir = Direction::DtoD {
        dst_dev: dstDevice,
        src_dev: srcDevice,
    };
    entry("cuMemcpyDtoDAsync_v2", |d, fault| {
        copy(
            d,
            CopyCall {
                label: "cuMemcpyDtoDAsync_v2",
                stream: hStream.addr(),
                dir,
                len: ByteCount,
                fault,
                synchronous: false,
            },
        )
    })
}

//! Device memory: allocation, free, queries, memset.

use std::ffi::c_uchar;

use cudarc::driver::sys::{CUdeviceptr, CUresult, CUstream};

use super::{AsyncFault, entry};
use crate::completion::wait_all;
use crate::driver::Driver;
use crate::ffi::{addr, dptr, non_null, put};
use crate::stream::{self, Work};

/// `cuMemAlloc_v2`: first fit in the current context's device, 512-byte
/// aligned; fresh memory reads back as the poison byte 0xA5. Size 0 is
/// `CUDA_ERROR_INVALID_VALUE`, a full device `CUDA_ERROR_OUT_OF_MEMORY`.
///
/// # Safety
/// `dptr_out` must be null or valid for a write of a `CUdeviceptr`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr_out: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    entry("cuMemAlloc_v2", |d, _| {
        non_null(dptr_out)?;
        let (device, a) = {
            let mut st = d.lock();
            let ctx = st.current_ctx()?;
            st.captures.check_unsafe_call()?;
            let id = st.new_buffer_id();
            (
                ctx.device,
                st.allocators[ctx.device].allocate(bytesize, id)?,
            )
        };
        // Nobody knows the new address yet, so the poison is written unlocked.
        d.spaces[device].poison(a.offset, a.reserved);
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(dptr_out, dptr(d.spaces[device].base() + a.offset)) }
    })
}

/// `cuMemFree_v2`: the pointer must be an allocation's start. Like the
/// driver's it synchronizes: the device's pending work runs first. The pages
/// go back to the kernel; a later allocation there reads as poison again.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr_in: CUdeviceptr) -> CUresult {
    entry("cuMemFree_v2", |d, _| {
        let at = addr(dptr_in)?;
        let (device, offset) = d.locate(at).ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let (ctx, pending) = {
            let mut st = d.lock();
            let ctx = st.current_ctx()?;
            st.captures.check_unsafe_call()?;
            if st.allocators[device]
                .containing(offset)
                .is_none_or(|a| a.offset != offset)
            {
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
            (ctx, st.pending_work(device))
        };
        wait_all(&pending);
        let a = d.lock().allocators[device]
            .free(offset)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        d.spaces[device].release(a.offset, a.reserved);
        ctx.check()
    })
}

/// `cuMemGetInfo_v2`: free and total bytes of the current context's device.
///
/// # Safety
/// `free` and `total` must be null or valid for writes of a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    entry("cuMemGetInfo_v2", |d, _| {
        non_null(free)?;
        non_null(total)?;
        let st = d.lock();
        let ctx = st.current_ctx()?;
        let size = d.config.memory_bytes;
        let used = st.allocators[ctx.device].used();
        // SAFETY: both non-null; valid by the caller's contract.
        unsafe {
            put(free, size - used)?;
            put(total, size)
        }
    })
}

/// `cuMemGetAddressRange_v2`: the allocation containing `dptr`; either
/// out-pointer may be null; outside every allocation `CUDA_ERROR_NOT_FOUND`.
///
/// # Safety
/// `pbase` and `psize` must each be null or valid for a write of its type.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    pbase: *mut CUdeviceptr,
    psize: *mut usize,
    dptr_in: CUdeviceptr,
) -> CUresult {
    entry("cuMemGetAddressRange_v2", |d, _| {
        let st = d.lock();
        st.current_ctx()?;
        let (device, offset) = addr(dptr_in)
            .ok()
            .and_then(|a| d.locate(a))
            .ok_or(CUresult::CUDA_ERROR_NOT_FOUND)?;
        let a = st.allocators[device]
            .containing(offset)
            .ok_or(CUresult::CUDA_ERROR_NOT_FOUND)?;
        if !pbase.is_null() {
            // SAFETY: non-null; valid by the caller's contract.
            unsafe { put(pbase, dptr(d.spaces[device].base() + a.offset))? };
        }
        if !psize.is_null() {
            // SAFETY: non-null; valid by the caller's contract.
            unsafe { put(psize, a.size)? };
        }
        Ok(())
    })
}

/// Enqueues a fill of `[dst, dst + n)` on `stream` after validating the range.
fn memset(
    d: &'static Driver,
    label: &'static str,
    stream_raw: usize,
    dst: CUdeviceptr,
    value: u8,
    n: usize,
    fault: AsyncFault,
) -> Result<(), CUresult> {
    let mut st = d.lock();
    let (key, ctx) = st.resolve_stream(stream_raw)?;
    let (_, alias) = st.device_range(d, ctx.device, addr(dst)?, n)?;
    stream::enqueue(
        &mut st,
        key,
        Work::Fill {
            dst: alias,
            value,
            len: n,
        },
        Vec::new(),
        fault,
        label,
    )?;
    Ok(())
}

/// `cuMemsetD8_v2`: on the legacy stream of the current context, and, as
/// the driver documents for device memory, asynchronous with respect to the host.
///
/// # Safety
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8_v2(dstDevice: CUdeviceptr, uc: c_uchar, N: usize) -> CUresult {
    entry("cuMemsetD8_v2", |d, fault| {
        memset(d, "cuMemsetD8_v2", 0, dstDevice, uc, N, fault)
    })
}

/// `cuMemsetD8Async`.
///
/// # Safety
/// None beyond the C ABI (the stream handle is only looked up).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8Async(
    dstDevice: CUdeviceptr,
    uc: c_uchar,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemsetD8Async", |d, fault| {
        memset(
            d,
            "cuMemsetD8Async",
            hStream.addr(),
            dstDevice,
            uc,
            N,
            fault,
        )
    })
}

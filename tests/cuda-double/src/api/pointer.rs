//! Pointer queries: `cuPointerGetAttribute(s)`.
//!
//! The value types written are the driver's: `CUcontext`, `unsigned int`
//! (memory type, and the booleans `IS_MANAGED` and `MAPPED`), `CUdeviceptr`,
//! `void *`, `unsigned long long` (buffer id), `int` (device ordinal),
//! `size_t` (range size).

use std::ffi::{c_int, c_uint, c_void};

use cudarc::driver::sys::{
    CUcontext, CUdeviceptr, CUmemorytype, CUpointer_attribute as P, CUresult,
};

use super::entry;
use crate::driver::{Driver, State};
use crate::ffi::{addr, as_handle, dptr, put};

/// What the double knows about an address.
#[derive(Debug, Clone, Copy)]
enum Known {
    Device {
        ctx: usize,
        device: usize,
        start: usize,
        size: usize,
        id: u64,
    },
    Host {
        ctx: usize,
        device: usize,
        start: usize,
        size: usize,
    },
}

fn lookup(d: &Driver, st: &mut State, at: usize) -> Option<Known> {
    if let Some((device, offset)) = d.locate(at) {
        let a = st.allocators[device].containing(offset)?;
        return Some(Known::Device {
            ctx: st.contexts[device].handle,
            device,
            start: d.spaces[device].base() + a.offset,
            size: a.size,
            id: a.id,
        });
    }
    let r = st.host.containing(at, 0)?;
    Some(Known::Host {
        ctx: r.ctx.handle,
        device: r.ctx.device,
        start: r.start,
        size: r.len,
    })
}

/// Whether `raw` is a `CUpointer_attribute` of the cuda-13000 bindings (1 to 21).
fn is_attribute(raw: u32) -> bool {
    (1..=P::CU_POINTER_ATTRIBUTE_IS_HW_DECOMPRESS_CAPABLE as u32).contains(&raw)
}

/// Writes attribute `raw` of `known` (or the documented null value for
/// unknown memory, when `known` is `None`) to `data`.
///
/// # Safety
/// `data` must be valid for a write of the attribute's value type.
unsafe fn write_attribute(
    data: *mut c_void,
    raw: u32,
    at: usize,
    known: Option<Known>,
) -> Result<(), CUresult> {
    let is = |a: P| raw == a as u32;
    let (ctx, device, start, size, memory_type) = match known {
        Some(Known::Device {
            ctx,
            device,
            start,
            size,
            ..
        }) => (
            ctx,
            device,
            start,
            size,
            CUmemorytype::CU_MEMORYTYPE_DEVICE as c_uint,
        ),
        Some(Known::Host {
            ctx,
            device,
            start,
            size,
        }) => (
            ctx,
            device,
            start,
            size,
            CUmemorytype::CU_MEMORYTYPE_HOST as c_uint,
        ),
        None => (0, 0, 0, 0, 0),
    };
    let ordinal = c_int::try_from(device).map_err(|_| CUresult::CUDA_ERROR_UNKNOWN)?;
    // SAFETY: every write below goes to `data`, which is valid for a write
    // of the attribute's value type by the caller's contract.
    unsafe {
        if is(P::CU_POINTER_ATTRIBUTE_CONTEXT) {
            put(data.cast::<CUcontext>(), as_handle(ctx))
        } else if is(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE) {
            put(data.cast::<c_uint>(), memory_type)
        } else if is(P::CU_POINTER_ATTRIBUTE_DEVICE_POINTER) {
            put(
                data.cast::<CUdeviceptr>(),
                if known.is_some() { dptr(at) } else { 0 },
            )
        } else if is(P::CU_POINTER_ATTRIBUTE_HOST_POINTER) {
            let host = if matches!(known, Some(Known::Host { .. })) {
                at
            } else {
                0
            };
            put(
                data.cast::<*mut c_void>(),
                std::ptr::with_exposed_provenance_mut(host),
            )
        } else if is(P::CU_POINTER_ATTRIBUTE_BUFFER_ID) {
            let id = if let Some(Known::Device { id, .. }) = known {
                id
            } else {
                0
            };
            put(data.cast::<u64>(), id)
        } else if is(P::CU_POINTER_ATTRIBUTE_IS_MANAGED) {
            put(data.cast::<c_uint>(), 0)
        } else if is(P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL) {
            put(data.cast::<c_int>(), ordinal)
        } else if is(P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR) {
            put(data.cast::<CUdeviceptr>(), dptr(start))
        } else if is(P::CU_POINTER_ATTRIBUTE_RANGE_SIZE) {
            put(data.cast::<usize>(), size)
        } else if is(P::CU_POINTER_ATTRIBUTE_MAPPED) {
            put(data.cast::<c_uint>(), c_uint::from(known.is_some()))
        } else {
            Err(CUresult::CUDA_ERROR_NOT_SUPPORTED)
        }
    }
}

/// `cuPointerGetAttribute`: supports CONTEXT, MEMORY_TYPE (DEVICE for
/// allocations, HOST for page-locked memory), DEVICE_POINTER, HOST_POINTER
/// (`CUDA_ERROR_INVALID_VALUE` for device memory), BUFFER_ID, IS_MANAGED (0),
/// DEVICE_ORDINAL, RANGE_START_ADDR, RANGE_SIZE and MAPPED (1); other
/// attributes of the enum are `CUDA_ERROR_NOT_SUPPORTED`, numbers outside it
/// and memory the double does not know `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// `data` must be null or valid for a write of the attribute's value type.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    attribute: u32,
    ptr: CUdeviceptr,
) -> CUresult {
    entry("cuPointerGetAttribute", |d, _| {
        if data.is_null() || !is_attribute(attribute) {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let at = addr(ptr)?;
        let known = lookup(d, &mut d.lock(), at).ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        if matches!(known, Known::Device { .. })
            && attribute == P::CU_POINTER_ATTRIBUTE_HOST_POINTER as u32
        {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: `data` is non-null and valid by the caller's contract.
        unsafe { write_attribute(data, attribute, at, Some(known)) }
    })
}

/// `cuPointerGetAttributes`: the same attributes; unlike
/// `cuPointerGetAttribute` unknown memory is no error: its attributes read
/// as null (memory type 0, context null, pointers and sizes 0, MAPPED 0), as
/// documented, and HOST_POINTER of device memory reads as null.
///
/// # Safety
/// `attributes` must hold `numAttributes` values and `data` as many pointers,
/// each null or valid for a write of its attribute's value type.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuPointerGetAttributes(
    numAttributes: c_uint,
    attributes: *const u32,
    data: *mut *mut c_void,
    ptr: CUdeviceptr,
) -> CUresult {
    entry("cuPointerGetAttributes", |d, _| {
        let n = usize::try_from(numAttributes).map_err(|_| CUresult::CUDA_ERROR_INVALID_VALUE)?;
        if n == 0 || attributes.is_null() || data.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: both arrays hold `n` entries by the caller's contract.
        let (attrs, outs) = unsafe {
            (
                std::slice::from_raw_parts(attributes, n),
                std::slice::from_raw_parts(data, n),
            )
        };
        if attrs.iter().any(|a| !is_attribute(*a)) || outs.iter().any(|o| o.is_null()) {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let at = addr(ptr)?;
        let known = lookup(d, &mut d.lock(), at);
        for (a, out) in attrs.iter().zip(outs) {
            // SAFETY: each output is non-null and valid for its attribute's
            // value type by the caller's contract.
            unsafe { write_attribute(*out, *a, at, known)? };
        }
        Ok(())
    })
}

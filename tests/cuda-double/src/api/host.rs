//! Page-locked host memory: registration of the caller's memory, and the
//! double's own page-locked allocations.

use std::ffi::{c_uint, c_void};
use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUresult};

use super::entry;
use crate::completion::wait_all;
use crate::control::control;
use crate::driver::Driver;
use crate::ffi::{dptr, non_null, put};
use crate::host::{self, HostKind, HostRange, PAGE_BYTES};

/// `CU_MEMHOSTREGISTER_PORTABLE | DEVICEMAP | IOMEMORY | READ_ONLY`.
const REGISTER_FLAGS: u32 = 0x1 | 0x2 | 0x4 | 0x8;
/// `CU_MEMHOSTALLOC_PORTABLE | DEVICEMAP | WRITECOMBINED`.
const ALLOC_FLAGS: u32 = 0x1 | 0x2 | 0x4;

/// `cuMemHostRegister_v2`. Refused: unknown flags, a null pointer, size 0,
/// a pointer or size not page-aligned, device memory, a range not wholly
/// mapped (`CUDA_ERROR_INVALID_VALUE`); more than the configured maximum in
/// one call (`CUDA_ERROR_OUT_OF_MEMORY`); a range overlapping page-locked
/// memory (`CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED`).
///
/// # Safety
/// `p` is only inspected, never dereferenced, at the call; the caller must
/// keep the range mapped until it unregisters it (the double records a
/// violation otherwise).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostRegister_v2(
    p: *mut c_void,
    bytesize: usize,
    Flags: c_uint,
) -> CUresult {
    let start = p.expose_provenance();
    entry("cuMemHostRegister_v2", |d, _| {
        let mut st = d.lock();
        let ctx = st.current_ctx()?;
        if Flags & !REGISTER_FLAGS != 0
            || start == 0
            || bytesize == 0
            || !start.is_multiple_of(PAGE_BYTES)
            || !bytesize.is_multiple_of(PAGE_BYTES)
            || start.checked_add(bytesize).is_none()
        {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if u64::try_from(bytesize).unwrap_or(u64::MAX) > d.config.host_register_max_bytes {
            return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        }
        if d.overlaps_device_memory(start, bytesize) || !host::is_mapped(start, bytesize) {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if st.host.overlaps(start, bytesize) {
            return Err(CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
        }
        st.host.insert(HostRange {
            start,
            len: bytesize,
            flags: Flags,
            kind: HostKind::Registered,
            ctx,
            pending: Vec::new(),
        });
        Ok(())
    })
}

/// Ends a page-locked range: records the violations the real driver would
/// punish later, and waits for the copies still using it.
fn retire(label: &str, r: &HostRange) {
    if r.kind == HostKind::Registered && !host::is_mapped(r.start, r.len) {
        control().violation(format!(
            "{label}({:#x}): the registered range {:#x}..{:#x} was unmapped before it was unregistered",
            r.start,
            r.start,
            r.end()
        ));
    }
    let pending: Vec<_> = r.pending.iter().filter(|c| !c.is_done()).cloned().collect();
    if !pending.is_empty() {
        control().violation(format!(
            "{label}({:#x}): {} asynchronous copies using the range were still pending",
            r.start,
            pending.len()
        ));
        wait_all(&pending);
    }
}

/// `cuMemHostUnregister`: `p` must be the base of a registration
/// (`CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED` otherwise). A range unmapped
/// before this call, or still used by a pending copy, is a violation; it is
/// unregistered all the same.
///
/// # Safety
/// `p` is only compared, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostUnregister(p: *mut c_void) -> CUresult {
    let start = p.expose_provenance();
    entry("cuMemHostUnregister", |d, _| {
        let r = {
            let mut st = d.lock();
            st.current_ctx()?;
            if st
                .host
                .at(start)
                .is_none_or(|r| r.kind != HostKind::Registered)
            {
                return Err(CUresult::CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED);
            }
            st.host
                .remove(start)
                .ok_or(CUresult::CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED)?
        };
        retire("cuMemHostUnregister", &r);
        Ok(())
    })
}

fn host_alloc(
    d: &Driver,
    pp: *mut *mut c_void,
    bytesize: usize,
    flags: u32,
) -> Result<(), CUresult> {
    non_null(pp)?;
    let mut st = d.lock();
    let ctx = st.current_ctx()?;
    if flags & !ALLOC_FLAGS != 0 || bytesize == 0 {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let len = bytesize
        .checked_next_multiple_of(PAGE_BYTES)
        .ok_or(CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    st.host.insert(HostRange {
        start: p.expose_provenance(),
        len,
        flags,
        kind: HostKind::Allocated,
        ctx: Arc::clone(&ctx),
        pending: Vec::new(),
    });
    // SAFETY: non-null; valid by the caller's contract.
    unsafe { put(pp, p) }
}

/// `cuMemHostAlloc`: page-locked, page-aligned memory (flags PORTABLE,
/// DEVICEMAP, WRITECOMBINED); size 0 is `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// `pp` must be null or valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytesize: usize,
    Flags: c_uint,
) -> CUresult {
    entry("cuMemHostAlloc", |d, _| host_alloc(d, pp, bytesize, Flags))
}

/// `cuMemAllocHost_v2`: `cuMemHostAlloc` with no flags.
///
/// # Safety
/// `pp` must be null or valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    entry("cuMemAllocHost_v2", |d, _| host_alloc(d, pp, bytesize, 0))
}

/// `cuMemFreeHost`: `p` must be the start of a `cuMemHostAlloc` allocation
/// (`CUDA_ERROR_INVALID_VALUE` otherwise); copies still using it are waited
/// for (and recorded as a violation) before it is unmapped.
///
/// # Safety
/// After the call the memory is unmapped: the caller must not use it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    let start = p.expose_provenance();
    entry("cuMemFreeHost", |d, _| {
        let r = {
            let mut st = d.lock();
            if st
                .host
                .at(start)
                .is_none_or(|r| r.kind != HostKind::Allocated)
            {
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
            st.host
                .remove(start)
                .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?
        };
        retire("cuMemFreeHost", &r);
        // SAFETY: the double mapped this range in cuMemHostAlloc and no copy
        // uses it any more (waited for above); the caller gives it up.
        unsafe { libc::munmap(p, r.len) };
        Ok(())
    })
}

/// `cuMemHostGetDevicePointer_v2`: with unified addressing the device
/// pointer of page-locked memory is its host address. Flags must be 0; memory
/// that is not page-locked is `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// `pdptr` must be null or valid for a write of a `CUdeviceptr`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostGetDevicePointer_v2(
    pdptr: *mut CUdeviceptr,
    p: *mut c_void,
    Flags: c_uint,
) -> CUresult {
    let at = p.expose_provenance();
    entry("cuMemHostGetDevicePointer_v2", |d, _| {
        non_null(pdptr)?;
        let mut st = d.lock();
        st.current_ctx()?;
        if Flags != 0 || st.host.containing(at, 0).is_none() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: non-null; valid by the caller's contract.
        unsafe { put(pdptr, dptr(at)) }
    })
}

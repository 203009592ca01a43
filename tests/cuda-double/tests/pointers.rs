//! Pointer attributes of device memory, page-locked host memory and memory
//! the double does not know. The tests look at addresses after freeing
//! them, which a concurrent test could be given: they take the file's lock.

#[macro_use]
mod common;

use std::ffi::{c_int, c_uint, c_void};

use common::*;
use cudarc::driver::sys::{CUmemorytype as M, CUpointer_attribute as P};

fn get<T: Copy>(attr: P, ptr: CUdeviceptr, init: T) -> Result<T, CUresult> {
    let mut v = init;
    // SAFETY: `v` is a value of the attribute's type.
    match unsafe { dbl::cuPointerGetAttribute((&raw mut v).cast(), attr as u32, ptr) } {
        CUresult::CUDA_SUCCESS => Ok(v),
        e => Err(e),
    }
}

fn host_addr<T>(p: *const T) -> CUdeviceptr {
    dbl::ffi::dptr(p.expose_provenance())
}

#[test]
fn device_allocations() {
    let _serial = serial();
    let ctx = Ctx::enter(0);
    let a = alloc(1000);
    let b = alloc(10);
    let inner = a + 999;
    assert_eq!(
        get(
            P::CU_POINTER_ATTRIBUTE_CONTEXT,
            inner,
            std::ptr::null_mut::<c_void>()
        ),
        Ok(ctx.handle.cast())
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, inner, 0 as c_uint),
        Ok(M::CU_MEMORYTYPE_DEVICE as c_uint)
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_DEVICE_POINTER, inner, 0u64),
        Ok(inner)
    );
    assert_eq!(
        get(
            P::CU_POINTER_ATTRIBUTE_HOST_POINTER,
            inner,
            std::ptr::null_mut::<c_void>()
        ),
        Err(CUresult::CUDA_ERROR_INVALID_VALUE)
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, inner, -1 as c_int),
        Ok(0)
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, inner, 0u64),
        Ok(a)
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_RANGE_SIZE, inner, 0usize),
        Ok(1000)
    );
    // The booleans are 32-bit unsigned ints: the upper half is untouched.
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_IS_MANAGED, inner, u64::MAX),
        Ok(0xFFFF_FFFF_0000_0000)
    );
    assert_eq!(get(P::CU_POINTER_ATTRIBUTE_MAPPED, inner, 0u64), Ok(1));
    let (ia, ib) = (
        get(P::CU_POINTER_ATTRIBUTE_BUFFER_ID, a, 0u64).unwrap(),
        get(P::CU_POINTER_ATTRIBUTE_BUFFER_ID, b, 0u64).unwrap(),
    );
    assert!(ia != 0 && ib != 0 && ia != ib);
    // Past the allocation (its padding) and after a free the memory is unknown.
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, a + 1000, 0 as c_uint),
        Err(CUresult::CUDA_ERROR_INVALID_VALUE)
    );
    ck!(dbl::cuMemFree_v2(b));
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, b, 0 as c_uint),
        Err(CUresult::CUDA_ERROR_INVALID_VALUE)
    );

    let c1 = Ctx::enter(1);
    let on_one = alloc(64);
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, on_one, -1 as c_int),
        Ok(1)
    );
    assert_eq!(
        get(
            P::CU_POINTER_ATTRIBUTE_CONTEXT,
            on_one,
            std::ptr::null_mut::<c_void>()
        ),
        Ok(c1.handle.cast())
    );
    ck!(dbl::cuMemFree_v2(on_one));
    drop(c1);
    ctx.bind();
    ck!(dbl::cuMemFree_v2(a));
}

#[test]
fn page_locked_host_memory() {
    let _serial = serial();
    let ctx = Ctx::enter(0);
    let m = HostMap::new(8192);
    ck!(dbl::cuMemHostRegister_v2(m.void(), 8192, 0));
    let inner = host_addr(m.ptr) + 100;
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, inner, 0 as c_uint),
        Ok(M::CU_MEMORYTYPE_HOST as c_uint)
    );
    assert_eq!(
        get(
            P::CU_POINTER_ATTRIBUTE_CONTEXT,
            inner,
            std::ptr::null_mut::<c_void>()
        ),
        Ok(ctx.handle.cast())
    );
    assert_eq!(
        get(
            P::CU_POINTER_ATTRIBUTE_HOST_POINTER,
            inner,
            std::ptr::null_mut::<c_void>()
        )
        .map(|p| p.addr()),
        Ok(usize::try_from(inner).unwrap())
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_DEVICE_POINTER, inner, 0u64),
        Ok(inner)
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, inner, 0u64),
        Ok(host_addr(m.ptr))
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_RANGE_SIZE, inner, 0usize),
        Ok(8192)
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, inner, -1 as c_int),
        Ok(0)
    );
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_MAPPED, inner, 0 as c_uint),
        Ok(1)
    );
    ck!(dbl::cuMemHostUnregister(m.void()));
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, inner, 0 as c_uint),
        Err(CUresult::CUDA_ERROR_INVALID_VALUE)
    );

    let mut p = std::ptr::null_mut();
    ck!(dbl::cuMemAllocHost_v2(&mut p, 100));
    assert_eq!(
        get(
            P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            host_addr(p),
            0 as c_uint
        ),
        Ok(M::CU_MEMORYTYPE_HOST as c_uint)
    );
    ck!(dbl::cuMemFreeHost(p));
}

#[test]
fn unknown_memory_and_unsupported_attributes() {
    let _serial = serial();
    let _ctx = Ctx::enter(0);
    let local = [0u8; 16];
    let plain = host_addr(local.as_ptr());
    assert_eq!(
        get(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, plain, 0 as c_uint),
        Err(CUresult::CUDA_ERROR_INVALID_VALUE)
    );
    assert_eq!(
        get(
            P::CU_POINTER_ATTRIBUTE_CONTEXT,
            0x10,
            std::ptr::null_mut::<c_void>()
        ),
        Err(CUresult::CUDA_ERROR_INVALID_VALUE)
    );
    let a = alloc(64);
    let mut v = 0u64;
    for bad in [0u32, 22, 99] {
        expect_err!(
            CUDA_ERROR_INVALID_VALUE,
            dbl::cuPointerGetAttribute((&raw mut v).cast(), bad, a)
        );
    }
    expect_err!(
        CUDA_ERROR_NOT_SUPPORTED,
        dbl::cuPointerGetAttribute(
            (&raw mut v).cast(),
            P::CU_POINTER_ATTRIBUTE_P2P_TOKENS as u32,
            a
        )
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuPointerGetAttribute(
            std::ptr::null_mut(),
            P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE as u32,
            a
        )
    );
    ck!(dbl::cuMemFree_v2(a));
}

#[test]
fn get_attributes_reports_null_values_for_unknown_memory() {
    let _serial = serial();
    let ctx = Ctx::enter(0);
    let a = alloc(64);
    let attrs = [
        P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE as u32,
        P::CU_POINTER_ATTRIBUTE_CONTEXT as u32,
        P::CU_POINTER_ATTRIBUTE_HOST_POINTER as u32,
        P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL as u32,
        P::CU_POINTER_ATTRIBUTE_MAPPED as u32,
    ];
    let query = |ptr: CUdeviceptr| {
        let (mut ty, mut cx, mut hp, mut ord, mut mapped): (
            c_uint,
            CUcontext,
            *mut c_void,
            c_int,
            c_uint,
        ) = (
            9,
            std::ptr::without_provenance_mut(1),
            std::ptr::without_provenance_mut(1),
            9,
            9,
        );
        let mut outs: [*mut c_void; 5] = [
            (&raw mut ty).cast(),
            (&raw mut cx).cast(),
            (&raw mut hp).cast(),
            (&raw mut ord).cast(),
            (&raw mut mapped).cast(),
        ];
        ck!(dbl::cuPointerGetAttributes(
            5,
            attrs.as_ptr(),
            outs.as_mut_ptr(),
            ptr
        ));
        (ty, cx, hp, ord, mapped)
    };
    let (ty, cx, hp, ord, mapped) = query(a);
    assert_eq!(ty, M::CU_MEMORYTYPE_DEVICE as c_uint);
    assert_eq!(cx, ctx.handle);
    assert!(hp.is_null(), "device memory has no host pointer");
    assert_eq!((ord, mapped), (0, 1));
    let local = [0u8; 8];
    let (ty, cx, hp, ord, mapped) = query(host_addr(local.as_ptr()));
    assert_eq!(ty, 0);
    assert!(cx.is_null() && hp.is_null());
    assert_eq!((ord, mapped), (0, 0));
    let mut outs = [std::ptr::null_mut::<c_void>(); 1];
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuPointerGetAttributes(1, attrs.as_ptr(), outs.as_mut_ptr(), a)
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuPointerGetAttributes(0, attrs.as_ptr(), outs.as_mut_ptr(), a)
    );
    ck!(dbl::cuMemFree_v2(a));
}

//! Initialization and device queries.

#[macro_use]
mod common;

use std::ffi::{CStr, c_char, c_int};

use common::*;
use cudarc::driver::sys::{CUdevice_attribute as A, CUuuid};

#[test]
fn calls_before_cuinit_are_not_initialized() {
    if !is_child("calls_before_cuinit_are_not_initialized") {
        child_passes("calls_before_cuinit_are_not_initialized", &[]);
        return;
    }
    let mut n: c_int = 0;
    let mut ctx = std::ptr::null_mut();
    let mut p = 0;
    let mut s = std::ptr::null_mut();
    expect_err!(CUDA_ERROR_NOT_INITIALIZED, dbl::cuDeviceGetCount(&mut n));
    expect_err!(CUDA_ERROR_NOT_INITIALIZED, dbl::cuCtxGetCurrent(&mut ctx));
    expect_err!(
        CUDA_ERROR_NOT_INITIALIZED,
        dbl::cuDevicePrimaryCtxRetain(&mut ctx, 0)
    );
    expect_err!(CUDA_ERROR_NOT_INITIALIZED, dbl::cuMemAlloc_v2(&mut p, 16));
    expect_err!(CUDA_ERROR_NOT_INITIALIZED, dbl::cuStreamCreate(&mut s, 0));
    expect_err!(
        CUDA_ERROR_NOT_INITIALIZED,
        dbl::cuStreamSynchronize(std::ptr::null_mut())
    );
    // These work before cuInit.
    let mut version = 0;
    ck!(dbl::cuDriverGetVersion(&mut version));
    assert_eq!(version, 13000);
    let mut text: *const c_char = std::ptr::null();
    ck!(dbl::cuGetErrorString(
        CUresult::CUDA_ERROR_NOT_INITIALIZED as u32,
        &mut text
    ));
    // SAFETY: the double returns a static NUL-terminated string.
    let text = unsafe { CStr::from_ptr(text) };
    assert_eq!(text.to_str().unwrap(), "initialization error");
    // SAFETY: no pointers.
    assert_eq!(unsafe { dbl::gpusnapDoubleIsDouble() }, 1);
    // Flags must be 0, and a refused cuInit initializes nothing.
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuInit(1));
    expect_err!(CUDA_ERROR_NOT_INITIALIZED, dbl::cuDeviceGetCount(&mut n));
    ck!(dbl::cuInit(0));
    ck!(dbl::cuInit(0));
    ck!(dbl::cuDeviceGetCount(&mut n));
    assert_eq!(n, 2);
}

#[test]
fn driver_version_comes_from_the_environment() {
    if !is_child("driver_version_comes_from_the_environment") {
        child_passes(
            "driver_version_comes_from_the_environment",
            &[("GPUSNAP_CUDA_DOUBLE_DRIVER_VERSION", "12080")],
        );
        return;
    }
    let mut version = 0;
    ck!(dbl::cuDriverGetVersion(&mut version));
    assert_eq!(version, 12080);
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuDriverGetVersion(std::ptr::null_mut())
    );
}

#[test]
fn no_devices_fails_cuinit_with_no_device() {
    if !is_child("no_devices_fails_cuinit_with_no_device") {
        child_passes(
            "no_devices_fails_cuinit_with_no_device",
            &[("GPUSNAP_CUDA_DOUBLE_DEVICES", "0")],
        );
        return;
    }
    expect_err!(CUDA_ERROR_NO_DEVICE, dbl::cuInit(0));
    let mut n: c_int = -1;
    expect_err!(CUDA_ERROR_NOT_INITIALIZED, dbl::cuDeviceGetCount(&mut n));
}

#[test]
fn a_malformed_environment_fails_cuinit_and_is_reported_once() {
    const NAME: &str = "a_malformed_environment_fails_cuinit_and_is_reported_once";
    if !is_child(NAME) {
        let out = child_passes(
            NAME,
            &[("GPUSNAP_CUDA_DOUBLE_FAULTS", "cuInit:1=CUDA_ERROR_BOGUS")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.matches("refusing the environment").count(),
            1,
            "{stderr}"
        );
        assert!(stderr.contains("GPUSNAP_CUDA_DOUBLE_FAULTS"), "{stderr}");
        assert!(stderr.contains("unknown CUresult"), "{stderr}");
        return;
    }
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuInit(0));
    expect_err!(CUDA_ERROR_INVALID_VALUE, dbl::cuInit(0));
    let mut version = 0;
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuDriverGetVersion(&mut version)
    );
}

#[test]
fn device_memory_size_and_count_come_from_the_environment() {
    const NAME: &str = "device_memory_size_and_count_come_from_the_environment";
    if !is_child(NAME) {
        child_passes(
            NAME,
            &[
                ("GPUSNAP_CUDA_DOUBLE_DEVICES", "1"),
                ("GPUSNAP_CUDA_DOUBLE_MEMORY", "1048576"),
            ],
        );
        return;
    }
    init();
    let mut n: c_int = 0;
    ck!(dbl::cuDeviceGetCount(&mut n));
    assert_eq!(n, 1);
    let mut total = 0usize;
    ck!(dbl::cuDeviceTotalMem_v2(&mut total, 0));
    assert_eq!(total, 1 << 20);
    let _ctx = Ctx::enter(0);
    let whole = alloc(1 << 20);
    let mut p = 0;
    expect_err!(CUDA_ERROR_OUT_OF_MEMORY, dbl::cuMemAlloc_v2(&mut p, 1));
    ck!(dbl::cuMemFree_v2(whole));
    ck!(dbl::cuMemAlloc_v2(&mut p, 1));
}

#[test]
fn devices_ordinals_and_attributes() {
    init();
    let mut n: c_int = 0;
    ck!(dbl::cuDeviceGetCount(&mut n));
    assert_eq!(n, 2);
    for ordinal in 0..2 {
        let mut dev = -1;
        ck!(dbl::cuDeviceGet(&mut dev, ordinal));
        assert_eq!(dev, ordinal);
        let get = |a: A| {
            let mut v: c_int = -1;
            ck!(dbl::cuDeviceGetAttribute(&mut v, a as u32, dev));
            v
        };
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR), 9);
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR), 0);
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING), 1);
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED), 0);
        assert_eq!(
            get(A::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM),
            1
        );
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED), 1);
        assert_eq!(
            get(A::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED),
            1
        );
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT), 2);
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT), 132);
        assert_eq!(
            get(A::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED),
            0
        );
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID), ordinal);
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID), ordinal);
        assert_eq!(get(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID), 0);
        assert_eq!(
            get(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
            0,
            "other attributes are 0"
        );
        let mut v = 0;
        for bad in [0u32, A::CU_DEVICE_ATTRIBUTE_MAX as u32, 9999] {
            expect_err!(
                CUDA_ERROR_INVALID_VALUE,
                dbl::cuDeviceGetAttribute(&mut v, bad, dev)
            );
        }
        expect_err!(
            CUDA_ERROR_INVALID_VALUE,
            dbl::cuDeviceGetAttribute(
                std::ptr::null_mut(),
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as u32,
                dev
            )
        );

        let mut name = [0 as c_char; 64];
        ck!(dbl::cuDeviceGetName(name.as_mut_ptr(), 64, dev));
        // SAFETY: NUL-terminated by the double.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(name, format!("gpusnap CUDA driver double {ordinal}"));
        let mut short = [1 as c_char; 4];
        ck!(dbl::cuDeviceGetName(short.as_mut_ptr(), 4, dev));
        assert_eq!(short[3], 0, "truncated and NUL-terminated");
        expect_err!(
            CUDA_ERROR_INVALID_VALUE,
            dbl::cuDeviceGetName(short.as_mut_ptr(), 0, dev)
        );

        let mut total = 0usize;
        ck!(dbl::cuDeviceTotalMem_v2(&mut total, dev));
        assert_eq!(total, 4 << 30);

        let mut a = CUuuid { bytes: [0; 16] };
        let mut b = CUuuid { bytes: [0; 16] };
        ck!(dbl::cuDeviceGetUuid_v2(&mut a, dev));
        ck!(dbl::cuDeviceGetUuid_v2(&mut b, dev));
        assert_eq!(a.bytes, b.bytes, "stable");
        assert_eq!(
            a.bytes.map(|c| c.to_ne_bytes()[0]),
            dbl::api::device::uuid_bytes(u32::try_from(ordinal).unwrap())
        );
    }
    let mut u0 = CUuuid { bytes: [0; 16] };
    let mut u1 = CUuuid { bytes: [0; 16] };
    ck!(dbl::cuDeviceGetUuid_v2(&mut u0, 0));
    ck!(dbl::cuDeviceGetUuid_v2(&mut u1, 1));
    assert_ne!(u0.bytes, u1.bytes);

    let mut dev = 0;
    expect_err!(CUDA_ERROR_INVALID_DEVICE, dbl::cuDeviceGet(&mut dev, 2));
    expect_err!(CUDA_ERROR_INVALID_DEVICE, dbl::cuDeviceGet(&mut dev, -1));
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuDeviceGet(std::ptr::null_mut(), 0)
    );
    let mut v = 0;
    expect_err!(
        CUDA_ERROR_INVALID_DEVICE,
        dbl::cuDeviceGetAttribute(
            &mut v,
            A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as u32,
            2
        )
    );
    let mut total = 0usize;
    expect_err!(
        CUDA_ERROR_INVALID_DEVICE,
        dbl::cuDeviceTotalMem_v2(&mut total, 5)
    );
}

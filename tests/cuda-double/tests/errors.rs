//! `cuGetErrorName` and `cuGetErrorString` for every `CUresult`, before and
//! after `cuInit`.

#[macro_use]
mod common;

use std::ffi::{CStr, c_char};

use common::*;

fn name_and_string(raw: u32) -> (CUresult, CUresult, *const c_char, *const c_char) {
    let mut name: *const c_char = std::ptr::without_provenance(1);
    let mut text: *const c_char = std::ptr::without_provenance(1);
    // SAFETY: out-pointers to locals.
    let (a, b) = unsafe {
        (
            dbl::cuGetErrorName(raw, &mut name),
            dbl::cuGetErrorString(raw, &mut text),
        )
    };
    (a, b, name, text)
}

#[test]
fn every_code_has_its_name_and_description() {
    for e in dbl::errors::TABLE {
        let (a, b, name, text) = name_and_string(e.value);
        assert_eq!((a, b), (CUresult::CUDA_SUCCESS, CUresult::CUDA_SUCCESS));
        // SAFETY: static NUL-terminated strings of the double.
        let (name, text) = unsafe { (CStr::from_ptr(name), CStr::from_ptr(text)) };
        assert_eq!(name.to_str().unwrap(), format!("{:?}", e.code));
        assert_eq!(text, e.description);
    }
    init();
    let (_, _, _, text) = name_and_string(CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32);
    // SAFETY: a static NUL-terminated string.
    let text = unsafe { CStr::from_ptr(text) };
    assert_eq!(text.to_str().unwrap(), "out of memory");
}

#[test]
fn an_unknown_code_is_invalid_value_and_null() {
    for raw in [9u32, 917, 1000, u32::MAX] {
        let (a, b, name, text) = name_and_string(raw);
        assert_eq!(
            (a, b),
            (
                CUresult::CUDA_ERROR_INVALID_VALUE,
                CUresult::CUDA_ERROR_INVALID_VALUE
            )
        );
        assert!(name.is_null() && text.is_null());
    }
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuGetErrorString(0, std::ptr::null_mut())
    );
    expect_err!(
        CUDA_ERROR_INVALID_VALUE,
        dbl::cuGetErrorName(0, std::ptr::null_mut())
    );
}

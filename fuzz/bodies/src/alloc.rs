//! The fuzz targets' allocator: the system allocator, refusing any one
//! allocation over [`ALLOCATION_MAX`] bytes.
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's malloc hooks, which
//! a build with `--sanitizer none` does not have; this is the same limit
//! without them. A refused allocation is Rust's allocation failure: the
//! process aborts, and libFuzzer keeps the input as a crash. So an input
//! that makes the code under test allocate what a length field announces
//! (a safetensors header of 2^63 bytes) is found, not absorbed.

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation a target may make: 256 MiB.
pub const ALLOCATION_MAX: usize = 256 << 20;

/// [`System`], refusing allocations over [`ALLOCATION_MAX`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Capped;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, or returns null (a refusal `GlobalAlloc` allows) before
// `System` is called, so `System`'s guarantees are this allocator's.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_MAX {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's `layout` (non-zero size, by `alloc`'s
        // contract), passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_MAX {
            return std::ptr::null_mut();
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from `System`, with
        // this `layout` (the caller's contract).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_MAX {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with `layout` (the caller's
        // contract); `new_size` is the caller's, unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

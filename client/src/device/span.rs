//! Staging memory as devices see it: the whole mapping of one registration
//! ([`StagingRegion`], what a device attaches to) and the disjoint pieces
//! copies go through ([`StagingSpan`]).
//!
//! Staging is shared with the daemon, which writes it too (a restore fills
//! a slot), so its bytes are never typed as a Rust reference: spans copy
//! in and out through raw pointers.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use super::PinPolicy;
use crate::staging::Mapping;

/// One registration's staging mapping: `len` bytes at `as_ptr()`, mapped
/// shared and read-write for as long as any span of it lives.
pub struct StagingRegion {
    base: NonNull<u8>,
    len: usize,
    pin_policy: PinPolicy,
}

// SAFETY: a region is a description (an address and a length); reaching
// its bytes takes unsafe code or a span, each with its own rules.
unsafe impl Send for StagingRegion {}
// SAFETY: as above.
unsafe impl Sync for StagingRegion {}

impl fmt::Debug for StagingRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StagingRegion({:p}, {} bytes)", self.base, self.len)
    }
}

impl StagingRegion {
    /// # Safety
    /// `base..base + len` is a live shared mapping for as long as this
    /// region (the [`Mapping`] that holds it) lives; `base` is dangling only
    /// when `len` is 0.
    pub(crate) unsafe fn new(
        base: NonNull<u8>,
        len: usize,
        pin_policy: PinPolicy,
    ) -> StagingRegion {
        StagingRegion {
            base,
            len,
            pin_policy,
        }
    }

    /// Whether a device that page-locks staging (CUDA) may go on without
    /// when the driver refuses (the client's configuration).
    pub fn pin_policy(&self) -> PinPolicy {
        self.pin_policy
    }

    /// The start address (page-aligned; dangling when the region is empty).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (a registration of empty tensors).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `ptr..ptr + len` lies inside the region.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let (base, start) = (self.base.as_ptr() as usize, ptr as usize);
        start >= base
            && start
                .checked_add(len)
                .is_some_and(|end| end <= base + self.len)
    }
}

/// A region of the mapped staging memory that nothing else in this process
/// touches while the span lives (the client only makes spans disjoint, and
/// they are not `Clone`). A span keeps the mapping it points into mapped.
pub struct StagingSpan {
    mapping: Arc<Mapping>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a span is the unique handle on its bytes in this process (see
// the type's doc) and owns a reference to its mapping, so moving it to
// another thread moves the only access with it.
unsafe impl Send for StagingSpan {}

impl fmt::Debug for StagingSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StagingSpan({:p}, {} bytes)", self.ptr, self.len)
    }
}

impl StagingSpan {
    /// A span over `ptr..ptr + len`.
    ///
    /// # Safety
    /// The range lies inside `mapping`'s region, and no other live span
    /// covers any of it.
    pub(crate) unsafe fn new(mapping: Arc<Mapping>, ptr: NonNull<u8>, len: usize) -> StagingSpan {
        debug_assert!(mapping.region().contains(ptr.as_ptr(), len));
        StagingSpan { mapping, ptr, len }
    }

    /// Bytes in the span.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start address (for backends that issue their own copies, e.g.
    /// `cuMemcpyDtoHAsync` into the registered mapping).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The mapping this span is part of.
    pub fn region(&self) -> &StagingRegion {
        self.mapping.region()
    }

    /// Splits at `mid` into two disjoint spans.
    ///
    /// # Panics
    /// When `mid > len`.
    pub fn split_at(self, mid: usize) -> (StagingSpan, StagingSpan) {
        assert!(
            mid <= self.len,
            "split at {mid} of a {}-byte span",
            self.len
        );
        // SAFETY: `mid <= len`, so the offset stays inside (or one past) the
        // span, which is inside the mapping.
        let tail = unsafe { self.ptr.add(mid) };
        let StagingSpan { mapping, ptr, len } = self;
        // SAFETY: the halves partition this span's bytes, and `self` is
        // consumed, so each half is the only span over its bytes.
        unsafe {
            (
                StagingSpan::new(Arc::clone(&mapping), ptr, mid),
                StagingSpan::new(mapping, tail, len - mid),
            )
        }
    }

    /// Copies `src` into the span.
    ///
    /// # Panics
    /// When the lengths differ.
    pub fn copy_from(&mut self, src: &[u8]) {
        assert_eq!(
            src.len(),
            self.len,
            "copy of {} bytes into a {}-byte span",
            src.len(),
            self.len
        );
        // SAFETY: the span is `len` bytes of a live mapping (it holds the
        // mapping) that nothing else in this process touches; `src` is a
        // Rust borrow, which never covers staging memory, so the ranges do
        // not overlap. The daemon may write the same bytes only by breaking
        // the protocol, which changes what is copied, not what is valid.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr(), self.len) }
    }

    /// Copies the span into `dst`.
    ///
    /// # Panics
    /// When the lengths differ.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.len,
            "copy of a {}-byte span into {} bytes",
            self.len,
            dst.len()
        );
        // SAFETY: as in `copy_from`, reading the span instead of writing it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), dst.as_mut_ptr(), self.len) }
    }

    /// Zeroes the span.
    pub fn zero(&mut self) {
        // SAFETY: the span is `len` writable bytes of a live mapping that
        // nothing else in this process touches.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, self.len) }
    }
}

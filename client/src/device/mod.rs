//! What copies between registered buffers and staging memory.
//!
//! A [`Device`] receives a list of copies whose destinations (capture) or
//! sources (restore) are [`StagingSpan`]s: disjoint regions of the daemon's
//! staging memfd, mapped into this process. [`HostDevice`] copies with
//! `memcpy` on a few threads; a CUDA backend implements the same trait with
//! device-to-host copies on the trainer's stream and adds its own
//! [`Source`]/[`Target`] variants.

mod host;

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

pub use host::HostDevice;
pub(crate) use host::default_threads as host_default_threads;

use crate::error::Result;

/// Copies buffers into staging and back.
pub trait Device: Send + Sync + fmt::Debug {
    /// A short name for logs ("host", "cuda").
    fn name(&self) -> &'static str;

    /// Copies every `src` into its `dst`; returns once every byte is in
    /// staging. On an error staging holds partial data and the caller aborts
    /// the snapshot.
    fn capture(&self, copies: Vec<CaptureCopy<'_>>) -> Result<()>;

    /// Copies every staging `src` into its `dst` buffer; returns once every
    /// byte is there.
    fn restore(&self, copies: Vec<RestoreCopy<'_>>) -> Result<()>;
}

/// The bytes of one registered buffer (or a piece of it) to capture.
#[derive(Debug)]
#[non_exhaustive]
pub enum Source<'a> {
    /// Host memory.
    Host(&'a [u8]),
}

impl Source<'_> {
    /// Bytes to copy.
    pub fn len(&self) -> usize {
        match self {
            Source::Host(b) => b.len(),
        }
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where one registered buffer (or a piece of it) is restored to.
#[derive(Debug)]
#[non_exhaustive]
pub enum Target<'a> {
    /// Host memory.
    Host(&'a mut [u8]),
}

impl Target<'_> {
    /// Bytes to copy.
    pub fn len(&self) -> usize {
        match self {
            Target::Host(b) => b.len(),
        }
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One capture copy: `src` into `dst`, of equal lengths.
#[derive(Debug)]
pub struct CaptureCopy<'a> {
    pub src: Source<'a>,
    pub dst: StagingSpan<'a>,
}

/// One restore copy: `src` into `dst`, of equal lengths.
#[derive(Debug)]
pub struct RestoreCopy<'a> {
    pub src: StagingSpan<'a>,
    pub dst: Target<'a>,
}

/// A region of the mapped staging memory that nothing else in this process
/// touches while the span lives (spans are only made disjoint, by the
/// client, and are not `Clone`).
pub struct StagingSpan<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _mapping: PhantomData<&'a mut [u8]>,
}

// SAFETY: a span is the unique handle on its bytes (see the type's doc), so
// moving it to another thread moves the only access with it.
unsafe impl Send for StagingSpan<'_> {}

impl fmt::Debug for StagingSpan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StagingSpan({:p}, {} bytes)", self.ptr, self.len)
    }
}

impl<'a> StagingSpan<'a> {
    /// # Safety
    /// `ptr..ptr + len` is mapped, readable and writable for `'a`, and no
    /// other live span or reference covers any of it.
    pub(crate) unsafe fn new(ptr: NonNull<u8>, len: usize) -> StagingSpan<'a> {
        StagingSpan {
            ptr,
            len,
            _mapping: PhantomData,
        }
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
    /// `cuMemcpyDtoHAsync` into registered host memory).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Splits at `mid` into two disjoint spans.
    ///
    /// # Panics
    /// When `mid > len`.
    pub fn split_at(self, mid: usize) -> (StagingSpan<'a>, StagingSpan<'a>) {
        assert!(
            mid <= self.len,
            "split at {mid} of a {}-byte span",
            self.len
        );
        // SAFETY: `mid <= len`, so the offset stays inside (or one past) the
        // mapped region.
        let tail = unsafe { self.ptr.add(mid) };
        // SAFETY: the halves partition this span's bytes, and `self` is
        // consumed, so each half is the only span over its bytes.
        unsafe {
            (
                StagingSpan::new(self.ptr, mid),
                StagingSpan::new(tail, self.len - mid),
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
        // SAFETY: the span is `len` writable bytes no one else in this process
        // touches; `src` is a shared borrow of other memory (a span never
        // covers memory a Rust reference does), so the ranges do not overlap.
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
        // SAFETY: as in `copy_from`, reading instead of writing the span.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), dst.as_mut_ptr(), self.len) }
    }

    /// Zeroes the span.
    pub fn zero(&mut self) {
        // SAFETY: the span is `len` writable bytes no one else here touches.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, self.len) }
    }
}

//! The buffer side of a copy: [`Source`] (what a capture reads) and
//! [`Target`] (what a restore writes), each one registered buffer or a
//! range of it, and [`DeviceBuffer`], memory only its own [`Device`] can
//! reach.
//!
//! Both are owned: a host source holds a read lease on its buffer, a host
//! target the write lease, a device source or target a reference to its
//! buffer. Slicing ([`Source::subrange`], [`Target::split_at`]) narrows the
//! range and shares the lease, so any path (a slot capture, a stream chunk,
//! a backend cutting a copy into pieces) slices every kind of memory the
//! same way.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::Device;
use crate::buffer::{HostSource, HostTarget};

/// Memory that only its [`Device`] can copy (GPU memory): registered as
/// [`Buffer::Device`](crate::Buffer::Device). The client never reads or
/// writes it; it hands [`DeviceSource`]s and [`DeviceTarget`]s over it to
/// [`device`](DeviceBuffer::device), which finds its own buffer type again
/// through [`as_any`](DeviceBuffer::as_any).
pub trait DeviceBuffer: Send + Sync + fmt::Debug + 'static {
    /// The device whose `capture` and `restore` copy this buffer.
    ///
    /// Every call returns the same `Arc` (a clone of one handle the buffer
    /// keeps), and every buffer of one device returns that device's one
    /// `Arc`: the client tells devices apart by that pointer (one entry,
    /// and one attach per registration, per device). A registration whose
    /// buffer returns a different `Arc` on a second call is refused.
    fn device(&self) -> Arc<dyn Device>;

    /// Bytes of the buffer.
    fn byte_len(&self) -> usize;

    /// `self`, for the device to downcast to its own buffer type.
    fn as_any(&self) -> &dyn Any;

    /// Whether this buffer shares memory with `other`, another buffer of
    /// the same device (the client asks only about those; the same object
    /// always aliases itself, buffers of different devices never do):
    /// registering both would make a restore write those bytes twice. The
    /// default says no; a device whose buffers can be views of one
    /// allocation (CUDA tensors of one storage) compares their address
    /// ranges.
    fn overlaps(&self, other: &dyn DeviceBuffer) -> bool {
        let _ = other;
        false
    }
}

/// The bytes of one registered buffer (or a range of it) to capture.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Source {
    /// Host memory, read-leased.
    Host(HostSource),
    /// Memory of a [`DeviceBuffer`].
    Device(DeviceSource),
}

impl Source {
    /// Bytes to copy.
    pub fn len(&self) -> usize {
        match self {
            Source::Host(s) => s.len(),
            Source::Device(s) => s.len(),
        }
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `range` of this source (sharing its lease), or `None` when the
    /// range is not inside it.
    pub fn subrange(&self, range: Range<usize>) -> Option<Source> {
        if range.start > range.end || range.end > self.len() {
            return None;
        }
        Some(match self {
            Source::Host(s) => Source::Host(s.narrowed(range)),
            Source::Device(s) => Source::Device(s.narrowed(range)),
        })
    }

    /// Splits at `mid` into two sources over disjoint bytes.
    ///
    /// # Panics
    /// When `mid > len`.
    pub fn split_at(self, mid: usize) -> (Source, Source) {
        let len = self.len();
        assert!(mid <= len, "split at {mid} of a {len}-byte source");
        let head = self.subrange(0..mid).expect("mid <= len");
        let tail = self.subrange(mid..len).expect("mid <= len");
        (head, tail)
    }
}

/// Where one registered buffer (or a range of it) is restored to.
#[derive(Debug)]
#[non_exhaustive]
pub enum Target {
    /// Host memory, write-leased.
    Host(HostTarget),
    /// Memory of a [`DeviceBuffer`].
    Device(DeviceTarget),
}

impl Target {
    /// Bytes to copy.
    pub fn len(&self) -> usize {
        match self {
            Target::Host(t) => t.len(),
            Target::Device(t) => t.len(),
        }
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `range` of this target, or `None` when the range is not inside
    /// it (the rest of the target is let go).
    pub fn subrange(self, range: Range<usize>) -> Option<Target> {
        if range.start > range.end || range.end > self.len() {
            return None;
        }
        let end = range.end;
        let (_, rest) = self.split_at(range.start);
        let (piece, _) = rest.split_at(end - range.start);
        Some(piece)
    }

    /// Splits at `mid` into two targets over disjoint bytes (each the only
    /// writer of its bytes).
    ///
    /// # Panics
    /// When `mid > len`.
    pub fn split_at(self, mid: usize) -> (Target, Target) {
        let len = self.len();
        assert!(mid <= len, "split at {mid} of a {len}-byte target");
        match self {
            Target::Host(t) => {
                let (a, b) = t.split_at(mid);
                (Target::Host(a), Target::Host(b))
            }
            Target::Device(t) => {
                let (a, b) = t.split_at(mid);
                (Target::Device(a), Target::Device(b))
            }
        }
    }
}

/// Bytes `offset..offset + len` of a [`DeviceBuffer`], to capture.
#[derive(Debug, Clone)]
pub struct DeviceSource {
    buffer: Arc<dyn DeviceBuffer>,
    offset: usize,
    len: usize,
}

impl DeviceSource {
    /// The whole of `buffer`.
    pub(crate) fn new(buffer: Arc<dyn DeviceBuffer>) -> DeviceSource {
        let len = buffer.byte_len();
        DeviceSource {
            buffer,
            offset: 0,
            len,
        }
    }

    /// Bytes `offset..offset + len` of `buffer`, unchecked: what a slicing
    /// bug would make, for a device double's tests.
    #[cfg(test)]
    pub(crate) fn unchecked(
        buffer: Arc<dyn DeviceBuffer>,
        offset: usize,
        len: usize,
    ) -> DeviceSource {
        DeviceSource {
            buffer,
            offset,
            len,
        }
    }

    /// The buffer.
    pub fn buffer(&self) -> &Arc<dyn DeviceBuffer> {
        &self.buffer
    }

    /// Where the bytes start in the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes to copy.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `range` of these bytes; the caller checked it is inside.
    fn narrowed(&self, range: Range<usize>) -> DeviceSource {
        debug_assert!(range.start <= range.end && range.end <= self.len);
        DeviceSource {
            buffer: Arc::clone(&self.buffer),
            offset: self.offset + range.start,
            len: range.end - range.start,
        }
    }
}

/// Bytes `offset..offset + len` of a [`DeviceBuffer`], to restore into.
/// Not `Clone`: each target is the only writer of its bytes.
#[derive(Debug)]
pub struct DeviceTarget {
    buffer: Arc<dyn DeviceBuffer>,
    offset: usize,
    len: usize,
}

impl DeviceTarget {
    /// The whole of `buffer`.
    pub(crate) fn new(buffer: Arc<dyn DeviceBuffer>) -> DeviceTarget {
        let len = buffer.byte_len();
        DeviceTarget {
            buffer,
            offset: 0,
            len,
        }
    }

    /// Bytes `offset..offset + len` of `buffer`, unchecked: what a slicing
    /// bug would make, for a device double's tests.
    #[cfg(test)]
    pub(crate) fn unchecked(
        buffer: Arc<dyn DeviceBuffer>,
        offset: usize,
        len: usize,
    ) -> DeviceTarget {
        DeviceTarget {
            buffer,
            offset,
            len,
        }
    }

    /// The buffer.
    pub fn buffer(&self) -> &Arc<dyn DeviceBuffer> {
        &self.buffer
    }

    /// Where the bytes start in the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes to copy.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn split_at(self, mid: usize) -> (DeviceTarget, DeviceTarget) {
        let DeviceTarget {
            buffer,
            offset,
            len,
        } = self;
        (
            DeviceTarget {
                buffer: Arc::clone(&buffer),
                offset,
                len: mid,
            },
            DeviceTarget {
                buffer,
                offset: offset + mid,
                len: len - mid,
            },
        )
    }
}

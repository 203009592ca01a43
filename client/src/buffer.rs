//! Buffers a trainer registers: [`HostTensor`] (host memory shared with the
//! client), [`RawBuffer`] (memory someone else owns, for FFI), and
//! [`Buffer`], one of them or a [`DeviceBuffer`].
//!
//! A capture holds a read lock on every [`HostTensor`] from before `Begin`
//! until the daemon accepted the capture, so a trainer's `write()` waits for
//! the capture: that is what makes the overlapped mode safe. A restore holds
//! the write lock while it copies. The lock is this module's own (a mutex and
//! a condition variable) because a capture takes it on the trainer's thread
//! and releases it on a copy thread, which `std`'s guards cannot do; the
//! leases are the [`HostSource`]s and [`HostTarget`]s copies own.
//!
//! On a device the same guarantee is the device's to give (stream order):
//! the client takes no lock on a [`DeviceBuffer`].

use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use bytemuck::{Pod, Zeroable};

use crate::device::{DeviceBuffer, DeviceSource, DeviceTarget, Source, Target};
use crate::error::{Error, Result};
use crate::proto::convert::to_u64;
use crate::{Dtype, TensorSpec};

/// Alignment of [`HostTensor`] storage, in bytes.
pub const HOST_ALIGN_BYTES: usize = 64;

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Block([u8; HOST_ALIGN_BYTES]);

/// Who holds one tensor: `readers` read holds, or `writers > 0` holds of
/// one exclusive access (a `write()` guard, or the pieces of one restore
/// target, which cover disjoint bytes).
#[derive(Debug, Default)]
struct LockState {
    readers: usize,
    writers: usize,
}

struct Shared {
    dtype: Dtype,
    shape: Vec<u64>,
    len: usize,
    /// `blocks` 64-byte blocks from `Box<[Block]>::into_raw`, freed in `Drop`.
    data: NonNull<Block>,
    blocks: usize,
    state: Mutex<LockState>,
    changed: Condvar,
}

// SAFETY: the bytes behind `data` are only reached through the guards and
// leases below, which follow the reader/writer protocol kept in `state`
// (many readers or one writer), so sharing `Shared` across threads cannot
// race; `Block` is plain bytes.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Drop for Shared {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.data.as_ptr(), self.blocks);
        // SAFETY: `data`/`blocks` came from `Box::into_raw` of a boxed slice of
        // exactly `blocks` blocks, and this is the last owner (Arc dropped).
        drop(unsafe { Box::from_raw(slice) });
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, LockState> {
        // The state is two plain fields updated in one step each: a panic
        // elsewhere cannot leave it half-written, so poison is ignored.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_read(&self) {
        let mut state = self.state();
        while state.writers > 0 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.readers += 1;
    }

    /// One more read hold beside one the caller already has (never waits).
    fn add_reader(&self) {
        let mut state = self.state();
        assert!(state.readers > 0, "a second read hold without a first");
        state.readers += 1;
    }

    fn unlock_read(&self) {
        let mut state = self.state();
        assert!(state.readers > 0, "read unlock without a reader");
        state.readers -= 1;
        if state.readers == 0 {
            self.changed.notify_all();
        }
    }

    fn lock_write(&self) {
        let mut state = self.state();
        while state.writers > 0 || state.readers > 0 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.writers = 1;
    }

    /// One more hold of the exclusive access the caller already has, for a
    /// disjoint piece of it (never waits).
    fn add_writer(&self) {
        let mut state = self.state();
        assert!(state.writers > 0, "a second write hold without a first");
        state.writers += 1;
    }

    fn unlock_write(&self) {
        let mut state = self.state();
        assert!(state.writers > 0, "write unlock without the writer");
        state.writers -= 1;
        if state.writers == 0 {
            self.changed.notify_all();
        }
    }

    /// # Safety
    /// The caller holds a read or write lock for the lifetime of the slice.
    unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: `data` points at `blocks * 64 >= len` initialized bytes
        // that live as long as `self`; the caller's lock excludes writers.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), self.len) }
    }

    /// # Safety
    /// The caller holds the write lock for the lifetime of the slice.
    #[expect(
        clippy::mut_from_ref,
        reason = "the write lock makes the access unique"
    )]
    unsafe fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: as in `bytes`; the write lock excludes every other access.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr().cast::<u8>(), self.len) }
    }

    fn check_element<T: Pod>(&self) {
        assert_eq!(
            to_u64(std::mem::size_of::<T>()),
            self.dtype.size_bytes(),
            "typed access to a {} tensor with a {}-byte element type",
            self.dtype,
            std::mem::size_of::<T>()
        );
    }
}

/// A host tensor the trainer and the client both hold: 64-byte-aligned,
/// zero-initialized storage of a dtype and shape, behind a reader/writer
/// lock. Clones share the storage.
#[derive(Clone)]
pub struct HostTensor {
    shared: Arc<Shared>,
}

impl fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTensor")
            .field("dtype", &self.shared.dtype)
            .field("shape", &self.shared.shape)
            .field("bytes", &self.shared.len)
            .finish()
    }
}

impl HostTensor {
    /// A tensor of zeros. Fails with [`Error::Spec`] when the shape's byte
    /// size overflows.
    pub fn zeros(dtype: Dtype, shape: impl Into<Vec<u64>>) -> Result<HostTensor> {
        let shape = shape.into();
        let spec = TensorSpec::new("host tensor", dtype, shape);
        let len = spec.validate()?;
        let len = usize::try_from(len).map_err(|_| crate::TensorSpecError::SizeOverflow {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
        })?;
        let blocks = len.div_ceil(HOST_ALIGN_BYTES);
        let boxed: Box<[Block]> = vec![Block::zeroed(); blocks].into_boxed_slice();
        let raw = Box::into_raw(boxed);
        let data = NonNull::new(raw.cast::<Block>()).expect("Box::into_raw is never null");
        Ok(HostTensor {
            shared: Arc::new(Shared {
                dtype,
                shape: spec.shape,
                len,
                data,
                blocks,
                state: Mutex::new(LockState::default()),
                changed: Condvar::new(),
            }),
        })
    }

    /// A tensor holding a copy of `values`. Fails when `values` is not
    /// `dtype`/`shape` worth of bytes.
    pub fn from_slice<T: Pod>(
        dtype: Dtype,
        shape: impl Into<Vec<u64>>,
        values: &[T],
    ) -> Result<HostTensor> {
        let tensor = HostTensor::zeros(dtype, shape)?;
        let bytes: &[u8] = bytemuck::cast_slice(values);
        if bytes.len() != tensor.byte_len() {
            return Err(Error::BufferLength {
                name: "from_slice".into(),
                expected: to_u64(tensor.byte_len()),
                actual: to_u64(bytes.len()),
            });
        }
        tensor.write().copy_from_slice(bytes);
        Ok(tensor)
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.shared.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[u64] {
        &self.shared.shape
    }

    /// Bytes of data.
    pub fn byte_len(&self) -> usize {
        self.shared.len
    }

    /// The spec this tensor has when registered as `name`.
    pub fn spec(&self, name: impl Into<String>) -> TensorSpec {
        TensorSpec::new(name, self.shared.dtype, self.shared.shape.clone())
    }

    /// Read access; waits while a restore writes.
    pub fn read(&self) -> HostRead<'_> {
        self.shared.lock_read();
        HostRead {
            shared: &self.shared,
        }
    }

    /// Write access; waits while a capture or another reader holds the tensor.
    pub fn write(&self) -> HostWrite<'_> {
        self.shared.lock_write();
        HostWrite {
            shared: &self.shared,
        }
    }

    /// Whether two handles share storage.
    pub fn same_storage(&self, other: &HostTensor) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The storage's start address and byte length (to compare with other
    /// memory; never dereferenced).
    fn address_range(&self) -> (usize, usize) {
        (self.shared.data.as_ptr() as usize, self.shared.len)
    }
}

/// Shared read access to a [`HostTensor`]'s bytes.
pub struct HostRead<'a> {
    shared: &'a Shared,
}

impl HostRead<'_> {
    /// The data as elements of `T`.
    ///
    /// # Panics
    /// When `size_of::<T>()` is not the tensor's dtype size.
    pub fn as_slice<T: Pod>(&self) -> &[T] {
        self.shared.check_element::<T>();
        bytemuck::cast_slice(self)
    }
}

impl Deref for HostRead<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: this guard holds a read lock for its lifetime.
        unsafe { self.shared.bytes() }
    }
}

impl Drop for HostRead<'_> {
    fn drop(&mut self) {
        self.shared.unlock_read();
    }
}

impl fmt::Debug for HostRead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostRead({} bytes)", self.shared.len)
    }
}

/// Exclusive write access to a [`HostTensor`]'s bytes.
pub struct HostWrite<'a> {
    shared: &'a Shared,
}

impl HostWrite<'_> {
    /// The data as elements of `T`.
    ///
    /// # Panics
    /// When `size_of::<T>()` is not the tensor's dtype size.
    pub fn as_slice<T: Pod>(&self) -> &[T] {
        self.shared.check_element::<T>();
        bytemuck::cast_slice(self)
    }

    /// The data as mutable elements of `T`.
    ///
    /// # Panics
    /// When `size_of::<T>()` is not the tensor's dtype size.
    pub fn as_mut_slice<T: Pod>(&mut self) -> &mut [T] {
        self.shared.check_element::<T>();
        bytemuck::cast_slice_mut(self)
    }
}

impl Deref for HostWrite<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: this guard holds the write lock for its lifetime.
        unsafe { self.shared.bytes() }
    }
}

impl DerefMut for HostWrite<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: this guard holds the write lock, and `&mut self` makes the
        // slice the only one alive from this guard.
        unsafe { self.shared.bytes_mut() }
    }
}

impl Drop for HostWrite<'_> {
    fn drop(&mut self) {
        self.shared.unlock_write();
    }
}

impl fmt::Debug for HostWrite<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostWrite({} bytes)", self.shared.len)
    }
}

/// Memory the client does not own, described by a pointer and a length:
/// what the Python bindings register for a NumPy array or a pinned buffer.
/// Clones describe the same memory.
#[derive(Clone)]
pub struct RawBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a RawBuffer is a description of memory; `RawBuffer::new`'s
// contract makes its owner keep it valid and unraced while registered, from
// whichever thread the client copies.
unsafe impl Send for RawBuffer {}
// SAFETY: as above.
unsafe impl Sync for RawBuffer {}

impl fmt::Debug for RawBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawBuffer({:p}, {} bytes)", self.ptr, self.len)
    }
}

impl RawBuffer {
    /// Describes `len` bytes at `ptr` (`ptr` may be null only when `len` is 0).
    ///
    /// # Safety
    /// For as long as this buffer (or a clone) is registered with a
    /// [`Client`](crate::Client):
    /// * `ptr..ptr + len` is valid for reads and writes and stays allocated;
    /// * nothing writes it while a snapshot is being captured (from
    ///   `snapshot`/`snapshot_begin` until the capture is waited for or its
    ///   handle dropped), and nothing reads or writes it during `restore`;
    /// * it does not overlap another registered buffer.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> RawBuffer {
        let ptr = match NonNull::new(ptr) {
            Some(p) => p,
            None => {
                assert_eq!(len, 0, "RawBuffer::new: null pointer with {len} bytes");
                NonNull::dangling()
            }
        };
        RawBuffer { ptr, len }
    }

    /// Bytes described.
    pub fn byte_len(&self) -> usize {
        self.len
    }

    /// The start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn overlaps(&self, other: &RawBuffer) -> bool {
        ranges_overlap(
            (self.ptr.as_ptr() as usize, self.len),
            (other.ptr.as_ptr() as usize, other.len),
        )
    }
}

/// Whether address ranges `(start, len)` share a byte (an empty range
/// shares none).
fn ranges_overlap((a, a_len): (usize, usize), (b, b_len): (usize, usize)) -> bool {
    a_len > 0 && b_len > 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// Whether two device buffers share memory: the same object always does;
/// buffers of different devices never do; otherwise the buffers say.
fn device_buffers_alias(a: &Arc<dyn DeviceBuffer>, b: &Arc<dyn DeviceBuffer>) -> bool {
    if std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)) {
        return true;
    }
    crate::device::same_device(&a.device(), &b.device()) && (a.overlaps(&**b) || b.overlaps(&**a))
}

/// A registered buffer: a [`HostTensor`] or a [`RawBuffer`] (host memory,
/// copied by the client's host device), or a [`DeviceBuffer`] (copied by
/// the device it names). More kinds may come.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Buffer {
    Host(HostTensor),
    Raw(RawBuffer),
    Device(Arc<dyn DeviceBuffer>),
}

impl From<HostTensor> for Buffer {
    fn from(t: HostTensor) -> Buffer {
        Buffer::Host(t)
    }
}

impl From<&HostTensor> for Buffer {
    fn from(t: &HostTensor) -> Buffer {
        Buffer::Host(t.clone())
    }
}

impl From<RawBuffer> for Buffer {
    fn from(b: RawBuffer) -> Buffer {
        Buffer::Raw(b)
    }
}

impl From<Arc<dyn DeviceBuffer>> for Buffer {
    fn from(b: Arc<dyn DeviceBuffer>) -> Buffer {
        Buffer::Device(b)
    }
}

impl Buffer {
    /// Bytes of the buffer.
    pub fn byte_len(&self) -> usize {
        match self {
            Buffer::Host(t) => t.byte_len(),
            Buffer::Raw(r) => r.byte_len(),
            Buffer::Device(d) => d.byte_len(),
        }
    }

    /// The device that copies this buffer, when it is not host memory.
    pub fn device(&self) -> Option<Arc<dyn crate::Device>> {
        match self {
            Buffer::Host(_) | Buffer::Raw(_) => None,
            Buffer::Device(d) => Some(d.device()),
        }
    }

    /// Whether registering both would alias memory (a restore would then
    /// write the same bytes twice, or wait on itself): host buffers by
    /// their address ranges (two tensors, a tensor and raw memory, two raw
    /// buffers), device buffers by the device's say
    /// ([`DeviceBuffer::overlaps`]; buffers of different devices never
    /// alias). Host memory and a device's memory are different memories.
    pub(crate) fn aliases(&self, other: &Buffer) -> bool {
        match (self, other) {
            (Buffer::Host(a), Buffer::Host(b)) => a.same_storage(b),
            (Buffer::Host(t), Buffer::Raw(r)) | (Buffer::Raw(r), Buffer::Host(t)) => {
                let (start, len) = t.address_range();
                ranges_overlap((r.ptr.as_ptr() as usize, r.len), (start, len))
            }
            (Buffer::Raw(a), Buffer::Raw(b)) => a.overlaps(b),
            (Buffer::Device(a), Buffer::Device(b)) => device_buffers_alias(a, b),
            (Buffer::Host(_) | Buffer::Raw(_), Buffer::Device(_))
            | (Buffer::Device(_), Buffer::Host(_) | Buffer::Raw(_)) => false,
        }
    }

    /// The whole buffer as a capture source: takes its read lease (a host
    /// tensor's read lock, waiting while a writer holds it).
    pub(crate) fn source(&self) -> Source {
        match self {
            Buffer::Host(t) => {
                t.shared.lock_read();
                Source::Host(HostSource {
                    memory: HostMemory::Tensor(Arc::clone(&t.shared)),
                    start: 0,
                    len: t.byte_len(),
                })
            }
            Buffer::Raw(r) => Source::Host(HostSource {
                memory: HostMemory::Raw(r.ptr),
                start: 0,
                len: r.len,
            }),
            Buffer::Device(d) => Source::Device(DeviceSource::new(Arc::clone(d))),
        }
    }

    /// The whole buffer as a restore target: takes its write lease (a host
    /// tensor's write lock, waiting for readers and writers to leave).
    pub(crate) fn target(&self) -> Target {
        match self {
            Buffer::Host(t) => {
                t.shared.lock_write();
                Target::Host(HostTarget {
                    memory: HostMemory::Tensor(Arc::clone(&t.shared)),
                    start: 0,
                    len: t.byte_len(),
                })
            }
            Buffer::Raw(r) => Target::Host(HostTarget {
                memory: HostMemory::Raw(r.ptr),
                start: 0,
                len: r.len,
            }),
            Buffer::Device(d) => Target::Device(DeviceTarget::new(Arc::clone(d))),
        }
    }
}

/// The memory behind a host source or target.
enum HostMemory {
    /// A host tensor; the handle holds one read (source) or write (target)
    /// hold on it, released in `Drop`.
    Tensor(Arc<Shared>),
    /// The start of a [`RawBuffer`], under `RawBuffer::new`'s contract.
    Raw(NonNull<u8>),
}

impl HostMemory {
    fn base(&self) -> *mut u8 {
        match self {
            HostMemory::Tensor(shared) => shared.data.as_ptr().cast::<u8>(),
            HostMemory::Raw(ptr) => ptr.as_ptr(),
        }
    }
}

/// Bytes `start..start + len` of a registered host buffer, read-leased for
/// a capture: while any source of a [`HostTensor`] lives, its writers wait.
/// Clones share the lease (each holds the read lock once).
pub struct HostSource {
    memory: HostMemory,
    start: usize,
    len: usize,
}

// SAFETY: a source only reads; its bytes are read-locked (a tensor) or, for
// raw memory, not written while a capture runs (`RawBuffer::new`'s
// contract), so reading them from another thread cannot race a write. The
// tensor's lock is released from whichever thread drops the source, which
// the lock (a mutex and a condition variable) allows.
unsafe impl Send for HostSource {}
// SAFETY: as above; `&HostSource` only reads.
unsafe impl Sync for HostSource {}

impl fmt::Debug for HostSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostSource({:p}, {} bytes)", self.as_ptr(), self.len)
    }
}

impl Clone for HostSource {
    fn clone(&self) -> HostSource {
        self.narrowed(0..self.len)
    }
}

impl Drop for HostSource {
    fn drop(&mut self) {
        if let HostMemory::Tensor(shared) = &self.memory {
            shared.unlock_read();
        }
    }
}

impl HostSource {
    /// Bytes to copy.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte (for backends that issue their own copies).
    pub fn as_ptr(&self) -> *const u8 {
        self.memory.base().wrapping_add(self.start)
    }

    /// The bytes.
    ///
    /// # Safety
    /// Only until the ticket of the copy this source was handed to reports
    /// done: a [`RawBuffer`]'s owner may write or free its memory after the
    /// capture, which this handle cannot hold off.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: `start + len` is inside the buffer (sources are only made
        // whole and narrowed within); a tensor's bytes are read-locked by
        // this handle, raw bytes unwritten during the capture (the
        // caller's promise and `RawBuffer::new`'s contract).
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// Splits at `mid` into two sources over disjoint bytes.
    ///
    /// # Panics
    /// When `mid > len`.
    pub fn split_at(self, mid: usize) -> (HostSource, HostSource) {
        assert!(
            mid <= self.len,
            "split at {mid} of a {}-byte source",
            self.len
        );
        let tail = self.narrowed(mid..self.len);
        let mut head = self;
        head.len = mid;
        (head, tail)
    }

    /// `range` of these bytes with a lease of its own; the caller checked
    /// that it is inside.
    pub(crate) fn narrowed(&self, range: Range<usize>) -> HostSource {
        debug_assert!(range.start <= range.end && range.end <= self.len);
        let memory = match &self.memory {
            HostMemory::Tensor(shared) => {
                shared.add_reader();
                HostMemory::Tensor(Arc::clone(shared))
            }
            HostMemory::Raw(ptr) => HostMemory::Raw(*ptr),
        };
        HostSource {
            memory,
            start: self.start + range.start,
            len: range.end - range.start,
        }
    }
}

/// Bytes `start..start + len` of a registered host buffer, write-leased for
/// a restore: while any target of a [`HostTensor`] lives, its readers and
/// writers wait. Not `Clone`: each target is the only writer of its bytes
/// ([`split_at`](HostTarget::split_at) makes disjoint ones).
pub struct HostTarget {
    memory: HostMemory,
    start: usize,
    len: usize,
}

// SAFETY: a target is the only handle on its bytes (tensor: under the write
// lock it holds; raw memory: untouched by others during a restore, per
// `RawBuffer::new`), so moving it to another thread moves the only access.
unsafe impl Send for HostTarget {}

impl fmt::Debug for HostTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostTarget({:p}, {} bytes)", self.as_mut_ptr(), self.len)
    }
}

impl Drop for HostTarget {
    fn drop(&mut self) {
        if let HostMemory::Tensor(shared) = &self.memory {
            shared.unlock_write();
        }
    }
}

impl HostTarget {
    /// Bytes to copy.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte (for backends that issue their own copies).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.memory.base().wrapping_add(self.start)
    }

    /// The bytes, to write.
    ///
    /// # Safety
    /// Only until the ticket of the copy this target was handed to reports
    /// done: a [`RawBuffer`]'s owner may use or free its memory after the
    /// restore, which this handle cannot hold off.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `start + len` is inside the buffer; this target is the
        // only handle on these bytes (a tensor's write lock, disjoint
        // pieces; raw memory untouched by others during the restore, the
        // caller's promise and `RawBuffer::new`'s contract), and `&mut self`
        // keeps this slice the only one from it.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    /// Splits at `mid` into two targets over disjoint bytes.
    ///
    /// # Panics
    /// When `mid > len`.
    pub fn split_at(self, mid: usize) -> (HostTarget, HostTarget) {
        assert!(
            mid <= self.len,
            "split at {mid} of a {}-byte target",
            self.len
        );
        let memory = match &self.memory {
            HostMemory::Tensor(shared) => {
                shared.add_writer();
                HostMemory::Tensor(Arc::clone(shared))
            }
            HostMemory::Raw(ptr) => HostMemory::Raw(*ptr),
        };
        let tail = HostTarget {
            memory,
            start: self.start + mid,
            len: self.len - mid,
        };
        let mut head = self;
        head.len = mid;
        (head, tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn host_tensor_is_aligned_zeroed_and_typed() {
        let t = HostTensor::zeros(Dtype::F32, [3, 5]).expect("zeros");
        assert_eq!(t.byte_len(), 60);
        assert_eq!(t.read().as_ptr() as usize % HOST_ALIGN_BYTES, 0);
        assert!(t.read().iter().all(|&b| b == 0));
        t.write().as_mut_slice::<f32>()[7] = 1.5;
        assert_eq!(t.read().as_slice::<f32>()[7], 1.5);
        assert_eq!(t.spec("w"), TensorSpec::new("w", Dtype::F32, [3, 5]));
        let u = HostTensor::from_slice(Dtype::U16, [2], &[7u16, 9]).expect("from_slice");
        assert_eq!(u.read().as_slice::<u16>(), &[7, 9]);
        assert!(matches!(
            HostTensor::from_slice(Dtype::U16, [3], &[7u16, 9]),
            Err(Error::BufferLength {
                expected: 6,
                actual: 4,
                ..
            })
        ));
        assert!(matches!(
            HostTensor::zeros(Dtype::F64, [u64::MAX, 4]),
            Err(Error::Spec(_))
        ));
        let empty = HostTensor::zeros(Dtype::F32, [0]).expect("empty");
        assert!(empty.read().is_empty());
    }

    #[test]
    #[should_panic(expected = "typed access to a F32 tensor with a 8-byte element type")]
    fn typed_access_with_the_wrong_element_size_panics() {
        let t = HostTensor::zeros(Dtype::F32, [2]).expect("zeros");
        let _ = t.read().as_slice::<f64>().len();
    }

    #[test]
    fn a_lease_taken_on_one_thread_and_dropped_on_another_holds_writers_off() {
        let t = HostTensor::zeros(Dtype::U8, [16]).expect("zeros");
        let lease = Buffer::from(&t).source();
        // A piece of the lease holds the lock on its own.
        let piece = lease.subrange(4..12).expect("inside");
        assert_eq!(piece.len(), 8);
        drop(lease);
        let wrote = Arc::new(AtomicBool::new(false));
        let writer = {
            let (t, wrote) = (t.clone(), Arc::clone(&wrote));
            std::thread::spawn(move || {
                t.write().fill(1);
                wrote.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !wrote.load(Ordering::SeqCst),
            "writer ran under a read lease"
        );
        // A second reader still gets in while the writer waits.
        assert_eq!(t.read().len(), 16);
        std::thread::spawn(move || drop(piece))
            .join()
            .expect("drop lease");
        writer.join().expect("writer");
        assert!(t.read().iter().all(|&b| b == 1));
    }

    #[test]
    fn the_pieces_of_a_restore_target_hold_readers_off_until_the_last_one_goes() {
        let t = HostTensor::zeros(Dtype::U8, [16]).expect("zeros");
        let Target::Host(whole) = Buffer::from(&t).target() else {
            unreachable!("a host tensor's target is host memory")
        };
        let (mut head, mut tail) = whole.split_at(10);
        // SAFETY: no copy is involved; the pieces are this test's only
        // handles on the tensor's bytes.
        unsafe {
            head.as_mut_slice().fill(1);
            tail.as_mut_slice().fill(2);
        }
        drop(head);
        let read = Arc::new(AtomicBool::new(false));
        let reader = {
            let (t, read) = (t.clone(), Arc::clone(&read));
            std::thread::spawn(move || {
                let bytes = t.read().to_vec();
                read.store(true, Ordering::SeqCst);
                bytes
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !read.load(Ordering::SeqCst),
            "reader ran under a write lease"
        );
        drop(tail);
        let bytes = reader.join().expect("reader");
        assert_eq!(&bytes[..10], &[1; 10]);
        assert_eq!(&bytes[10..], &[2; 6]);
        assert!(Buffer::from(&t).source().subrange(3..17).is_none());
    }

    #[test]
    fn aliasing_buffers_are_detected() {
        let t = HostTensor::zeros(Dtype::U8, [4]).expect("zeros");
        let other = HostTensor::zeros(Dtype::U8, [4]).expect("zeros");
        assert!(Buffer::from(&t).aliases(&Buffer::from(t.clone())));
        assert!(!Buffer::from(&t).aliases(&Buffer::from(&other)));
        let mut mem = vec![0u8; 32];
        let p = mem.as_mut_ptr();
        // SAFETY: `mem` outlives the buffers, which are never copied through.
        let (a, b, c) = unsafe {
            (
                RawBuffer::new(p, 16),
                RawBuffer::new(p.add(8), 16),
                RawBuffer::new(p.add(16), 16),
            )
        };
        assert!(Buffer::from(a.clone()).aliases(&Buffer::from(b)));
        assert!(!Buffer::from(a).aliases(&Buffer::from(c)));
    }

    #[test]
    fn a_raw_buffer_over_a_host_tensors_storage_aliases_it_either_way() {
        let t = HostTensor::zeros(Dtype::U8, [64]).expect("zeros");
        let other = HostTensor::zeros(Dtype::U8, [64]).expect("zeros");
        let base = t.read().as_ptr().cast_mut();
        // SAFETY: the buffers are compared, never copied through; `t`
        // outlives them.
        let (inside, tail, after) = unsafe {
            (
                RawBuffer::new(base.add(8), 16),
                RawBuffer::new(base.add(63), 1),
                RawBuffer::new(base.add(64), 16),
            )
        };
        let tensor = Buffer::from(&t);
        for raw in [&inside, &tail] {
            let raw = Buffer::from(raw.clone());
            assert!(tensor.aliases(&raw), "{raw:?}");
            assert!(raw.aliases(&tensor), "{raw:?}");
        }
        assert!(!tensor.aliases(&Buffer::from(after.clone())));
        assert!(!Buffer::from(after).aliases(&tensor));
        assert!(!Buffer::from(&other).aliases(&Buffer::from(inside)));
    }

    /// A device buffer that is a view of bytes `range` of one allocation of
    /// its device.
    #[derive(Debug)]
    struct View {
        device: Arc<dyn crate::Device>,
        range: Range<usize>,
    }

    impl DeviceBuffer for View {
        fn device(&self) -> Arc<dyn crate::Device> {
            Arc::clone(&self.device)
        }
        fn byte_len(&self) -> usize {
            self.range.len()
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn overlaps(&self, other: &dyn DeviceBuffer) -> bool {
            other
                .as_any()
                .downcast_ref::<View>()
                .is_some_and(|o| self.range.start < o.range.end && o.range.start < self.range.end)
        }
    }

    #[test]
    fn device_buffers_alias_when_their_device_says_so_and_never_across_devices() {
        let one: Arc<dyn crate::Device> = Arc::new(crate::HostDevice::new(1));
        let two: Arc<dyn crate::Device> = Arc::new(crate::HostDevice::new(1));
        let view = |device: &Arc<dyn crate::Device>, range: Range<usize>| {
            let b: Arc<dyn DeviceBuffer> = Arc::new(View {
                device: Arc::clone(device),
                range,
            });
            Buffer::Device(b)
        };
        let a = view(&one, 0..64);
        assert!(a.aliases(&a.clone()), "the same buffer");
        assert!(a.aliases(&view(&one, 32..96)), "overlapping views");
        assert!(!a.aliases(&view(&one, 64..128)), "adjacent views");
        assert!(
            !a.aliases(&view(&two, 0..64)),
            "the same range of another device is other memory"
        );
        let host = HostTensor::zeros(Dtype::U8, [64]).expect("zeros");
        assert!(!a.aliases(&Buffer::from(&host)));
        assert!(!Buffer::from(&host).aliases(&a));
    }
}

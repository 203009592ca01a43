//! Memory another process writes: a handle, never a Rust reference.
//!
//! Staging memory is a memfd that the trainer maps read-write and writes
//! whenever it likes (a correct trainer only while its slot is capturing; a
//! buggy or hostile one at any time). A `&[u8]` over those bytes would tell
//! the compiler they hold still while it lives, which another process can
//! break at any moment: undefined behaviour in Rust's model whatever the
//! daemon itself does. [`SharedBytes`] is what the daemon holds instead, in
//! the spirit of rust-vmm's `vm-memory` `VolatileSlice` for guest memory: a
//! pointer, a length and a lifetime, with only the operations the daemon
//! needs, each done through raw pointers:
//!
//! * copy a range out into private memory ([`SharedBytes::copy_to`]) or
//!   private memory in ([`SharedBytes::copy_from`]): `ptr::copy_nonoverlapping`,
//!   as `vm-memory` does for copies larger than a word. It promises nothing
//!   about how (in what order, in what widths, how many times) it reads or
//!   writes each byte; what holds is that it forms no reference, so the
//!   compiler assumes nothing of the bytes, and that a byte written
//!   concurrently comes out as some value, which the chunk CRCs catch;
//! * the CRC32 through a [`ChunkChecksum`] ([`SharedBytes::crc32`]),
//!   computed piece by piece over a small
//!   private bounce buffer ([`CRC_BOUNCE_BYTES`], cache-resident, about 90%
//!   of the speed of a checksum over a slice), because a
//!   checksum implementation takes a slice and none may be formed over
//!   shared bytes;
//! * sub-ranges ([`SharedBytes::subrange`]);
//! * the raw region for O_DIRECT ([`SharedBytes::raw_region`]): the kernel
//!   reads or writes the memory itself, with no copy.
//!
//! What a concurrent write by the trainer can do: tear the bytes the daemon
//! copies, checksums or hands to the kernel. A chunk's CRC is computed from
//! what the daemon read; if the trainer changed the bytes meanwhile, the
//! stored CRC does not match what reached the disk and the read path refuses
//! that chunk. The trainer can corrupt its own snapshot, which the chunk CRCs
//! expose, and nothing else: no Rust reference covers its bytes, so no
//! assumption of the compiler is broken.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ptr::NonNull;

use gpusnap_kernels::{CRC32_EMPTY, ChunkChecksum};

use crate::storage::RawRegion;

/// Size of the private buffer a checksum of shared bytes copies through:
/// small enough to stay in the L1/L2 cache, so the copy costs little next
/// to the checksum. Measured on the 2-core development VM (1 MiB chunks of
/// a 512 MiB memfd mapping, release build): the CPU CRC32 over a plain
/// slice 9.9 GB/s, through a 16/32/64 KiB bounce buffer 9.0/9.1/8.8 GB/s,
/// three times what the disk writes (about 3 GB/s).
pub const CRC_BOUNCE_BYTES: usize = 32 << 10;

/// A range outside the handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bytes {offset}..{offset}+{len} are outside the {region_len}-byte shared region")]
pub struct OutOfRange {
    pub offset: usize,
    pub len: usize,
    pub region_len: usize,
}

/// `len` bytes of memory that another process may write at any time,
/// mapped for `'a`. Never handed out as a Rust reference; see the module
/// doc for what each operation does.
///
/// Copies of a handle name the same bytes; like the trainer's writes,
/// concurrent `copy_from`s on overlapping ranges tear those bytes and
/// affect nothing else.
#[derive(Debug, Clone, Copy)]
pub struct SharedBytes<'a> {
    ptr: NonNull<u8>,
    len: usize,
    /// Borrows the mapping for `'a`, as shared, mutable-behind-our-back
    /// memory.
    _memory: PhantomData<&'a UnsafeCell<[u8]>>,
}

// SAFETY: a handle is an address range whose validity for 'a its maker
// promised (`SharedBytes::new`) from any thread; every access through it is
// a raw-pointer copy that assumes nothing of concurrent writers, whichever
// thread performs it.
unsafe impl Send for SharedBytes<'_> {}
// SAFETY: as above: `&SharedBytes` gives only the same raw-pointer copies,
// which are sound against concurrent writers by construction.
unsafe impl Sync for SharedBytes<'_> {}

impl<'a> SharedBytes<'a> {
    /// A handle on `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` is mapped readable and writable for all of `'a`
    /// (`ptr` non-null, and dangling is fine for `len == 0`). The only
    /// concurrent writer of those bytes is another process (the trainer),
    /// which can only corrupt its own snapshot, which the chunk CRCs expose;
    /// this process reaches them only through `SharedBytes` handles and the
    /// kernel operations given their raw regions, never through a Rust
    /// reference, while `'a` lasts.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> SharedBytes<'a> {
        let ptr = NonNull::new(ptr).unwrap_or_else(|| panic!("a shared region at address 0"));
        assert!(
            isize::try_from(len).is_ok(),
            "a {len}-byte region is larger than any allocation"
        );
        SharedBytes {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    /// A handle on private memory borrowed exclusively for `'a` (tests,
    /// and the store's own direct reads into caller memory): nothing else
    /// reaches it while the handle lives.
    pub fn from_private(bytes: &'a mut [u8]) -> SharedBytes<'a> {
        let len = bytes.len();
        // SAFETY: the exclusive borrow keeps the bytes mapped, readable and
        // writable for 'a, with no other accessor at all while it lasts.
        unsafe { SharedBytes::new(bytes.as_mut_ptr(), len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start address, for alignment checks.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Checks `offset..offset + len` against the handle.
    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfRange> {
        let out = OutOfRange {
            offset,
            len,
            region_len: self.len,
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(out),
        }
    }

    /// The `len` bytes at `offset`, as a handle of the same lifetime.
    pub fn subrange(&self, offset: usize, len: usize) -> Result<SharedBytes<'a>, OutOfRange> {
        self.check(offset, len)?;
        Ok(SharedBytes {
            // SAFETY: `offset <= self.len` (checked), so the result stays
            // inside (or one past) the mapping this handle covers.
            ptr: unsafe { self.ptr.add(offset) },
            len,
            _memory: PhantomData,
        })
    }

    /// Copies the bytes at `offset..offset + dst.len()` into `dst`.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
        self.check(offset, dst.len())?;
        // SAFETY: the source range lies inside the mapping (checked), which
        // stays mapped for 'a (the constructor's contract); `dst` is private
        // memory borrowed exclusively, so the two do not overlap. A byte the
        // trainer writes meanwhile is copied as either value, which the CRCs
        // catch; no reference to the source is formed.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset).cast_const(),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        Ok(())
    }

    /// Copies `src` into the bytes at `offset..offset + src.len()`.
    pub fn copy_from(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
        self.check(offset, src.len())?;
        // SAFETY: the destination lies inside the mapping (checked), mapped
        // writable for 'a; `src` is private memory (a shared borrow of this
        // process's own bytes), so they do not overlap. A concurrent writer
        // can only leave torn bytes behind, which the CRCs catch.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len());
        }
        Ok(())
    }

    /// The CRC32 of the whole handle, through `checksum`, copying piece by
    /// piece through `bounce` (any non-empty private buffer;
    /// [`CRC_BOUNCE_BYTES`] is the size it is measured with).
    pub fn crc32(&self, checksum: &dyn ChunkChecksum, bounce: &mut [u8]) -> u32 {
        assert!(!bounce.is_empty(), "a bounce buffer needs room");
        let mut crc = CRC32_EMPTY;
        let mut at = 0;
        while at < self.len {
            let n = bounce.len().min(self.len - at);
            let Some(piece) = bounce.get_mut(..n) else {
                unreachable!("n is at most the bounce buffer's length");
            };
            if self.copy_to(at, piece).is_err() {
                unreachable!("at + n is at most the handle's length");
            }
            crc = checksum.update(crc, piece);
            at += n;
        }
        crc
    }

    /// The region for a kernel operation (O_DIRECT) on these bytes.
    ///
    /// # Safety
    /// The operation given the region completes before `'a` ends: its
    /// completion is reaped, or its data file's `Drop` waits it out or,
    /// failing that, aborts the process (the storage module's rule for
    /// borrowed memory). For a read into the region, nothing in this process
    /// reaches these bytes until then.
    pub unsafe fn raw_region(&self) -> RawRegion {
        // SAFETY: the bytes are mapped readable and writable for 'a (the
        // constructor's contract), and the caller keeps the operation inside
        // 'a and, for reads, away from every other accessor.
        unsafe { RawRegion::new(self.ptr.as_ptr(), self.len) }
    }
}

/// Test support: memfd mappings standing in for staging memory.
#[cfg(test)]
pub(crate) mod testing {
    use std::num::NonZeroUsize;
    use std::ptr::NonNull;

    use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

    use super::SharedBytes;

    /// A memfd of `len` bytes mapped twice, `MAP_SHARED`: the trainer's
    /// mapping and the daemon's, as two processes would have them.
    pub(crate) struct SharedPair {
        _memfd: std::fs::File,
        trainer: NonNull<u8>,
        daemon: NonNull<u8>,
        len: usize,
    }

    impl SharedPair {
        pub(crate) fn new(len: usize) -> SharedPair {
            let memfd = memfd::MemfdOptions::default()
                .close_on_exec(true)
                .create("gpusnap-test-shared")
                .expect("memfd")
                .into_file();
            memfd
                .set_len(u64::try_from(len).expect("len"))
                .expect("ftruncate");
            let map = || {
                // SAFETY: a fresh shared mapping of a memfd this test owns,
                // at an address the kernel picks; it aliases no Rust object.
                let ptr = unsafe {
                    mmap(
                        None,
                        NonZeroUsize::new(len).expect("non-empty"),
                        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                        MapFlags::MAP_SHARED,
                        &memfd,
                        0,
                    )
                }
                .expect("mmap");
                ptr.cast::<u8>()
            };
            let trainer = map();
            let daemon = map();
            SharedPair {
                _memfd: memfd,
                trainer,
                daemon,
                len,
            }
        }

        /// The trainer writing `bytes` at `offset` (its own mapping).
        pub(crate) fn trainer_writes(&self, offset: usize, bytes: &[u8]) {
            assert!(offset + bytes.len() <= self.len);
            // SAFETY: inside the trainer's mapping (asserted); it and the
            // daemon's mapping are different addresses, and the test does
            // not read the daemon's side concurrently.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    self.trainer.as_ptr().add(offset),
                    bytes.len(),
                );
            }
        }

        /// What the trainer's mapping holds at `offset..offset + len`.
        pub(crate) fn trainer_reads(&self, offset: usize, len: usize) -> Vec<u8> {
            assert!(offset + len <= self.len);
            let mut out = vec![0; len];
            // SAFETY: inside the trainer's mapping (asserted), copied into
            // a private vector.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.trainer.as_ptr().add(offset),
                    out.as_mut_ptr(),
                    len,
                );
            }
            out
        }

        /// The daemon's handle on its own mapping.
        pub(crate) fn daemon(&self) -> SharedBytes<'_> {
            // SAFETY: the daemon mapping lives as long as `self`; the only
            // other writer is the trainer mapping of the same memfd.
            unsafe { SharedBytes::new(self.daemon.as_ptr(), self.len) }
        }

        /// The daemon's mapping's address (the same bytes as the trainer's).
        pub(crate) fn daemon_addr(&self) -> usize {
            self.daemon.as_ptr() as usize
        }
    }

    impl Drop for SharedPair {
        fn drop(&mut self) {
            for ptr in [self.trainer, self.daemon] {
                // SAFETY: both were mapped in `new` with this length, and
                // no handle outlives `self` (they borrow it).
                unsafe { munmap(ptr.cast(), self.len) }.expect("munmap");
            }
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use gpusnap_kernels::{CpuCrc32, reference};

    use super::testing::SharedPair;
    use super::*;

    /// The CRC32 of every `chunk_bytes` chunk of `shared`, each through the
    /// handle (what the store computes, a chunk at a time).
    fn chunk_crc32s(shared: &SharedBytes<'_>, chunk_bytes: usize) -> Vec<u32> {
        let mut bounce = vec![0u8; CRC_BOUNCE_BYTES.min(chunk_bytes)];
        (0..shared.len())
            .step_by(chunk_bytes)
            .map(|at| {
                let n = chunk_bytes.min(shared.len() - at);
                shared
                    .subrange(at, n)
                    .unwrap()
                    .crc32(&CpuCrc32, &mut bounce)
            })
            .collect()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(131) >> 3).to_le_bytes()[0] ^ seed)
            .collect()
    }

    #[test]
    fn copies_see_what_the_other_mapping_wrote_and_write_back_into_it() {
        let pair = SharedPair::new(3 * 4096);
        let data = pattern(3 * 4096, 7);
        pair.trainer_writes(0, &data);
        let shared = pair.daemon();
        assert_eq!(shared.len(), 3 * 4096);
        let mut out = vec![0; 5000];
        shared.copy_to(100, &mut out).expect("in range");
        assert_eq!(out, data[100..5100]);
        shared.copy_from(4096, b"daemon").expect("in range");
        assert_eq!(pair.trainer_reads(4096, 6), b"daemon");
        // A copy reads the bytes as they are now, not as they were.
        pair.trainer_writes(100, &[0xEE; 4]);
        shared.copy_to(100, &mut out[..4]).expect("in range");
        assert_eq!(out[..4], [0xEE; 4]);
    }

    #[test]
    fn ranges_outside_the_handle_are_refused() {
        let pair = SharedPair::new(4096);
        let shared = pair.daemon();
        let mut buf = [0u8; 8];
        assert_eq!(
            shared.copy_to(4090, &mut buf),
            Err(OutOfRange {
                offset: 4090,
                len: 8,
                region_len: 4096
            })
        );
        assert!(shared.copy_from(usize::MAX, &buf).is_err());
        assert!(shared.subrange(4096, 1).is_err());
        assert!(shared.subrange(1, usize::MAX).is_err());
        let tail = shared.subrange(4096, 0).expect("empty tail");
        assert!(tail.is_empty());
        let sub = shared.subrange(4000, 96).expect("in range");
        assert_eq!(sub.addr(), shared.addr() + 4000);
        assert!(
            sub.copy_to(90, &mut buf).is_err(),
            "bounds are the subrange's"
        );
        sub.copy_to(88, &mut buf).expect("last 8 bytes");
    }

    #[test]
    fn checksums_through_the_bounce_buffer_equal_the_reference() {
        let len = 3 * CRC_BOUNCE_BYTES + 1234;
        let pair = SharedPair::new(len.next_multiple_of(4096));
        let data = pattern(len, 3);
        pair.trainer_writes(0, &data);
        let shared = pair.daemon().subrange(0, len).expect("range");
        for bounce_len in [1, 4095, CRC_BOUNCE_BYTES, 4 * CRC_BOUNCE_BYTES] {
            let mut bounce = vec![0; bounce_len];
            assert_eq!(
                shared.crc32(&CpuCrc32, &mut bounce),
                reference::chunk_crc32(&data),
                "bounce of {bounce_len}"
            );
        }
        for chunk in [1 << 20, 65536, 4096, 1000] {
            assert_eq!(
                chunk_crc32s(&shared, chunk),
                reference::chunk_crc32s(&data, chunk),
                "chunk {chunk}"
            );
        }
        // A byte the trainer flips shows in the checksum of its chunk only.
        pair.trainer_writes(70_000, &[data[70_000] ^ 1]);
        let crcs = chunk_crc32s(&shared, 65536);
        let before = reference::chunk_crc32s(&data, 65536);
        let differ: Vec<usize> = (0..crcs.len()).filter(|&i| crcs[i] != before[i]).collect();
        assert_eq!(differ, [1]);
    }

    #[test]
    fn a_raw_region_carries_an_o_direct_write_and_read_of_the_mapping() {
        use crate::buffer_pool::BufferPool;
        use crate::storage::os::OsStorage;
        use crate::storage::probe::BackendChoice;
        use crate::storage::{IoBuf, IoOp, OpKind, Storage};

        let dir = tempfile::tempdir().expect("tempdir");
        let pool = BufferPool::new(4 * 65536, 65536).expect("pool");
        let storage = OsStorage::open(dir.path(), BackendChoice::Auto, pool).expect("storage");
        let pair = SharedPair::new(2 * 4096);
        let data = pattern(2 * 4096, 9);
        pair.trainer_writes(0, &data);
        let path = dir.path().join("f");
        let mut file = storage.create_data_file(&path, 8192, 2).expect("create");
        let shared = pair.daemon();
        file.submit(IoOp {
            kind: OpKind::Write,
            offset: 0,
            len: 8192,
            // SAFETY: `pair` outlives `file`, whose reap below completes the
            // op; the daemon mapping is only read by the kernel meanwhile.
            buf: IoBuf::Borrowed(unsafe { shared.raw_region() }),
            tag: 0,
        });
        let done = file.reap(1).expect("reap");
        assert_eq!(done[0].result.as_ref().expect("write"), &8192);
        file.sync_data().expect("fdatasync");
        drop(file);
        assert_eq!(std::fs::read(&path).expect("read back"), data);

        pair.trainer_writes(0, &[0; 8192]);
        let mut file = storage.open_data_file(&path, 2).expect("open");
        let target = shared.subrange(4096, 4096).expect("second page");
        file.submit(IoOp {
            kind: OpKind::Read,
            offset: 4096,
            len: 4096,
            // SAFETY: as above; nothing here touches the bytes until the
            // read is reaped.
            buf: IoBuf::Borrowed(unsafe { target.raw_region() }),
            tag: 1,
        });
        let done = file.reap(1).expect("reap");
        assert_eq!(done[0].result.as_ref().expect("read"), &4096);
        assert_eq!(pair.trainer_reads(4096, 4096), data[4096..]);
        assert_eq!(pair.trainer_reads(0, 4096), vec![0; 4096]);
        assert_eq!(pair.daemon_addr() % 4096, 0, "mappings are page aligned");
    }

    #[test]
    fn a_private_handle_covers_exactly_its_borrow() {
        let mut bytes = pattern(10_000, 1);
        let expected = reference::chunk_crc32s(&bytes, 4096);
        let shared = SharedBytes::from_private(&mut bytes);
        assert_eq!(chunk_crc32s(&shared, 4096), expected);
        shared.copy_from(0, b"xy").expect("in range");
        assert_eq!(&bytes[..2], b"xy");
    }
}

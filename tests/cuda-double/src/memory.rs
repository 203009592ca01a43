//! Device memory: each device's address space and its allocator.
//!
//! A device's address space is one large `PROT_NONE`, `MAP_NORESERVE`
//! anonymous reservation: device pointers are addresses inside it, so a host
//! dereference of device memory faults (SIGSEGV), as it does on a real GPU.
//! The double's copy engine reaches the bytes through a private read-write
//! alias, a second `MAP_NORESERVE` mapping of the same size where offset `o`
//! holds the byte of device address `base + o`.

use std::collections::BTreeMap;
use std::io;

use cudarc::driver::sys::CUresult;

/// Device allocations are aligned to this many bytes, like `cuMemAlloc`'s
/// documented minimum alignment (the driver aligns to at least 256).
pub const ALLOC_ALIGN_BYTES: usize = 512;
/// Fresh device memory reads back as this byte, never as zeros: code that
/// relies on `cuMemAlloc` zeroing (it does not) or reads memory it never
/// wrote sees it.
pub const POISON: u8 = 0xA5;
const PAGE_BYTES: usize = 4096;

/// One device's address space: the `PROT_NONE` reservation device pointers
/// point into, and the alias the copy engine uses.
#[derive(Debug)]
pub struct AddressSpace {
    base: usize,
    alias: usize,
    size: usize,
}

fn map(size: usize, prot: libc::c_int) -> io::Result<usize> {
    // SAFETY: an anonymous private mapping at an address the kernel picks:
    // it replaces nothing and aliases no Rust object.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.expose_provenance())
}

impl AddressSpace {
    /// Reserves `size` bytes (a multiple of the page size).
    pub fn new(size: usize) -> io::Result<Self> {
        assert!(
            size > 0 && size.is_multiple_of(PAGE_BYTES),
            "device memory size {size}"
        );
        let base = map(size, libc::PROT_NONE)?;
        let alias = match map(size, libc::PROT_READ | libc::PROT_WRITE) {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: `base` is the mapping of `size` bytes made above;
                // nothing refers to it yet.
                unsafe { libc::munmap(std::ptr::with_exposed_provenance_mut(base), size) };
                return Err(e);
            }
        };
        Ok(Self { base, alias, size })
    }

    /// The first device address.
    pub fn base(&self) -> usize {
        self.base
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The offset of `addr` in this space, if it is inside.
    pub fn offset_of(&self, addr: usize) -> Option<usize> {
        addr.checked_sub(self.base).filter(|o| *o < self.size)
    }

    /// Whether `[addr, addr + len)` overlaps this space.
    pub fn overlaps(&self, addr: usize, len: usize) -> bool {
        let end = addr.saturating_add(len);
        addr < self.base + self.size && end > self.base
    }

    /// The alias address of offset `offset`: where the copy engine reads and
    /// writes the device byte at `base + offset`.
    pub fn alias_at(&self, offset: usize) -> usize {
        debug_assert!(offset <= self.size);
        self.alias + offset
    }

    /// Fills `[offset, offset + len)` with the poison byte.
    pub fn poison(&self, offset: usize, len: usize) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.size));
        // SAFETY: the range is inside the alias mapping (asserted), which is
        // read-write for the life of the process; no Rust reference points
        // into it, and no stream operation uses this range while it is being
        // (re)allocated.
        unsafe {
            std::ptr::write_bytes(
                std::ptr::with_exposed_provenance_mut::<u8>(self.alias + offset),
                POISON,
                len,
            );
        }
    }

    /// Gives the pages wholly inside `[offset, offset + len)` back to the
    /// kernel, so freed device memory costs no host memory.
    pub fn release(&self, offset: usize, len: usize) {
        let start = (self.alias + offset).next_multiple_of(PAGE_BYTES);
        let end = (self.alias + offset + len) / PAGE_BYTES * PAGE_BYTES;
        if end > start {
            // SAFETY: the pages are inside the alias mapping and belong to no
            // live allocation; MADV_DONTNEED on a private anonymous mapping
            // only drops their contents.
            unsafe {
                libc::madvise(
                    std::ptr::with_exposed_provenance_mut(start),
                    end - start,
                    libc::MADV_DONTNEED,
                );
            }
        }
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        for start in [self.base, self.alias] {
            // SAFETY: both are mappings of `size` bytes this value made and
            // owns; the caller drops it only when no device pointer into it
            // is used any more (the driver's spaces live as long as the
            // process).
            unsafe { libc::munmap(std::ptr::with_exposed_provenance_mut(start), self.size) };
        }
    }
}

/// One device allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Offset of its first byte in the device's address space.
    pub offset: usize,
    /// The size the caller asked for.
    pub size: usize,
    /// The size it occupies (rounded up to the alignment).
    pub reserved: usize,
    /// A process-unique id (`CU_POINTER_ATTRIBUTE_BUFFER_ID`).
    pub id: u64,
}

impl Allocation {
    pub fn end(&self) -> usize {
        self.offset + self.size
    }
}

/// A first-fit allocator over one device's address space.
#[derive(Debug)]
pub struct Allocator {
    size: usize,
    live: BTreeMap<usize, Allocation>,
    used: usize,
}

impl Allocator {
    pub fn new(size: usize) -> Self {
        Self {
            size,
            live: BTreeMap::new(),
            used: 0,
        }
    }

    /// Bytes occupied by live allocations.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The lowest gap that fits `size` bytes, 512-byte aligned.
    pub fn allocate(&mut self, size: usize, id: u64) -> Result<Allocation, CUresult> {
        if size == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let reserved = size
            .checked_next_multiple_of(ALLOC_ALIGN_BYTES)
            .ok_or(CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
        let mut cursor = 0;
        for a in self.live.values() {
            if a.offset - cursor >= reserved {
                break;
            }
            cursor = a.offset + a.reserved;
        }
        if self.size - cursor < reserved {
            return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        }
        let a = Allocation {
            offset: cursor,
            size,
            reserved,
            id,
        };
        self.live.insert(cursor, a);
        self.used += reserved;
        Ok(a)
    }

    /// Frees the allocation that starts at `offset`.
    pub fn free(&mut self, offset: usize) -> Option<Allocation> {
        let a = self.live.remove(&offset)?;
        self.used -= a.reserved;
        Some(a)
    }

    /// Frees everything (a context reset).
    pub fn free_all(&mut self) -> Vec<Allocation> {
        self.used = 0;
        std::mem::take(&mut self.live).into_values().collect()
    }

    /// The live allocation containing offset `offset`.
    pub fn containing(&self, offset: usize) -> Option<&Allocation> {
        self.live
            .range(..=offset)
            .next_back()
            .map(|(_, a)| a)
            .filter(|a| offset < a.end())
    }

    /// The live allocation wholly containing `[offset, offset + len)`; a
    /// zero-length range may sit at the allocation's end.
    pub fn containing_range(&self, offset: usize, len: usize) -> Option<&Allocation> {
        let end = offset.checked_add(len)?;
        self.live
            .range(..=offset)
            .next_back()
            .map(|(_, a)| a)
            .filter(|a| end <= a.end() && (offset < a.end() || (len == 0 && offset == a.end())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_aligned_and_reused() {
        let mut a = Allocator::new(8192);
        let x = a.allocate(1, 1).unwrap();
        let y = a.allocate(513, 2).unwrap();
        let z = a.allocate(512, 3).unwrap();
        assert_eq!((x.offset, y.offset, z.offset), (0, 512, 1536));
        assert_eq!(a.used(), 2048);
        a.free(y.offset).unwrap();
        // The 1024-byte hole is reused first, then the space after `z`.
        assert_eq!(a.allocate(1000, 4).unwrap().offset, 512);
        assert_eq!(a.allocate(100, 5).unwrap().offset, 2048);
    }

    #[test]
    fn zero_full_and_overflow() {
        let mut a = Allocator::new(4096);
        assert_eq!(a.allocate(0, 1), Err(CUresult::CUDA_ERROR_INVALID_VALUE));
        assert_eq!(a.allocate(4097, 1), Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert_eq!(
            a.allocate(usize::MAX, 1),
            Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY)
        );
        a.allocate(4096, 1).unwrap();
        assert_eq!(a.allocate(1, 2), Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert_eq!(a.free_all().len(), 1);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn ranges_must_lie_inside_one_allocation() {
        let mut a = Allocator::new(4096);
        let x = a.allocate(100, 1).unwrap();
        let y = a.allocate(100, 2).unwrap();
        assert_eq!(a.containing_range(0, 100), Some(&x));
        assert_eq!(a.containing_range(99, 1), Some(&x));
        assert_eq!(a.containing_range(100, 0), Some(&x));
        assert_eq!(a.containing_range(50, 51), None, "runs past the end");
        assert_eq!(
            a.containing_range(100, 1),
            None,
            "padding is not the allocation"
        );
        assert_eq!(a.containing_range(512, 100), Some(&y));
        assert_eq!(a.containing(512 + 99), Some(&y));
        assert_eq!(a.containing(512 + 100), None);
        assert_eq!(a.free(1), None, "not an allocation's start");
    }

    #[test]
    fn the_reservation_is_prot_none_and_the_alias_is_not() {
        let space = AddressSpace::new(1 << 20).unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let perms = |addr: usize| {
            maps.lines()
                .find_map(|l| {
                    let (range, rest) = l.split_once(' ')?;
                    let (s, e) = range.split_once('-')?;
                    let (s, e) = (
                        usize::from_str_radix(s, 16).ok()?,
                        usize::from_str_radix(e, 16).ok()?,
                    );
                    (s <= addr && addr < e).then(|| rest[..4].to_owned())
                })
                .unwrap()
        };
        assert_eq!(perms(space.base()), "---p");
        assert_eq!(perms(space.base() + space.size() - 1), "---p");
        assert_eq!(perms(space.alias_at(0)), "rw-p");
        space.poison(10, 10);
        // SAFETY: offset 10 of the alias was just written.
        let b = unsafe { *std::ptr::with_exposed_provenance::<u8>(space.alias_at(15)) };
        assert_eq!(b, POISON);
    }
}

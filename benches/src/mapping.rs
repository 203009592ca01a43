//! The benchmark's data section: one anonymous mapping, like a staging
//! area, 4096-byte aligned, filled with a cheap deterministic pattern.

use std::io;
use std::ptr::NonNull;

/// An anonymous private mapping of at least `len` bytes; unmapped on drop.
#[derive(Debug)]
pub struct DataMapping {
    ptr: NonNull<u8>,
    /// Bytes handed out by `as_slice`.
    len: usize,
    /// Bytes mapped: `len` rounded up to a page.
    mapped: usize,
}

impl DataMapping {
    /// Maps `len` bytes (page-aligned start) and fills them with the pattern:
    /// little-endian u64 words `i * golden_ratio` (so no two 8-byte words
    /// near each other repeat).
    pub fn filled(len: usize) -> io::Result<Self> {
        let mapped = len.max(1).next_multiple_of(4096);
        // SAFETY: an anonymous private mapping with no address hint touches no
        // existing memory; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let mapping = DataMapping { ptr, len, mapped };
        // SAFETY: the mapping is `mapped` bytes, page-aligned (so u64-aligned),
        // a multiple of 8 long, owned by `mapping` and not yet shared.
        let words = unsafe {
            std::slice::from_raw_parts_mut(mapping.ptr.as_ptr().cast::<u64>(), mapped / 8)
        };
        for (i, w) in (0u64..).zip(words.iter_mut()) {
            *w = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le();
        }
        assert!(
            (mapping.ptr.as_ptr() as usize).is_multiple_of(4096),
            "mmap returns page-aligned memory"
        );
        Ok(mapping)
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` lies inside the live mapping this value owns;
        // writes go only through `as_mut_slice`, whose `&mut self` cannot
        // coexist with this borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DataMapping {
    /// The mapping's bytes, writable (the memcpy peer's destination).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` lies inside the live mapping this value owns,
        // and `&mut self` makes this the only slice of it alive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DataMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`mapped` are exactly what mmap returned, and every
        // slice from `as_slice` borrows `self`, so none outlives this.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
        debug_assert_eq!(rc, 0, "munmap of the data section failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_is_aligned_sized_and_patterned() {
        let m = DataMapping::filled(10_000).expect("mmap");
        let s = m.as_slice();
        assert_eq!(s.len(), 10_000);
        assert!((s.as_ptr() as usize).is_multiple_of(4096));
        assert_eq!(s.get(..8), Some(&[0u8; 8][..]));
        assert_eq!(
            s.get(8..16),
            Some(&0x9E37_79B9_7F4A_7C15u64.to_le_bytes()[..])
        );
    }
}

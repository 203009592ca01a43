//! Page-locked host memory: the ranges registered with `cuMemHostRegister_v2`
//! and those allocated by `cuMemHostAlloc`/`cuMemAllocHost_v2`, tracked
//! process-wide, and the checks of whether host memory is still mapped.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::completion::Completion;
use crate::context::CtxShared;

pub const PAGE_BYTES: usize = 4096;

/// How the range became page-locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// `cuMemHostRegister_v2`: the caller's mapping; `cuMemHostUnregister`.
    Registered,
    /// `cuMemHostAlloc`/`cuMemAllocHost_v2`: the double's mapping; `cuMemFreeHost`.
    Allocated,
}

/// One page-locked range.
#[derive(Debug)]
pub struct HostRange {
    pub start: usize,
    pub len: usize,
    pub flags: u32,
    pub kind: HostKind,
    /// The context current when it was made (`CU_POINTER_ATTRIBUTE_CONTEXT`);
    /// a reset of that context ends it, as destroying the context does.
    pub ctx: Arc<CtxShared>,
    /// Stream operations enqueued with their host side in this range, not
    /// yet known to be done.
    pub pending: Vec<Arc<Completion>>,
}

impl HostRange {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// Every page-locked range of the process.
#[derive(Debug, Default)]
pub struct HostRegistry {
    ranges: BTreeMap<usize, HostRange>,
}

impl HostRegistry {
    /// Whether `[start, start + len)` overlaps a page-locked range.
    pub fn overlaps(&self, start: usize, len: usize) -> bool {
        let end = start.saturating_add(len);
        self.ranges
            .range(..end)
            .next_back()
            .is_some_and(|(_, r)| r.end() > start)
    }

    pub fn insert(&mut self, range: HostRange) {
        debug_assert!(!self.overlaps(range.start, range.len));
        self.ranges.insert(range.start, range);
    }

    /// The range starting exactly at `start`.
    pub fn at(&self, start: usize) -> Option<&HostRange> {
        self.ranges.get(&start)
    }

    pub fn remove(&mut self, start: usize) -> Option<HostRange> {
        self.ranges.remove(&start)
    }

    /// The range that wholly contains `[start, start + len)` (a zero-length
    /// range: the one containing `start`).
    pub fn containing(&mut self, start: usize, len: usize) -> Option<&mut HostRange> {
        let end = start.checked_add(len)?;
        self.ranges
            .range_mut(..=start)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| start < r.end() && end <= r.end())
    }

    /// Removes and returns every range made in the context `ctx_handle`.
    pub fn remove_context(&mut self, ctx_handle: usize) -> Vec<HostRange> {
        let starts: Vec<usize> = self
            .ranges
            .values()
            .filter(|r| r.ctx.handle == ctx_handle)
            .map(|r| r.start)
            .collect();
        starts
            .into_iter()
            .filter_map(|s| self.ranges.remove(&s))
            .collect()
    }

    /// Bytes page-locked now.
    pub fn locked_bytes(&self) -> u64 {
        self.ranges
            .values()
            .map(|r| u64::try_from(r.len).unwrap_or(u64::MAX))
            .sum()
    }
}

/// Whether every page of `[start, start + len)` is mapped in this process.
/// `msync(MS_ASYNC)` fails with ENOMEM when part of the range is unmapped and
/// otherwise does nothing to anonymous or shared memory.
pub fn is_mapped(start: usize, len: usize) -> bool {
    let first = start / PAGE_BYTES * PAGE_BYTES;
    let Some(end) = start.checked_add(len.max(1)) else {
        return false;
    };
    let Some(end) = end.checked_next_multiple_of(PAGE_BYTES) else {
        return false;
    };
    // SAFETY: msync(MS_ASYNC) changes no memory: at most it schedules the
    // write-back of shared file pages. It fails with ENOMEM when part of the
    // page-aligned range is unmapped.
    let rc = unsafe {
        libc::msync(
            std::ptr::with_exposed_provenance_mut(first),
            end - first,
            libc::MS_ASYNC,
        )
    };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOMEM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Arc<CtxShared> {
        Arc::new(CtxShared::new(0x1000, 0))
    }

    fn range(start: usize, len: usize) -> HostRange {
        HostRange {
            start,
            len,
            flags: 0,
            kind: HostKind::Registered,
            ctx: ctx(),
            pending: Vec::new(),
        }
    }

    #[test]
    fn overlap_and_containment() {
        let mut r = HostRegistry::default();
        r.insert(range(0x10000, 0x2000));
        assert!(r.overlaps(0x11fff, 1));
        assert!(r.overlaps(0xf000, 0x1001));
        assert!(!r.overlaps(0xf000, 0x1000));
        assert!(!r.overlaps(0x12000, 0x1000));
        assert!(r.containing(0x10000, 0x2000).is_some());
        assert!(r.containing(0x11000, 0x1001).is_none());
        assert!(r.containing(0x12000, 0).is_none());
        assert_eq!(r.locked_bytes(), 0x2000);
        assert_eq!(r.remove_context(0x1000).len(), 1);
        assert_eq!(r.locked_bytes(), 0);
    }

    #[test]
    fn mapped_check_sees_munmap() {
        // Four pages: the outer two stay mapped as guards, so the hole made
        // in the middle is too small for another test's mappings (thread
        // stacks, address spaces) to land in.
        // SAFETY: a fresh anonymous mapping of four pages.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * PAGE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let a = p.expose_provenance() + PAGE_BYTES;
        assert!(is_mapped(a, 2 * PAGE_BYTES));
        // SAFETY: the third page of the mapping made above; nothing uses it.
        unsafe {
            libc::munmap(
                std::ptr::with_exposed_provenance_mut(a + PAGE_BYTES),
                PAGE_BYTES,
            )
        };
        assert!(is_mapped(a, PAGE_BYTES));
        assert!(!is_mapped(a, PAGE_BYTES + 1));
        // SAFETY: the second page, still mapped and unused.
        unsafe { libc::munmap(std::ptr::with_exposed_provenance_mut(a), PAGE_BYTES) };
        assert!(!is_mapped(a, 1));
        assert!(
            is_mapped(a - PAGE_BYTES, PAGE_BYTES),
            "the guard is still mapped"
        );
        // SAFETY: the whole range of the mapping; its middle is already gone.
        unsafe { libc::munmap(p, 4 * PAGE_BYTES) };
    }
}

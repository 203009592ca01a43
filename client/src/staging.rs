//! The daemon's staging memfd, mapped shared and read-write into this
//! process, and the spans copies go through.
//!
//! Everything the daemon said about the layout is checked before the first
//! byte is copied: [`StagingInfo::check`], tensors that do not overlap, and
//! the memfd's real size (`fstat`) equal to `memfd_bytes`.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::device::StagingSpan;
use crate::error::{Error, Result};
use crate::proto::StagingInfo;

/// A mapped staging memfd of one registration.
#[derive(Debug)]
pub(crate) struct Staging {
    info: StagingInfo,
    /// Byte length of each registered tensor, in registration order.
    tensor_bytes: Vec<u64>,
    /// Tensor indices sorted by offset.
    by_offset: Vec<usize>,
    base: NonNull<u8>,
    /// Mapped bytes; 0 when the memfd is empty (then `base` is dangling).
    mapped: usize,
    _fd: OwnedFd,
}

// SAFETY: `Staging` hands out access to the mapping only through
// `StagingSpan`s, whose creation is `unsafe` and requires disjointness; the
// struct itself only reads its own plain fields.
unsafe impl Send for Staging {}
// SAFETY: as above.
unsafe impl Sync for Staging {}

/// A piece of a data range: a tensor's bytes or a hole between tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    /// `Some(i)`: bytes `tensor_offset..tensor_offset + len` of tensor `i`.
    pub tensor: Option<usize>,
    pub tensor_offset: u64,
    pub len: u64,
}

fn protocol(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

impl Staging {
    /// Checks `info` against the registration and the memfd, then maps it.
    pub(crate) fn map(fd: OwnedFd, info: StagingInfo, tensor_bytes: Vec<u64>) -> Result<Staging> {
        info.check(&tensor_bytes)
            .map_err(|e| protocol(format!("staging description refused: {e}")))?;
        let mut by_offset: Vec<usize> = (0..tensor_bytes.len()).collect();
        by_offset.sort_by_key(|&i| info.offsets.get(i).copied().unwrap_or(0));
        let stat = nix::sys::stat::fstat(&fd).map_err(|e| Error::Io(e.into()))?;
        if u64::try_from(stat.st_size).ok() != Some(info.memfd_bytes) {
            return Err(protocol(format!(
                "staging memfd is {} bytes, the description says {}",
                stat.st_size, info.memfd_bytes
            )));
        }
        seal_against_shrinking(&fd);
        let mapped = usize::try_from(info.memfd_bytes)
            .map_err(|_| protocol("staging memfd larger than the address space"))?;
        let base = match NonZeroUsize::new(mapped) {
            None => NonNull::dangling(),
            Some(len) => {
                // SAFETY: a fresh shared mapping of a file we hold, at an
                // address the kernel picks, aliases no Rust object; it is
                // unmapped only in `Drop`, after every span (borrowing
                // `self`) is gone.
                let ptr = unsafe {
                    mmap(
                        None,
                        len,
                        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                        // The daemon allocated every page at registration;
                        // populating the page tables now keeps the first
                        // capture from paying a fault per page.
                        MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                        &fd,
                        0,
                    )
                }
                .map_err(|e| Error::Io(e.into()))?;
                ptr.cast::<u8>()
            }
        };
        Ok(Staging {
            info,
            tensor_bytes,
            by_offset,
            base,
            mapped,
            _fd: fd,
        })
    }

    /// The layout the daemon described.
    pub(crate) fn info(&self) -> &StagingInfo {
        &self.info
    }

    /// Bytes of tensor data in one snapshot.
    pub(crate) fn tensor_bytes_total(&self) -> u64 {
        self.tensor_bytes.iter().sum()
    }

    /// A span over memfd bytes `offset..offset + len`.
    ///
    /// # Safety
    /// No other live span covers any of these bytes.
    ///
    /// # Panics
    /// When the range is outside the mapping (the layout was checked, so
    /// that is a bug in this crate).
    unsafe fn span(&self, offset: u64, len: u64) -> StagingSpan<'_> {
        let end = offset.checked_add(len).expect("span end overflows");
        assert!(
            end <= self.mapped as u64,
            "span {offset}..{end} outside the {}-byte mapping",
            self.mapped
        );
        let (offset, len) = (to_usize(offset), to_usize(len));
        // SAFETY: `offset <= end <= mapped` (checked above), inside the mapping.
        let ptr = unsafe { self.base.add(offset) };
        // SAFETY: the range is inside the live mapping (read-write, shared)
        // for as long as `self` is borrowed; disjointness is the caller's.
        unsafe { StagingSpan::new(ptr, len) }
    }

    /// One span per registered tensor (registration order) in `slot`.
    ///
    /// # Safety
    /// No other span over this slot is alive.
    pub(crate) unsafe fn slot_spans(&self, slot: u32) -> Result<Vec<StagingSpan<'_>>> {
        if slot >= self.info.slots {
            return Err(protocol(format!("slot {slot} of {}", self.info.slots)));
        }
        let base = u64::from(slot) * self.info.slot_bytes;
        Ok((0..self.tensor_bytes.len())
            .map(|i| {
                // SAFETY: tensors do not overlap (checked in `map`) and the
                // caller holds no other span over this slot.
                unsafe {
                    self.span(
                        base + offset_of(&self.info, i),
                        len_of(&self.tensor_bytes, i),
                    )
                }
            })
            .collect())
    }

    /// The ring position of stream chunk `seq`, cut along `segments`.
    ///
    /// # Safety
    /// No other span over this ring position is alive.
    pub(crate) unsafe fn chunk_spans(&self, seq: u64) -> Vec<(Segment, StagingSpan<'_>)> {
        let (start, end) = self.info.chunk_range(seq);
        // SAFETY: the caller's promise; `check` put the ring inside the memfd.
        let mut rest = unsafe { self.span(self.info.ring_position(seq), end - start) };
        let mut out = Vec::new();
        for segment in self.segments(start, end) {
            let (head, tail) = rest.split_at(to_usize(segment.len));
            out.push((segment, head));
            rest = tail;
        }
        out
    }

    /// Covers data bytes `start..end` with tensor pieces and holes, in order.
    pub(crate) fn segments(&self, start: u64, end: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut pos = start;
        for &i in &self.by_offset {
            let (off, len) = (offset_of(&self.info, i), len_of(&self.tensor_bytes, i));
            let (lo, hi) = (off.max(pos), off.saturating_add(len).min(end));
            if lo >= hi {
                continue;
            }
            if lo > pos {
                out.push(Segment {
                    tensor: None,
                    tensor_offset: 0,
                    len: lo - pos,
                });
            }
            out.push(Segment {
                tensor: Some(i),
                tensor_offset: lo - off,
                len: hi - lo,
            });
            pos = hi;
        }
        if pos < end {
            out.push(Segment {
                tensor: None,
                tensor_offset: 0,
                len: end - pos,
            });
        }
        out
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.mapped > 0 {
            // SAFETY: `base`/`mapped` are the mapping made in `map`; spans
            // borrow `self`, so none is alive now.
            if let Err(e) = unsafe { munmap(self.base.cast(), self.mapped) } {
                tracing::warn!(error = %e, "munmap of the staging memfd failed");
            }
        }
    }
}

/// A length or offset inside the mapping (which fits the address space).
fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("a value inside the mapping fits usize")
}

fn offset_of(info: &StagingInfo, i: usize) -> u64 {
    info.offsets.get(i).copied().unwrap_or(0)
}

fn len_of(tensor_bytes: &[u64], i: usize) -> u64 {
    tensor_bytes.get(i).copied().unwrap_or(0)
}

/// Asks the kernel to refuse any later shrink of the memfd, so a daemon bug
/// cannot turn our copies into SIGBUS. Only possible when the daemon created
/// it with sealing allowed; otherwise nothing changes.
fn seal_against_shrinking(fd: &OwnedFd) {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    if let Err(e) = fcntl(fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)) {
        tracing::debug!(error = %e, "staging memfd cannot be sealed against shrinking");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing, clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::proto::BusyPolicy;
    use nix::sys::memfd::{MFdFlags, memfd_create};

    fn info() -> StagingInfo {
        StagingInfo {
            memory: crate::proto::StagingMemory::HostMemfd,
            memfd_bytes: 3 * 4096,
            slots: 2,
            slot_bytes: 4096,
            data_bytes: 100,
            offsets: vec![64, 0],
            ring_offset: 8192,
            ring_chunks: 2,
            chunk_bytes: 48,
            policy: BusyPolicy::Stream,
        }
    }

    fn memfd(len: i64) -> OwnedFd {
        let fd = memfd_create("staging-test", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, len).unwrap();
        fd
    }

    #[test]
    fn a_memfd_of_the_wrong_size_or_a_bad_layout_is_a_protocol_error() {
        let err = Staging::map(memfd(4096), info(), vec![36, 60]).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("memfd is 4096 bytes")),
            "{err}"
        );
        let err = Staging::map(memfd(3 * 4096), info(), vec![37, 60]).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("refused")),
            "{err}"
        );
        let mut overlapping = info();
        overlapping.offsets = vec![0, 30];
        let err = Staging::map(memfd(3 * 4096), overlapping, vec![36, 60]).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("overlap")),
            "{err}"
        );
    }

    #[test]
    fn segments_cover_chunks_with_tensor_pieces_and_holes() {
        let staging = Staging::map(memfd(3 * 4096), info(), vec![30, 60]).unwrap();
        // tensor 1 at 0..60, tensor 0 at 64..94, hole 60..64 and 94..100.
        assert_eq!(staging.info().chunk_count(), 3);
        let seg = |tensor, tensor_offset, len| Segment {
            tensor,
            tensor_offset,
            len,
        };
        assert_eq!(staging.segments(0, 48), vec![seg(Some(1), 0, 48)]);
        assert_eq!(
            staging.segments(48, 96),
            vec![
                seg(Some(1), 48, 12),
                seg(None, 0, 4),
                seg(Some(0), 0, 30),
                seg(None, 0, 2)
            ]
        );
        assert_eq!(staging.segments(96, 100), vec![seg(None, 0, 4)]);
        // SAFETY: no other span is alive.
        let spans = unsafe { staging.chunk_spans(1) };
        assert_eq!(spans.iter().map(|(_, s)| s.len()).sum::<usize>(), 48);
        drop(spans);
        // SAFETY: the chunk spans above are gone.
        let slot = unsafe { staging.slot_spans(1) }.unwrap();
        assert_eq!(
            slot.iter().map(|s| s.len()).collect::<Vec<_>>(),
            vec![30, 60]
        );
        drop(slot);
        // SAFETY: as above.
        assert!(unsafe { staging.slot_spans(2) }.is_err());
    }
}

//! The daemon's staging memfd, mapped shared and read-write into this
//! process, attached to every device of the registration, and the spans
//! copies go through.
//!
//! Everything the daemon said about the layout is checked before the first
//! byte is copied: the kind of memory (a host memfd is the one this client
//! maps; any other kind is refused, named), [`StagingInfo::check`], tensors
//! that do not overlap, the
//! memfd's real size (`fstat`) equal to `memfd_bytes`, and its seals: a
//! memfd the daemon could still shrink would turn a copy into `SIGBUS`, so
//! one without `F_SEAL_SHRINK` and `F_SEAL_GROW` is refused.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::device::{AttachedStaging, Device, PinPolicy, Pinning, StagingRegion, StagingSpan};
use crate::error::{Error, Result};
use crate::proto::convert::{nanos, to_u64, to_usize};
use crate::proto::{ATTACH_DEVICES_MAX, AttachReport, PinState, StagingInfo, StagingMemory};

/// The mapping of one staging memfd and what each device attached to it.
/// Shared by the registration's [`Staging`] and every span; unmapped when
/// the last of them goes, after the attachments are undone.
#[derive(Debug)]
pub(crate) struct Mapping {
    region: StagingRegion,
    /// One per device of the registration, in attach order.
    attached: Vec<Box<dyn AttachedStaging>>,
    _fd: OwnedFd,
}

impl Mapping {
    pub(crate) fn region(&self) -> &StagingRegion {
        &self.region
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Detach (unregister) before the memory goes away, newest first.
        while let Some(attached) = self.attached.pop() {
            drop(attached);
        }
        if let Some(len) = NonZeroUsize::new(self.region.len()) {
            let base =
                NonNull::new(self.region.as_ptr()).expect("a non-empty mapping has an address");
            // SAFETY: `base`/`len` are the mapping made in `Staging::map`;
            // every span holds this `Mapping`, so none is alive now, and no
            // Rust reference ever covered the mapped bytes.
            if let Err(e) = unsafe { munmap(base.cast(), len.get()) } {
                tracing::warn!(error = %e, "munmap of the staging memfd failed");
            }
        }
    }
}

/// A mapped staging memfd of one registration.
#[derive(Debug)]
pub(crate) struct Staging {
    info: StagingInfo,
    /// Byte length of each registered tensor, in registration order.
    tensor_bytes: Vec<u64>,
    /// Tensor indices sorted by offset.
    by_offset: Vec<usize>,
    mapping: Arc<Mapping>,
}

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

/// A device's [`Pinning`] in the protocol's words (the time in whole
/// nanoseconds; one that is not a duration, which no device measures, is 0).
fn pin_state(pinning: Pinning) -> PinState {
    match pinning {
        Pinning::NotNeeded => PinState::NotNeeded,
        Pinning::Pinned { bytes, seconds } => PinState::Pinned {
            bytes,
            pin_ns: std::time::Duration::try_from_secs_f64(seconds).map_or(0, nanos),
        },
        Pinning::Unpinned { reason } => PinState::Unpinned { reason },
    }
}

/// Whether this client can map staging memory of `memory`'s kind: a host
/// memfd it maps shared. A kind a newer protocol crate adds (a CUDA VMM
/// export) is refused, naming it, until this module learns to map it.
fn check_memory(memory: &StagingMemory) -> Result<()> {
    match memory {
        StagingMemory::HostMemfd => Ok(()),
        // `StagingMemory` is non-exhaustive across crates: this arm is every
        // kind the protocol crate has and this client does not map.
        other => Err(protocol(format!(
            "staging memory of kind {:?} cannot be mapped by this client (it maps {:?} only)",
            other.name(),
            StagingMemory::HostMemfd.name()
        ))),
    }
}

impl Staging {
    /// Checks `info` against the registration and the memfd, maps it, and
    /// attaches every device in `devices` (an attach error fails the whole
    /// registration, and what was attached before is undone).
    pub(crate) fn map(
        fd: OwnedFd,
        info: StagingInfo,
        tensor_bytes: Vec<u64>,
        devices: &[Arc<dyn Device>],
        pin_policy: PinPolicy,
    ) -> Result<Staging> {
        check_memory(&info.memory)?;
        info.check(&tensor_bytes)
            .map_err(|e| protocol(format!("staging description refused: {e}")))?;
        let mut by_offset: Vec<usize> = (0..tensor_bytes.len()).collect();
        by_offset.sort_by_key(|&i| offset_of(&info, i));
        let stat = nix::sys::stat::fstat(&fd).map_err(|e| Error::Io(e.into()))?;
        if u64::try_from(stat.st_size).ok() != Some(info.memfd_bytes) {
            return Err(protocol(format!(
                "staging memfd is {} bytes, the description says {}",
                stat.st_size, info.memfd_bytes
            )));
        }
        check_seals(&fd)?;
        let mapped = usize::try_from(info.memfd_bytes)
            .map_err(|_| protocol("staging memfd larger than the address space"))?;
        let base = match NonZeroUsize::new(mapped) {
            None => NonNull::dangling(),
            Some(len) => {
                // SAFETY: a fresh shared mapping of a file we hold, at an
                // address the kernel picks, aliases no Rust object; it is
                // unmapped only when the `Mapping` below drops, after every
                // span (each holds the mapping) is gone.
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
        let mut mapping = Mapping {
            // SAFETY: `base..base + mapped` was just mapped and stays mapped
            // until this `Mapping` drops; `base` is dangling only when
            // `mapped` is 0.
            region: unsafe { StagingRegion::new(base, mapped, pin_policy) },
            attached: Vec::with_capacity(devices.len()),
            _fd: fd,
        };
        for device in devices {
            let attached = device.attach(&mapping.region)?;
            mapping.attached.push(attached);
        }
        Ok(Staging {
            info,
            tensor_bytes,
            by_offset,
            mapping: Arc::new(mapping),
        })
    }

    /// What each device's attach did to the mapping (page-locked or not),
    /// one per device of the registration, in the client's device order.
    pub(crate) fn pinning(&self) -> Vec<Pinning> {
        self.mapping.attached.iter().map(|a| a.pinning()).collect()
    }

    /// What the daemon is told about the attachments (`Attached`): one
    /// report per device of `devices` (the ones it was mapped with, in that
    /// order), named by [`Device::label`], at most [`ATTACH_DEVICES_MAX`].
    pub(crate) fn attach_reports(&self, devices: &[Arc<dyn Device>]) -> Vec<AttachReport> {
        devices
            .iter()
            .zip(self.pinning())
            .take(ATTACH_DEVICES_MAX)
            .map(|(device, pinning)| AttachReport::new(&device.label(), pin_state(pinning)))
            .collect()
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
    unsafe fn span(&self, offset: u64, len: u64) -> StagingSpan {
        let mapped = self.mapping.region().len();
        let end = offset.checked_add(len).expect("span end overflows");
        assert!(
            end <= to_u64(mapped),
            "span {offset}..{end} outside the {mapped}-byte mapping",
        );
        let base =
            NonNull::new(self.mapping.region().as_ptr()).expect("the mapping has an address");
        // SAFETY: `offset <= end <= mapped` (checked above): inside the
        // mapping, or one past it for an empty span.
        let ptr = unsafe { base.add(to_usize(offset)) };
        // SAFETY: the range is inside the mapping, which the span holds;
        // disjointness is the caller's promise.
        unsafe { StagingSpan::new(Arc::clone(&self.mapping), ptr, to_usize(len)) }
    }

    /// One span per registered tensor (registration order) in `slot`.
    ///
    /// # Safety
    /// No other span over this slot is alive.
    pub(crate) unsafe fn slot_spans(&self, slot: u32) -> Result<Vec<StagingSpan>> {
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
    pub(crate) unsafe fn chunk_spans(&self, seq: u64) -> Vec<(Segment, StagingSpan)> {
        let (start, end) = self.info.chunk_range(seq);
        // SAFETY: the caller's promise; `check` put the ring inside the memfd.
        let mut rest = unsafe { self.span(self.info.ring_position(seq), end - start) };
        let segments = self.segments(start, end);
        let mut out = Vec::with_capacity(segments.len());
        for segment in segments {
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
            let (lo, hi) = (off.max(pos), (off + len).min(end));
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

/// Tensor `i`'s offset in a slot; `i` is a registered tensor, which `check`
/// gave an offset.
fn offset_of(info: &StagingInfo, i: usize) -> u64 {
    *info
        .offsets
        .get(i)
        .expect("every registered tensor has an offset (checked)")
}

/// Tensor `i`'s byte length; `i` is a registered tensor.
fn len_of(tensor_bytes: &[u64], i: usize) -> u64 {
    *tensor_bytes.get(i).expect("a registered tensor's index")
}

/// Refuses a memfd that could still shrink or grow under the mapping (the
/// daemon seals its memfds before it passes them; this is the check that it
/// did).
fn check_seals(fd: &OwnedFd) -> Result<()> {
    let bits = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| {
        protocol(format!(
            "staging descriptor refused: F_GET_SEALS failed ({e}), so it is not a sealed memfd"
        ))
    })?;
    let seals = SealFlag::from_bits_truncate(bits);
    let missing: Vec<&str> = [
        (SealFlag::F_SEAL_SHRINK, "F_SEAL_SHRINK"),
        (SealFlag::F_SEAL_GROW, "F_SEAL_GROW"),
    ]
    .into_iter()
    .filter(|(flag, _)| !seals.contains(*flag))
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(protocol(format!(
            "staging memfd refused: it is not sealed against resizing (missing {})",
            missing.join(" and ")
        )))
    }
}

/// Staging for unit tests of the copy paths: a sealed memfd and a layout.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use std::os::fd::OwnedFd;

    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};

    use crate::proto::{BusyPolicy, StagingInfo, StagingMemory};

    /// A memfd of `len` bytes sealed as the daemon seals it, and a second
    /// handle on it for the test to read the bytes back.
    pub(crate) fn memfd(len: u64) -> (OwnedFd, std::fs::File) {
        let fd = memfd_create(
            "staging-test",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        nix::unistd::ftruncate(&fd, i64::try_from(len).unwrap()).unwrap();
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .unwrap();
        let reader = std::fs::File::from(fd.try_clone().unwrap());
        (fd, reader)
    }

    /// One slot holding tensors of `lens` bytes back to back, no ring.
    pub(crate) fn one_slot(lens: &[u64]) -> StagingInfo {
        let mut offsets = Vec::new();
        let mut end = 0;
        for len in lens {
            offsets.push(end);
            end += len;
        }
        let slot_bytes = end.div_ceil(4096).max(1) * 4096;
        StagingInfo {
            memory: StagingMemory::HostMemfd,
            memfd_bytes: slot_bytes,
            slots: 1,
            slot_bytes,
            data_bytes: end,
            offsets,
            ring_offset: slot_bytes,
            ring_chunks: 0,
            chunk_bytes: 4096,
            policy: BusyPolicy::Block,
        }
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

    /// A memfd of `len` bytes with `seals` added.
    fn memfd_sealed(len: i64, seals: SealFlag) -> OwnedFd {
        let fd = memfd_create(
            "staging-test",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        nix::unistd::ftruncate(&fd, len).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
        fd
    }

    /// A memfd sealed as the daemon seals it.
    fn memfd(len: i64) -> OwnedFd {
        testing::memfd(u64::try_from(len).unwrap()).0
    }

    fn map(fd: OwnedFd, info: StagingInfo, tensor_bytes: Vec<u64>) -> Result<Staging> {
        Staging::map(fd, info, tensor_bytes, &[], PinPolicy::Prefer)
    }

    #[test]
    fn a_memfd_that_could_still_shrink_or_grow_is_refused_naming_the_missing_seals() {
        let unsealed = memfd_create("staging-test", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&unsealed, 3 * 4096).unwrap();
        let err = map(unsealed, info(), vec![36, 60]).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("missing F_SEAL_SHRINK and F_SEAL_GROW")),
            "{err}"
        );
        let err = map(
            memfd_sealed(3 * 4096, SealFlag::F_SEAL_SHRINK),
            info(),
            vec![36, 60],
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.ends_with("(missing F_SEAL_GROW)")),
            "{err}"
        );
        let err = map(
            memfd_sealed(3 * 4096, SealFlag::F_SEAL_GROW),
            info(),
            vec![36, 60],
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.ends_with("(missing F_SEAL_SHRINK)")),
            "{err}"
        );
        // A descriptor that is not a memfd at all (a plain file cannot be
        // sealed: F_GET_SEALS fails, or reports only F_SEAL_SEAL on tmpfs).
        let file: OwnedFd = tempfile::tempfile().unwrap().into();
        nix::unistd::ftruncate(&file, 3 * 4096).unwrap();
        let err = map(file, info(), vec![36, 60]).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.starts_with("staging") && m.contains("refused")),
            "{err}"
        );
        map(memfd(3 * 4096), info(), vec![36, 60]).expect("a sealed memfd maps");
    }

    #[test]
    fn a_host_memfd_is_the_staging_memory_this_client_maps() {
        // The only kind the protocol has today; the refusal of any other
        // is the non-exhaustive arm of `check_memory`.
        check_memory(&StagingMemory::HostMemfd).expect("a host memfd maps");
        assert_eq!(info().memory, StagingMemory::HostMemfd);
        map(memfd(3 * 4096), info(), vec![36, 60]).expect("maps");
    }

    #[test]
    fn a_memfd_of_the_wrong_size_or_a_bad_layout_is_a_protocol_error() {
        let err = map(memfd(4096), info(), vec![36, 60]).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("memfd is 4096 bytes")),
            "{err}"
        );
        let err = map(memfd(3 * 4096), info(), vec![37, 60]).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("refused")),
            "{err}"
        );
        let mut overlapping = info();
        overlapping.offsets = vec![0, 30];
        let err = map(memfd(3 * 4096), overlapping, vec![36, 60]).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("overlap")),
            "{err}"
        );
    }

    #[test]
    fn segments_cover_chunks_with_tensor_pieces_and_holes() {
        let staging = map(memfd(3 * 4096), info(), vec![30, 60]).unwrap();
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

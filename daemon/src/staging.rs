//! Staging memory: one sealed `memfd` per registration, owned by the daemon,
//! mapped by the daemon and (after `SCM_RIGHTS`) by the trainer.
//!
//! ```text
//! memfd: [slot 0: data section][pad to 4096] [slot 1 ...] [stream ring: ring_chunks x chunk_bytes]
//! ```
//!
//! A slot holds the data section exactly as the store writes it (tensors
//! packed in the store's layout order), so the persist engine writes it to
//! disk with O_DIRECT straight from the mapping, with no copy. Every slot
//! starts on a 4096-byte boundary.
//!
//! Slot states: `Free -> Capturing (client copies) -> Persisting (engine
//! writes) -> Free`, and `Free -> Lent (a restore filled it; the client copies
//! out) -> Free`. Only the daemon moves a slot between states; the client
//! writes a slot only while it is `Capturing` for it, reads it only while it
//! is `Lent` to it.
//!
//! A claimed slot is a guard, never a bare index: [`CapturingSlot`],
//! [`PersistingSlot`] and [`LentSlot`] each return their slot to `Free` when
//! dropped, so a connection that ends in any way (a panic too) and a lane
//! that panics mid-persist give their slots back. A capturing slot becomes a
//! persisting one only by being handed over ([`CapturingSlot::into_persisting`]).
//!
//! # Slot memory is a handle, never a slice
//!
//! The trainer maps the memfd read-write and can write any byte of it at
//! any time (a correct one only into a slot `Capturing` for it and a ring
//! chunk it has not announced; a buggy or hostile one anywhere). The daemon
//! therefore never forms a `&[u8]` or `&mut [u8]` over staging: it reaches
//! a slot through a handle built on [`SharedBytes`] (raw-pointer copies,
//! checksums through a private bounce buffer, the raw region for O_DIRECT),
//! and only through the slot's guard, so the handle lives no longer than
//! the slot's state:
//!
//! * [`PersistingSlot::memory`] gives the persist engine a [`SlotMemory`]:
//!   the [`Source`] the store writes ([`SlotMemory::source`]) and the copy
//!   out into the hot tier ([`SlotMemory::copy_out`]);
//! * [`LentSlot::fill_target`] gives a restore a [`FillTarget`]: verified
//!   private bytes copied in ([`FillTarget::copy_in`]) and, where the
//!   memory allows it, the region a store read fills with O_DIRECT
//!   ([`FillTarget::direct_read`]);
//! * [`StagingArea::ring_chunk`] gives a streamed capture a [`RingChunk`]
//!   to copy out of.
//!
//! What holds for each handle (the SAFETY argument, made once in
//! `StagingArea::shared`): the bytes are mapped (the [`StagingArea`] owns
//! the mapping and unmaps it only when dropped, and every handle borrows a
//! guard or the area that keeps it alive); they are in bounds (asserted
//! against the mapping when the handle is made, and every operation checks
//! its range against the handle); and the only concurrent writer is the
//! trainer, which can only corrupt its own snapshot, which the chunk CRCs
//! expose: a chunk's CRC is computed from the bytes as the daemon read
//! them, so a write that lands between the persist's O_DIRECT transfer and
//! its CRC read of the same bytes, or after the commit and before the hot
//! copy, shows as a CRC mismatch when that chunk is read back (from disk,
//! or from the hot tier, which then falls back to disk). A write before
//! both reads is simply part of the snapshot the trainer asked for.
//!
//! # The seam for GPU staging
//!
//! Every slot today is host memory ([`StagingMemory::HostMemfd`]), and the
//! handles say so in one private enum. Staging in GPU memory (a later
//! `StagingMemory::CudaVmm`) adds a variant there, and each operation gets
//! its arm: the persist's [`Source`] becomes a device-to-host stream through
//! pinned buffers (today `Source::Shared`, O_DIRECT straight from the slot),
//! the hot copy a device-to-host copy, and the restore's fill target takes
//! verified host bytes and copies them in (today `copy_in`, or a direct read
//! from disk into the slot with `Store::read_into_shared`), with
//! [`FillTarget::direct_read`] `None` until GPUDirect Storage can fill
//! device memory.

use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use gpusnap_proto::TensorSpec;
use gpusnap_proto::convert::{gauge, to_u64, to_usize};
use gpusnap_proto::{BusyPolicy, StagingInfo, StagingMemory};

use crate::buffer_pool::IO_ALIGN_BYTES;
use crate::metrics::Metrics;
use crate::shared_memory::{OutOfRange, SharedBytes};
use crate::store::layout::LayoutError;
use crate::store::{Layout, Source};

/// Why a staging area cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("{0}")]
    Layout(#[from] LayoutError),
    #[error(
        "staging needs {needed} bytes ({slots} slot(s) of {slot_bytes} bytes and a {ring_bytes}-byte ring) but only {free} of the {budget}-byte staging budget are free"
    )]
    BudgetExceeded {
        needed: u64,
        slots: u32,
        slot_bytes: u64,
        ring_bytes: u64,
        free: u64,
        budget: u64,
    },
    #[error("creating the staging memfd ({bytes} bytes): {op}: {source}")]
    Memfd {
        op: &'static str,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping the staging memfd ({len} bytes): {source}")]
    Map {
        len: u64,
        #[source]
        source: nix::Error,
    },
}

impl StagingError {
    /// The operating system's error behind this one, if a system call
    /// failed.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StagingError::Memfd { source, .. } => source.raw_os_error(),
            StagingError::Map { source, .. } => Some(*source as i32),
            StagingError::Layout(_) | StagingError::BudgetExceeded { .. } => None,
        }
    }
}

/// The global staging budget. Leases give their bytes back on drop.
#[derive(Debug)]
pub struct StagingBudget {
    budget_bytes: u64,
    used_bytes: Mutex<u64>,
    metrics: Arc<Metrics>,
}

impl StagingBudget {
    pub fn new(budget_bytes: u64, metrics: Arc<Metrics>) -> Arc<StagingBudget> {
        metrics.staging_budget_bytes.set(gauge(budget_bytes));
        Arc::new(StagingBudget {
            budget_bytes,
            used_bytes: Mutex::new(0),
            metrics,
        })
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        *self
            .used_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn try_reserve(self: &Arc<Self>, bytes: u64) -> Result<BudgetLease, u64> {
        let mut used = self
            .used_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let free = self.budget_bytes.saturating_sub(*used);
        if bytes > free {
            return Err(free);
        }
        *used += bytes;
        self.metrics.staging_bytes.set(gauge(*used));
        Ok(BudgetLease {
            budget: Arc::clone(self),
            bytes,
        })
    }
}

/// Bytes of the staging budget held by one staging area.
#[derive(Debug)]
struct BudgetLease {
    budget: Arc<StagingBudget>,
    bytes: u64,
}

impl Drop for BudgetLease {
    fn drop(&mut self) {
        let mut used = self
            .budget
            .used_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Never a panic in a Drop (a second one while unwinding aborts the
        // daemon): a broken count is logged, and fails debug builds when
        // not unwinding already.
        let left = used.checked_sub(self.bytes);
        if left.is_none() {
            tracing::error!(
                used = *used,
                returned = self.bytes,
                "staging budget accounting underflow; counting it as empty"
            );
        }
        debug_assert!(
            left.is_some() || std::thread::panicking(),
            "staging budget accounting underflow: {} returned of {} used",
            self.bytes,
            *used
        );
        *used = left.unwrap_or(0);
        self.budget.metrics.staging_bytes.set(gauge(*used));
    }
}

/// What a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Free,
    Capturing { step: u64 },
    Persisting { step: u64 },
    Lent,
}

/// How the staging area should be sized.
#[derive(Debug, Clone, Copy)]
pub struct StagingPlan {
    pub double: bool,
    pub policy: BusyPolicy,
    pub chunk_bytes: u64,
    pub ring_chunks: u32,
}

/// One registration's staging memory.
#[derive(Debug)]
pub struct StagingArea {
    memfd: std::fs::File,
    map: NonNull<u8>,
    map_len: usize,
    info: StagingInfo,
    layout: Layout,
    specs: Vec<TensorSpec>,
    slots: Mutex<Vec<SlotState>>,
    slot_freed: tokio::sync::Notify,
    _lease: BudgetLease,
}

// SAFETY: the mapping is owned by this value for its whole life and is
// reached only through `SharedBytes` handles (raw-pointer copies that assume
// nothing of concurrent writers), from whichever thread; the slot table is
// behind a mutex.
unsafe impl Send for StagingArea {}
// SAFETY: as for Send: `&StagingArea` hands out only `SharedBytes`-based
// handles, never a reference over the mapping.
unsafe impl Sync for StagingArea {}

impl StagingArea {
    /// Plans, reserves budget for, creates, seals and maps the staging area
    /// of `specs` (registration order).
    pub fn create(
        specs: Vec<TensorSpec>,
        plan: StagingPlan,
        budget: &Arc<StagingBudget>,
    ) -> Result<StagingArea, StagingError> {
        let layout = Layout::plan(&specs)?;
        let align = IO_ALIGN_BYTES as u64;
        let slot_bytes = layout.data_len.next_multiple_of(align).max(align);
        let ring_chunks = if plan.policy == BusyPolicy::Stream {
            plan.ring_chunks
        } else {
            0
        };
        let ring_bytes = u64::from(ring_chunks) * plan.chunk_bytes;
        let slot_counts: &[u32] = if plan.double { &[2, 1] } else { &[1] };
        let mut reserved = None;
        // The last refusal (the fewest slots), which the error reports.
        let mut refused = None;
        for &slots in slot_counts {
            let needed = u64::from(slots) * slot_bytes + ring_bytes;
            match budget.try_reserve(needed) {
                Ok(lease) => {
                    reserved = Some((slots, lease));
                    break;
                }
                Err(free) => refused = Some((slots, needed, free)),
            }
        }
        let Some((slots, lease)) = reserved else {
            let Some((slots, needed, free)) = refused else {
                unreachable!("at least one slot count is tried");
            };
            return Err(StagingError::BudgetExceeded {
                needed,
                slots,
                slot_bytes,
                ring_bytes,
                free,
                budget: budget.budget_bytes(),
            });
        };
        let ring_offset = u64::from(slots) * slot_bytes;
        let memfd_bytes = ring_offset + ring_bytes;
        let offsets = registration_offsets(&specs, &layout);
        let info = StagingInfo {
            memory: StagingMemory::HostMemfd,
            memfd_bytes,
            slots,
            slot_bytes,
            data_bytes: layout.data_len,
            offsets,
            ring_offset,
            ring_chunks,
            chunk_bytes: plan.chunk_bytes,
            policy: plan.policy,
        };
        let lens: Vec<u64> = specs
            .iter()
            .map(|s| {
                s.byte_len()
                    .expect("Layout::plan checked every tensor's size")
            })
            .collect();
        if let Err(why) = info.check(&lens) {
            unreachable!("a staging plan contradicts itself: {why}");
        }

        let memfd_error = |op: &'static str| {
            move |source: std::io::Error| StagingError::Memfd {
                op,
                bytes: memfd_bytes,
                source,
            }
        };
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("gpusnap-staging")
            .map_err(memfd_io_error)
            .map_err(memfd_error("memfd_create"))?;
        memfd
            .as_file()
            .set_len(memfd_bytes)
            .map_err(memfd_error("ftruncate"))?;
        // The trainer maps this file; it must never shrink under either
        // mapping (a SIGBUS) nor grow past what was planned.
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(memfd_io_error)
            .map_err(memfd_error("F_ADD_SEALS"))?;
        let memfd = memfd.into_file();
        // Allocate every page now: the budget is real memory from the start
        // (a shortage fails the registration, never a capture with SIGBUS),
        // and no capture or restore pays for first-touch faults. Never
        // empty: a slot is at least 4096 bytes, and there is one.
        assert!(memfd_bytes >= align, "a staging area holds a slot");
        let len = i64::try_from(memfd_bytes)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))
            .map_err(memfd_error("fallocate"))?;
        nix::fcntl::fallocate(&memfd, nix::fcntl::FallocateFlags::empty(), 0, len)
            .map_err(std::io::Error::from)
            .map_err(memfd_error("fallocate"))?;
        let map_len = to_usize(memfd_bytes);
        let map = map_shared(&memfd, map_len).map_err(|source| StagingError::Map {
            len: memfd_bytes,
            source,
        })?;
        let slot_table = vec![SlotState::Free; to_usize(u64::from(slots))];
        Ok(StagingArea {
            memfd,
            map,
            map_len,
            info,
            layout,
            specs,
            slots: Mutex::new(slot_table),
            slot_freed: tokio::sync::Notify::new(),
            _lease: lease,
        })
    }

    pub fn info(&self) -> &StagingInfo {
        &self.info
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The registered tensors, in registration order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Claims a free slot for the capture of `step`; `None` if every slot
    /// is busy.
    pub fn claim_capturing(self: &Arc<Self>, step: u64) -> Option<CapturingSlot> {
        self.claim(SlotState::Capturing { step }).map(CapturingSlot)
    }

    /// Claims a free slot for a restore to fill and lend; `None` if every
    /// slot is busy.
    pub fn claim_lent(self: &Arc<Self>) -> Option<LentSlot> {
        self.claim(SlotState::Lent).map(LentSlot)
    }

    fn claim(self: &Arc<Self>, state: SlotState) -> Option<SlotLease> {
        assert_ne!(state, SlotState::Free, "claiming a slot for nothing");
        let mut slots = self.lock_slots();
        let index = slots.iter().position(|s| *s == SlotState::Free)?;
        let slot = slots.get_mut(index)?;
        *slot = state;
        Some(SlotLease {
            staging: Arc::clone(self),
            slot: u32::try_from(index).expect("the slot count is a u32"),
            state,
        })
    }

    /// Moves slot `slot` from `from` to `to`; false (and nothing changes) if
    /// it was not in `from`. Only the slot guards call this.
    fn transition(&self, slot: u32, from: SlotState, to: SlotState) -> bool {
        let mut slots = self.lock_slots();
        let Some(s) = slots.get_mut(to_usize(u64::from(slot))) else {
            return false;
        };
        if *s != from {
            return false;
        }
        *s = to;
        drop(slots);
        if to == SlotState::Free {
            self.slot_freed.notify_waiters();
        }
        true
    }

    pub fn slot_state(&self, slot: u32) -> Option<SlotState> {
        self.lock_slots().get(to_usize(u64::from(slot))).copied()
    }

    /// Slots not free.
    pub fn busy_slots(&self) -> u32 {
        let n = self
            .lock_slots()
            .iter()
            .filter(|s| **s != SlotState::Free)
            .count();
        u32::try_from(n).expect("the slot count is a u32")
    }

    /// Resolves when some slot becomes free (create it before checking, then
    /// await it).
    pub fn slot_freed(&self) -> &tokio::sync::Notify {
        &self.slot_freed
    }

    /// The ring position of stream chunk `seq`, `len` bytes of it, for a
    /// streamed capture to copy out of. By the protocol the client writes a
    /// ring position only after being told it is free (`ChunkFree`) and
    /// before announcing it (`ChunkFilled`), and the stream copies a chunk
    /// out only between its `ChunkFilled` and its `ChunkFree`; a client that
    /// breaks this can only tear its own streamed snapshot (the copy is what
    /// is checksummed and written).
    pub fn ring_chunk(&self, seq: u64, len: usize) -> RingChunk<'_> {
        assert!(
            self.info.ring_chunks > 0 && to_u64(len) <= self.info.chunk_bytes,
            "ring chunk {seq} of {len} bytes outside the ring"
        );
        RingChunk {
            bytes: self.shared(to_usize(self.info.ring_position(seq)), len),
        }
    }

    /// The memory of slot `slot`: its data section and the whole slot (the
    /// data section and its padding to 4096). Only the slot guards call
    /// this, so the memory is reached only while the slot is claimed.
    fn slot_memory(&self, slot: u32) -> Memory<'_> {
        assert!(slot < self.info.slots, "slot {slot} out of range");
        let start = to_usize(u64::from(slot) * self.info.slot_bytes);
        assert!(start.is_multiple_of(IO_ALIGN_BYTES), "slot not aligned");
        assert!(
            self.info.data_bytes <= self.info.slot_bytes,
            "a slot's data section is larger than the slot"
        );
        Memory::HostMemfd {
            data: self.shared(start, to_usize(self.info.data_bytes)),
            whole: self.shared(start, to_usize(self.info.slot_bytes)),
        }
    }

    /// A handle on the `len` bytes of the mapping at `offset`.
    fn shared(&self, offset: usize, len: usize) -> SharedBytes<'_> {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.map_len),
            "staging bytes {offset}..+{len} past the {}-byte mapping",
            self.map_len
        );
        // SAFETY: mapped: `map` is the MAP_SHARED mapping of `map_len` bytes
        // this area made and unmaps only in its Drop, and the handle borrows
        // `self`, so it cannot outlive the mapping. In bounds: asserted
        // above, so the pointer arithmetic stays inside it. The only
        // concurrent writer is the trainer (its own mapping of the memfd),
        // which can only corrupt its own snapshot, which the chunk CRCs
        // expose; this process reaches the bytes only through `SharedBytes`
        // handles and the O_DIRECT regions the store makes of them, never
        // through a Rust reference.
        unsafe { SharedBytes::new(self.map.as_ptr().add(offset), len) }
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Vec<SlotState>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A claimed slot in state `state`; back to `Free` when dropped.
#[derive(Debug)]
struct SlotLease {
    staging: Arc<StagingArea>,
    slot: u32,
    state: SlotState,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let freed = self
            .staging
            .transition(self.slot, self.state, SlotState::Free);
        // Never a panic in a Drop (a second one while unwinding aborts the
        // daemon): logged, and failing debug builds when not unwinding.
        if !freed {
            tracing::error!(
                slot = self.slot,
                state = ?self.state,
                "a slot left its state under its guard; it is not freed"
            );
        }
        debug_assert!(
            freed || std::thread::panicking(),
            "slot {} left {:?} under its guard",
            self.slot,
            self.state
        );
    }
}

/// A slot the client is capturing one step into. Dropped (the client left,
/// aborted, or its connection panicked), the slot is `Free` again and
/// nothing of the step is written; handed to the lane
/// ([`CapturingSlot::into_persisting`]), it is the engine's.
#[derive(Debug)]
#[must_use = "the slot is freed when the guard is dropped"]
pub struct CapturingSlot(SlotLease);

impl CapturingSlot {
    pub fn index(&self) -> u32 {
        self.0.slot
    }

    pub fn step(&self) -> u64 {
        match self.0.state {
            SlotState::Capturing { step } => step,
            other => unreachable!("a capturing slot in state {other:?}"),
        }
    }

    /// The client has written the step: the slot is now `Persisting`, for
    /// the lane to write and then free.
    pub fn into_persisting(mut self) -> PersistingSlot {
        let step = self.step();
        let to = SlotState::Persisting { step };
        let moved = self.0.staging.transition(self.0.slot, self.0.state, to);
        assert!(moved, "a capturing slot changed state under its guard");
        self.0.state = to;
        PersistingSlot(self.0)
    }
}

/// A slot holding a captured step until the lane has written it; `Free`
/// again when dropped (after the commit, a failure, or a panic in the lane).
#[derive(Debug)]
#[must_use = "the slot is freed when the guard is dropped"]
pub struct PersistingSlot(SlotLease);

impl PersistingSlot {
    pub fn index(&self) -> u32 {
        self.0.slot
    }

    pub fn step(&self) -> u64 {
        match self.0.state {
            SlotState::Persisting { step } => step,
            other => unreachable!("a persisting slot in state {other:?}"),
        }
    }

    pub fn staging(&self) -> &Arc<StagingArea> {
        &self.0.staging
    }

    /// The slot's memory, for the persist engine to write and the hot tier
    /// to copy: borrowed from this guard, so it is reached only while the
    /// slot is `Persisting`.
    pub fn memory(&self) -> SlotMemory<'_> {
        SlotMemory(self.0.staging.slot_memory(self.0.slot))
    }
}

/// A slot a restore fills and lends to the client, until it releases it;
/// `Free` again when dropped.
#[derive(Debug)]
#[must_use = "the slot is freed when the guard is dropped"]
pub struct LentSlot(SlotLease);

impl LentSlot {
    pub fn index(&self) -> u32 {
        self.0.slot
    }

    pub fn staging(&self) -> &Arc<StagingArea> {
        &self.0.staging
    }

    /// The slot as a restore's fill target: borrowed from this guard, so it
    /// is reached only while the slot is `Lent` (and, by the protocol, not
    /// yet reported to the client, which reads it only once told).
    pub fn fill_target(&self) -> FillTarget<'_> {
        FillTarget(self.0.staging.slot_memory(self.0.slot))
    }
}

/// What a slot's bytes are: the seam where GPU staging plugs in (see the
/// module doc). Private, so a handle is made only by a guard.
#[derive(Debug, Clone, Copy)]
enum Memory<'a> {
    /// [`StagingMemory::HostMemfd`]: the slot in the host memfd, as its data
    /// section and as the whole slot (the data section and its padding to
    /// 4096, the length a direct read fills).
    HostMemfd {
        data: SharedBytes<'a>,
        whole: SharedBytes<'a>,
    },
}

/// A persisting slot's memory ([`PersistingSlot::memory`]): what the store
/// writes and what the hot tier copies. Copies of it name the same bytes.
#[derive(Debug, Clone, Copy)]
pub struct SlotMemory<'a>(Memory<'a>);

impl<'a> SlotMemory<'a> {
    /// Bytes of the data section.
    pub fn len(&self) -> usize {
        match self.0 {
            Memory::HostMemfd { data, .. } => data.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data section as the store's source: host memory is written with
    /// O_DIRECT straight from the slot, no copy, its CRCs computed through
    /// the handle.
    pub fn source(&self) -> Source<'a> {
        match self.0 {
            Memory::HostMemfd { data, .. } => Source::Shared(data),
        }
    }

    /// Copies the data bytes at `offset..offset + dst.len()` into `dst`
    /// (private memory: the hot tier's copy).
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
        match self.0 {
            Memory::HostMemfd { data, .. } => data.copy_to(offset, dst),
        }
    }
}

/// A lent slot as a restore fills it ([`LentSlot::fill_target`]). `Copy`
/// and `Sync`: several threads may copy into disjoint ranges at once.
#[derive(Debug, Clone, Copy)]
pub struct FillTarget<'a>(Memory<'a>);

impl<'a> FillTarget<'a> {
    /// Bytes of the data section.
    pub fn len(&self) -> usize {
        match self.0 {
            Memory::HostMemfd { data, .. } => data.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies verified private bytes `src` to data bytes
    /// `offset..offset + src.len()`.
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
        match self.0 {
            Memory::HostMemfd { data, .. } => data.copy_from(offset, src),
        }
    }

    /// The memory a store read may fill with O_DIRECT
    /// (`Store::read_into_shared`): the whole slot, 4096-aligned, its length
    /// the data section rounded up to 4096. `None` where the memory cannot
    /// be the target of a read from disk; the restore then copies in piece
    /// by piece.
    pub fn direct_read(&self) -> Option<SharedBytes<'a>> {
        match self.0 {
            Memory::HostMemfd { whole, .. } => Some(whole),
        }
    }

    /// A fill target over private memory (tests of the restore's copies):
    /// `bytes` is the data section and the whole slot at once.
    #[cfg(test)]
    pub(crate) fn from_private(bytes: &'a mut [u8]) -> FillTarget<'a> {
        let shared = SharedBytes::from_private(bytes);
        FillTarget(Memory::HostMemfd {
            data: shared,
            whole: shared,
        })
    }
}

/// One ring chunk of a streamed capture ([`StagingArea::ring_chunk`]).
#[derive(Debug, Clone, Copy)]
pub struct RingChunk<'a> {
    bytes: SharedBytes<'a>,
}

impl RingChunk<'_> {
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Copies the whole chunk into `dst` (private memory: a pool buffer the
    /// store writes and checksums), which must be the chunk's length.
    pub fn copy_out(&self, dst: &mut [u8]) -> Result<(), OutOfRange> {
        if dst.len() != self.bytes.len() {
            return Err(OutOfRange {
                offset: 0,
                len: dst.len(),
                region_len: self.bytes.len(),
            });
        }
        self.bytes.copy_to(0, dst)
    }
}

impl Drop for StagingArea {
    fn drop(&mut self) {
        // SAFETY: `map` was returned by mmap with exactly `map_len` bytes and
        // is unmapped only here; every handle on it borrows `self` (or a
        // guard holding it), so none outlives the mapping.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.map.cast(), self.map_len) } {
            tracing::error!(error = %e, "munmap of a staging area failed");
        }
    }
}

fn memfd_io_error(e: memfd::Error) -> std::io::Error {
    match e {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => e,
    }
}

fn map_shared(file: &std::fs::File, len: usize) -> Result<NonNull<u8>, nix::Error> {
    use nix::sys::mman::{MapFlags, ProtFlags, mmap};
    let Some(len_nz) = std::num::NonZeroUsize::new(len) else {
        return Err(nix::Error::EINVAL);
    };
    // SAFETY: a fresh shared mapping of a file we own, at an address the
    // kernel picks; it aliases nothing in this process.
    let ptr = unsafe {
        mmap(
            None,
            len_nz,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            // Page tables filled now, not one fault at a time in a capture.
            MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
            file,
            0,
        )
    }?;
    Ok(ptr.cast())
}

/// Offset of each tensor (registration order) within a slot.
fn registration_offsets(specs: &[TensorSpec], layout: &Layout) -> Vec<u64> {
    let by_name: std::collections::HashMap<&str, u64> = layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.offset))
        .collect();
    specs
        .iter()
        .map(|s| {
            *by_name
                .get(s.name.as_str())
                .expect("the layout places every registered tensor")
        })
        .collect()
}

/// Test support: the trainer's side of a staging area.
#[cfg(test)]
pub(crate) mod testing {
    use std::ptr::NonNull;

    use super::{StagingArea, map_shared};

    /// A staging memfd mapped a second time, as the trainer maps it.
    pub(crate) struct TrainerMapping {
        ptr: NonNull<u8>,
        len: usize,
    }

    impl TrainerMapping {
        pub(crate) fn of(area: &StagingArea) -> TrainerMapping {
            let file = area.memfd.try_clone().expect("dup");
            let len = area.map_len;
            TrainerMapping {
                ptr: map_shared(&file, len).expect("mmap"),
                len,
            }
        }

        pub(crate) fn write(&self, offset: usize, bytes: &[u8]) {
            assert!(offset + bytes.len() <= self.len);
            // SAFETY: inside this test's own mapping (asserted); the daemon
            // side reaches the same bytes only through handles.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    self.ptr.as_ptr().add(offset),
                    bytes.len(),
                );
            }
        }

        pub(crate) fn read(&self, offset: usize, len: usize) -> Vec<u8> {
            assert!(offset + len <= self.len);
            let mut out = vec![0; len];
            // SAFETY: inside this test's own mapping (asserted), copied into
            // a private vector.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), len);
            }
            out
        }
    }

    impl Drop for TrainerMapping {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `of`, with this length.
            unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) }.expect("munmap");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TrainerMapping;
    use super::*;
    use gpusnap_proto::Dtype;

    fn plan(policy: BusyPolicy) -> StagingPlan {
        StagingPlan {
            double: true,
            policy,
            chunk_bytes: 4096,
            ring_chunks: 4,
        }
    }

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("mask", Dtype::U8, [5]),
            TensorSpec::new("w", Dtype::F32, [1000]),
        ]
    }

    #[test]
    fn double_slots_where_the_budget_allows_else_one_else_refused() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let budget = StagingBudget::new(5 * 4096 + 100, Arc::clone(&metrics));
        let a = StagingArea::create(specs(), plan(BusyPolicy::Stream), &budget).expect("fits");
        assert_eq!(a.info().slots, 1, "two slots plus the ring do not fit");
        assert_eq!(a.info().ring_chunks, 4);
        assert_eq!(a.info().offsets, vec![4000, 0]);
        assert_eq!(budget.used_bytes(), 4096 + 4 * 4096);
        let err = StagingArea::create(specs(), plan(BusyPolicy::Stream), &budget)
            .expect_err("budget exhausted");
        assert!(matches!(err, StagingError::BudgetExceeded { .. }), "{err}");
        drop(a);
        assert_eq!(budget.used_bytes(), 0, "the lease returns on drop");
        let b = StagingArea::create(specs(), plan(BusyPolicy::Block), &budget).expect("fits");
        assert_eq!((b.info().slots, b.info().ring_chunks), (2, 0));
    }

    #[test]
    fn slots_move_only_through_their_guards_and_the_memfd_is_sealed() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let budget = StagingBudget::new(1 << 20, metrics);
        let a = Arc::new(
            StagingArea::create(specs(), plan(BusyPolicy::Block), &budget).expect("create"),
        );
        let capturing = a.claim_capturing(1).expect("slot");
        let lent = a.claim_lent().expect("slot");
        assert!(a.claim_lent().is_none() && a.claim_capturing(2).is_none());
        assert_eq!(
            a.slot_state(capturing.index()),
            Some(SlotState::Capturing { step: 1 })
        );
        let persisting = capturing.into_persisting();
        assert_eq!(persisting.step(), 1);
        assert_eq!(
            a.slot_state(persisting.index()),
            Some(SlotState::Persisting { step: 1 })
        );
        assert_eq!(a.busy_slots(), 2);
        drop(lent);
        assert_eq!(a.busy_slots(), 1, "a lent slot is freed when dropped");
        drop(persisting);
        assert_eq!(a.busy_slots(), 0, "a persisting slot is freed when dropped");
        let file = a.memfd.try_clone().expect("dup");
        assert!(file.set_len(10).is_err(), "shrinking is sealed");
        assert_eq!(file.metadata().expect("stat").len(), a.info().memfd_bytes);
    }

    #[test]
    fn slot_handles_reach_the_trainer_s_bytes_only_through_their_guards_and_bounds() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let budget = StagingBudget::new(1 << 20, metrics);
        let a = Arc::new(
            StagingArea::create(specs(), plan(BusyPolicy::Stream), &budget).expect("create"),
        );
        let info = a.info().clone();
        assert_eq!(
            (info.slots, info.data_bytes, info.slot_bytes),
            (2, 4005, 4096)
        );
        let trainer = TrainerMapping::of(&a);
        let data: Vec<u8> = (0..4005u32)
            .map(|i| u8::try_from(i % 251).expect("below 251"))
            .collect();

        // A persisting slot's memory: what the trainer wrote into it, as the
        // store's source (the data section, aligned) and as a copy out.
        let persisting = a.claim_capturing(3).expect("slot").into_persisting();
        let at = to_usize(u64::from(persisting.index()) * info.slot_bytes);
        trainer.write(at, &data);
        let memory = persisting.memory();
        assert_eq!(memory.len(), 4005);
        match memory.source() {
            Source::Shared(bytes) => {
                assert_eq!(bytes.len(), 4005);
                assert_eq!(bytes.addr() % IO_ALIGN_BYTES, 0, "O_DIRECT from the slot");
            }
            other => panic!("a host slot is written as shared memory, not {other:?}"),
        }
        let mut out = vec![0; 4005];
        memory.copy_out(0, &mut out).expect("in range");
        assert_eq!(out, data);
        memory
            .copy_out(4000, &mut out[..5])
            .expect("the last bytes");
        assert!(
            memory.copy_out(4000, &mut out[..6]).is_err(),
            "the padding is not data"
        );

        // A lent slot's fill target: bytes copied in are the trainer's to
        // read; a direct read may fill the whole padded slot.
        let lent = a.claim_lent().expect("slot");
        assert_ne!(lent.index(), persisting.index());
        let at = to_usize(u64::from(lent.index()) * info.slot_bytes);
        let target = lent.fill_target();
        assert_eq!(target.len(), 4005);
        target.copy_in(10, b"restored").expect("in range");
        assert_eq!(trainer.read(at + 10, 8), b"restored");
        assert!(target.copy_in(4000, b"sixsix").is_err());
        let whole = target
            .direct_read()
            .expect("host memory is read into directly");
        assert_eq!((whole.len(), whole.addr() % IO_ALIGN_BYTES), (4096, 0));

        // A ring chunk: its position in the memfd, copied out whole.
        let chunk = vec![0xA5; 4096];
        trainer.write(to_usize(info.ring_position(5)), &chunk);
        let ring = a.ring_chunk(5, 4096);
        let mut out = vec![0; 4096];
        ring.copy_out(&mut out).expect("whole chunk");
        assert_eq!(out, chunk);
        assert!(
            ring.copy_out(&mut out[..100]).is_err(),
            "a chunk is copied whole"
        );
        let last = a.ring_chunk(1, 100);
        assert_eq!(last.len(), 100);
    }

    #[test]
    #[should_panic(expected = "outside the ring")]
    fn a_ring_chunk_larger_than_a_ring_position_is_refused() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let budget = StagingBudget::new(1 << 20, metrics);
        let a = StagingArea::create(specs(), plan(BusyPolicy::Stream), &budget).expect("create");
        let _ = a.ring_chunk(0, 4097);
    }

    #[test]
    fn a_capture_dropped_by_a_panic_frees_its_slot_and_the_budget_returns() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let budget = StagingBudget::new(1 << 20, metrics);
        let a = Arc::new(
            StagingArea::create(specs(), plan(BusyPolicy::Block), &budget).expect("create"),
        );
        let used = budget.used_bytes();
        assert!(used > 0);
        let area = Arc::clone(&a);
        let panicked = std::thread::spawn(move || {
            let _capturing = area.claim_capturing(7).expect("slot");
            let _lent = area.claim_lent().expect("slot");
            panic!("a connection task's bug");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(a.busy_slots(), 0, "both slots back to free");
        assert_eq!(budget.used_bytes(), used);
        drop(a);
        assert_eq!(
            budget.used_bytes(),
            0,
            "the last holder gives the budget back"
        );
    }
}

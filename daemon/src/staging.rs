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

use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use gpusnap_proto::TensorSpec;
use gpusnap_proto::{BusyPolicy, StagingInfo, StagingMemory};

use crate::buffer_pool::IO_ALIGN_BYTES;
use crate::metrics::Metrics;
use crate::store::Layout;
use crate::store::layout::LayoutError;

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
    #[error("creating the staging memfd: {0}")]
    Memfd(String),
    #[error("mapping the staging memfd ({len} bytes): {source}")]
    Map {
        len: u64,
        #[source]
        source: nix::Error,
    },
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
        assert!(*used >= self.bytes, "staging budget accounting underflow");
        *used -= self.bytes;
        self.budget.metrics.staging_bytes.set(gauge(*used));
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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

// SAFETY: the mapping is shared memory owned by this value for its whole
// life; access to each slot is arbitrated by the `slots` table (see the
// module doc), and the raw pointer is only dereferenced under that protocol.
unsafe impl Send for StagingArea {}
// SAFETY: as for Send: every method that hands out slot memory checks or is
// documented against the slot table, which is behind a mutex.
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
        let mut tried = Vec::new();
        let slot_counts: &[u32] = if plan.double { &[2, 1] } else { &[1] };
        let mut reserved = None;
        for &slots in slot_counts {
            let needed = u64::from(slots) * slot_bytes + ring_bytes;
            match budget.try_reserve(needed) {
                Ok(lease) => {
                    reserved = Some((slots, lease));
                    break;
                }
                Err(free) => tried.push((slots, needed, free)),
            }
        }
        let Some((slots, lease)) = reserved else {
            let (slots, needed, free) = tried.last().copied().unwrap_or((1, 0, 0));
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
            .map(|s| s.byte_len().unwrap_or(u64::MAX))
            .collect();
        if let Err(why) = info.check(&lens) {
            unreachable!("a staging plan contradicts itself: {why}");
        }

        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("gpusnap-staging")
            .map_err(|e| StagingError::Memfd(e.to_string()))?;
        memfd
            .as_file()
            .set_len(memfd_bytes)
            .map_err(|e| StagingError::Memfd(format!("ftruncate to {memfd_bytes}: {e}")))?;
        // The trainer maps this file; it must never shrink under either
        // mapping (a SIGBUS) nor grow past what was planned.
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(|e| StagingError::Memfd(format!("sealing: {e}")))?;
        let memfd = memfd.into_file();
        // Allocate every page now: the budget is real memory from the start
        // (a shortage fails the registration, never a capture with SIGBUS),
        // and no capture or restore pays for first-touch faults.
        if memfd_bytes > 0 {
            let len = i64::try_from(memfd_bytes)
                .map_err(|_| StagingError::Memfd(format!("{memfd_bytes} bytes overflow off_t")))?;
            nix::fcntl::fallocate(&memfd, nix::fcntl::FallocateFlags::empty(), 0, len)
                .map_err(|e| StagingError::Memfd(format!("allocating {memfd_bytes} bytes: {e}")))?;
        }
        let map_len = usize::try_from(memfd_bytes).map_err(|_| StagingError::Map {
            len: memfd_bytes,
            source: nix::Error::EOVERFLOW,
        })?;
        let map = map_shared(&memfd, map_len).map_err(|source| StagingError::Map {
            len: memfd_bytes,
            source,
        })?;
        let slot_table = vec![SlotState::Free; usize::try_from(slots).unwrap_or(1)];
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

    /// Claims a free slot for `state`; `None` if every slot is busy.
    pub fn claim(&self, state: SlotState) -> Option<u32> {
        assert_ne!(state, SlotState::Free, "claiming a slot for nothing");
        let mut slots = self.lock_slots();
        let index = slots.iter().position(|s| *s == SlotState::Free)?;
        if let Some(s) = slots.get_mut(index) {
            *s = state;
        }
        u32::try_from(index).ok()
    }

    /// Moves slot `slot` from `from` to `to`; false (and nothing changes) if
    /// it was not in `from`.
    pub fn transition(&self, slot: u32, from: SlotState, to: SlotState) -> bool {
        let mut slots = self.lock_slots();
        let Some(s) = slots.get_mut(usize::try_from(slot).unwrap_or(usize::MAX)) else {
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
        self.lock_slots().get(usize::try_from(slot).ok()?).copied()
    }

    /// Slots not free.
    pub fn busy_slots(&self) -> u32 {
        let n = self
            .lock_slots()
            .iter()
            .filter(|s| **s != SlotState::Free)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Resolves when some slot becomes free (create it before checking, then
    /// await it).
    pub fn slot_freed(&self) -> &tokio::sync::Notify {
        &self.slot_freed
    }

    /// The data section in slot `slot`, for the persist engine to write.
    ///
    /// # Safety
    /// The slot must be `Persisting` (the client has finished writing and is
    /// told not to touch it until the commit; a client that breaks this can
    /// only corrupt its own snapshot, which the chunk CRCs then expose), and
    /// the returned slice must not outlive that state.
    pub unsafe fn slot_data(&self, slot: u32) -> &[u8] {
        let (ptr, len) = self.slot_range(slot);
        // SAFETY: `slot_range` stays inside the live mapping; the caller
        // guarantees no one writes the slot while the slice lives.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }

    /// The whole of slot `slot` (`slot_bytes`: the data section and its
    /// padding to 4096), for a restore that reads straight into it.
    ///
    /// # Safety
    /// The slot must be `Lent` and not yet reported to the client (nobody
    /// else reads or writes it), and the slice must not outlive that.
    #[expect(
        clippy::mut_from_ref,
        reason = "shared memory arbitrated by the slot table"
    )]
    pub unsafe fn slot_whole_mut(&self, slot: u32) -> &mut [u8] {
        let (ptr, _) = self.slot_range(slot);
        let len = usize::try_from(self.info.slot_bytes).unwrap_or(usize::MAX);
        let start = u64::from(slot) * self.info.slot_bytes;
        assert!(
            start + self.info.slot_bytes <= self.map_len as u64,
            "slot past the mapping"
        );
        // SAFETY: inside the live mapping (asserted); the caller guarantees
        // exclusive access for the slice's life.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Ring position of stream chunk `seq`, `len` bytes of it.
    ///
    /// # Safety
    /// The client must have announced the chunk (`ChunkFilled`) and not been
    /// told it is free; the slice must not outlive that.
    pub unsafe fn ring_chunk(&self, seq: u64, len: usize) -> &[u8] {
        let offset = self.info.ring_position(seq);
        assert!(
            self.info.ring_chunks > 0 && len as u64 <= self.info.chunk_bytes,
            "ring chunk {seq} of {len} bytes outside the ring"
        );
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        assert!(start + len <= self.map_len, "ring chunk past the mapping");
        // SAFETY: bounds checked above against the live mapping; the caller
        // guarantees the client does not write this position meanwhile.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), len) }
    }

    fn slot_range(&self, slot: u32) -> (*mut u8, usize) {
        assert!(slot < self.info.slots, "slot {slot} out of range");
        let start = u64::from(slot) * self.info.slot_bytes;
        let len = usize::try_from(self.info.data_bytes).unwrap_or(usize::MAX);
        let start = usize::try_from(start).unwrap_or(usize::MAX);
        assert!(start + len <= self.map_len, "slot past the mapping");
        assert!(start.is_multiple_of(IO_ALIGN_BYTES), "slot not aligned");
        // SAFETY: `start` is within the mapping (asserted above).
        (unsafe { self.map.as_ptr().add(start) }, len)
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Vec<SlotState>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for StagingArea {
    fn drop(&mut self) {
        // SAFETY: `map` was returned by mmap with exactly `map_len` bytes and
        // is unmapped only here; no slice handed out can outlive `self`.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.map.cast(), self.map_len) } {
            tracing::error!(error = %e, "munmap of a staging area failed");
        }
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

#[cfg(test)]
mod tests {
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
    fn slots_move_only_through_their_states_and_the_memfd_is_sealed() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let budget = StagingBudget::new(1 << 20, metrics);
        let a = StagingArea::create(specs(), plan(BusyPolicy::Block), &budget).expect("create");
        let s0 = a.claim(SlotState::Capturing { step: 1 }).expect("slot");
        let s1 = a.claim(SlotState::Lent).expect("slot");
        assert_eq!(a.claim(SlotState::Lent), None);
        assert!(!a.transition(s0, SlotState::Lent, SlotState::Free));
        assert!(a.transition(
            s0,
            SlotState::Capturing { step: 1 },
            SlotState::Persisting { step: 1 }
        ));
        assert_eq!(a.busy_slots(), 2);
        assert!(a.transition(s1, SlotState::Lent, SlotState::Free));
        assert_eq!(a.busy_slots(), 1);
        let file = a.memfd.try_clone().expect("dup");
        assert!(file.set_len(10).is_err(), "shrinking is sealed");
        assert_eq!(file.metadata().expect("stat").len(), a.info().memfd_bytes);
    }
}

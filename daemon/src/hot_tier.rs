//! The hot tier: the newest committed snapshot of each (job, rank), kept in
//! the daemon's memory within a budget, least recently used evicted first.
//!
//! An entry is a copy of a committed data section with the manifest's chunk
//! CRCs; a restore from it checks every chunk's CRC before handing bytes
//! out, exactly as a read from disk does, and through the same
//! [`ChunkChecksum`] as the store (`Store::checksum`), the seam a GPU
//! checksum kernel plugs into. The copy itself is made by the caller into
//! the buffer the tier gives it ([`HotTier::offer`]): the persist lane
//! copies out of the slot's handle, never through a slice over staging. An entry is only ever replaced by
//! a newer step of the same (job, rank): [`HotTier::offer`] checks the step
//! when it reserves room and again when it inserts (the copy in between runs
//! outside the lock), so two lanes of one rank racing (an older connection's
//! lane still draining, a newer one committing) leave the newer step hot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use gpusnap_kernels::ChunkChecksum;
use gpusnap_proto::convert::{gauge, to_u64, to_usize};

use crate::metrics::Metrics;
use crate::ranks::RankKey;
use crate::store::{Layout, Manifest};

/// One hot snapshot.
#[derive(Debug)]
pub struct HotSnapshot {
    pub step: u64,
    pub world_size: u32,
    pub layout: Layout,
    pub chunk_bytes: u64,
    pub chunk_crc32: Vec<u32>,
    pub data: HotBuffer,
    /// The checksum its chunks are verified with (the store's).
    pub checksum: Arc<dyn ChunkChecksum>,
}

impl HotSnapshot {
    /// Checks chunk `index`'s CRC (through [`HotSnapshot::checksum`]) and
    /// returns its bytes.
    pub fn verified_chunk(&self, index: usize) -> Result<(u64, &[u8]), HotError> {
        let chunk = to_usize(self.chunk_bytes);
        let start = index.saturating_mul(chunk);
        let end = start.saturating_add(chunk).min(self.data.len());
        let (Some(bytes), Some(&expected)) =
            (self.data.get(start..end), self.chunk_crc32.get(index))
        else {
            return Err(HotError::Corrupt {
                step: self.step,
                chunk: index,
            });
        };
        if self.checksum.chunk_crc32(bytes) != expected {
            return Err(HotError::Corrupt {
                step: self.step,
                chunk: index,
            });
        }
        Ok((to_u64(start), bytes))
    }

    pub fn chunk_count(&self) -> usize {
        self.chunk_crc32.len()
    }
}

/// A hot snapshot that fails its CRC: memory corruption. The restore then
/// falls back to disk.
#[derive(Debug, thiserror::Error)]
pub enum HotError {
    #[error("hot copy of step {step}: chunk {chunk} fails its CRC32")]
    Corrupt { step: u64, chunk: usize },
}

/// The memory of one hot copy: an anonymous private mapping, on huge pages
/// where the kernel gives them, populated when it is made, so the first copy
/// into it does not take a page fault per 4 KiB (on a VM that costs more
/// than the copy itself).
#[derive(Debug)]
pub struct HotBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and only reached through
// `&self`/`&mut self`, like a `Vec<u8>`.
unsafe impl Send for HotBuffer {}
// SAFETY: as for Send; shared access is read-only.
unsafe impl Sync for HotBuffer {}

impl HotBuffer {
    pub fn new(len: usize) -> Result<HotBuffer, nix::Error> {
        use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous};
        let Some(len_nz) = std::num::NonZeroUsize::new(len) else {
            return Ok(HotBuffer {
                ptr: std::ptr::NonNull::dangling(),
                len: 0,
            });
        };
        // SAFETY: a fresh anonymous mapping at an address the kernel picks;
        // it aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len_nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        // SAFETY: advice on the mapping just made, `len` bytes long; neither
        // call changes what it holds (fresh zero pages). Both are best
        // effort: without them the copy faults the pages in as it goes.
        unsafe {
            let _ = madvise(ptr, len, MmapAdvise::MADV_HUGEPAGE);
            libc::madvise(ptr.as_ptr(), len, libc::MADV_POPULATE_WRITE);
        }
        Ok(HotBuffer {
            ptr: ptr.cast(),
            len,
        })
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Result<HotBuffer, nix::Error> {
        let mut buf = HotBuffer::new(bytes.len())?;
        buf.copy_from_slice(bytes);
        Ok(buf)
    }
}

impl std::ops::Deref for HotBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` bytes (or dangling with
        // len 0), owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for HotBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HotBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: exactly the mapping made in `new`, unmapped only here.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) } {
            tracing::error!(error = %e, "munmap of a hot copy failed");
        }
    }
}

/// Room reserved in a tier's budget for a copy in progress; given back
/// when dropped unless the copy became an entry.
struct Reservation<'t> {
    tier: &'t HotTier,
    len: u64,
    inserted: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.inserted {
            self.tier.release_reserved(self.len);
        }
    }
}

#[derive(Debug)]
struct Entry {
    snapshot: Arc<HotSnapshot>,
    last_used: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<RankKey, Entry>,
    bytes: u64,
    clock: u64,
}

/// The hot tier of the whole daemon.
#[derive(Debug)]
pub struct HotTier {
    budget_bytes: u64,
    state: Mutex<State>,
    checksum: Arc<dyn ChunkChecksum>,
    metrics: Arc<Metrics>,
}

impl HotTier {
    /// A tier of `budget_bytes` whose restores verify chunks through
    /// `checksum` (the store's, so hot and disk agree).
    pub fn new(
        budget_bytes: u64,
        checksum: Arc<dyn ChunkChecksum>,
        metrics: Arc<Metrics>,
    ) -> HotTier {
        metrics.hot_tier_budget_bytes.set(gauge(budget_bytes));
        HotTier {
            budget_bytes,
            state: Mutex::new(State::default()),
            checksum,
            metrics,
        }
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Keeps a copy of a just-committed snapshot, unless a newer step of the
    /// same (job, rank) is already hot or it cannot fit the budget: `copy`
    /// fills the buffer it is given (`manifest.data_len` bytes) with the
    /// data section, once, and only if the snapshot is kept. Evicts least
    /// recently used entries of other ranks to make room. Returns whether
    /// it was kept.
    ///
    /// The copy runs outside the lock, between two critical sections: the
    /// first checks the step and reserves the room, the second checks the
    /// step again and inserts. A newer step that landed in between wins; the
    /// copy made here is then dropped and its reservation given back.
    pub fn offer(
        &self,
        key: &RankKey,
        manifest: &Manifest,
        layout: &Layout,
        copy: impl FnOnce(&mut [u8]),
    ) -> bool {
        let len = manifest.data_len;
        let data_len = to_usize(len);
        if len > self.budget_bytes {
            return false;
        }
        let reuse = {
            let mut state = self.lock();
            if state
                .entries
                .get(key)
                .is_some_and(|e| e.snapshot.step >= manifest.step)
            {
                return false;
            }
            // The old entry of this rank goes now; its buffer is reused when
            // nobody else holds it and it has the right size.
            let old = state.entries.remove(key);
            if let Some(old) = &old {
                state.bytes -= to_u64(old.snapshot.data.len());
            }
            while state.bytes + len > self.budget_bytes {
                let Some(victim) = state
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                if let Some(e) = state.entries.remove(&victim) {
                    state.bytes -= to_u64(e.snapshot.data.len());
                    tracing::debug!(job = %victim.job, rank = victim.rank, step = e.snapshot.step, "hot tier evicted a snapshot");
                }
            }
            if state.bytes + len > self.budget_bytes {
                // What is left is reserved by copies in progress.
                self.publish(&state);
                return false;
            }
            // Reserve the room now so concurrent offers cannot overshoot.
            state.bytes += len;
            self.publish(&state);
            old.and_then(|e| Arc::try_unwrap(e.snapshot).ok())
                .map(|s| s.data)
                .filter(|d| d.len() == data_len)
        };
        // Given back unless the copy is inserted below: a failed allocation,
        // a newer step that won, or a panic in `copy`.
        let mut reservation = Reservation {
            tier: self,
            len,
            inserted: false,
        };
        let mut buf = match reuse {
            Some(buf) => buf,
            None => match HotBuffer::new(data_len) {
                Ok(buf) => buf,
                Err(e) => {
                    // No memory for it: the snapshot is on disk all the same.
                    tracing::warn!(bytes = len, error = %e, "no memory for a hot copy; restores of this rank read from disk");
                    return false;
                }
            },
        };
        assert_eq!(buf.len(), data_len, "a hot buffer of the wrong size");
        copy(&mut buf);
        let snapshot = Arc::new(HotSnapshot {
            step: manifest.step,
            world_size: manifest.world_size,
            layout: layout.clone(),
            chunk_bytes: manifest.chunk_bytes,
            chunk_crc32: manifest.chunk_crc32.clone(),
            data: buf,
            checksum: Arc::clone(&self.checksum),
        });
        let mut state = self.lock();
        if state
            .entries
            .get(key)
            .is_some_and(|e| e.snapshot.step >= manifest.step)
        {
            // A newer step of this rank landed while this one was copied;
            // the reservation goes back as it is dropped.
            drop(state);
            tracing::debug!(job = %key.job, rank = key.rank, step = manifest.step, "a newer step became hot meanwhile; this copy is dropped");
            return false;
        }
        state.clock += 1;
        let last_used = state.clock;
        // The reserved room is the entry's now.
        reservation.inserted = true;
        if let Some(prev) = state.entries.insert(
            key.clone(),
            Entry {
                snapshot,
                last_used,
            },
        ) {
            // An older step of this rank landed meanwhile.
            state.bytes -= to_u64(prev.snapshot.data.len());
        }
        self.publish(&state);
        true
    }

    fn release_reserved(&self, len: u64) {
        let mut state = self.lock();
        state.bytes -= len;
        self.publish(&state);
    }

    /// The hot snapshot of `key`, if it is `step` (or any step when `None`).
    pub fn get(&self, key: &RankKey, step: Option<u64>) -> Option<Arc<HotSnapshot>> {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        let entry = state.entries.get_mut(key)?;
        if step.is_some_and(|s| s != entry.snapshot.step) {
            return None;
        }
        entry.last_used = now;
        Some(Arc::clone(&entry.snapshot))
    }

    /// Step of the hot snapshot of `key`.
    pub fn step(&self, key: &RankKey) -> Option<u64> {
        self.lock().entries.get(key).map(|e| e.snapshot.step)
    }

    /// Drops the entry of `key` if it is still `step` (that copy failed
    /// verification); a newer step that replaced it meanwhile stays.
    pub fn discard(&self, key: &RankKey, step: u64) {
        let mut state = self.lock();
        if state
            .entries
            .get(key)
            .is_some_and(|e| e.snapshot.step == step)
            && let Some(e) = state.entries.remove(key)
        {
            state.bytes -= to_u64(e.snapshot.data.len());
        }
        self.publish(&state);
    }

    fn publish(&self, state: &State) {
        self.metrics.hot_tier_bytes.set(gauge(state.bytes));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::BackendKind;
    use crate::store::manifest::{FORMAT_NAME, FORMAT_VERSION};
    use gpusnap_kernels::CpuCrc32;
    use gpusnap_proto::{Dtype, TensorSpec};

    fn tier(budget_bytes: u64) -> HotTier {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        HotTier::new(budget_bytes, Arc::new(CpuCrc32), metrics)
    }

    /// The copy a caller hands `offer`: `data`, into the tier's buffer.
    fn copy_of(data: &[u8]) -> impl FnOnce(&mut [u8]) + '_ {
        move |buf| buf.copy_from_slice(data)
    }

    fn snapshot(step: u64, data: &[u8]) -> (Manifest, Layout) {
        let layout =
            Layout::plan(&[TensorSpec::new("t", Dtype::U8, [data.len() as u64])]).expect("plan");
        let manifest = Manifest {
            format: FORMAT_NAME.to_owned(),
            format_version: FORMAT_VERSION,
            job: "j".into(),
            rank: 0,
            world_size: 1,
            step,
            created_unix_ms: 0,
            io_backend: BackendKind::Buffered,
            data_file: "state.safetensors".into(),
            file_len: 4096 + data.len() as u64,
            header_len: 4096,
            header_crc32: 0,
            data_len: data.len() as u64,
            chunk_bytes: 4,
            chunk_crc32: gpusnap_kernels::reference::chunk_crc32s(data, 4),
            tensors: layout.tensors.clone(),
        };
        (manifest, layout)
    }

    #[test]
    fn keeps_the_newest_step_and_evicts_the_least_recently_used() {
        let hot = tier(16);
        let a = RankKey::new("a", 0);
        let b = RankKey::new("b", 0);
        let (m, l) = snapshot(5, &[1; 8]);
        assert!(hot.offer(&a, &m, &l, copy_of(&[1; 8])));
        let (m_old, l_old) = snapshot(4, &[2; 8]);
        assert!(
            !hot.offer(&a, &m_old, &l_old, copy_of(&[2; 8])),
            "older step refused"
        );
        let (m, l) = snapshot(1, &[3; 8]);
        assert!(hot.offer(&b, &m, &l, copy_of(&[3; 8])));
        assert_eq!(hot.bytes(), 16);
        assert!(hot.get(&a, None).is_some(), "touch a: b is now the LRU");
        let c = RankKey::new("c", 0);
        let (m, l) = snapshot(9, &[4; 8]);
        assert!(hot.offer(&c, &m, &l, copy_of(&[4; 8])));
        assert!(hot.get(&b, None).is_none(), "b evicted");
        assert_eq!(hot.step(&a), Some(5));
        assert!(hot.get(&a, Some(4)).is_none());
        let (m, l) = snapshot(2, &[0; 32]);
        assert!(
            !hot.offer(&b, &m, &l, copy_of(&[0; 32])),
            "over the whole budget"
        );
        assert_eq!(hot.bytes(), 16);
    }

    #[test]
    fn a_corrupted_hot_chunk_is_detected() {
        let hot = tier(64);
        let key = RankKey::new("a", 0);
        let data: Vec<u8> = (0..10).collect();
        let (m, l) = snapshot(1, &data);
        assert!(hot.offer(&key, &m, &l, copy_of(&data)));
        let snap = hot.get(&key, Some(1)).expect("hot");
        assert_eq!(snap.chunk_count(), 3);
        assert_eq!(snap.verified_chunk(2).expect("ok"), (8, &data[8..]));
        let mut bad = HotSnapshot {
            step: snap.step,
            world_size: snap.world_size,
            layout: snap.layout.clone(),
            chunk_bytes: snap.chunk_bytes,
            chunk_crc32: snap.chunk_crc32.clone(),
            data: HotBuffer::from_slice(&snap.data).expect("buffer"),
            checksum: Arc::clone(&snap.checksum),
        };
        bad.data[5] ^= 1;
        assert!(matches!(
            bad.verified_chunk(1),
            Err(HotError::Corrupt { chunk: 1, .. })
        ));
        hot.discard(&key, 1);
        assert_eq!(hot.bytes(), 0);
    }

    /// The regression: a restore whose hot copy of step N failed its CRCs
    /// dropped whatever the rank had hot, a newer step that landed in the
    /// meantime too.
    #[test]
    fn discarding_a_step_keeps_a_newer_one_that_replaced_it() {
        let hot = tier(64);
        let key = RankKey::new("a", 0);
        let (m, l) = snapshot(2, &[2; 8]);
        assert!(hot.offer(&key, &m, &l, copy_of(&[2; 8])));
        hot.discard(&key, 1);
        assert_eq!(hot.step(&key), Some(2), "step 1's failure spares step 2");
        assert_eq!(hot.bytes(), 8);
        hot.discard(&key, 2);
        assert_eq!(hot.step(&key), None);
        assert_eq!(hot.bytes(), 0);
        hot.discard(&key, 2);
        assert_eq!(hot.bytes(), 0, "nothing to discard is no change");
    }

    /// The race, forced: the older step's offer reserves its room and
    /// starts copying; its copy waits until the newer step's offer has
    /// inserted; then the older one must not replace it. Code that checked
    /// the step only when reserving fails this every time.
    #[test]
    fn a_racing_older_offer_never_replaces_the_newer_step() {
        const LEN: usize = 4096;
        // Room for both copies at once: nothing is evicted, only the order
        // decides.
        let hot = tier(4 * LEN as u64);
        let key = RankKey::new("race", 0);
        let (old_data, new_data) = (vec![1u8; LEN], vec![2u8; LEN]);
        let (old_m, old_l) = snapshot(1, &old_data);
        let (new_m, new_l) = snapshot(2, &new_data);
        let (copying_tx, copying) = crossbeam_channel::bounded::<()>(1);
        let (newer_in_tx, newer_in) = crossbeam_channel::bounded::<()>(1);
        let older = std::thread::scope(|s| {
            let older = s.spawn(|| {
                hot.offer(&key, &old_m, &old_l, |buf| {
                    copying_tx.send(()).expect("the test waits");
                    newer_in
                        .recv_timeout(std::time::Duration::from_secs(30))
                        .expect("the newer offer inserted");
                    buf.copy_from_slice(&old_data);
                })
            });
            copying
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("the older offer is copying");
            assert!(
                hot.offer(&key, &new_m, &new_l, copy_of(&new_data)),
                "the newer step is kept while the older one copies"
            );
            newer_in_tx.send(()).expect("the older copy waits");
            older.join().expect("older")
        });
        assert!(
            !older,
            "the older copy, made after the newer landed, is dropped"
        );
        let kept = hot.get(&key, None).expect("hot");
        assert_eq!(kept.step, 2);
        assert!(kept.data.iter().all(|&b| b == 2));
        assert_eq!(hot.bytes(), LEN as u64, "the older reservation came back");
    }

    /// A checksum that counts its calls (and computes the real CRC32).
    #[derive(Debug, Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl ChunkChecksum for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }

        fn update(&self, crc: u32, piece: &[u8]) -> u32 {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            CpuCrc32.update(crc, piece)
        }
    }

    #[test]
    fn hot_chunks_are_verified_through_the_tier_s_checksum() {
        let counting = Arc::new(Counting::default());
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let hot = HotTier::new(64, Arc::clone(&counting) as Arc<dyn ChunkChecksum>, metrics);
        let key = RankKey::new("a", 0);
        let data: Vec<u8> = (0..10).collect();
        let (m, l) = snapshot(1, &data);
        assert!(hot.offer(&key, &m, &l, copy_of(&data)));
        assert_eq!(
            counting.0.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no CRC at insert"
        );
        let snap = hot.get(&key, Some(1)).expect("hot");
        for index in 0..snap.chunk_count() {
            snap.verified_chunk(index).expect("intact");
        }
        assert_eq!(
            counting.0.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "one checksum call per chunk, through the trait"
        );
    }

    #[test]
    fn a_copy_that_panics_gives_its_reservation_back() {
        let hot = tier(64);
        let key = RankKey::new("a", 0);
        let (m, l) = snapshot(1, &[7; 16]);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hot.offer(&key, &m, &l, |_| panic!("a copy that fails"))
        }));
        assert!(panicked.is_err());
        assert_eq!(hot.bytes(), 0, "the reserved room came back");
        assert!(hot.get(&key, None).is_none());
        assert!(
            hot.offer(&key, &m, &l, copy_of(&[7; 16])),
            "room for it again"
        );
        assert_eq!(hot.bytes(), 16);
    }
}

//! Filling a client's staging slot from a snapshot: from the hot tier or the
//! store, every chunk's CRC checked before its bytes are copied, tensors
//! matched by name (a trainer may register in another order after a
//! restart; the data then moves piece by piece). [`fill_slot`] is the whole
//! restore of one slot: which snapshot, hot or disk, and the fall back to
//! disk when the hot copy fails its CRCs.
//!
//! The slot is reached only through its [`FillTarget`]
//! ([`LentSlot::fill_target`]), never as a slice: from the hot tier,
//! verified private bytes are copied in through it (on a few threads, each
//! placing disjoint ranges); from disk, when the snapshot is laid out as the
//! registration, the store reads straight into the slot with O_DIRECT
//! (`Store::read_into_shared` into [`FillTarget::direct_read`]), and
//! otherwise hands verified pieces that are copied in.
//!
//! [`walk`] chooses which snapshot: the newest that verifies, locally or
//! from the remote tier, reporting every newer one it passed over.

pub mod walk;

use std::collections::HashMap;

use gpusnap_proto::RestoreSource;
use gpusnap_proto::convert::{to_u64, to_usize};

use crate::hot_tier::{HotSnapshot, HotTier};
use crate::ranks::RankKey;
use crate::staging::{FillTarget, LentSlot};
use crate::store::{Layout, Snapshot, Store, StoreError};

/// Why a snapshot cannot fill a registration.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "tensor {name:?}: registered as {registered}, the snapshot of step {step} has {stored}"
    )]
    TensorDiffers {
        name: String,
        step: u64,
        registered: String,
        stored: String,
    },
    #[error("tensor {name:?} is registered but not in the snapshot of step {step}")]
    MissingInSnapshot { name: String, step: u64 },
    #[error("tensor {name:?} is in the snapshot of step {step} but not registered")]
    NotRegistered { name: String, step: u64 },
    #[error(transparent)]
    Hot(#[from] crate::hot_tier::HotError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The remote tier could not be asked (unreachable, refusing): with no
    /// local snapshot to restore, saying "none" would start the trainer
    /// over, so the restore fails instead.
    #[error("{key}: no local snapshot, and the remote tier cannot be listed: {source}")]
    RemoteUnavailable {
        key: RankKey,
        #[source]
        source: Box<crate::remote::RemoteError>,
    },
    /// The object store holds the job for another uid (its `OWNER`).
    #[error("{key}: the object store's job of this name belongs to uid {}, not to uid {uid}", .owner.map_or_else(|| "nobody".to_owned(), |o| o.to_string()))]
    RemoteNotOwner {
        key: RankKey,
        uid: u32,
        owner: Option<u32>,
    },
    /// Every snapshot there is (of the step asked for, or of any step)
    /// failed verification; nothing is restored.
    #[error("{}", walk::nothing_verifies(.key, *.step, .passed))]
    NothingVerifies {
        key: RankKey,
        step: Option<u64>,
        passed: Vec<gpusnap_proto::WalkBack>,
    },
    /// The daemon is stopping.
    #[error("the daemon is stopping")]
    Stopping,
}

/// A contiguous run copied from the snapshot's data section to the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    src: u64,
    dst: u64,
    len: u64,
}

/// How the snapshot's data section maps onto the registration's.
#[derive(Debug)]
pub struct Mapping {
    /// Ascending by `src`, non-overlapping.
    runs: Vec<Run>,
    data_len: u64,
}

impl Mapping {
    /// Checks that `stored` holds exactly the tensors of `registered` (names,
    /// dtypes, shapes) and plans the copy. The error names the first tensor
    /// that differs.
    pub fn plan(stored: &Layout, registered: &Layout, step: u64) -> Result<Mapping, RestoreError> {
        let by_name: HashMap<&str, &crate::store::TensorEntry> = registered
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let mut runs: Vec<Run> = Vec::with_capacity(stored.tensors.len());
        for s in &stored.tensors {
            let Some(r) = by_name.get(s.name.as_str()) else {
                return Err(RestoreError::NotRegistered {
                    name: s.name.clone(),
                    step,
                });
            };
            if r.dtype != s.dtype || r.shape != s.shape {
                return Err(RestoreError::TensorDiffers {
                    name: s.name.clone(),
                    step,
                    registered: format!("{} {:?}", r.dtype, r.shape),
                    stored: format!("{} {:?}", s.dtype, s.shape),
                });
            }
            assert_eq!(r.len, s.len, "same dtype and shape, same length");
            if s.len == 0 {
                continue;
            }
            match runs.last_mut() {
                Some(last)
                    if last.src + last.len == s.offset && last.dst + last.len == r.offset =>
                {
                    last.len += s.len;
                }
                _ => runs.push(Run {
                    src: s.offset,
                    dst: r.offset,
                    len: s.len,
                }),
            }
        }
        if registered.tensors.len() != stored.tensors.len() {
            let stored_names: std::collections::HashSet<&str> =
                stored.tensors.iter().map(|t| t.name.as_str()).collect();
            // Every stored tensor is registered (checked above), so with more
            // registered than stored one registered tensor is not stored.
            let missing = registered
                .tensors
                .iter()
                .find(|t| !stored_names.contains(t.name.as_str()))
                .map(|t| t.name.clone())
                .expect("a registered tensor the snapshot lacks");
            return Err(RestoreError::MissingInSnapshot {
                name: missing,
                step,
            });
        }
        assert_eq!(stored.data_len, registered.data_len);
        Ok(Mapping {
            runs,
            data_len: registered.data_len,
        })
    }

    /// Copies the verified bytes `src_start..` of the snapshot's data section
    /// to their places in `target`. Each source byte has exactly one
    /// destination, so threads placing disjoint source ranges write disjoint
    /// bytes of the target.
    pub fn place(&self, src_start: u64, bytes: &[u8], target: &FillTarget<'_>) {
        assert_eq!(
            to_u64(target.len()),
            self.data_len,
            "a fill target of the wrong size"
        );
        let src_end = src_start + to_u64(bytes.len());
        let first = self.runs.partition_point(|r| r.src + r.len <= src_start);
        for run in self.runs.iter().skip(first) {
            if run.src >= src_end {
                break;
            }
            let from = run.src.max(src_start);
            let to = (run.src + run.len).min(src_end);
            let src_off = to_usize(from - src_start);
            let piece = bytes
                .get(src_off..src_off + to_usize(to - from))
                .expect("the run's part lies inside the piece");
            let dst_off = to_usize(run.dst + (from - run.src));
            if let Err(e) = target.copy_in(dst_off, piece) {
                unreachable!("a run lies inside the registration's data section: {e}");
            }
        }
    }

    /// Whether every byte stays at its offset (the layouts are identical).
    pub fn is_identity(&self) -> bool {
        match self.runs.as_slice() {
            [] => true,
            [run] => run.src == 0 && run.dst == 0 && run.len == self.data_len,
            _ => false,
        }
    }

    /// Number of runs (1 when the layouts are identical).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }
}

/// Threads a hot restore verifies and copies with.
fn restore_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Fills `target` from a hot snapshot, each chunk's CRC checked before its
/// bytes are copied in; chunks are spread over a few threads.
pub fn fill_from_hot(
    hot: &HotSnapshot,
    mapping: &Mapping,
    target: FillTarget<'_>,
) -> Result<u64, RestoreError> {
    let chunks = hot.chunk_count();
    let threads = restore_threads().min(chunks.max(1));
    let per_thread = chunks.div_ceil(threads.max(1));
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let target = &target;
                scope.spawn(move || -> Result<(), RestoreError> {
                    let first = t * per_thread;
                    for index in first..(first + per_thread).min(chunks) {
                        let (start, bytes) = hot.verified_chunk(index)?;
                        mapping.place(start, bytes, target);
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a restore worker panicked"))
    })?;
    Ok(to_u64(hot.data.len()))
}

/// Fills `target` from a snapshot on disk, every chunk's CRC checked. When
/// the snapshot is laid out exactly as the registration (the usual case)
/// and the target has a region for it, the store reads straight into the
/// slot with O_DIRECT; otherwise through its buffers, each verified piece
/// copied in.
pub fn fill_from_disk(
    store: &Store,
    snapshot: &Snapshot,
    mapping: &Mapping,
    target: FillTarget<'_>,
) -> Result<u64, RestoreError> {
    if mapping.is_identity()
        && mapping.data_len > 0
        && let Some(region) = target.direct_read()
    {
        match store.read_into_shared(snapshot, region) {
            Ok(()) => return Ok(snapshot.manifest.data_len),
            Err(StoreError::DirectReadUnsupported { why, .. }) => {
                tracing::debug!(%why, "direct read not possible; reading through the store's buffers");
            }
            Err(e) => return Err(e.into()),
        }
    }
    store.read(snapshot, &mut |start, bytes| {
        mapping.place(start, bytes, &target);
        Ok(())
    })?;
    Ok(snapshot.manifest.data_len)
}

/// What a restore put into the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    /// The step restored.
    pub step: u64,
    /// Where its bytes came from.
    pub source: RestoreSource,
    /// Data bytes placed in the slot.
    pub bytes: u64,
}

/// Fills the lent `slot` (its registration is `key`) with the snapshot of
/// `step` (the newest when `None`) of the local store: from the hot tier
/// when it holds that step, else from disk. `Ok(None)`: `key` has no
/// snapshot at all. The daemon's restores go through [`walk::restore`],
/// which adds the remote tier and the walk-back.
pub fn fill_slot(
    store: &Store,
    hot: &HotTier,
    key: &RankKey,
    slot: &LentSlot,
    step: Option<u64>,
) -> Result<Option<Filled>, RestoreError> {
    let snapshot = match store.find(&key.job, key.rank, step) {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) if step.is_none() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    fill_snapshot(store, hot, key, slot, &snapshot).map(Some)
}

/// Fills the lent `slot` with `snapshot` (of `key`, in `store`): from the
/// hot tier when it holds that step and its copy verifies, else from disk.
pub fn fill_snapshot(
    store: &Store,
    hot: &HotTier,
    key: &RankKey,
    slot: &LentSlot,
    snapshot: &Snapshot,
) -> Result<Filled, RestoreError> {
    let found = snapshot.manifest.step;
    let staging = slot.staging();
    // Borrowed from the guard, which holds the slot `Lent` for this whole
    // call; the client reads it only once told it is restored.
    let target = slot.fill_target();
    assert_eq!(
        to_u64(target.len()),
        staging.info().data_bytes,
        "the fill target is the slot's data section"
    );
    if let Some(hot_copy) = hot.get(key, Some(found)) {
        let mapping = Mapping::plan(&hot_copy.layout, staging.layout(), found)?;
        match fill_from_hot(&hot_copy, &mapping, target) {
            Ok(bytes) => {
                return Ok(Filled {
                    step: found,
                    source: RestoreSource::Memory,
                    bytes,
                });
            }
            Err(e) => {
                tracing::error!(job = %key.job, rank = key.rank, step = found, error = %e, "hot copy failed verification; dropping it and reading from disk");
                hot.discard(key, found);
            }
        }
    }
    let mapping = Mapping::plan(&snapshot.layout, staging.layout(), found)?;
    let bytes = fill_from_disk(store, snapshot, &mapping, target)?;
    Ok(Filled {
        step: found,
        source: RestoreSource::Disk,
        bytes,
    })
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "tests use small known sizes"
)]
mod tests {
    use super::*;
    use gpusnap_proto::{Dtype, TensorSpec};

    fn specs(order: &[usize]) -> Vec<TensorSpec> {
        let all = [
            TensorSpec::new("a", Dtype::F32, [3]),
            TensorSpec::new("b", Dtype::F32, [2]),
            TensorSpec::new("c", Dtype::U8, [5]),
            TensorSpec::new("z", Dtype::F64, [0]),
        ];
        order.iter().map(|&i| all[i].clone()).collect()
    }

    fn fill(layout: &Layout) -> Vec<u8> {
        // Each tensor's bytes carry its name's first letter and index.
        let mut data = vec![0u8; layout.data_len as usize];
        for t in &layout.tensors {
            for i in 0..t.len {
                data[(t.offset + i) as usize] = t.name.as_bytes()[0].wrapping_add(i as u8);
            }
        }
        data
    }

    #[test]
    fn same_layout_is_one_run_and_reordered_registration_moves_tensors_by_name() {
        let stored = Layout::plan(&specs(&[0, 1, 2, 3])).expect("plan");
        let same = Mapping::plan(&stored, &stored, 1).expect("match");
        assert_eq!(same.run_count(), 1);
        assert!(same.is_identity());
        let registered = Layout::plan(&specs(&[2, 1, 3, 0])).expect("plan");
        let moved = Mapping::plan(&stored, &registered, 1).expect("match");
        assert!(moved.run_count() > 1 && !moved.is_identity());
        let src = fill(&stored);
        let mut slot = vec![0u8; registered.data_len as usize];
        let target = FillTarget::from_private(&mut slot);
        // Odd chunk boundaries, as the store's reader may cut them.
        for (i, piece) in src.chunks(3).enumerate() {
            moved.place((i * 3) as u64, piece, &target);
        }
        assert_eq!(slot, fill(&registered));
    }

    #[test]
    fn hot_fill_checks_every_chunk_on_several_threads() {
        let stored = Layout::plan(&specs(&[0, 1, 2, 3])).expect("plan");
        let registered = Layout::plan(&specs(&[3, 2, 0, 1])).expect("plan");
        let mapping = Mapping::plan(&stored, &registered, 9).expect("match");
        let data = fill(&stored);
        let mut hot = HotSnapshot {
            step: 9,
            world_size: 1,
            layout: stored.clone(),
            chunk_bytes: 2,
            chunk_crc32: gpusnap_kernels::reference::chunk_crc32s(&data, 2),
            data: crate::hot_tier::HotBuffer::from_slice(&data).expect("buffer"),
            checksum: std::sync::Arc::new(gpusnap_kernels::CpuCrc32),
        };
        let mut slot = vec![0u8; registered.data_len as usize];
        assert_eq!(
            fill_from_hot(&hot, &mapping, FillTarget::from_private(&mut slot)).expect("fill"),
            stored.data_len
        );
        assert_eq!(slot, fill(&registered));
        hot.data[7] ^= 0x40;
        assert!(matches!(
            fill_from_hot(&hot, &mapping, FillTarget::from_private(&mut slot)),
            Err(RestoreError::Hot(crate::hot_tier::HotError::Corrupt {
                chunk: 3,
                ..
            }))
        ));
    }

    /// A registration of three tensors over several 4096-byte chunks, in
    /// the order `order` names them.
    fn big_specs(order: &[usize]) -> Vec<TensorSpec> {
        let all = [
            TensorSpec::new("a", Dtype::F32, [3000]),
            TensorSpec::new("b", Dtype::U8, [5001]),
            TensorSpec::new("c", Dtype::F64, [700]),
        ];
        order.iter().map(|&i| all[i].clone()).collect()
    }

    #[test]
    fn a_lent_slot_is_filled_from_disk_and_from_the_hot_tier_through_its_handle() {
        use crate::hot_tier::HotBuffer;
        use crate::metrics::Metrics;
        use crate::staging::testing::TrainerMapping;
        use crate::staging::{StagingArea, StagingBudget, StagingPlan};
        use crate::store::{SnapshotId, Source, StoreConfig};
        use std::sync::Arc;

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(StoreConfig {
            root: dir.path().to_path_buf(),
            io_backend: crate::storage::probe::BackendChoice::Buffered,
            io_buffer_bytes: 4096,
            io_pool_bytes: 16 * 4096,
            ..StoreConfig::default()
        })
        .expect("store");
        let stored = Layout::plan(&big_specs(&[0, 1, 2])).expect("plan");
        assert!(stored.data_len > 5 * 4096, "several chunks");
        let data = fill(&stored);
        // Page-aligned private memory, as the store's Memory source wants.
        let aligned = HotBuffer::from_slice(&data).expect("buffer");
        let id = SnapshotId::new("j".to_owned(), 0, 1).expect("id");
        let committed = store
            .write_laid_out(&id, &stored, 1, Source::Memory(&aligned))
            .expect("commit");
        let key = RankKey::new("j", 0);
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let hot = HotTier::new(1 << 20, Arc::clone(store.checksum()), Arc::clone(&metrics));
        let budget = StagingBudget::new(1 << 20, metrics);
        let plan = StagingPlan {
            double: false,
            policy: gpusnap_proto::BusyPolicy::Block,
            chunk_bytes: 4096,
            ring_chunks: 0,
        };

        // The same layout: the store reads straight into the slot; a
        // reordered registration: verified pieces copied in by name.
        for order in [[0, 1, 2], [2, 0, 1]] {
            let staging =
                Arc::new(StagingArea::create(big_specs(&order), plan, &budget).expect("staging"));
            let registered = staging.layout().clone();
            let trainer = TrainerMapping::of(&staging);
            let lent = staging.claim_lent().expect("slot");
            let filled = fill_slot(&store, &hot, &key, &lent, None)
                .expect("restore")
                .expect("a snapshot");
            assert_eq!(
                filled,
                Filled {
                    step: 1,
                    source: RestoreSource::Disk,
                    bytes: stored.data_len
                }
            );
            let at = usize::try_from(u64::from(lent.index()) * staging.info().slot_bytes)
                .expect("offset");
            assert_eq!(
                trainer.read(at, registered.data_len as usize),
                fill(&registered),
                "order {order:?}"
            );
        }

        // Hot: the committed data section copied in, each chunk verified.
        assert!(hot.offer(&key, &committed.manifest, &stored, |buf| {
            buf.copy_from_slice(&data);
        }));
        let staging =
            Arc::new(StagingArea::create(big_specs(&[1, 2, 0]), plan, &budget).expect("staging"));
        let registered = staging.layout().clone();
        let trainer = TrainerMapping::of(&staging);
        let lent = staging.claim_lent().expect("slot");
        let filled = fill_slot(&store, &hot, &key, &lent, Some(1))
            .expect("restore")
            .expect("a snapshot");
        assert_eq!(filled.source, RestoreSource::Memory);
        let at =
            usize::try_from(u64::from(lent.index()) * staging.info().slot_bytes).expect("offset");
        assert_eq!(
            trainer.read(at, registered.data_len as usize),
            fill(&registered)
        );
        assert!(
            fill_slot(&store, &hot, &RankKey::new("other", 0), &lent, None)
                .expect("nothing to restore is not an error")
                .is_none()
        );
    }

    #[test]
    fn mismatches_name_the_tensor() {
        let stored = Layout::plan(&specs(&[0, 1, 2])).expect("plan");
        let fewer = Layout::plan(&specs(&[0, 1])).expect("plan");
        let more = Layout::plan(&specs(&[0, 1, 2, 3])).expect("plan");
        let mut reshaped = specs(&[0, 1, 2]);
        reshaped[1].shape = vec![1, 2];
        let reshaped = Layout::plan(&reshaped).expect("plan");
        let err = |r: Result<Mapping, RestoreError>| r.expect_err("mismatch").to_string();
        assert!(err(Mapping::plan(&stored, &fewer, 7)).contains("\"c\""));
        assert!(err(Mapping::plan(&stored, &more, 7)).contains("\"z\""));
        let e = err(Mapping::plan(&stored, &reshaped, 7));
        assert!(e.contains("\"b\"") && e.contains("[1, 2]"), "{e}");
    }
}

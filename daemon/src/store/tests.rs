//! Store tests over the simulated file system: round trips, the commit
//! protocol under power loss at every operation, retention and recovery.
//! The same scenarios on the real backends live in `daemon/tests/`.

use std::path::Path;
use std::sync::Arc;

use gpusnap_kernels::{ChunkChecksum, CpuCrc32};
use gpusnap_proto::{Dtype, TensorSpec};

use super::*;
use crate::storage::sim::SimStorage;

const ROOT: &str = "/snapshots";

fn config() -> StoreConfig {
    StoreConfig {
        root: ROOT.into(),
        keep_snapshots: 2,
        queue_depth: 4,
        io_buffer_bytes: 8192,
        io_pool_bytes: 16 * 8192,
        ..StoreConfig::default()
    }
}

fn store_on(sim: &SimStorage) -> Store {
    let cfg = config();
    let pool = BufferPool::new(cfg.io_pool_bytes, cfg.io_buffer_bytes).expect("pool");
    Store::with_storage(cfg, Arc::new(sim.clone()), pool).expect("open store")
}

fn tensors() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("w", Dtype::F32, [3, 1000]),
        TensorSpec::new("b", Dtype::U8, [17]),
        TensorSpec::new("empty", Dtype::F16, [0]),
        TensorSpec::new("step", Dtype::I64, []),
    ]
}

/// Deterministic bytes for a data section, different for each `seed`.
fn data(len: u64, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Writes through a streamed source (the simulated store has no aligned
/// staging memory to borrow).
fn write(store: &Store, step: u64, seed: u8) -> Result<Committed, StoreError> {
    let layout = Layout::plan(&tensors()).expect("layout");
    let bytes = data(layout.data_len, seed);
    let mut fill = |offset: u64, dst: &mut [u8]| -> Result<(), SourceError> {
        let start = usize::try_from(offset)?;
        dst.copy_from_slice(&bytes[start..start + dst.len()]);
        Ok(())
    };
    let id = SnapshotId::new("job", 0, step).expect("id");
    store.write_snapshot(&id, &tensors(), 1, Source::Stream(&mut fill))
}

fn read_all(store: &Store, snapshot: &Snapshot) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    store.read(snapshot, &mut |offset, bytes| {
        assert_eq!(offset, out.len() as u64, "chunks arrive in order");
        out.extend_from_slice(bytes);
        Ok(())
    })?;
    Ok(out)
}

#[test]
fn stream_round_trip_reads_back_equal_bytes() {
    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    let committed = write(&store, 5, 1).expect("commit");
    assert_eq!(
        committed.manifest.io_backend,
        crate::storage::BackendKind::Buffered,
        "the simulator reports the backend it imitates"
    );
    let snap = store.find("job", 0, None).expect("find newest");
    assert_eq!(snap.manifest.step, 5);
    let expected = data(snap.layout.data_len, 1);
    assert_eq!(read_all(&store, &snap).expect("read"), expected);
    let report = store.verify(&snap.dir);
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(
        report.chunks_checked,
        snap.manifest.chunk_crc32.len() as u64
    );
}

#[test]
fn committed_snapshots_are_never_overwritten() {
    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    write(&store, 1, 1).expect("commit");
    assert!(matches!(
        write(&store, 1, 2),
        Err(StoreError::AlreadyCommitted { .. })
    ));
    let snap = store.find("job", 0, Some(1)).expect("find");
    assert_eq!(
        read_all(&store, &snap).expect("read"),
        data(snap.layout.data_len, 1)
    );
}

#[test]
fn a_failing_source_fails_the_snapshot_and_leaves_no_directory() {
    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    write(&store, 1, 1).expect("commit");
    let id = SnapshotId::new("job", 0, 2).expect("id");
    let mut fill = |offset: u64, _: &mut [u8]| -> Result<(), SourceError> {
        if offset > 0 {
            Err("trainer went away".into())
        } else {
            Ok(())
        }
    };
    let err = store
        .write_snapshot(&id, &tensors(), 1, Source::Stream(&mut fill))
        .expect_err("source error fails the snapshot");
    assert!(err.to_string().contains("trainer went away"), "{err}");
    assert!(
        sim.metadata(&id.partial_dir(Path::new(ROOT)))
            .expect("stat")
            .is_none()
    );
    assert!(
        sim.metadata(&id.dir(Path::new(ROOT)))
            .expect("stat")
            .is_none()
    );
    assert_eq!(store.find("job", 0, None).expect("find").manifest.step, 1);
}

#[test]
fn retention_keeps_the_newest_k() {
    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    for step in 1..=5 {
        write(&store, step, 0).expect("commit");
    }
    let steps: Vec<u64> = store
        .list(None)
        .expect("list")
        .snapshots
        .iter()
        .map(|s| s.manifest.step)
        .collect();
    assert_eq!(steps, [4, 5]);
}

/// `commit_laid_out` applies no retention (the persist engine prunes after
/// reporting the commit, outside its write permit); `apply_retention` then
/// keeps the newest `keep_snapshots`, the newest among them.
#[test]
fn a_commit_without_retention_keeps_every_snapshot_until_retention_runs() {
    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    let layout = Layout::plan(&tensors()).expect("layout");
    for step in 1..=4 {
        let bytes = data(layout.data_len, 1);
        let mut fill = |offset: u64, dst: &mut [u8]| -> Result<(), SourceError> {
            let start = usize::try_from(offset)?;
            dst.copy_from_slice(&bytes[start..start + dst.len()]);
            Ok(())
        };
        let id = SnapshotId::new("job", 0, step).expect("id");
        store
            .commit_laid_out(&id, &layout, 1, Source::Stream(&mut fill))
            .expect("commit");
    }
    let steps = |store: &Store| -> Vec<u64> {
        let listing = store.list(Some("job")).expect("list");
        listing.snapshots.iter().map(|s| s.manifest.step).collect()
    };
    assert_eq!(steps(&store), [1, 2, 3, 4], "nothing pruned by the commits");
    store.apply_retention("job", 0);
    assert_eq!(steps(&store), [3, 4], "keep_snapshots = 2, the newest kept");
}

#[test]
fn recovery_removes_partial_directories() {
    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    write(&store, 1, 0).expect("commit");
    let partial = SnapshotId::new("job", 0, 2)
        .expect("id")
        .partial_dir(Path::new(ROOT));
    sim.create_dir(&partial).expect("mkdir");
    let removed = store.recover().expect("recover");
    assert_eq!(removed, std::slice::from_ref(&partial));
    assert!(sim.metadata(&partial).expect("stat").is_none());
}

#[test]
fn complete_steps_need_every_rank() {
    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    let layout = Layout::plan(&tensors()).expect("layout");
    let bytes = data(layout.data_len, 0);
    for (rank, step) in [(0, 1), (1, 1), (0, 2)] {
        let mut fill = |offset: u64, dst: &mut [u8]| -> Result<(), SourceError> {
            let start = usize::try_from(offset)?;
            dst.copy_from_slice(&bytes[start..start + dst.len()]);
            Ok(())
        };
        let id = SnapshotId::new("job", rank, step).expect("id");
        store
            .write_snapshot(&id, &tensors(), 2, Source::Stream(&mut fill))
            .expect("commit");
    }
    assert_eq!(
        store.list(Some("job")).expect("list").complete_steps("job"),
        [1]
    );
}

/// Power loss at every mutating operation of a commit: after reboot and
/// recovery the newest snapshot is either the previous one or the new one,
/// each reading back exactly, and nothing else is listed.
#[test]
fn power_loss_at_every_operation_keeps_old_or_new_snapshot() {
    let base = SimStorage::new(Path::new(ROOT));
    {
        let store = store_on(&base);
        write(&store, 1, 1).expect("first commit");
    }
    let base = base.durable_image();

    // How many mutating operations does one more commit take?
    let probe = base.durable_image();
    let before = probe.ops_count();
    write(&store_on(&probe), 2, 2).expect("uncut commit");
    let ops = probe.ops_count() - before;
    assert!(
        ops > 10,
        "a commit is more than a handful of operations ({ops})"
    );

    let mut outcomes = [0usize; 2];
    for cut in 0..=ops {
        let live = base.durable_image();
        let store = store_on(&live);
        live.cut_power_after(cut);
        let result = write(&store, 2, 2);
        assert_eq!(result.is_ok(), cut >= ops, "cut at {cut} of {ops}");
        drop(store);

        let rebooted = live.durable_image();
        let store = store_on(&rebooted);
        let listing = store.list(None).expect("list");
        assert!(
            listing.invalid.is_empty(),
            "cut {cut}: {:?}",
            listing.invalid
        );
        let newest = store.find("job", 0, None).expect("a snapshot survives");
        let step = newest.manifest.step;
        assert!(step == 1 || step == 2, "cut {cut}: step {step}");
        let seed = if step == 1 { 1 } else { 2 };
        assert_eq!(
            read_all(&store, &newest).expect("read"),
            data(newest.layout.data_len, seed)
        );
        assert!(store.verify(&newest.dir).is_ok());
        // The previous snapshot is intact whichever is newest.
        let old = store.find("job", 0, Some(1)).expect("step 1 intact");
        assert_eq!(
            read_all(&store, &old).expect("read"),
            data(old.layout.data_len, 1)
        );
        outcomes[usize::from(step == 2)] += 1;
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

/// A committed snapshot's manifest is read without its data file; a step
/// that is not committed (absent, or only `.partial`) is `NotFound`; a
/// committed directory whose manifest is missing, garbled or misplaced is
/// an error of the manifest.
#[test]
fn committed_manifest_reads_only_the_manifest_and_tells_missing_from_broken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        root: dir.path().to_path_buf(),
        io_backend: BackendChoice::Buffered,
        ..config()
    };
    let store = Store::open(cfg).expect("store");
    for step in [1, 2] {
        write(&store, step, 3).expect("commit");
    }
    let id = |step| SnapshotId::new("job", 0, step).expect("id");
    let (manifest, layout) = store.committed_manifest(&id(2)).expect("described");
    assert_eq!((manifest.step, manifest.world_size), (2, 1));
    let names: Vec<&str> = layout.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["step", "w", "empty", "b"], "data file order");
    let mut specs: Vec<TensorSpec> = layout.tensors.iter().map(TensorEntry::spec).collect();
    let mut registered = tensors();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    registered.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(specs, registered);

    // The data file plays no part.
    let step_dir = id(2).dir(dir.path());
    std::fs::remove_file(step_dir.join(paths::DATA_FILE)).expect("rm data");
    assert!(store.committed_manifest(&id(2)).is_ok());

    for missing in [
        id(3),
        SnapshotId::new("job", 1, 1).expect("id"),
        SnapshotId::new("nojob", 0, 1).expect("id"),
    ] {
        assert!(
            matches!(
                store.committed_manifest(&missing),
                Err(StoreError::NotFound { .. })
            ),
            "{missing}"
        );
    }
    std::fs::create_dir_all(id(4).partial_dir(dir.path())).expect("mkdir partial");
    assert!(matches!(
        store.committed_manifest(&id(4)),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.committed_manifest(&SnapshotId {
            job: "../x".into(),
            rank: 0,
            step: 1
        }),
        Err(StoreError::Name(_))
    ));

    let manifest_path = id(1).dir(dir.path()).join(paths::MANIFEST_FILE);
    let good = std::fs::read(&manifest_path).expect("read manifest");
    std::fs::write(&manifest_path, &good[..good.len() / 2]).expect("truncate");
    assert!(matches!(
        store.committed_manifest(&id(1)),
        Err(StoreError::Manifest { .. })
    ));
    std::fs::remove_file(&manifest_path).expect("rm manifest");
    assert!(matches!(
        store.committed_manifest(&id(1)),
        Err(StoreError::ManifestMissing { .. })
    ));
    // A manifest of another step in step 1's place.
    std::fs::copy(step_dir.join(paths::MANIFEST_FILE), &manifest_path).expect("copy");
    assert!(matches!(
        store.committed_manifest(&id(1)),
        Err(StoreError::Manifest {
            source: manifest::ManifestError::WrongPlace { .. },
            ..
        })
    ));
}

/// A checksum that counts what it is given and delegates to the CPU one, or
/// (when `flip`) answers one bit off.
#[derive(Debug, Default)]
struct CountingChecksum {
    bytes: std::sync::atomic::AtomicU64,
    flip: bool,
}

impl CountingChecksum {
    fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ChunkChecksum for CountingChecksum {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn update(&self, crc: u32, piece: &[u8]) -> u32 {
        self.bytes
            .fetch_add(piece.len() as u64, std::sync::atomic::Ordering::SeqCst);
        let crc = CpuCrc32.update(crc, piece);
        if self.flip { crc ^ 1 } else { crc }
    }
}

/// Commit and read compute every CRC through the store's checksum, none
/// beside it: a counting checksum sees the header and every data byte once
/// per commit and per read, and a wrong one makes the same snapshot unread-
/// able (the header check and every chunk fail).
#[test]
fn commit_and_read_checksum_only_through_the_store_checksum() {
    let sim = SimStorage::new(Path::new(ROOT));
    let mut store = store_on(&sim);
    let counting = Arc::new(CountingChecksum::default());
    store.set_checksum(counting.clone());
    assert_eq!(store.checksum().name(), "counting");
    let committed = write(&store, 1, 4).expect("commit");
    let (header, data) = (committed.manifest.header_len, committed.manifest.data_len);
    // The header and each data byte once, and the header again when
    // retention opens the snapshots of the rank.
    assert_eq!(counting.bytes(), 2 * header + data);

    let snap = store.find("job", 0, None).expect("find");
    assert_eq!(
        counting.bytes(),
        3 * header + data,
        "finding checks the header"
    );
    read_all(&store, &snap).expect("read");
    assert_eq!(
        counting.bytes(),
        3 * header + 2 * data,
        "reading checks each byte"
    );
    assert!(store.verify(&snap.dir).is_ok());

    let mut wrong = store_on(&sim);
    wrong.set_checksum(Arc::new(CountingChecksum {
        flip: true,
        ..CountingChecksum::default()
    }));
    assert!(matches!(
        wrong.open_dir(&snap.dir, None),
        Err(StoreError::HeaderCorrupt { .. })
    ));
    let report = wrong.verify(&snap.dir);
    assert!(!report.is_ok());
    // With the structure vouched for by the right checksum, every chunk
    // fails the wrong one.
    let err = read_all(&wrong, &snap).expect_err("every chunk fails");
    assert!(
        matches!(err, StoreError::ChunkCorrupt { chunk: 0, .. }),
        "{err}"
    );
}

/// Memory another process writes goes in through `Source::Shared` and out
/// through `read_into_shared`, on a memfd mapped twice (the trainer's and
/// the daemon's mappings), with its CRCs computed through the handle.
#[test]
fn shared_memory_source_and_direct_read_round_trip_through_a_memfd() {
    use crate::shared_memory::testing::SharedPair;

    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    let layout = Layout::plan(&tensors()).expect("layout");
    let len = usize::try_from(layout.data_len).expect("fits");
    let padded = len.next_multiple_of(4096);
    let source = SharedPair::new(padded);
    let bytes = data(layout.data_len, 6);
    source.trainer_writes(0, &bytes);
    let id = SnapshotId::new("job", 0, 1).expect("id");
    let shared = source.daemon().subrange(0, len).expect("range");
    let committed = store
        .write_laid_out(&id, &layout, 1, Source::Shared(shared))
        .expect("commit from shared memory");
    assert_eq!(
        committed.manifest.chunk_crc32,
        gpusnap_kernels::reference::chunk_crc32s(&bytes, store.pool().buf_bytes())
    );
    let snap = store.find("job", 0, None).expect("find");
    assert_eq!(read_all(&store, &snap).expect("read"), bytes);

    let target = SharedPair::new(padded);
    target.trainer_writes(0, &vec![0xAB; padded]);
    store
        .read_into_shared(&snap, target.daemon())
        .expect("direct read into shared memory");
    assert_eq!(target.trainer_reads(0, len), bytes, "the trainer sees it");
    let empty = SharedPair::new(4096);
    assert!(matches!(
        store.read_into_shared(&snap, empty.daemon()),
        Err(StoreError::DirectReadUnsupported {
            why: DirectReadBlocker::DestinationTooSmall { .. },
            ..
        })
    ));
}

/// A pool held by others makes a snapshot fail with a timeout at the
/// store's pool wait, not wait forever; it commits once the pool is free.
#[test]
fn a_snapshot_waiting_on_a_busy_pool_times_out() {
    let sim = SimStorage::new(Path::new(ROOT));
    let mut store = store_on(&sim);
    store.set_pool_wait(std::time::Duration::from_millis(100));
    let held = store
        .pool()
        .lease(store.pool().capacity(), std::time::Instant::now())
        .expect("every buffer");
    let started = std::time::Instant::now();
    let err = write(&store, 1, 1).expect_err("no buffer frees up");
    assert!(
        matches!(
            err,
            StoreError::Pool(crate::buffer_pool::PoolError::Timeout { .. })
        ),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    drop(held);
    write(&store, 1, 1).expect("commits once the pool is free");
}

/// The regression: a direct read leased a pool buffer it never used, so a
/// restore failed with `PoolError::Timeout` while persists held the pool.
/// It needs none: it reads the same bytes while every buffer is held.
#[test]
fn a_direct_read_needs_no_pool_buffer() {
    use crate::shared_memory::testing::SharedPair;

    let sim = SimStorage::new(Path::new(ROOT));
    let mut store = store_on(&sim);
    let committed = write(&store, 1, 4).expect("commit");
    let len = usize::try_from(committed.manifest.data_len).expect("fits");
    let snap = store.find("job", 0, Some(1)).expect("find");
    store.set_pool_wait(std::time::Duration::from_millis(100));
    let held = store
        .pool()
        .lease(store.pool().capacity(), std::time::Instant::now())
        .expect("every buffer");
    let target = SharedPair::new(len.next_multiple_of(4096));
    store
        .read_into_shared(&snap, target.daemon())
        .expect("a direct read while the pool is held");
    assert_eq!(
        target.trainer_reads(0, len),
        data(committed.manifest.data_len, 4)
    );
    let mut private = crate::hot_tier::HotBuffer::new(len.next_multiple_of(4096)).expect("buffer");
    store
        .read_into(&snap, &mut private)
        .expect("the same into private memory");
    assert_eq!(&private[..len], &data(committed.manifest.data_len, 4)[..]);
    drop(held);
}

/// Under `JobDirs::Claimed` (the daemon's store) a commit whose job
/// directory vanished after its claim fails naming it, and makes nothing: a
/// job directory without its OWNER would be refused to everyone.
#[test]
fn a_claimed_store_never_makes_a_missing_job_directory() {
    let sim = SimStorage::new(Path::new(ROOT));
    let mut store = store_on(&sim);
    assert_eq!(store.job_dirs(), JobDirs::MadeByCommits);
    store.set_job_dirs(JobDirs::Claimed);
    let job_dir = Path::new(ROOT).join("job");
    match write(&store, 1, 1) {
        Err(StoreError::JobMissing { job, dir }) => {
            assert_eq!((job.as_str(), dir.as_path()), ("job", job_dir.as_path()));
        }
        other => panic!("a commit into a missing job directory: {other:?}"),
    }
    assert!(
        sim.metadata(&job_dir).expect("stat").is_none(),
        "nothing made"
    );
    // A claim made it: the rank directory below it is made as before.
    sim.create_dir(&job_dir).expect("the claim's directory");
    write(&store, 1, 1).expect("commits under the claimed job");
    assert_eq!(store.find("job", 0, None).expect("find").manifest.step, 1);
    // The default store (benchmarks, tests) makes the job itself.
    store.set_job_dirs(JobDirs::MadeByCommits);
    let id = SnapshotId::new("other", 0, 1).expect("id");
    let layout = Layout::plan(&tensors()).expect("layout");
    let bytes = data(layout.data_len, 2);
    let mut fill = |offset: u64, dst: &mut [u8]| -> Result<(), SourceError> {
        let start = usize::try_from(offset)?;
        dst.copy_from_slice(&bytes[start..start + dst.len()]);
        Ok(())
    };
    store
        .write_laid_out(&id, &layout, 1, Source::Stream(&mut fill))
        .expect("the job directory made by the commit");
}

#[test]
fn the_newest_of_nothing_is_not_found_without_a_step_zero() {
    let sim = SimStorage::new(Path::new(ROOT));
    let store = store_on(&sim);
    let err = store.find("job", 3, None).expect_err("nothing there");
    assert!(
        matches!(
            &err,
            StoreError::NotFound {
                step: None,
                rank: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "no snapshot of job/3 found");
    write(&store, 5, 1).expect("commit");
    let err = store.find("job", 0, Some(6)).expect_err("no step 6");
    assert_eq!(err.to_string(), "snapshot job/0/step-6 not found");
}

/// A store of a later (simulated) format reads this build's snapshots; this
/// build refuses the later one's, and reports it instead of listing it.
#[test]
fn a_bumped_store_reads_older_snapshots_and_an_older_store_refuses_newer_ones() {
    let sim = SimStorage::new(Path::new(ROOT));
    let v1 = store_on(&sim);
    write(&v1, 1, 1).expect("v1 commit");
    let mut v2 = store_on(&sim);
    v2.set_format(FormatVersion::of_build(2));
    let committed = write(&v2, 2, 2).expect("v2 commit");
    assert_eq!(committed.manifest.format_version, 2);
    let steps: Vec<(u64, u32)> = v2
        .list(None)
        .expect("list")
        .snapshots
        .iter()
        .map(|s| (s.manifest.step, s.manifest.format_version))
        .collect();
    assert_eq!(steps, [(1, 1), (2, 2)]);
    let listing = v1.list(None).expect("list");
    assert_eq!(listing.snapshots.len(), 1);
    assert!(matches!(
        &listing.invalid[..],
        [Invalid {
            error: StoreError::Manifest {
                source: manifest::ManifestError::UnsupportedVersion {
                    found: 2,
                    newest: 1
                },
                ..
            },
            ..
        }]
    ));
}

/// The latency backend wraps the real storage of a store: the first
/// snapshot's fdatasync takes the delay, the second none.
#[test]
fn a_store_over_delayed_storage_delays_only_the_first_snapshots_sync() {
    use crate::storage::delay::{DelaySpec, DelayedOp, DelayedStorage};
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        root: dir.path().to_path_buf(),
        io_backend: BackendChoice::Buffered,
        ..config()
    };
    let mut delayed = None;
    let store = Store::open_wrapped(cfg, |inner| {
        let d = DelayedStorage::new(
            inner,
            vec![DelaySpec {
                op: DelayedOp::SyncData,
                delay_ms: 300,
                first_n: Some(1),
            }],
        );
        delayed = Some(d.clone());
        Arc::new(d)
    })
    .expect("store");
    let delayed = delayed.expect("wrapped");
    let started = std::time::Instant::now();
    write(&store, 1, 1).expect("commit");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(delayed.delays_applied(), 1);
    write(&store, 2, 2).expect("commit");
    assert_eq!(delayed.delays_applied(), 1, "only the first snapshot");
    let snap = store.find("job", 0, None).expect("find");
    assert_eq!(
        read_all(&store, &snap).expect("read"),
        data(snap.layout.data_len, 2)
    );
}

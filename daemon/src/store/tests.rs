//! Store tests over the simulated file system: round trips, the commit
//! protocol under power loss at every operation, retention and recovery.
//! The same scenarios on the real backends live in `daemon/tests/`.

use std::path::Path;
use std::sync::Arc;

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

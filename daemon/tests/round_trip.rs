//! Random tensor sets through every backend and both kinds of source read
//! back equal, and the official `safetensors` crate loads every file written.

mod common;

use common::*;
use gpusnap::{Dtype, TensorSpec};
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::{SnapshotId, Store};
use proptest::prelude::*;

fn tensor_set() -> impl Strategy<Value = Vec<TensorSpec>> {
    let one = (
        0usize..Dtype::ALL.len(),
        prop::collection::vec(0u64..40, 0..4),
    );
    let small = prop::collection::vec(one, 0..60);
    let large = prop::collection::vec((0usize..Dtype::ALL.len(), 1u64..400_000), 0..3);
    (small, large).prop_map(|(small, large)| {
        let mut out = Vec::new();
        for (i, (d, shape)) in small.into_iter().enumerate() {
            out.push(TensorSpec::new(format!("t{i}"), Dtype::ALL[d], shape));
        }
        for (i, (d, n)) in large.into_iter().enumerate() {
            out.push(TensorSpec::new(format!("large.{i}"), Dtype::ALL[d], [n]));
        }
        out
    })
}

/// The file loads with the safetensors crate, with every tensor's dtype,
/// shape and bytes as registered.
fn check_with_safetensors(store: &Store, job: &str, step: u64, tensors: &[TensorSpec], seed: u64) {
    let snapshot = store.find(job, 0, Some(step)).expect("find");
    let bytes = std::fs::read(snapshot.data_path()).expect("read file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors loads the file");
    assert_eq!(st.len(), tensors.len());
    for spec in tensors {
        let view = st.tensor(&spec.name).expect("tensor present");
        assert_eq!(
            format!("{:?}", view.dtype()),
            spec.dtype.name(),
            "{}",
            spec.name
        );
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        assert_eq!(shape, spec.shape, "{}", spec.name);
        let entry = snapshot
            .layout
            .tensors
            .iter()
            .find(|t| t.name == spec.name)
            .expect("in table");
        for (i, b) in view.data().iter().enumerate() {
            assert_eq!(
                *b,
                pattern_byte(seed, entry.offset + i as u64),
                "{} byte {i}",
                spec.name
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_tensor_sets_round_trip_on_every_backend(tensors in tensor_set(), seed in any::<u64>()) {
        for backend in BACKENDS {
            let dir = scratch();
            let store = open(dir.path(), backend);
            write_memory(&store, "mem", 1, &tensors, seed).expect("memory write");
            write_shared(&store, "shared", 1, &tensors, seed).expect("shared write");
            write_stream(&store, "stream", 1, &tensors, seed).expect("stream write");
            for job in ["mem", "shared", "stream"] {
                let snapshot = store.find(job, 0, Some(1)).expect("listed");
                check_pattern(&store, &snapshot, seed).expect("reads back equal");
                check_with_safetensors(&store, job, 1, &tensors, seed);
                prop_assert!(store.verify(&snapshot.dir).is_ok());
            }
        }
    }
}

#[test]
fn thousands_of_tiny_tensors_and_zero_byte_ones() {
    let tensors: Vec<TensorSpec> = (0..5000)
        .map(|i| match i % 4 {
            0 => TensorSpec::new(format!("layer.{i}.bias"), Dtype::F32, [i % 7]),
            1 => TensorSpec::new(format!("layer.{i}.scale"), Dtype::BF16, [3]),
            2 => TensorSpec::new(format!("layer.{i}.empty"), Dtype::F64, [0]),
            _ => TensorSpec::new(format!("layer.{i}.flag"), Dtype::Bool, []),
        })
        .collect();
    let dir = scratch();
    let store = open(dir.path(), BackendChoice::Auto);
    write_memory(&store, "tiny", 7, &tensors, 3).expect("write");
    let snapshot = store.find("tiny", 0, None).expect("find");
    assert!(snapshot.manifest.header_len > 4096, "a multi-block header");
    check_pattern(&store, &snapshot, 3).expect("read");
    check_with_safetensors(&store, "tiny", 7, &tensors, 3);
}

#[test]
fn an_empty_tensor_set_is_a_valid_snapshot() {
    let dir = scratch();
    let store = open(dir.path(), BackendChoice::Auto);
    write_memory(&store, "none", 1, &[], 0).expect("write");
    let snapshot = store.find("none", 0, None).expect("find");
    assert_eq!(snapshot.manifest.file_len, 4096);
    check_with_safetensors(&store, "none", 1, &[], 0);
}

/// io_uring refused (forced by config) makes the fallback write the very
/// same data file; private memory, shared memory and a stream write it too.
#[test]
fn every_backend_and_source_writes_identical_files() {
    let tensors = mixed_tensors();
    let mut files = Vec::new();
    for backend in BACKENDS {
        for write in [write_memory, write_shared, write_stream] {
            let dir = scratch();
            let store = open(dir.path(), backend);
            write(&store, "same", 9, &tensors, 42).expect("write");
            let snapshot = store.find("same", 0, None).expect("find");
            assert_eq!(
                snapshot.manifest.io_backend.name(),
                serde_json::to_value(backend)
                    .expect("name")
                    .as_str()
                    .expect("a string")
            );
            files.push((
                std::fs::read(snapshot.data_path()).expect("read"),
                snapshot.manifest.chunk_crc32.clone(),
            ));
        }
    }
    assert_eq!(files.len(), 9);
    assert!(
        files.windows(2).all(|w| w[0] == w[1]),
        "identical bytes and CRCs"
    );
}

#[test]
fn memory_source_must_match_layout_and_alignment() {
    let dir = scratch();
    let store = open(dir.path(), BackendChoice::Auto);
    let tensors = mixed_tensors();
    let (layout, mem) = staged(&tensors, 1);
    let id = SnapshotId::new("bad", 0, 1).expect("id");
    let short = &mem.bytes()[..mem.bytes().len() - 1];
    assert!(matches!(
        store.write_laid_out(&id, &layout, 1, gpusnapd::store::Source::Memory(short)),
        Err(gpusnapd::store::StoreError::SourceLength { .. })
    ));
    let mut bigger = Aligned::new(mem.bytes().len() + 1);
    let unaligned = &bigger.bytes_mut()[1..];
    assert!(matches!(
        store.write_laid_out(&id, &layout, 1, gpusnapd::store::Source::Memory(unaligned)),
        Err(gpusnapd::store::StoreError::SourceAlignment { .. })
    ));
    let (_, shared) = staged_shared(&tensors, 1);
    let len = shared.handle().len();
    let short = shared.handle().subrange(0, len - 1).expect("range");
    assert!(matches!(
        store.write_laid_out(&id, &layout, 1, gpusnapd::store::Source::Shared(short)),
        Err(gpusnapd::store::StoreError::SourceLength { .. })
    ));
    let bigger = SharedMemfd::new(len + 4096);
    let unaligned = bigger.handle().subrange(8, len).expect("range");
    assert!(matches!(
        store.write_laid_out(&id, &layout, 1, gpusnapd::store::Source::Shared(unaligned)),
        Err(gpusnapd::store::StoreError::SourceAlignment { .. })
    ));
    assert!(store.list(None).expect("list").snapshots.is_empty());
}

//! Manifest format versions: a build at format version N lists, verifies
//! and reads every snapshot of versions 1..=N (the rules are in
//! `store/manifest.rs`).
//!
//! `fixtures/v1` is a real version-1 store: job `fixture` (OWNER uid 1000),
//! rank 0 of 1, step 1, the six tensors of [`fixture_tensors`] in six
//! dtypes, 4096-byte chunks (two of them), 9837 bytes of data file. The
//! version-1 writer wrote it from [`fixture_data`] (the store tests'
//! pattern with seed 1, the bool tensor masked to 0 and 1), and the reader
//! of commit 022b6b5 (before format versions were explicit) lists and
//! verifies it. It is never regenerated.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use gpusnap::{Dtype, TensorSpec};
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::manifest::ManifestError;
use gpusnapd::store::{FormatVersion, Layout, Snapshot, Store, StoreError};

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

fn fixture_tensors() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("model.weight", Dtype::F32, [8, 128]),
        TensorSpec::new("model.bias", Dtype::BF16, [300]),
        TensorSpec::new("model.norm", Dtype::F16, [3, 5]),
        TensorSpec::new("step", Dtype::I64, []),
        TensorSpec::new("tokens", Dtype::U8, [1000]),
        TensorSpec::new("mask", Dtype::Bool, [7]),
    ]
}

/// The data section the fixture was written from.
fn fixture_data(layout: &Layout) -> Vec<u8> {
    let mut data = vec![0; usize::try_from(layout.data_len).expect("fits")];
    fill_pattern(1, 0, &mut data);
    let mask = layout
        .tensors
        .iter()
        .find(|t| t.name == "mask")
        .expect("mask");
    for b in &mut data[byte_range(mask)] {
        *b &= 1;
    }
    data
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn read_all(store: &Store, snapshot: &Snapshot) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .read(snapshot, &mut |offset, bytes| {
            assert_eq!(offset, out.len() as u64, "in order");
            out.extend_from_slice(bytes);
            Ok(())
        })
        .expect("verified read");
    out
}

/// Lists, verifies and reads the fixture byte for byte (through the
/// buffers and with a direct read) with `store`.
fn check_fixture(store: &Store) {
    let listing = store.list(Some("fixture")).expect("list");
    let snap = listing
        .snapshots
        .iter()
        .find(|s| s.manifest.step == 1)
        .unwrap_or_else(|| panic!("v1 snapshot not listed: {:?}", listing.invalid));
    let m = &snap.manifest;
    assert_eq!(
        (m.format_version, m.job.as_str(), m.rank, m.world_size),
        (1, "fixture", 0, 1)
    );
    assert_eq!(m.chunk_crc32.len(), 2);
    assert_eq!(
        snap.manifest.header_metadata()["gpusnap.format_version"],
        "1"
    );
    let planned = Layout::plan(&fixture_tensors()).expect("plan");
    assert_eq!(snap.layout, planned, "the tensor table is the recipe's");
    let report = store.verify(&snap.dir);
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.chunks_checked, 2);
    let expected = fixture_data(&planned);
    assert!(read_all(store, snap) == expected, "bytes differ");
    let mut dst = Aligned::new(expected.len().next_multiple_of(4096));
    store.read_into(snap, dst.bytes_mut()).expect("direct read");
    assert!(
        dst.bytes()[..expected.len()] == expected[..],
        "direct read differs"
    );
}

#[test]
fn the_v1_fixture_is_listed_verified_and_read_today_and_by_a_bumped_build_beside_its_own() {
    let dir = scratch();
    let root = dir.path().join("store");
    copy_tree(&fixture_root(), &root);
    let data_file = Path::new("fixture/0/step-1/state.safetensors");
    let original = std::fs::read(fixture_root().join(data_file)).expect("fixture");
    // Any safetensors loader reads it.
    let st = safetensors::SafeTensors::deserialize(&original).expect("safetensors loads it");
    assert_eq!(st.len(), fixture_tensors().len());

    // Today's build.
    let today = open(&root, BackendChoice::Auto);
    assert_eq!(today.format(), FormatVersion::CURRENT);
    check_fixture(&today);

    // A build at format version 2 (simulated): it reads version 1 as
    // before, and writes version 2 beside it.
    let mut bumped = open(&root, BackendChoice::Auto);
    bumped.set_format(FormatVersion::of_build(2));
    check_fixture(&bumped);
    write_memory(&bumped, "fixture", 2, &fixture_tensors(), 2).expect("a v2 snapshot");
    let listing = bumped.list(Some("fixture")).expect("list");
    assert!(listing.invalid.is_empty(), "{:?}", listing.invalid);
    let versions: Vec<(u64, u32)> = listing
        .snapshots
        .iter()
        .map(|s| (s.manifest.step, s.manifest.format_version))
        .collect();
    assert_eq!(versions, [(1, 1), (2, 2)]);
    let v2 = &listing.snapshots[1];
    assert_eq!(v2.manifest.header_metadata()["gpusnap.format_version"], "2");
    assert!(bumped.verify(&v2.dir).is_ok());
    check_pattern(&bumped, v2, 2).expect("the v2 snapshot reads back");
    check_fixture(&bumped);

    // Today's build still reads version 1 and reports version 2, never
    // misreading it.
    let listing = today.list(Some("fixture")).expect("list");
    assert_eq!(listing.snapshots.len(), 1);
    assert!(
        matches!(
            &listing.invalid[..],
            [gpusnapd::store::Invalid {
                error: StoreError::Manifest {
                    source: ManifestError::UnsupportedVersion {
                        found: 2,
                        newest: 1
                    },
                    ..
                },
                ..
            }]
        ),
        "{:?}",
        listing.invalid
    );
    assert_eq!(
        std::fs::read(root.join(data_file)).expect("copy"),
        original,
        "reading changed nothing"
    );
}

//! Damaged snapshots are reported precisely and never returned as valid:
//! a flipped data byte, a flipped header byte, a truncated file, a missing or
//! garbled manifest. `gpusnapctl verify` says the same and exits non-zero.
//!
//! It lives beside gpusnapctl (whose binary only its own crate's tests can
//! run) and shares the store tests' helpers.

#[path = "../../daemon/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::{DirectReadBlocker, Store, StoreError};

fn committed(dir: &Path) -> (Store, std::path::PathBuf) {
    let store = open(dir, BackendChoice::Auto);
    write_memory(&store, "job", 1, &mixed_tensors(), 1).expect("write");
    let snap = store.find("job", 0, None).expect("find");
    (store, snap.dir)
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).expect("read");
    let at = usize::try_from(at).expect("fits");
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).expect("write");
}

fn ctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gpusnapctl"))
        .args(args)
        .output()
        .expect("run gpusnapctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_flipped_data_byte_names_the_chunk_range_and_tensor() {
    let dir = scratch();
    let (store, snap_dir) = committed(dir.path());
    let snap = store
        .open_dir(&snap_dir, None)
        .expect("structure is intact");
    let victim = snap
        .layout
        .tensors
        .iter()
        .find(|t| t.name == "opt.m")
        .expect("tensor");
    let at = snap.manifest.header_len + victim.offset + 1000;
    flip_byte(&snap.data_path(), at);

    let err = check_pattern(&store, &snap, 1).expect_err("the reader refuses the chunk");
    let StoreError::ChunkCorrupt {
        start,
        end,
        tensors,
        ..
    } = &err
    else {
        panic!("unexpected error {err}");
    };
    let data_at = victim.offset + 1000;
    assert!(*start <= data_at && data_at < *end, "{err}");
    assert!(tensors.contains(&"opt.m".to_owned()), "{err}");
    assert!(err.to_string().contains("opt.m"), "{err}");

    let report = store.verify(&snap_dir);
    assert!(!report.is_ok());
    assert_eq!(
        report.problems.len(),
        1,
        "exactly one corrupt chunk: {:?}",
        report.problems
    );

    let (code, stdout) = ctl(&["verify", snap_dir.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("CORRUPT") && stdout.contains("opt.m"),
        "{stdout}"
    );
    let (code, stdout) = ctl(&["--json", "verify", snap_dir.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(json[0]["ok"], false);
}

#[test]
fn a_flipped_header_byte_unlists_the_snapshot() {
    let dir = scratch();
    let (store, snap_dir) = committed(dir.path());
    flip_byte(&snap_dir.join("state.safetensors"), 20);
    assert!(matches!(
        store.open_dir(&snap_dir, None),
        Err(StoreError::HeaderCorrupt { .. })
    ));
    let listing = store.list(None).expect("list");
    assert!(listing.snapshots.is_empty());
    assert_eq!(listing.invalid.len(), 1);
    assert_eq!(ctl(&["verify", snap_dir.to_str().expect("utf8")]).0, 1);
}

#[test]
fn a_truncated_file_is_reported_with_both_lengths() {
    let dir = scratch();
    let (store, snap_dir) = committed(dir.path());
    let path = snap_dir.join("state.safetensors");
    let len = std::fs::metadata(&path).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(len - 10)
        .expect("truncate");
    match store.open_dir(&snap_dir, None) {
        Err(StoreError::LengthMismatch {
            expected, actual, ..
        }) => {
            assert_eq!((expected, actual), (len, len - 10));
        }
        other => panic!("expected a length mismatch, got {other:?}"),
    }
    assert!(
        store.find("job", 0, None).is_err(),
        "nothing valid to restore"
    );
    let (code, stdout) = ctl(&["verify", snap_dir.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    assert!(stdout.contains(&format!("{}", len - 10)), "{stdout}");
}

#[test]
fn a_missing_or_garbled_manifest_is_not_a_snapshot() {
    let dir = scratch();
    let (store, snap_dir) = committed(dir.path());
    let manifest = snap_dir.join("MANIFEST.json");
    let good = std::fs::read(&manifest).expect("read");

    std::fs::write(&manifest, &good[..good.len() / 2]).expect("garble");
    assert!(matches!(
        store.open_dir(&snap_dir, None),
        Err(StoreError::Manifest { .. })
    ));
    assert!(store.list(None).expect("list").snapshots.is_empty());

    // A CRC changed in the manifest: the structure holds, the data does not.
    let mut m: serde_json::Value = serde_json::from_slice(&good).expect("json");
    m["chunk_crc32"][0] = serde_json::json!(m["chunk_crc32"][0].as_u64().expect("crc") ^ 1);
    std::fs::write(&manifest, serde_json::to_vec(&m).expect("json")).expect("write");
    let report = store.verify(&snap_dir);
    assert!(!report.is_ok());
    assert!(
        report.problems[0].to_string().contains("chunk 0"),
        "{:?}",
        report.problems
    );

    std::fs::remove_file(&manifest).expect("remove");
    assert!(matches!(
        store.open_dir(&snap_dir, None),
        Err(StoreError::ManifestMissing { .. })
    ));
    let (code, stdout) = ctl(&["verify", snap_dir.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    assert!(stdout.contains("no manifest"), "{stdout}");
}

#[test]
fn gpusnapctl_list_and_inspect_show_committed_snapshots() {
    let dir = scratch();
    let (_store, snap_dir) = committed(dir.path());
    let root = dir.path().to_str().expect("utf8");
    let (code, stdout) = ctl(&["--json", "list", "--root", root]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(json["snapshots"][0]["step"], 1);
    assert_eq!(json["complete_steps"]["job"], serde_json::json!([1]));
    let (code, stdout) = ctl(&["inspect", snap_dir.to_str().expect("utf8")]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("model.w") && stdout.contains("F32"),
        "{stdout}"
    );
    let (code, _) = ctl(&["verify", snap_dir.to_str().expect("utf8")]);
    assert_eq!(code, 0);
    // A path that is not there is an error (exit 2), and nothing is created.
    let missing = dir.path().join("nope").join("step-1");
    let (code, _) = ctl(&["verify", missing.to_str().expect("utf8")]);
    assert_eq!(code, 2);
    assert!(!dir.path().join("nope").exists());
}

#[test]
fn a_direct_read_into_aligned_memory_round_trips_on_every_backend_and_refuses_a_flipped_byte() {
    for backend in BACKENDS {
        let dir = scratch();
        let store = open(dir.path(), backend);
        write_memory(&store, "job", 1, &mixed_tensors(), 1).expect("write");
        let snap = store.find("job", 0, None).expect("find");
        let data_len = usize::try_from(snap.manifest.data_len).expect("fits");
        let mut dst = Aligned::new(data_len.next_multiple_of(4096));
        store
            .read_into(&snap, dst.bytes_mut())
            .expect("direct read");
        let (_, expected) = staged(&mixed_tensors(), 1);
        assert!(
            dst.bytes()[..data_len] == *expected.bytes(),
            "{backend:?}: bytes differ"
        );

        // Too small or unaligned destinations are refused, not overrun.
        let mut short = Aligned::new(data_len.next_multiple_of(4096) - 4096);
        assert!(matches!(
            store.read_into(&snap, short.bytes_mut()),
            Err(StoreError::DirectReadUnsupported {
                why: DirectReadBlocker::DestinationTooSmall { .. },
                ..
            })
        ));
        assert!(matches!(
            store.read_into(&snap, &mut dst.bytes_mut()[1..]),
            Err(StoreError::DirectReadUnsupported {
                why: DirectReadBlocker::UnalignedDestination { .. },
                ..
            })
        ));

        let victim = snap
            .layout
            .tensors
            .iter()
            .find(|t| t.name == "opt.m")
            .expect("tensor");
        flip_byte(
            &snap.data_path(),
            snap.manifest.header_len + victim.offset + 7,
        );
        let err = store
            .read_into(&snap, dst.bytes_mut())
            .expect_err("the flipped chunk is refused");
        assert!(
            matches!(&err, StoreError::ChunkCorrupt { tensors, .. } if tensors.contains(&"opt.m".to_owned())),
            "{backend:?}: {err}"
        );
    }
}

/// The direct read into memory another process may write (a staging slot):
/// O_DIRECT into a memfd mapping, every chunk checked through the handle;
/// a flipped byte on disk is refused, a short or unaligned target is not
/// overrun.
#[test]
fn a_direct_read_into_shared_memory_round_trips_on_every_backend_and_refuses_a_flipped_byte() {
    for backend in BACKENDS {
        let dir = scratch();
        let store = open(dir.path(), backend);
        write_shared(&store, "job", 1, &mixed_tensors(), 1).expect("write from shared memory");
        let snap = store.find("job", 0, None).expect("find");
        let data_len = usize::try_from(snap.manifest.data_len).expect("fits");
        let dst = SharedMemfd::new(data_len.next_multiple_of(4096));
        store
            .read_into_shared(&snap, dst.handle())
            .expect("direct read");
        let mut back = vec![0; data_len];
        dst.handle().copy_to(0, &mut back).expect("in range");
        let (_, expected) = staged(&mixed_tensors(), 1);
        assert!(back == *expected.bytes(), "{backend:?}: bytes differ");

        let short = dst
            .handle()
            .subrange(0, data_len.next_multiple_of(4096) - 4096)
            .expect("range");
        assert!(matches!(
            store.read_into_shared(&snap, short),
            Err(StoreError::DirectReadUnsupported {
                why: DirectReadBlocker::DestinationTooSmall { .. },
                ..
            })
        ));
        let unaligned = dst.handle().subrange(512, 4096).expect("range");
        assert!(matches!(
            store.read_into_shared(&snap, unaligned),
            Err(StoreError::DirectReadUnsupported {
                why: DirectReadBlocker::UnalignedDestination { .. },
                ..
            })
        ));

        let victim = snap
            .layout
            .tensors
            .iter()
            .find(|t| t.name == "opt.m")
            .expect("tensor");
        flip_byte(
            &snap.data_path(),
            snap.manifest.header_len + victim.offset + 7,
        );
        let err = store
            .read_into_shared(&snap, dst.handle())
            .expect_err("the flipped chunk is refused");
        assert!(
            matches!(&err, StoreError::ChunkCorrupt { tensors, .. } if tensors.contains(&"opt.m".to_owned())),
            "{backend:?}: {err}"
        );
    }
}

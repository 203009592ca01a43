//! Injected I/O faults on the real backends: ENOSPC mid-write, EIO on write,
//! EIO on fdatasync, and failures of every later commit step. Each fails that
//! snapshot with a clear error, removes its partial directory, and leaves the
//! earlier snapshot listed and intact.

mod common;

use std::sync::Arc;

use common::*;
use gpusnapd::storage::fault::{FaultPlan, FaultyStorage};
use gpusnapd::store::{Store, StoreError};

fn check_fault(plan: FaultPlan, expect_in_message: &str) {
    for backend in BACKENDS {
        let dir = scratch();
        let cfg = config(dir.path(), backend);
        let (inner, pool) = os_storage(&cfg);
        let faulty = FaultyStorage::new(inner, FaultPlan::default());
        let store = Store::with_storage(cfg, Arc::new(faulty.clone()), pool).expect("store");
        write_memory(&store, "job", 1, &mixed_tensors(), 1).expect("first snapshot");

        faulty.set_plan(plan.clone());
        let err = write_memory(&store, "job", 2, &mixed_tensors(), 2)
            .expect_err("fault fails the snapshot");
        assert!(faulty.faults_fired() > 0, "{backend:?}: fault never fired");
        let message = err.to_string();
        assert!(
            message.contains(expect_in_message),
            "{backend:?}: {message}"
        );
        faulty.set_plan(FaultPlan::default());

        let rank_dir = dir.path().join("job").join("0");
        let names: Vec<String> = std::fs::read_dir(&rank_dir)
            .expect("rank dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["step-1"],
            "{backend:?}: only the earlier snapshot remains"
        );
        let snapshot = store.find("job", 0, None).expect("earlier snapshot listed");
        check_pattern(&store, &snapshot, 1).expect("earlier snapshot intact");

        // The store is not wedged: the next snapshot commits.
        write_memory(&store, "job", 3, &mixed_tensors(), 3).expect("next snapshot");
    }
}

#[test]
fn enospc_mid_write() {
    check_fault(
        FaultPlan {
            fail_write_at: Some((3, libc::ENOSPC)),
            ..FaultPlan::default()
        },
        "No space left",
    );
}

#[test]
fn eio_on_write() {
    check_fault(
        FaultPlan {
            fail_write_at: Some((1, libc::EIO)),
            ..FaultPlan::default()
        },
        "Input/output error",
    );
}

#[test]
fn eio_on_fdatasync() {
    check_fault(
        FaultPlan {
            fail_sync_data: Some(libc::EIO),
            ..FaultPlan::default()
        },
        "fdatasync",
    );
}

#[test]
fn enospc_when_reserving_space() {
    check_fault(
        FaultPlan {
            fail_create_data_file: Some(libc::ENOSPC),
            ..FaultPlan::default()
        },
        "No space left",
    );
}

#[test]
fn manifest_write_failure() {
    check_fault(
        FaultPlan {
            fail_write_file_synced: Some(libc::EIO),
            ..FaultPlan::default()
        },
        "Input/output error",
    );
}

#[test]
fn rename_failure() {
    check_fault(
        FaultPlan {
            fail_rename: Some(libc::EIO),
            ..FaultPlan::default()
        },
        "rename",
    );
}

#[test]
fn directory_fsync_failure() {
    check_fault(
        FaultPlan {
            fail_sync_dir: Some(libc::EIO),
            ..FaultPlan::default()
        },
        "Input/output error",
    );
}

#[test]
fn errors_are_typed_storage_errors() {
    let dir = scratch();
    let cfg = config(dir.path(), gpusnapd::storage::probe::BackendChoice::Auto);
    let (inner, pool) = os_storage(&cfg);
    let faulty = FaultyStorage::new(
        inner,
        FaultPlan {
            fail_sync_data: Some(libc::EIO),
            ..FaultPlan::default()
        },
    );
    let store = Store::with_storage(cfg, Arc::new(faulty), pool).expect("store");
    let err = write_memory(&store, "job", 1, &mixed_tensors(), 1).expect_err("fails");
    assert!(
        matches!(&err, StoreError::Storage(e) if e.raw_os_error() == Some(libc::EIO)),
        "{err:?}"
    );
}

//! Injected I/O faults on the real backends: ENOSPC mid-write (from memory
//! and from a stream), EIO on write, on read, on fdatasync, a reap that keeps
//! failing, and failures of every later commit step. Each fails that
//! snapshot with its errno intact (compared as a number, never as message
//! text), removes its partial directory, and leaves the earlier snapshot
//! listed and intact.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gpusnapd::storage::StorageError;
use gpusnapd::storage::fault::{FaultPlan, FaultyStorage};
use gpusnapd::store::{Store, StoreError};

/// How a faulted snapshot's data reaches the store.
#[derive(Debug, Clone, Copy)]
enum Write {
    Memory,
    Stream,
}

fn write(store: &Store, how: Write, step: u64) -> Result<(), StoreError> {
    match how {
        Write::Memory => write_memory(store, "job", step, &mixed_tensors(), step),
        Write::Stream => write_stream(store, "job", step, &mixed_tensors(), step),
    }
}

/// A store over the real backend wrapped in a fault injector.
fn faulty_store(
    dir: &std::path::Path,
    backend: gpusnapd::storage::probe::BackendChoice,
) -> (Store, FaultyStorage) {
    let cfg = config(dir, backend);
    let (inner, pool) = os_storage(&cfg);
    let faulty = FaultyStorage::new(inner, FaultPlan::default());
    let store = Store::with_storage(cfg, Arc::new(faulty.clone()), pool).expect("store");
    (store, faulty)
}

/// Step 1 commits; `plan` fails step 2 with `errno`, within `bound`; step
/// 1 stays the only snapshot, intact; step 3 commits once the plan is gone.
fn check_fault(plan: FaultPlan, how: Write, errno: i32) -> Vec<StoreError> {
    let mut errors = Vec::new();
    for backend in BACKENDS {
        let dir = scratch();
        let (store, faulty) = faulty_store(dir.path(), backend);
        write(&store, how, 1).expect("first snapshot");

        faulty.set_plan(plan.clone());
        let started = Instant::now();
        let err = write(&store, how, 2).expect_err("fault fails the snapshot");
        let took = started.elapsed();
        assert!(faulty.faults_fired() > 0, "{backend:?}: fault never fired");
        assert_eq!(
            err.raw_os_error(),
            Some(errno),
            "{backend:?}: the errno survives: {err:?}"
        );
        assert!(
            took < Duration::from_secs(20),
            "{backend:?}: failed in {took:?}"
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
        write(&store, how, 3).expect("next snapshot");
        errors.push(err);
    }
    errors
}

#[test]
fn enospc_mid_write_keeps_its_errno_and_offset() {
    let errors = check_fault(
        FaultPlan {
            fail_write_at: Some((3, libc::ENOSPC)),
            ..FaultPlan::default()
        },
        Write::Memory,
        libc::ENOSPC,
    );
    for err in errors {
        assert!(
            matches!(
                &err,
                StoreError::Storage(StorageError::Io {
                    op: "write",
                    offset: Some(offset),
                    ..
                }) if offset % 4096 == 0
            ),
            "{err:?}"
        );
    }
}

#[test]
fn enospc_mid_write_of_a_streamed_snapshot() {
    check_fault(
        FaultPlan {
            fail_write_at: Some((2, libc::ENOSPC)),
            ..FaultPlan::default()
        },
        Write::Stream,
        libc::ENOSPC,
    );
}

#[test]
fn eio_on_write() {
    check_fault(
        FaultPlan {
            fail_write_at: Some((1, libc::EIO)),
            ..FaultPlan::default()
        },
        Write::Memory,
        libc::EIO,
    );
}

#[test]
fn eio_on_fdatasync() {
    let errors = check_fault(
        FaultPlan {
            fail_sync_data: Some(libc::EIO),
            ..FaultPlan::default()
        },
        Write::Memory,
        libc::EIO,
    );
    for err in errors {
        assert!(
            matches!(
                &err,
                StoreError::Storage(StorageError::Io {
                    op: "fdatasync",
                    ..
                })
            ),
            "{err:?}"
        );
    }
}

#[test]
fn enospc_when_reserving_space() {
    check_fault(
        FaultPlan {
            fail_create_data_file: Some(libc::ENOSPC),
            ..FaultPlan::default()
        },
        Write::Memory,
        libc::ENOSPC,
    );
}

#[test]
fn manifest_write_failure() {
    check_fault(
        FaultPlan {
            fail_write_file_synced: Some(libc::EIO),
            ..FaultPlan::default()
        },
        Write::Memory,
        libc::EIO,
    );
}

#[test]
fn rename_failure_keeps_its_errno_and_both_paths() {
    let errors = check_fault(
        FaultPlan {
            fail_rename: Some(libc::EIO),
            ..FaultPlan::default()
        },
        Write::Memory,
        libc::EIO,
    );
    for err in errors {
        assert!(
            matches!(
                &err,
                StoreError::Storage(StorageError::Io { op: "rename", .. })
            ),
            "{err:?}"
        );
    }
}

#[test]
fn directory_fsync_failure() {
    check_fault(
        FaultPlan {
            fail_sync_dir: Some(libc::EIO),
            ..FaultPlan::default()
        },
        Write::Memory,
        libc::EIO,
    );
}

/// A data file whose reap fails every time (as a ring whose
/// `io_uring_enter` keeps failing): the commit fails with that errno in
/// bounded time instead of spinning, from memory and from a stream.
#[test]
fn a_reap_that_keeps_failing_fails_the_commit_in_bounded_time() {
    for how in [Write::Memory, Write::Stream] {
        check_fault(
            FaultPlan {
                fail_reap: Some(libc::EIO),
                ..FaultPlan::default()
            },
            how,
            libc::EIO,
        );
    }
}

/// A write that moves fewer bytes than asked fails the snapshot (no errno:
/// the store itself refuses it), and nothing is trimmed or synced after it.
#[test]
fn a_short_write_fails_the_snapshot_and_the_dead_file_is_never_synced() {
    for backend in BACKENDS {
        let dir = scratch();
        let (store, faulty) = faulty_store(dir.path(), backend);
        write(&store, Write::Memory, 1).expect("first snapshot");
        faulty.set_plan(FaultPlan {
            short_write_at: Some(2),
            fail_sync_data: Some(libc::EIO),
            ..FaultPlan::default()
        });
        let err = write(&store, Write::Memory, 2).expect_err("short write");
        assert!(
            matches!(err, StoreError::ShortTransfer { op: "write", .. }),
            "{backend:?}: {err:?}"
        );
        assert_eq!(err.raw_os_error(), None);
        assert_eq!(
            faulty.faults_fired(),
            1,
            "{backend:?}: the dead file was never synced"
        );
        faulty.set_plan(FaultPlan::default());
        assert_eq!(store.find("job", 0, None).expect("listed").manifest.step, 1);
        write(&store, Write::Memory, 3).expect("next snapshot");
    }
}

/// Reads fail with their errno too: an injected EIO on a read, and a reap
/// that keeps failing, through the verified stream and the direct read.
#[test]
fn read_failures_keep_their_errno() {
    for backend in BACKENDS {
        let dir = scratch();
        let (store, faulty) = faulty_store(dir.path(), backend);
        write(&store, Write::Memory, 1).expect("snapshot");
        let snapshot = store.find("job", 0, None).expect("listed");
        let data_len = usize::try_from(snapshot.manifest.data_len).expect("fits");
        let mut dst = Aligned::new(data_len.next_multiple_of(4096));
        for plan in [
            FaultPlan {
                fail_read_at: Some((2, libc::EIO)),
                ..FaultPlan::default()
            },
            FaultPlan {
                fail_reap: Some(libc::EIO),
                ..FaultPlan::default()
            },
        ] {
            faulty.set_plan(plan.clone());
            let err = check_pattern(&store, &snapshot, 1).expect_err("read fails");
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EIO),
                "{backend:?} {plan:?}: {err:?}"
            );
            faulty.set_plan(plan.clone());
            let err = store
                .read_into(&snapshot, dst.bytes_mut())
                .expect_err("direct read fails");
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EIO),
                "{backend:?} {plan:?}: {err:?}"
            );
        }
        faulty.set_plan(FaultPlan::default());
        check_pattern(&store, &snapshot, 1).expect("reads again once the faults stop");
        assert_eq!(
            store.pool().free_count(),
            store.pool().capacity(),
            "{backend:?}: every buffer came back"
        );
    }
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

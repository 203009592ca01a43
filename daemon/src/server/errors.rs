//! Every error that reaches a client, in its wire form, decided here and
//! nowhere else: the kind ([`ErrorKind`], which the client maps to its own
//! error), the message, and the operating system's error behind it
//! ([`OsError`]: `ENOSPC`, `EIO`...), which both `Error` replies and
//! `Failed` events carry as a typed field whenever a system call failed.
//!
//! | error | kind | os_error |
//! | --- | --- | --- |
//! | `StoreError::Storage` (I/O, a dead file, no backend, a stalled ring `Stalled`, dead workers `WorkersGone`) | `Storage` | the errno (none for `Dead`, `BackendUnavailable`, `Stalled`, `WorkersGone`) |
//! | `StoreError::Storage(Beneath)` (a path refused beneath the store root: a symbolic link in the way, `ELOOP`; a path leaving it, `EXDEV`; or its OS error) | `Storage` | the errno |
//! | `StoreError::Storage(Root)` (the store root removed from under the daemon: nothing at its path, `ENOENT`; or what is there now cannot be opened) | `Storage` | the errno |
//! | `StoreError::Storage(TooLarge)` (a file over its size limit) | `Corrupt` | none |
//! | `StoreError::{ShortTransfer, JobMissing}` (a job directory removed after its claim) | `Storage` | none |
//! | `StoreError::Pool(Map)` | `Storage` | the errno |
//! | `StoreError::Pool(Timeout)` (no free I/O buffers within the pool wait) | `Timeout` | none |
//! | `StoreError::Pool` otherwise (sizes the configuration rules out) | `Internal` | none |
//! | `StoreError::{Manifest, ManifestMissing, LengthMismatch, HeaderCorrupt, ChunkCorrupt}` | `Corrupt` | none |
//! | `StoreError::NotFound` | `NotFound` | none |
//! | `StoreError::{AlreadyCommitted, InProgress}` | `Busy` | none |
//! | `StoreError::{Name, Layout, RankOutsideWorld}` | `InvalidRegistration` | none |
//! | `StoreError::Source` with a [`StreamError`]: client timeout | `Timeout` | none |
//! | `StoreError::Source` with a [`StreamError`]: client gone, out of order | `Protocol` | none |
//! | `StoreError::Source` otherwise, `Sink`, `SharedRange`, `DirectReadUnsupported`, `SourceLength`, `SourceAlignment`, `ChunkLargerThanBuffer`, `Config` | `Internal` | none |
//! | `PersistError::WriteWait` (no write turn within `persist.write_wait_s`) | `Timeout` | none |
//! | `PersistError::Panicked` (a lane or stream thread panicked) | `Internal` | none |
//! | `RestoreError::{TensorDiffers, MissingInSnapshot, NotRegistered}` | `Mismatch` | none |
//! | `RestoreError::Hot` | `Corrupt` | none |
//! | `RestoreError::Store` | as the store error | as the store error |
//! | `StagingError::Layout` | `InvalidRegistration` | none |
//! | `StagingError::BudgetExceeded` | `StagingFull` | none |
//! | `StagingError::{Memfd, Map}` | `Internal` | the errno |
//! | `OwnerError::NotOwner` | `PermissionDenied` | none |
//! | `OwnerError::BadOwner` (a job directory without a valid OWNER) | `PermissionDenied` | none |
//! | `OwnerError::Store` | as the store error | as the store error |
//! | `LaneError` (the lane's queue full or its thread gone) | `Internal` | none |
//! | a thread the daemon could not start | `Internal` | the errno |
//!
//! No match here has a wildcard over the daemon's own errors: a new variant
//! does not compile until it is given its kind.

use std::any::Any;

use gpusnap_proto::{ErrorKind, OsError, ReplyBody};

use crate::buffer_pool::PoolError;
use crate::owners::OwnerError;
use crate::persist::{LaneError, PersistError, StreamError};
use crate::restore::RestoreError;
use crate::staging::StagingError;
use crate::storage::StorageError;
use crate::store::StoreError;

/// An error reply; kinds that close the connection
/// ([`ErrorKind::closes_connection`]) end it after it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
    pub os_error: Option<OsError>,
}

impl Refusal {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
            os_error: None,
        }
    }

    pub fn protocol(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorKind::Protocol, message)
    }

    /// A bug or an unexpected condition in the daemon.
    pub fn internal(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorKind::Internal, message)
    }

    /// A system call of the daemon's own (not the store's) failed:
    /// `Internal`, with its errno.
    pub fn io(context: &str, e: &std::io::Error) -> Refusal {
        Refusal {
            kind: ErrorKind::Internal,
            message: format!("{context}: {e}"),
            os_error: os_error(e.raw_os_error()),
        }
    }

    pub fn store(e: &StoreError) -> Refusal {
        Refusal {
            kind: wire_kind(e),
            message: e.to_string(),
            os_error: os_error(e.raw_os_error()),
        }
    }

    pub fn restore(e: &RestoreError) -> Refusal {
        let kind = match e {
            RestoreError::TensorDiffers { .. }
            | RestoreError::MissingInSnapshot { .. }
            | RestoreError::NotRegistered { .. } => ErrorKind::Mismatch,
            RestoreError::Hot(_) | RestoreError::NothingVerifies { .. } => ErrorKind::Corrupt,
            RestoreError::RemoteUnavailable { .. } => ErrorKind::Storage,
            RestoreError::RemoteNotOwner { .. } => ErrorKind::PermissionDenied,
            RestoreError::Stopping => ErrorKind::ShuttingDown,
            RestoreError::Store(s) => return Refusal::store(s),
        };
        Refusal::new(kind, e.to_string())
    }

    pub fn staging(e: &StagingError) -> Refusal {
        let kind = match e {
            StagingError::Layout(_) => ErrorKind::InvalidRegistration,
            StagingError::BudgetExceeded { .. } => ErrorKind::StagingFull,
            StagingError::Memfd { .. } | StagingError::Map { .. } => ErrorKind::Internal,
        };
        Refusal {
            kind,
            message: e.to_string(),
            os_error: os_error(e.raw_os_error()),
        }
    }

    pub fn owner(e: &OwnerError) -> Refusal {
        let kind = match e {
            OwnerError::NotOwner { .. } => ErrorKind::PermissionDenied,
            // A job directory whose OWNER is missing or unreadable: nobody
            // may use it until an operator repairs it (the message names it).
            OwnerError::BadOwner { .. } => ErrorKind::PermissionDenied,
            OwnerError::Store(s) => return Refusal::store(s),
        };
        Refusal::new(kind, e.to_string())
    }

    pub fn lane(e: &LaneError) -> Refusal {
        let kind = match e {
            LaneError::Full { .. } | LaneError::Gone => ErrorKind::Internal,
        };
        Refusal::new(kind, e.to_string())
    }

    /// The `Error` reply that says this.
    pub fn into_reply(self) -> ReplyBody {
        ReplyBody::Error {
            kind: self.kind,
            message: self.message,
            os_error: self.os_error,
        }
    }
}

/// The typed OS error of a raw errno.
pub fn os_error(raw: Option<i32>) -> Option<OsError> {
    raw.map(OsError::from_raw)
}

/// The wire kind of a store error.
pub fn wire_kind(e: &StoreError) -> ErrorKind {
    match e {
        StoreError::Storage(s) => storage_kind(s),
        StoreError::Pool(p) => pool_kind(p),
        StoreError::ShortTransfer { .. } | StoreError::JobMissing { .. } => ErrorKind::Storage,
        StoreError::Manifest { .. }
        | StoreError::ManifestMissing { .. }
        | StoreError::LengthMismatch { .. }
        | StoreError::HeaderCorrupt { .. }
        | StoreError::ChunkCorrupt { .. } => ErrorKind::Corrupt,
        StoreError::NotFound { .. } => ErrorKind::NotFound,
        StoreError::AlreadyCommitted { .. } | StoreError::InProgress { .. } => ErrorKind::Busy,
        StoreError::Name(_) | StoreError::Layout(_) | StoreError::RankOutsideWorld { .. } => {
            ErrorKind::InvalidRegistration
        }
        StoreError::Source { source, .. } => source
            .downcast_ref::<StreamError>()
            .map_or(ErrorKind::Internal, stream_kind),
        // The daemon's own staging always matches its layout, reads feed a
        // sink that never fails, a direct read that cannot be done falls
        // back before it is reported, and the rest are checked at start: a
        // bug.
        StoreError::Sink { .. }
        | StoreError::SharedRange(_)
        | StoreError::DirectReadUnsupported { .. }
        | StoreError::SourceLength { .. }
        | StoreError::SourceAlignment { .. }
        | StoreError::ChunkLargerThanBuffer { .. }
        | StoreError::Config(_) => ErrorKind::Internal,
    }
}

fn storage_kind(e: &StorageError) -> ErrorKind {
    match e {
        StorageError::Io { .. }
        | StorageError::Dead { .. }
        | StorageError::BackendUnavailable { .. }
        | StorageError::Stalled { .. }
        | StorageError::WorkersGone { .. }
        | StorageError::Beneath(_)
        | StorageError::Root(_) => ErrorKind::Storage,
        StorageError::TooLarge { .. } => ErrorKind::Corrupt,
    }
}

fn pool_kind(e: &PoolError) -> ErrorKind {
    match e {
        PoolError::Map { .. } => ErrorKind::Storage,
        PoolError::Timeout { .. } => ErrorKind::Timeout,
        PoolError::BadBufferSize { .. }
        | PoolError::PoolTooSmall { .. }
        | PoolError::LeaseTooLarge { .. } => ErrorKind::Internal,
    }
}

fn stream_kind(e: &StreamError) -> ErrorKind {
    match e {
        StreamError::ClientTimeout { .. } => ErrorKind::Timeout,
        StreamError::ClientGone { .. } | StreamError::OutOfOrder { .. } => ErrorKind::Protocol,
        StreamError::Misaligned { .. } => ErrorKind::Internal,
    }
}

/// The wire kind of a persist that did not commit.
pub fn persist_kind(e: &PersistError) -> ErrorKind {
    match e {
        PersistError::Store(s) => wire_kind(s),
        PersistError::WriteWait { .. } => ErrorKind::Timeout,
        PersistError::Panicked { .. } => ErrorKind::Internal,
    }
}

/// The `Failed` event of `step`.
pub fn failed_event(step: u64, e: &PersistError) -> ReplyBody {
    ReplyBody::Failed {
        step,
        kind: persist_kind(e),
        message: e.to_string(),
        os_error: os_error(e.raw_os_error()),
    }
}

/// What a panic said (its payload, when it is text).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SnapshotId;

    fn io_error(errno: i32) -> StoreError {
        StoreError::Storage(StorageError::io(
            "pwrite",
            std::path::Path::new("/x"),
            std::io::Error::from_raw_os_error(errno),
        ))
    }

    #[test]
    fn storage_failures_carry_their_errno_and_others_none() {
        let full = Refusal::store(&io_error(libc::ENOSPC));
        assert_eq!(
            (full.kind, full.os_error),
            (ErrorKind::Storage, Some(OsError::ENOSPC))
        );
        let missing = Refusal::store(&StoreError::NotFound {
            job: "j".to_owned(),
            rank: 0,
            step: Some(3),
        });
        assert_eq!(
            (missing.kind, missing.os_error),
            (ErrorKind::NotFound, None)
        );
        let owner = Refusal::owner(&OwnerError::Store(io_error(libc::EDQUOT)));
        assert_eq!(
            (owner.kind, owner.os_error),
            (ErrorKind::Storage, Some(OsError::EDQUOT)),
            "a failed OWNER claim keeps its errno"
        );
        let restore = Refusal::restore(&RestoreError::Store(io_error(libc::EIO)));
        assert_eq!(
            (restore.kind, restore.os_error),
            (ErrorKind::Storage, Some(OsError::EIO))
        );
        match failed_event(4, &PersistError::Store(io_error(libc::ENOSPC))) {
            ReplyBody::Failed {
                step: 4,
                kind: ErrorKind::Storage,
                os_error: Some(OsError::ENOSPC),
                ..
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stream_source_error_keeps_its_meaning() {
        let id = SnapshotId::new("j".to_owned(), 0, 3).expect("id");
        let source = |e: StreamError| StoreError::Source {
            id: id.clone(),
            offset: 0,
            source: Box::new(e),
        };
        assert_eq!(
            wire_kind(&source(StreamError::ClientTimeout { seq: 2 })),
            ErrorKind::Timeout
        );
        assert_eq!(
            wire_kind(&source(StreamError::ClientGone { seq: 2 })),
            ErrorKind::Protocol
        );
        assert_eq!(
            persist_kind(&PersistError::WriteWait {
                waited_s: 1,
                concurrent_writes: 2
            }),
            ErrorKind::Timeout
        );
        assert_eq!(
            persist_kind(&PersistError::Panicked {
                step: 1,
                message: "x".into()
            }),
            ErrorKind::Internal
        );
    }

    #[test]
    fn panic_messages_are_read_from_either_payload() {
        let text = std::panic::catch_unwind(|| panic!("plain")).expect_err("panics");
        assert_eq!(panic_message(&*text), "plain");
        let formatted = std::panic::catch_unwind(|| panic!("step {}", 3)).expect_err("panics");
        assert_eq!(panic_message(&*formatted), "step 3");
    }
}

//! The one error type of the client library.

use std::path::PathBuf;
use std::time::Duration;

use crate::TensorSpecError;
use crate::device::cuda::CudaError;
use crate::proto::{ErrorKind, OsError};

/// Everything that can go wrong in the client.
///
/// Errors the daemon reports keep its message and, where the daemon sends
/// one, the operating system's error behind them ([`Error::os_error`]:
/// the daemon sends one with [`Error::Storage`], [`Error::Internal`] and
/// [`Error::SnapshotFailed`]); [`Error::from_daemon`] maps each
/// [`ErrorKind`] to exactly one variant and [`Error::daemon_kind`] maps it
/// back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No daemon answers on the socket (it does not exist, refuses, or the
    /// connect timeout ran out).
    #[error("gpusnapd is not reachable at {}: {source}", socket.display())]
    DaemonUnavailable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon speaks another protocol version.
    #[error("protocol version mismatch: client speaks {client}, {message}")]
    VersionMismatch { client: u32, message: String },
    /// A malformed, oversized or out-of-order message, in either direction.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The daemon refused a frame as over its size limit.
    #[error("message too large: {0}")]
    TooLarge(String),
    /// The connection broke and could not be (or was not to be) re-established.
    #[error("disconnected from gpusnapd: {0}")]
    Disconnected(String),
    /// `Begin` or `Restore` reached the daemon before a registration.
    #[error("not registered: {0}")]
    NotRegistered(String),
    /// The daemon refused the tensor specs, job name, rank or world size.
    #[error("invalid registration: {0}")]
    InvalidRegistration(String),
    /// Another connection holds this (job, rank).
    #[error("busy: {0}")]
    Busy(String),
    /// The job belongs to another user.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The registration does not fit the daemon's staging budget.
    #[error("staging full: {0}")]
    StagingFull(String),
    /// A restore's snapshot does not hold exactly the registered tensors.
    #[error("snapshot does not match the registered tensors: {0}")]
    Mismatch(String),
    /// The requested step does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A checksum or structure check failed.
    #[error("corrupt snapshot: {0}")]
    Corrupt(String),
    /// The daemon's disk refused (`os_error`: the errno, e.g. `ENOSPC`).
    #[error("storage error: {message}")]
    Storage {
        message: String,
        os_error: Option<OsError>,
    },
    /// The daemon is stopping.
    #[error("gpusnapd is shutting down: {0}")]
    ShuttingDown(String),
    /// A wait ran past its bound (`after`; zero when the daemon reported it).
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    /// A bug or an unexpected condition, in the daemon or in this client
    /// (`os_error`: the errno of a system call of the daemon's own that
    /// failed, such as creating or mapping a staging memfd, or starting a
    /// thread; never set by the client itself).
    #[error("internal error: {message}")]
    Internal {
        message: String,
        os_error: Option<OsError>,
    },
    /// The daemon refused this snapshot because staging was busy (policy `skip`).
    #[error("snapshot of step {step} was skipped: {reason}")]
    Skipped { step: u64, reason: String },
    /// The snapshot was captured but the daemon could not commit it
    /// (`os_error`: the errno behind it, when an I/O error was the cause).
    #[error("snapshot of step {step} failed ({}): {message}", kind.name())]
    SnapshotFailed {
        step: u64,
        kind: ErrorKind,
        message: String,
        os_error: Option<OsError>,
    },
    /// The connection that carried this step broke before its commit was
    /// reported, and the daemon does not list it: it is gone.
    #[error(
        "snapshot of step {step} was lost: the daemon did not commit it before the connection broke"
    )]
    Lost { step: u64 },
    /// A buffer's length is not the byte length of its dtype and shape.
    #[error("buffer of tensor {name:?} holds {actual} bytes, its spec needs {expected}")]
    BufferLength {
        name: String,
        expected: u64,
        actual: u64,
    },
    /// A tensor of that name is already registered.
    #[error("tensor {name:?} is already registered")]
    DuplicateName { name: String },
    /// A tensor spec that cannot be stored.
    #[error(transparent)]
    Spec(#[from] TensorSpecError),
    /// The copy backend a buffer needs is not usable on this machine.
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },
    /// A capture is open on this client (started by `begin_snapshot`):
    /// finish it before restoring, registering or snapshotting again.
    #[error("the capture of step {step} is still open: finish it first")]
    CaptureInProgress { step: u64 },
    /// A local I/O error (socket options, mapping the staging memfd).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The CUDA backend failed: no usable driver or device, a driver call
    /// (its name and `CUresult` kept), a device pointer or stream refused
    /// at registration or snapshot time.
    #[error("CUDA: {0}")]
    Cuda(#[from] CudaError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Internal`] of this client's own (no OS error).
    pub(crate) fn internal(message: impl Into<String>) -> Error {
        Error::Internal {
            message: message.into(),
            os_error: None,
        }
    }

    /// The variant for an error the daemon reported. `os_error` is kept by
    /// [`Error::Storage`] (a failed I/O of the store) and
    /// [`Error::Internal`] (a failed system call of the daemon's own), the
    /// kinds the daemon sends one with; on any other kind it is logged and
    /// dropped.
    pub fn from_daemon(kind: ErrorKind, message: String, os_error: Option<OsError>) -> Error {
        if os_error.is_some() && !matches!(kind, ErrorKind::Storage | ErrorKind::Internal) {
            tracing::debug!(
                kind = kind.name(),
                ?os_error,
                "an OS error on a daemon error of a kind that keeps none"
            );
        }
        match kind {
            ErrorKind::Protocol => Error::Protocol(message),
            ErrorKind::TooLarge => Error::TooLarge(message),
            ErrorKind::VersionMismatch => Error::VersionMismatch {
                client: crate::proto::PROTOCOL_VERSION,
                message,
            },
            ErrorKind::NotRegistered => Error::NotRegistered(message),
            ErrorKind::InvalidRegistration => Error::InvalidRegistration(message),
            ErrorKind::Busy => Error::Busy(message),
            ErrorKind::PermissionDenied => Error::PermissionDenied(message),
            ErrorKind::StagingFull => Error::StagingFull(message),
            ErrorKind::Mismatch => Error::Mismatch(message),
            ErrorKind::NotFound => Error::NotFound(message),
            ErrorKind::Corrupt => Error::Corrupt(message),
            ErrorKind::Storage => Error::Storage { message, os_error },
            ErrorKind::ShuttingDown => Error::ShuttingDown(message),
            ErrorKind::Timeout => Error::Timeout {
                what: message,
                after: Duration::ZERO,
            },
            ErrorKind::Internal => Error::Internal { message, os_error },
        }
    }

    /// The daemon error kind this error corresponds to, if any (local
    /// protocol errors and timeouts report `Protocol` and `Timeout` too).
    pub fn daemon_kind(&self) -> Option<ErrorKind> {
        Some(match self {
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::TooLarge(_) => ErrorKind::TooLarge,
            Error::VersionMismatch { .. } => ErrorKind::VersionMismatch,
            Error::NotRegistered(_) => ErrorKind::NotRegistered,
            Error::InvalidRegistration(_) => ErrorKind::InvalidRegistration,
            Error::Busy(_) => ErrorKind::Busy,
            Error::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Error::StagingFull(_) => ErrorKind::StagingFull,
            Error::Mismatch(_) => ErrorKind::Mismatch,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Storage { .. } => ErrorKind::Storage,
            Error::ShuttingDown(_) => ErrorKind::ShuttingDown,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Internal { .. } => ErrorKind::Internal,
            Error::SnapshotFailed { kind, .. } => *kind,
            Error::DaemonUnavailable { .. }
            | Error::Disconnected(_)
            | Error::Skipped { .. }
            | Error::Lost { .. }
            | Error::BufferLength { .. }
            | Error::DuplicateName { .. }
            | Error::Spec(_)
            | Error::BackendUnavailable { .. }
            | Error::CaptureInProgress { .. }
            | Error::Io(_)
            | Error::Cuda(_) => return None,
        })
    }
    /// The operating system's error behind this one: the errno the daemon
    /// reported ([`Error::Storage`], [`Error::Internal`],
    /// [`Error::SnapshotFailed`]) or that a local call returned
    /// ([`Error::Io`], [`Error::DaemonUnavailable`]).
    pub fn os_error(&self) -> Option<OsError> {
        match self {
            Error::Storage { os_error, .. }
            | Error::Internal { os_error, .. }
            | Error::SnapshotFailed { os_error, .. } => *os_error,
            Error::Io(e) | Error::DaemonUnavailable { source: e, .. } => {
                e.raw_os_error().map(OsError::from_raw)
            }
            Error::VersionMismatch { .. }
            | Error::Protocol(_)
            | Error::TooLarge(_)
            | Error::Disconnected(_)
            | Error::NotRegistered(_)
            | Error::InvalidRegistration(_)
            | Error::Busy(_)
            | Error::PermissionDenied(_)
            | Error::StagingFull(_)
            | Error::Mismatch(_)
            | Error::NotFound(_)
            | Error::Corrupt(_)
            | Error::ShuttingDown(_)
            | Error::Timeout { .. }
            | Error::Skipped { .. }
            | Error::Lost { .. }
            | Error::BufferLength { .. }
            | Error::DuplicateName { .. }
            | Error::Spec(_)
            | Error::BackendUnavailable { .. }
            | Error::CaptureInProgress { .. }
            | Error::Cuda(_) => None,
        }
    }

    /// The same error again, for a caller that asks twice (a second wait
    /// on a failed capture): the same variant, fields and message; an I/O
    /// error keeps its kind, errno and text, not its inner error object.
    pub(crate) fn replay(&self) -> Error {
        fn io(e: &std::io::Error) -> std::io::Error {
            match e.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(e.kind(), e.to_string()),
            }
        }
        match self {
            Error::DaemonUnavailable { socket, source } => Error::DaemonUnavailable {
                socket: socket.clone(),
                source: io(source),
            },
            Error::VersionMismatch { client, message } => Error::VersionMismatch {
                client: *client,
                message: message.clone(),
            },
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::TooLarge(m) => Error::TooLarge(m.clone()),
            Error::Disconnected(m) => Error::Disconnected(m.clone()),
            Error::NotRegistered(m) => Error::NotRegistered(m.clone()),
            Error::InvalidRegistration(m) => Error::InvalidRegistration(m.clone()),
            Error::Busy(m) => Error::Busy(m.clone()),
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::StagingFull(m) => Error::StagingFull(m.clone()),
            Error::Mismatch(m) => Error::Mismatch(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::Corrupt(m) => Error::Corrupt(m.clone()),
            Error::Storage { message, os_error } => Error::Storage {
                message: message.clone(),
                os_error: *os_error,
            },
            Error::ShuttingDown(m) => Error::ShuttingDown(m.clone()),
            Error::Timeout { what, after } => Error::Timeout {
                what: what.clone(),
                after: *after,
            },
            Error::Internal { message, os_error } => Error::Internal {
                message: message.clone(),
                os_error: *os_error,
            },
            Error::Skipped { step, reason } => Error::Skipped {
                step: *step,
                reason: reason.clone(),
            },
            Error::SnapshotFailed {
                step,
                kind,
                message,
                os_error,
            } => Error::SnapshotFailed {
                step: *step,
                kind: *kind,
                message: message.clone(),
                os_error: *os_error,
            },
            Error::Lost { step } => Error::Lost { step: *step },
            Error::BufferLength {
                name,
                expected,
                actual,
            } => Error::BufferLength {
                name: name.clone(),
                expected: *expected,
                actual: *actual,
            },
            Error::DuplicateName { name } => Error::DuplicateName { name: name.clone() },
            Error::Spec(e) => Error::Spec(e.clone()),
            Error::BackendUnavailable { backend, reason } => Error::BackendUnavailable {
                backend,
                reason: reason.clone(),
            },
            Error::CaptureInProgress { step } => Error::CaptureInProgress { step: *step },
            Error::Io(e) => Error::Io(io(e)),
            Error::Cuda(e) => Error::Cuda(e.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_daemon_kind_maps_to_its_own_variant_and_back() {
        let kinds = ErrorKind::ALL;
        let mut variants = std::collections::HashSet::new();
        for kind in &kinds {
            let err = Error::from_daemon(*kind, format!("msg-{kind:?}"), None);
            assert_eq!(err.daemon_kind(), Some(*kind), "{err}");
            assert!(err.to_string().contains(&format!("msg-{kind:?}")), "{err}");
            variants.insert(std::mem::discriminant(&err));
        }
        assert_eq!(variants.len(), kinds.len(), "two kinds share a variant");
    }

    #[test]
    fn the_os_error_of_a_storage_or_internal_error_is_kept_and_a_replay_is_the_same_error() {
        let err = Error::from_daemon(
            ErrorKind::Storage,
            "write: No space left on device".into(),
            Some(OsError::ENOSPC),
        );
        assert_eq!(err.os_error(), Some(OsError::ENOSPC));
        let again = err.replay();
        assert_eq!(again.to_string(), err.to_string());
        assert_eq!(again.os_error(), Some(OsError::ENOSPC));
        assert!(matches!(again, Error::Storage { .. }));
        // The daemon's own failed system calls come as Internal, errno kept.
        let err = Error::from_daemon(
            ErrorKind::Internal,
            "memfd_create: Too many open files".into(),
            Some(OsError::EMFILE),
        );
        assert!(
            matches!(
                &err,
                Error::Internal {
                    os_error: Some(OsError::EMFILE),
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.os_error(), Some(OsError::EMFILE));
        assert_eq!(err.replay().os_error(), Some(OsError::EMFILE));
        assert_eq!(err.replay().to_string(), err.to_string());
        // The client's own internal errors have none.
        assert_eq!(Error::internal("a bug").os_error(), None);
        // Other kinds have no OS error field.
        let err = Error::from_daemon(ErrorKind::Corrupt, "crc".into(), Some(OsError::EIO));
        assert_eq!(err.os_error(), None);
        // A local I/O error keeps its errno through a replay.
        let io = Error::Io(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(io.replay().os_error(), Some(OsError::EMFILE));
        assert_eq!(io.replay().to_string(), io.to_string());
        let failed = Error::SnapshotFailed {
            step: 4,
            kind: ErrorKind::Storage,
            message: "fsync".into(),
            os_error: Some(OsError::EIO),
        };
        assert!(matches!(
            failed.replay(),
            Error::SnapshotFailed {
                step: 4,
                kind: ErrorKind::Storage,
                os_error: Some(OsError::EIO),
                ..
            }
        ));
    }
}

"""gpusnap: snapshot a training job's state into the node's gpusnapd daemon
while it keeps training, and restore it after a crash or a restart.

    snap = gpusnap.Client(job="llama-7b")
    snap.register_module(model)
    snap.register_optimizer(optimizer)
    step = snap.restore() or 0
    for step in range(step + 1, steps + 1):
        loss = train_step(...)
        if step % 100 == 0:
            with snap.snapshot_begin(step):   # the copies overlap the next step
                ...

Every error is a ``gpusnap.Error``; see the subclasses below.
"""

from gpusnap._client import (
    CaptureInfo,
    Client,
    CommitInfo,
    Snapshot,
    SnapshotHandle,
    Stats,
)
from gpusnap._native import (
    DEFAULT_SOCKET,
    PROTOCOL_VERSION,
    BackendUnavailable,
    BlobTooLarge,
    BufferLength,
    Busy,
    CaptureInProgress,
    Corrupt,
    DaemonUnavailable,
    Disconnected,
    DuplicateName,
    Error,
    InternalError,
    InvalidRegistration,
    InvalidSpec,
    IoError,
    Lost,
    MessageTooLarge,
    NotContiguous,
    NotFound,
    NotRegistered,
    PermissionDenied,
    ProtocolError,
    ShapeMismatch,
    ShuttingDown,
    SnapshotFailed,
    Skipped,
    StagingFull,
    StorageError,
    TensorReallocated,
    Timeout,
    UnsupportedTensor,
    VersionMismatch,
    __version__,
)

__all__ = [
    "Client",
    "SnapshotHandle",
    "CaptureInfo",
    "CommitInfo",
    "Snapshot",
    "Stats",
    "DEFAULT_SOCKET",
    "PROTOCOL_VERSION",
    "__version__",
    "Error",
    "BackendUnavailable",
    "BlobTooLarge",
    "BufferLength",
    "Busy",
    "CaptureInProgress",
    "Corrupt",
    "DaemonUnavailable",
    "Disconnected",
    "DuplicateName",
    "InternalError",
    "InvalidRegistration",
    "InvalidSpec",
    "IoError",
    "Lost",
    "MessageTooLarge",
    "NotContiguous",
    "NotFound",
    "NotRegistered",
    "PermissionDenied",
    "ProtocolError",
    "ShapeMismatch",
    "ShuttingDown",
    "SnapshotFailed",
    "Skipped",
    "StagingFull",
    "StorageError",
    "TensorReallocated",
    "Timeout",
    "UnsupportedTensor",
    "VersionMismatch",
]

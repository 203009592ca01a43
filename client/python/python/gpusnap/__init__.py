"""gpusnap: snapshot a training job's state into the node's gpusnapd daemon
while it keeps training, and restore it after a crash or a restart.

    snap = gpusnap.Client(job="llama-7b")
    snap.register_module(model)
    snap.register_optimizer(optimizer)
    start = snap.restore() or 0
    handle = None
    for step in range(start + 1, steps + 1):
        loss = forward_and_backward(...)
        if handle is not None:
            handle.wait_captured()            # before the optimizer changes the state
            handle = None
        optimizer.step()
        if step % 100 == 0:
            handle = snap.snapshot_begin(step)  # the copies overlap the next step's pass

Every error is a ``gpusnap.Error``; see the subclasses below.
"""

from gpusnap._client import (
    CaptureInfo,
    Client,
    CommitInfo,
    RestoreInfo,
    Snapshot,
    SnapshotHandle,
    Stats,
    WalkBack,
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
    CudaDriverTooOld,
    CudaError,
    DaemonUnavailable,
    Disconnected,
    DuplicateName,
    Error,
    GraphCapture,
    InternalError,
    InvalidDevicePointer,
    InvalidRegistration,
    InvalidSpec,
    InvalidStream,
    IoError,
    Lost,
    MessageTooLarge,
    NoCudaDevice,
    NoCudaDriver,
    NotContiguous,
    NotFound,
    NotRegistered,
    PermissionDenied,
    PinningRequired,
    ProtocolError,
    ShapeMismatch,
    ShuttingDown,
    Skipped,
    SnapshotFailed,
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
    "RestoreInfo",
    "WalkBack",
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
    "CudaDriverTooOld",
    "CudaError",
    "DaemonUnavailable",
    "Disconnected",
    "DuplicateName",
    "GraphCapture",
    "InternalError",
    "InvalidDevicePointer",
    "InvalidRegistration",
    "InvalidSpec",
    "InvalidStream",
    "IoError",
    "Lost",
    "MessageTooLarge",
    "NoCudaDevice",
    "NoCudaDriver",
    "NotContiguous",
    "NotFound",
    "NotRegistered",
    "PermissionDenied",
    "PinningRequired",
    "ProtocolError",
    "ShapeMismatch",
    "ShuttingDown",
    "Skipped",
    "SnapshotFailed",
    "StagingFull",
    "StorageError",
    "TensorReallocated",
    "Timeout",
    "UnsupportedTensor",
    "VersionMismatch",
]

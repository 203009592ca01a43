//! The Python exception tree: one class per variant of the client crate's
//! [`gpusnap::Error`], all under `gpusnap.Error`, plus the checks the Python
//! layer makes itself (non-contiguous or reallocated tensors).
//!
//! [`to_py`] is the only way a Rust error becomes a Python one. Exceptions
//! that concern one step carry it as their `step` attribute; those an
//! operating system error can be behind (`StorageError`, `InternalError`,
//! `SnapshotFailed`, `IoError`, `DaemonUnavailable`) carry `errno` (an int,
//! None when there is none) and `os_error` (its name, `"ENOSPC"`; None when
//! there is none or the errno has no name the protocol lists, `errno` still
//! carrying the number); `SnapshotFailed` carries the daemon's error `kind`
//! too (`"storage"`, `"internal"`...).

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::{PyErr, create_exception};

create_exception!(gpusnap, Error, PyException, "Root of every gpusnap error.");
create_exception!(
    gpusnap,
    DaemonUnavailable,
    Error,
    "No gpusnapd answers on the socket."
);
create_exception!(
    gpusnap,
    VersionMismatch,
    Error,
    "gpusnapd speaks another protocol version."
);
create_exception!(
    gpusnap,
    ProtocolError,
    Error,
    "A malformed, oversized or out-of-order message."
);
create_exception!(
    gpusnap,
    MessageTooLarge,
    ProtocolError,
    "A message over the daemon's size limit."
);
create_exception!(
    gpusnap,
    Disconnected,
    Error,
    "The connection to gpusnapd broke and could not be re-established."
);
create_exception!(
    gpusnap,
    NotRegistered,
    Error,
    "Nothing is registered (or not this tensor)."
);
create_exception!(
    gpusnap,
    InvalidRegistration,
    Error,
    "The daemon or the client refused a registration."
);
create_exception!(
    gpusnap,
    DuplicateName,
    InvalidRegistration,
    "A tensor of that name is already registered."
);
create_exception!(
    gpusnap,
    BufferLength,
    InvalidRegistration,
    "A buffer's length is not its dtype and shape's."
);
create_exception!(
    gpusnap,
    InvalidSpec,
    InvalidRegistration,
    "A tensor name, dtype or shape that cannot be stored."
);
create_exception!(
    gpusnap,
    NotContiguous,
    InvalidRegistration,
    "A tensor or array that is not contiguous in memory."
);
create_exception!(
    gpusnap,
    UnsupportedTensor,
    InvalidRegistration,
    "A tensor of a dtype, layout or kind gpusnap cannot store."
);
create_exception!(
    gpusnap,
    TensorReallocated,
    Error,
    "A registered tensor's storage moved since it was registered."
);
create_exception!(
    gpusnap,
    BlobTooLarge,
    Error,
    "A registered blob grew past its capacity."
);
create_exception!(
    gpusnap,
    Busy,
    Error,
    "Another connection holds this (job, rank)."
);
create_exception!(
    gpusnap,
    PermissionDenied,
    Error,
    "The job belongs to another user."
);
create_exception!(
    gpusnap,
    StagingFull,
    Error,
    "The registration does not fit the daemon's staging budget."
);
create_exception!(
    gpusnap,
    ShapeMismatch,
    Error,
    "A snapshot does not hold exactly the registered tensors, dtypes and shapes."
);
create_exception!(
    gpusnap,
    NotFound,
    Error,
    "The requested step or snapshot does not exist."
);
create_exception!(
    gpusnap,
    Corrupt,
    Error,
    "A checksum or structure check of a snapshot failed."
);
create_exception!(gpusnap, StorageError, Error, "The daemon's disk refused.");
create_exception!(gpusnap, ShuttingDown, Error, "gpusnapd is stopping.");
create_exception!(gpusnap, Timeout, Error, "A wait ran past its bound.");
create_exception!(
    gpusnap,
    InternalError,
    Error,
    "A bug or an unexpected condition (in the daemon or in gpusnap itself)."
);
create_exception!(
    gpusnap,
    Skipped,
    Error,
    "The daemon skipped this snapshot: staging was busy and its policy is `skip`."
);
create_exception!(
    gpusnap,
    SnapshotFailed,
    Error,
    "The snapshot was captured but the daemon could not commit it."
);
create_exception!(
    gpusnap,
    Lost,
    Error,
    "The connection broke before the step's commit was reported, and the daemon does not have it."
);
create_exception!(
    gpusnap,
    BackendUnavailable,
    Error,
    "The copy backend a tensor needs is not usable here (CUDA tensors before the CUDA backend)."
);
create_exception!(
    gpusnap,
    NoCudaDriver,
    BackendUnavailable,
    "No usable CUDA driver library (libcuda.so) is loaded, or it lacks a function gpusnap calls."
);
create_exception!(
    gpusnap,
    NoCudaDevice,
    BackendUnavailable,
    "The CUDA driver sees no device, or not the one asked for."
);
create_exception!(
    gpusnap,
    CudaDriverTooOld,
    BackendUnavailable,
    "The CUDA driver is older than the CUDA version gpusnap calls."
);
create_exception!(
    gpusnap,
    CudaError,
    Error,
    "A CUDA driver call failed (`call` and `cuda_error` name it) or the CUDA backend refused."
);
create_exception!(
    gpusnap,
    InvalidStream,
    CudaError,
    "A stream given to a snapshot or restore is not a live stream of the tensor's device."
);
create_exception!(
    gpusnap,
    GraphCapture,
    CudaError,
    "A snapshot or restore was asked for while the stream captures a CUDA graph."
);
create_exception!(
    gpusnap,
    PinningRequired,
    CudaError,
    "Staging could not be page-locked and the client requires pinned staging."
);
create_exception!(
    gpusnap,
    InvalidDevicePointer,
    InvalidRegistration,
    "A registered CUDA tensor's memory is not device memory gpusnap can copy."
);
create_exception!(
    gpusnap,
    CaptureInProgress,
    Error,
    "A capture is still open on this client."
);
create_exception!(
    gpusnap,
    IoError,
    Error,
    "A local I/O error (socket options, mapping staging memory)."
);

/// Every exception class, with its Python name, for the module to export.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    macro_rules! add {
        ($($name:ident),* $(,)?) => {
            $( m.add(stringify!($name), py.get_type::<$name>())?; )*
        };
    }
    add!(
        Error,
        DaemonUnavailable,
        VersionMismatch,
        ProtocolError,
        MessageTooLarge,
        Disconnected,
        NotRegistered,
        InvalidRegistration,
        DuplicateName,
        BufferLength,
        InvalidSpec,
        NotContiguous,
        UnsupportedTensor,
        TensorReallocated,
        BlobTooLarge,
        Busy,
        PermissionDenied,
        StagingFull,
        ShapeMismatch,
        NotFound,
        Corrupt,
        StorageError,
        ShuttingDown,
        Timeout,
        InternalError,
        Skipped,
        SnapshotFailed,
        Lost,
        BackendUnavailable,
        NoCudaDriver,
        NoCudaDevice,
        CudaDriverTooOld,
        CudaError,
        InvalidStream,
        GraphCapture,
        PinningRequired,
        InvalidDevicePointer,
        CaptureInProgress,
        IoError,
    );
    // Class-level defaults, so that one of these raised without an OS
    // error (by the Python layer, or a panic turned InternalError) still
    // answers `errno` and `os_error` with None.
    for class in [
        py.get_type::<DaemonUnavailable>(),
        py.get_type::<StorageError>(),
        py.get_type::<InternalError>(),
        py.get_type::<SnapshotFailed>(),
        py.get_type::<IoError>(),
    ] {
        class.setattr("errno", py.None())?;
        class.setattr("os_error", py.None())?;
    }
    // Set on the failed driver call's error; None on the backend's own
    // refusals.
    let cuda = py.get_type::<CudaError>();
    cuda.setattr("call", py.None())?;
    cuda.setattr("cuda_error", py.None())?;
    cuda.setattr("code", py.None())?;
    Ok(())
}

/// The Python exception for a client error.
pub fn to_py(err: gpusnap::Error) -> PyErr {
    use gpusnap::Error as E;
    let message = err.to_string();
    let step = match &err {
        E::Skipped { step, .. }
        | E::SnapshotFailed { step, .. }
        | E::Lost { step }
        | E::CaptureInProgress { step } => Some(*step),
        _ => None,
    };
    let kind = match &err {
        E::SnapshotFailed { kind, .. } => Some(kind.name()),
        _ => None,
    };
    let may_have_os_error = matches!(
        &err,
        E::Storage { .. }
            | E::Internal { .. }
            | E::SnapshotFailed { .. }
            | E::Io(_)
            | E::DaemonUnavailable { .. }
    );
    let os_error = err.os_error();
    let driver_call = match &err {
        E::Cuda(gpusnap::device::cuda::CudaError::Driver {
            call, name, code, ..
        }) => Some((*call, name.clone(), *code)),
        _ => None,
    };
    let py_err = match err {
        E::Cuda(cuda) => cuda_to_py(cuda, message),
        E::DaemonUnavailable { .. } => DaemonUnavailable::new_err(message),
        E::VersionMismatch { .. } => VersionMismatch::new_err(message),
        E::Protocol(_) => ProtocolError::new_err(message),
        E::TooLarge(_) => MessageTooLarge::new_err(message),
        E::Disconnected(_) => Disconnected::new_err(message),
        E::NotRegistered(_) => NotRegistered::new_err(message),
        E::InvalidRegistration(_) => InvalidRegistration::new_err(message),
        E::Busy(_) => Busy::new_err(message),
        E::PermissionDenied(_) => PermissionDenied::new_err(message),
        E::StagingFull(_) => StagingFull::new_err(message),
        E::Mismatch(_) => ShapeMismatch::new_err(message),
        E::NotFound(_) => NotFound::new_err(message),
        E::Corrupt(_) => Corrupt::new_err(message),
        E::Storage { .. } => StorageError::new_err(message),
        E::ShuttingDown(_) => ShuttingDown::new_err(message),
        E::Timeout { .. } => Timeout::new_err(message),
        E::Internal { .. } => InternalError::new_err(message),
        E::Skipped { .. } => Skipped::new_err(message),
        E::SnapshotFailed { .. } => SnapshotFailed::new_err(message),
        E::Lost { .. } => Lost::new_err(message),
        E::BufferLength { .. } => BufferLength::new_err(message),
        E::DuplicateName { .. } => DuplicateName::new_err(message),
        E::Spec(_) => InvalidSpec::new_err(message),
        E::BackendUnavailable { .. } => BackendUnavailable::new_err(message),
        E::CaptureInProgress { .. } => CaptureInProgress::new_err(message),
        E::Io(_) => IoError::new_err(message),
        // The enum is non-exhaustive: a variant added later is still an
        // Error, never a panic.
        _ => Error::new_err(message),
    };
    Python::attach(|py| {
        // Attributes the caller may read; failing to set one must not hide
        // the error itself.
        let value = py_err.value(py);
        if let Some(step) = step {
            let _ = value.setattr("step", step);
        }
        if let Some(kind) = kind {
            let _ = value.setattr("kind", kind);
        }
        if let Some((call, name, code)) = driver_call {
            let _ = value.setattr("call", call);
            let _ = value.setattr("cuda_error", name);
            let _ = value.setattr("code", code);
        }
        if may_have_os_error {
            let _ = value.setattr("errno", os_error.map(|e| e.raw()));
            let _ = value.setattr("os_error", os_error.and_then(|e| e.name()));
        }
    });
    py_err
}

/// The Python exception for a CUDA backend error.
fn cuda_to_py(err: gpusnap::device::cuda::CudaError, message: String) -> PyErr {
    use gpusnap::device::cuda::CudaError as C;
    match err {
        C::NoCudaDriver { .. } => NoCudaDriver::new_err(message),
        C::NoDevice { .. } => NoCudaDevice::new_err(message),
        C::CudaDriverTooOld { .. } => CudaDriverTooOld::new_err(message),
        C::InvalidPointer { .. } => InvalidDevicePointer::new_err(message),
        C::InvalidStream { .. } => InvalidStream::new_err(message),
        C::GraphCapture { .. } => GraphCapture::new_err(message),
        C::PinningRequired { .. } => PinningRequired::new_err(message),
        // Driver, Panicked, and a variant added later (non-exhaustive).
        _ => CudaError::new_err(message),
    }
}

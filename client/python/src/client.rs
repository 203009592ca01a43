//! `gpusnap._native.Client`: a [`gpusnap::Client`] behind a mutex, every
//! call made with the GIL released and with panics turned into
//! `gpusnap.InternalError`.
//!
//! The Python layer (`gpusnap/_client.py`) does everything that knows about
//! torch and numpy; this class only sees names, dtypes, shapes, addresses
//! and the objects that own the memory.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use gpusnap::device::cuda::CudaDevice;
use gpusnap::{
    Buffer, ClientConfig, Dtype, PinPolicy, Pinning, RawBuffer, SnapshotOutcome, Step, StreamOrder,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serde_json::{Value, json};

use crate::convert::to_python;
use crate::errors::{self, InternalError};

/// What the mutex guards. Field order matters: `client` drops first, and a
/// `gpusnap::Client` finishes an open capture when it drops, so no copy
/// reads the owners' memory after they go.
#[derive(Debug)]
struct Inner {
    /// `None` once closed.
    client: Option<gpusnap::Client>,
    /// The objects owning every registered buffer, kept alive for as long
    /// as the client may copy into or out of their memory.
    owners: Vec<Py<PyAny>>,
}

/// A connection to gpusnapd and the buffers registered on it (private: use
/// `gpusnap.Client`).
#[pyclass(name = "Client", module = "gpusnap._native", frozen)]
#[derive(Debug)]
pub struct NativeClient {
    inner: Mutex<Inner>,
    job: String,
    rank: u32,
    world_size: u32,
    socket: PathBuf,
}

fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a finite number of seconds >= 0, not {value}"
        ))
    })
}

/// Why a call panicked, for the InternalError it becomes.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `f` with no Python attached and turns a panic into an error.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> PyResult<T> + Send) -> PyResult<T> {
    py.detach(|| {
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
            Err(InternalError::new_err(format!(
                "gpusnap panicked (please report this): {}",
                panic_message(&*payload)
            )))
        })
    })
}

/// Panics inside the same guard every call runs under, so that a test can
/// see the panic arrive as `gpusnap.InternalError` (private).
#[pyfunction]
pub fn _panic_inside_a_call(py: Python<'_>) -> PyResult<()> {
    detached(py, || -> PyResult<()> { panic!("a deliberate panic") })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn outcome_json(outcome: &SnapshotOutcome) -> Value {
    match outcome {
        SnapshotOutcome::Captured(info) => json!({
            "step": info.step,
            "skipped": false,
            "bytes": info.bytes,
            "capture_s": secs(info.capture),
            "stall_s": secs(info.stall),
            "reason": null,
        }),
        SnapshotOutcome::Skipped { step, reason } => json!({
            "step": step,
            "skipped": true,
            "bytes": 0,
            "capture_s": 0.0,
            "stall_s": 0.0,
            "reason": reason,
        }),
    }
}

/// The trainer's streams from Python: `(device ordinal, CUstream handle)`
/// pairs; devices not named use their legacy default stream.
fn stream_order(streams: Option<Vec<(u32, u64)>>) -> StreamOrder {
    streams
        .unwrap_or_default()
        .into_iter()
        .fold(StreamOrder::legacy(), |order, (ordinal, stream)| {
            order.with(ordinal, stream)
        })
}

fn pinning_json(pinning: &Pinning) -> Value {
    match pinning {
        Pinning::NotNeeded => json!({"state": "not_needed"}),
        Pinning::Pinned { bytes, seconds } => {
            json!({"state": "pinned", "bytes": bytes, "seconds": seconds})
        }
        Pinning::Unpinned { reason } => json!({"state": "unpinned", "reason": reason}),
    }
}

fn dtype_of(dtype: &str) -> PyResult<Dtype> {
    dtype
        .parse()
        .map_err(|e: gpusnap::UnknownDtype| errors::InvalidSpec::new_err(e.to_string()))
}

impl NativeClient {
    fn lock(&self) -> PyResult<MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| {
            InternalError::new_err(
                "an earlier call on this gpusnap client panicked; create a new Client",
            )
        })
    }

    /// Runs `f` on the client, detached from Python.
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut gpusnap::Client) -> gpusnap::Result<T> + Send,
    ) -> PyResult<T> {
        detached(py, || {
            let result = {
                let mut inner = self.lock()?;
                let client = inner.client.as_mut().ok_or_else(|| {
                    errors::Disconnected::new_err("this gpusnap client is closed")
                })?;
                f(client)
            };
            // Converting may attach to Python: never with the lock held.
            result.map_err(errors::to_py)
        })
    }

    /// Runs the registration `f` on the client, detached from Python, and
    /// keeps `owner` alive if it succeeded.
    fn register_with(
        &self,
        py: Python<'_>,
        owner: Py<PyAny>,
        f: impl FnOnce(&mut gpusnap::Client) -> gpusnap::Result<()> + Send,
    ) -> PyResult<()> {
        detached(py, || {
            let mut inner = self.lock()?;
            let client = inner
                .client
                .as_mut()
                .ok_or_else(|| errors::Disconnected::new_err("this gpusnap client is closed"))?;
            let registered = f(client);
            if registered.is_ok() {
                inner.owners.push(owner);
            }
            drop(inner);
            registered.map_err(errors::to_py)
        })
    }
}

#[pymethods]
impl NativeClient {
    #[new]
    #[pyo3(signature = (job, *, socket=None, rank=0, world_size=1, connect_timeout=10.0, call_timeout=60.0, commit_timeout=600.0, reconnect=true, copy_threads=None, busy_timeout=None, require_pinned=false))]
    #[expect(clippy::too_many_arguments, reason = "Python keyword arguments")]
    fn new(
        py: Python<'_>,
        job: String,
        socket: Option<PathBuf>,
        rank: u32,
        world_size: u32,
        connect_timeout: f64,
        call_timeout: f64,
        commit_timeout: f64,
        reconnect: bool,
        copy_threads: Option<usize>,
        busy_timeout: Option<f64>,
        require_pinned: bool,
    ) -> PyResult<NativeClient> {
        let mut config = ClientConfig::new(job.clone());
        if let Some(socket) = socket {
            config.socket = socket;
        }
        config.rank = rank;
        config.world_size = world_size;
        config.connect_timeout = seconds("connect_timeout", connect_timeout)?;
        config.call_timeout = seconds("call_timeout", call_timeout)?;
        config.commit_timeout = seconds("commit_timeout", commit_timeout)?;
        // A registration refused as Busy is retried by the client crate's
        // one backoff, under one deadline (None: connect_timeout).
        config.busy_timeout = busy_timeout
            .map(|s| seconds("busy_timeout", s))
            .transpose()?;
        config.reconnect = reconnect;
        if require_pinned {
            config.pin_policy = PinPolicy::Require;
        }
        if let Some(threads) = copy_threads {
            if threads == 0 {
                return Err(PyValueError::new_err("copy_threads must be at least 1"));
            }
            config.copy_threads = threads;
        }
        let socket = config.socket.clone();
        let client = detached(py, || {
            gpusnap::Client::with_config(config).map_err(errors::to_py)
        })?;
        Ok(NativeClient {
            inner: Mutex::new(Inner {
                client: Some(client),
                owners: Vec::new(),
            }),
            job,
            rank,
            world_size,
            socket,
        })
    }

    #[getter]
    fn job(&self) -> &str {
        &self.job
    }

    #[getter]
    fn rank(&self) -> u32 {
        self.rank
    }

    #[getter]
    fn world_size(&self) -> u32 {
        self.world_size
    }

    #[getter]
    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// The uid the daemon authenticated this process as.
    #[getter]
    fn uid(&self, py: Python<'_>) -> PyResult<u32> {
        self.call(py, |c| Ok(c.uid()))
    }

    /// The step of the open capture, or None.
    #[getter]
    fn open_capture(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        self.call(py, |c| Ok(c.open_capture()))
    }

    /// Registers `nbytes` bytes of host memory at `address` as tensor
    /// `name`. `owner` is kept alive while this client lives; the caller
    /// guarantees it owns exactly that memory (the public `gpusnap.Client`
    /// derives both from the tensor or array itself).
    #[pyo3(signature = (name, dtype, shape, address, nbytes, owner))]
    #[expect(clippy::too_many_arguments, reason = "Python arguments")]
    fn register(
        &self,
        py: Python<'_>,
        name: String,
        dtype: &str,
        shape: Vec<u64>,
        address: usize,
        nbytes: usize,
        owner: Py<PyAny>,
    ) -> PyResult<()> {
        let dtype = dtype_of(dtype)?;
        if address == 0 && nbytes != 0 {
            return Err(errors::InvalidSpec::new_err(format!(
                "tensor {name:?}: a null address for {nbytes} bytes"
            )));
        }
        self.register_with(py, owner, move |client| {
            // SAFETY: the Python layer derives `address`/`nbytes` from the
            // tensor or array `owner` (its data pointer and byte size,
            // after checking it is contiguous and in host memory), and
            // `owner` is kept alive in `owners` for as long as the client
            // exists, so the memory stays allocated while registered. Not
            // writing it during a capture, nor touching it during a
            // restore, is the documented contract of
            // `snapshot_begin`/`restore`.
            let buffer = unsafe { RawBuffer::new(address as *mut u8, nbytes) };
            client.register(name, dtype, shape, buffer)
        })
    }

    /// Registers `nbytes` bytes of CUDA device memory at `address` as
    /// tensor `name`, checked with the driver (device memory, inside one
    /// allocation, of a device of this process); returns the device's
    /// ordinal. `owner` is kept alive while this client lives.
    #[pyo3(signature = (name, dtype, shape, address, nbytes, owner))]
    #[expect(clippy::too_many_arguments, reason = "Python arguments")]
    fn register_cuda(
        &self,
        py: Python<'_>,
        name: String,
        dtype: &str,
        shape: Vec<u64>,
        address: u64,
        nbytes: usize,
        owner: Py<PyAny>,
    ) -> PyResult<u32> {
        let dtype = dtype_of(dtype)?;
        let mut ordinal = 0;
        let found = &mut ordinal;
        self.register_with(py, owner, move |client| {
            let device = CudaDevice::of_pointer(address).map_err(|e| e.for_tensor(&name))?;
            // SAFETY: as for `register`: `address`/`nbytes` come from the
            // tensor `owner` (its data pointer and byte size, contiguous),
            // and `owner` stays alive in `owners` for as long as the
            // client, which owns every reference to the buffer (its
            // finishing thread's included: it ends when the client drops).
            let buffer = unsafe { device.buffer(&name, address, nbytes, None) }?;
            *found = device.ordinal();
            client.register(name, dtype, shape, Buffer::Device(buffer))
        })?;
        Ok(ordinal)
    }

    /// (name, dtype, shape) of every registered tensor, in order.
    fn tensors(&self, py: Python<'_>) -> PyResult<Vec<(String, String, Vec<u64>)>> {
        self.call(py, |c| {
            Ok(c.tensors()
                .map(|t| (t.name.clone(), t.dtype.to_string(), t.shape.clone()))
                .collect())
        })
    }

    /// Sends the registration now; returns the staging layout as a dict.
    fn sync_registration(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let info = self.call(py, |c| {
            let info = c.sync_registration()?;
            serde_json::to_value(info).map_err(|e| gpusnap::Error::Internal {
                message: e.to_string(),
                os_error: None,
            })
        })?;
        to_python(py, &info)
    }

    /// Starts the capture of `step` (the copies run in the background),
    /// the copies of CUDA buffers ordered after the work queued so far on
    /// `streams` (`(device ordinal, CUstream)` pairs; the legacy default
    /// stream of a device not named).
    #[pyo3(signature = (step, streams=None))]
    fn begin(&self, py: Python<'_>, step: u64, streams: Option<Vec<(u32, u64)>>) -> PyResult<()> {
        let order = stream_order(streams);
        self.call(py, move |c| c.begin_snapshot_on(step, order))
    }

    /// Finishes the open capture without blocking on the device: the
    /// trainer's streams wait for the copies, the host for the copies of
    /// host memory only, and a client thread tells the daemon. Its outcome
    /// comes from `background_outcome(step)`.
    fn finish_in_background(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |c| c.finish_snapshot_in_background())
    }

    /// The outcome of the capture of `step` handed off by
    /// `finish_in_background` (waiting for it if it still runs), as
    /// `finish` returns it, or its error raised; None when none is kept.
    fn background_outcome(&self, py: Python<'_>, step: u64) -> PyResult<Option<Py<PyAny>>> {
        let outcome = self.call(py, move |c| c.background_outcome(step).transpose())?;
        outcome
            .map(|o| to_python(py, &outcome_json(&o)))
            .transpose()
    }

    /// What attaching each device did to the staging of the current
    /// registration: [{"state": "pinned", "bytes", "seconds"} |
    /// {"state": "unpinned", "reason"} | {"state": "not_needed"}].
    fn staging_pinning(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let value = self.call(py, |c| {
            Ok(Value::Array(
                c.staging_pinning().iter().map(pinning_json).collect(),
            ))
        })?;
        to_python(py, &value)
    }

    /// Whether the open capture's copies have finished, without blocking;
    /// None when no capture is open.
    fn copies_done(&self, py: Python<'_>) -> PyResult<Option<bool>> {
        self.call(py, |c| Ok(c.copies_done()))
    }

    /// Finishes the open capture; returns what it came to as a dict.
    fn finish(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let outcome = self.call(py, |c| c.finish_snapshot())?;
        to_python(py, &outcome_json(&outcome))
    }

    /// Waits until `step` is committed.
    fn wait_committed(&self, py: Python<'_>, step: u64) -> PyResult<Py<PyAny>> {
        let info = self.call(py, |c| c.wait_committed(step))?;
        let value = json!({
            "step": info.step,
            "bytes": info.bytes,
            "persist_s": secs(info.persist),
        });
        to_python(py, &value)
    }

    /// Restores `step` (the newest when None) into every registered buffer;
    /// None when there is no snapshot. Otherwise {"step", "source"
    /// ("memory", "disk" or "remote": downloaded from the object store),
    /// "bytes", "daemon_fill_s", "copy_s", "walked_back": [{"step",
    /// "source", "reason"}, ...]}: the newer steps the daemon passed over
    /// because they failed verification, newest first (empty when none).
    /// The copies into CUDA buffers are ordered after the work queued so
    /// far on `streams` (as for `begin`), the work queued there later
    /// after the copies; the host waits for them too.
    #[pyo3(signature = (step=None, streams=None))]
    fn restore(
        &self,
        py: Python<'_>,
        step: Option<u64>,
        streams: Option<Vec<(u32, u64)>>,
    ) -> PyResult<Py<PyAny>> {
        let which = step.map_or(Step::Latest, Step::At);
        let order = stream_order(streams);
        let restored = self.call(py, move |c| c.restore_on(which, &order))?;
        let value = match restored {
            None => Value::Null,
            Some(info) => json!({
                "step": info.step,
                "source": info.source,
                "bytes": info.bytes,
                "daemon_fill_s": secs(info.daemon_fill),
                "copy_s": secs(info.copy),
                "walked_back": info.walked_back,
            }),
        };
        to_python(py, &value)
    }

    /// Committed snapshots of this job (or of every job this user may see
    /// when `all_jobs`): {"snapshots": [...], "complete": [...],
    /// "remote_complete": [...]}: per job, the steps every rank committed
    /// locally, and those complete in the object store (empty when the
    /// remote tier is off); "remote_error" too, saying why, when the daemon
    /// could not list the object store.
    #[pyo3(signature = (all_jobs=false))]
    fn list(&self, py: Python<'_>, all_jobs: bool) -> PyResult<Py<PyAny>> {
        let value = self.call(py, |c| {
            let listing = if all_jobs {
                c.list_job(None)?
            } else {
                c.list()?
            };
            let mut value = json!({
                "snapshots": listing.snapshots,
                "complete": listing.complete,
                "remote_complete": listing.remote_complete,
            });
            if let (Some(error), Some(map)) = (listing.remote_error, value.as_object_mut()) {
                map.insert("remote_error".into(), Value::String(error));
            }
            Ok(value)
        })?;
        to_python(py, &value)
    }

    /// What the committed snapshot of `step` of (`job`, `rank`) holds, read
    /// from its manifest (nothing is restored; `rank` and `job` default to
    /// this client's): {"job", "rank", "step", "world_size", "tensors":
    /// [{"name", "dtype", "shape"}, ...]}, tensors in data-file order. Needs
    /// no registration and works while a capture is open.
    #[pyo3(signature = (step, rank=None, job=None))]
    fn describe(
        &self,
        py: Python<'_>,
        step: u64,
        rank: Option<u32>,
        job: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let rank = rank.unwrap_or(self.rank);
        let value = self.call(py, |c| {
            let d = c.describe(job.as_deref(), rank, step)?;
            let tensors: Vec<Value> = d
                .tensors
                .iter()
                .map(|t| json!({"name": t.name, "dtype": t.dtype.name(), "shape": t.shape}))
                .collect();
            Ok(json!({
                "job": d.job,
                "rank": d.rank,
                "step": d.step,
                "world_size": d.world_size,
                "tensors": tensors,
            }))
        })?;
        to_python(py, &value)
    }

    /// The daemon's status, as `gpusnapctl status --json` shows it.
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let value = self.call(py, |c| {
            let status = c.status()?;
            serde_json::to_value(status).map_err(|e| gpusnap::Error::Internal {
                message: e.to_string(),
                os_error: None,
            })
        })?;
        to_python(py, &value)
    }

    /// Finishes an open capture, closes the connection and lets go of the
    /// registered buffers. Further calls raise `Disconnected`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let owners = detached(py, || {
            let mut inner = self.lock()?;
            // Dropping the client finishes an open capture first.
            drop(inner.client.take());
            Ok(std::mem::take(&mut inner.owners))
        })?;
        drop(owners);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "gpusnap._native.Client(job={:?}, rank={}, world_size={}, socket={:?})",
            self.job,
            self.rank,
            self.world_size,
            self.socket.display().to_string()
        )
    }
}

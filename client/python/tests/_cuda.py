"""CUDA device memory for the tests, through the driver API with ctypes: no
torch, no CuPy. On a CPU-only machine the driver is the project's driver
double (tests/cuda-double, on LD_LIBRARY_PATH as tests/run puts it), whose
device memory the host cannot read (a host dereference crashes), whose
streams run asynchronously with a delay per operation, and which can be
told to fail a named call; on a GPU machine it is the real driver, and the
same tests run there.

``DeviceArray`` exposes ``__cuda_array_interface__`` (version 3), as CuPy
and Numba arrays do, which is how gpusnap sees it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

import pytest

CU_STREAM_NON_BLOCKING = 1
CUDA_SUCCESS = 0


class DriverError(RuntimeError):
    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} returned CUresult {code}")
        self.call = call
        self.code = code


@dataclass
class Driver:
    """The loaded driver with device 0's primary context current on the
    calling thread (the one PyTorch would use)."""

    lib: Any
    context: ctypes.c_void_p
    is_double: bool

    def check(self, call: str, *args: Any) -> None:
        code = getattr(self.lib, call)(*args)
        if code != CUDA_SUCCESS:
            raise DriverError(call, code)

    def make_current(self) -> None:
        self.check("cuCtxSetCurrent", self.context)

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self.check("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1)))
        return ptr.value

    def free(self, ptr: int) -> None:
        self.check("cuMemFree_v2", ctypes.c_uint64(ptr))

    def write(self, ptr: int, data: bytes) -> None:
        """Host to device, synchronous (ordered on the legacy default
        stream, after the work queued there)."""
        buf = ctypes.create_string_buffer(data, len(data))
        self.check("cuMemcpyHtoD_v2", ctypes.c_uint64(ptr), buf, ctypes.c_size_t(len(data)))

    def read(self, ptr: int, nbytes: int) -> bytes:
        """Device to host, synchronous."""
        buf = ctypes.create_string_buffer(nbytes)
        self.check("cuMemcpyDtoH_v2", buf, ctypes.c_uint64(ptr), ctypes.c_size_t(nbytes))
        return buf.raw

    def fill_async(self, ptr: int, value: int, nbytes: int, stream: int = 0) -> None:
        """Queues a fill of ``nbytes`` at ``ptr`` with ``value`` on
        ``stream`` (the legacy default stream by default): the trainer's
        kernel, to the test."""
        self.check(
            "cuMemsetD8Async",
            ctypes.c_uint64(ptr),
            ctypes.c_ubyte(value),
            ctypes.c_size_t(nbytes),
            ctypes.c_void_p(stream),
        )

    def new_stream(self) -> int:
        stream = ctypes.c_void_p()
        self.check("cuStreamCreate", ctypes.byref(stream), ctypes.c_uint(CU_STREAM_NON_BLOCKING))
        return stream.value or 0

    def destroy_stream(self, stream: int) -> None:
        self.check("cuStreamDestroy_v2", ctypes.c_void_p(stream))

    def begin_graph_capture(self, stream: int) -> None:
        """Starts capturing a CUDA graph on ``stream`` (thread-local mode)."""
        self.check("cuStreamBeginCapture_v2", ctypes.c_void_p(stream), ctypes.c_int(1))

    def end_graph_capture(self, stream: int) -> None:
        """Ends the capture on ``stream`` and destroys the graph."""
        graph = ctypes.c_void_p()
        self.check("cuStreamEndCapture", ctypes.c_void_p(stream), ctypes.byref(graph))
        self.check("cuGraphDestroy", graph)

    def synchronize(self, stream: int = 0) -> None:
        self.check("cuStreamSynchronize", ctypes.c_void_p(stream))

    # ---- the double's controls (tests/cuda-double/src/control.rs) ----

    def set_op_delay_us(self, micros: int) -> None:
        self._double().gpusnapDoubleSetOpDelayUs(ctypes.c_uint64(micros))

    def inject_fault(self, function: str, nth: int, code: int) -> None:
        """The ``nth`` next call of ``function`` (counted from 1) returns
        ``code`` (synchronous faults only: an asynchronous one breaks the
        context for the rest of this process)."""
        got = self._double().gpusnapDoubleInjectFault(
            function.encode(), ctypes.c_uint64(nth), ctypes.c_uint32(code), ctypes.c_int(0)
        )
        if got != CUDA_SUCCESS:
            raise DriverError("gpusnapDoubleInjectFault", got)

    def clear_faults(self) -> None:
        self._double().gpusnapDoubleClearFaults()

    def violations(self) -> int:
        return int(self._double().gpusnapDoubleViolationCount())

    def _double(self) -> Any:
        if not self.is_double:
            pytest.skip("this test injects faults, which only the CUDA driver double can")
        return self.lib


_driver: Driver | None = None


def driver() -> Driver:
    """The driver (loaded once per process), or a skip saying why there is
    none; the skip fails the run under GPUSNAP_REQUIRE_CUDA=1."""
    global _driver
    if _driver is not None:
        _driver.make_current()
        return _driver
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        pytest.skip(
            f"needs a CUDA driver (libcuda.so.1: {e}; tests/run puts the driver double "
            f"on LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')!r})"
        )
    d = Driver(lib, ctypes.c_void_p(), hasattr(lib, "gpusnapDoubleIsDouble"))
    try:
        d.check("cuInit", ctypes.c_uint(0))
        device = ctypes.c_int()
        d.check("cuDeviceGet", ctypes.byref(device), ctypes.c_int(0))
        d.check("cuDevicePrimaryCtxRetain", ctypes.byref(d.context), device)
    except DriverError as e:
        pytest.skip(f"needs a CUDA driver with a device ({e})")
    if d.is_double:
        lib.gpusnapDoubleSetOpDelayUs.argtypes = [ctypes.c_uint64]
        lib.gpusnapDoubleViolationCount.restype = ctypes.c_uint64
    d.make_current()
    _driver = d
    return d


class DeviceArray:
    """A C-contiguous array in device memory, exposing
    ``__cuda_array_interface__`` v3; ``stream``: the stream its producer
    writes it on, which a consumer must order its work after (None: no
    synchronization needed beyond the legacy default stream)."""

    def __init__(
        self,
        cuda: Driver,
        shape: tuple[int, ...],
        typestr: str,
        data: bytes,
        stream: int | None = None,
    ) -> None:
        self.cuda = cuda
        self.stream = stream
        self.shape = shape
        self.typestr = typestr
        self.nbytes = len(data)
        self.ptr = cuda.alloc(self.nbytes)
        if data:
            cuda.write(self.ptr, data)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "typestr": self.typestr,
            "data": (self.ptr, False),
            "strides": None,
            "version": 3,
            "stream": self.stream,
        }

    def read(self) -> bytes:
        return self.cuda.read(self.ptr, self.nbytes)

    def write(self, data: bytes) -> None:
        assert len(data) == self.nbytes
        self.cuda.write(self.ptr, data)

    def __del__(self) -> None:
        try:
            self.cuda.make_current()
            self.cuda.free(self.ptr)
        except Exception:  # noqa: BLE001 - at interpreter exit the driver may be gone
            pass


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


_DLTENSOR = b"dltensor"  # a capsule keeps a pointer to its name: it must live
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class DlpackArray:
    """A 1-D array of uint32 in device memory exported through DLPack
    (``__dlpack__`` / ``__dlpack_device__``, device type kDLCUDA), as JAX
    exports its arrays. The capsules need no deleter: this object owns the
    memory, and a consumer keeps it alive with the capsule."""

    def __init__(self, cuda: Driver, data: bytes) -> None:
        assert len(data) % 4 == 0
        self.array = DeviceArray(cuda, (len(data) // 4,), "<u4", data)
        self._shape = (ctypes.c_int64 * 1)(len(data) // 4)
        self._tensors: list[_DLManagedTensor] = []

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def __dlpack__(self, stream: Any = None) -> Any:
        t = _DLManagedTensor(
            self.array.ptr, _DLDevice(2, 0), 1, _DLDataType(1, 32, 1), self._shape, None, 0, None, None
        )
        self._tensors.append(t)
        return _capsule_new(ctypes.addressof(t), _DLTENSOR, None)

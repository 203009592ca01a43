"""What a registered tensor or array is to gpusnap: a dtype name, a shape, an
address and a byte length, in host memory or in a CUDA device's memory,
plus the object that keeps that memory alive. Also the check, before every
snapshot and restore, that the memory has not moved since registration.

Host memory: CPU torch tensors and numpy arrays. Device memory: CUDA torch
tensors and any object with a ``__cuda_array_interface__`` (versions 2 and
3: CuPy arrays, Numba device arrays, ...), contiguous and writable. Any
other object exporting DLPack (``__dlpack__``/``__dlpack_device__``: JAX
arrays, ...) on the CPU or a CUDA device, contiguous.

torch and numpy are optional: each is imported only when an object of its
kind is seen.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any, Callable

from gpusnap._native import (
    InvalidStream,
    NotContiguous,
    TensorReallocated,
    UnsupportedTensor,
)

# numpy dtype.str (byte order stripped) -> safetensors dtype name.
_NUMPY_DTYPES = {
    "b1": "BOOL",
    "u1": "U8",
    "i1": "I8",
    "i2": "I16",
    "u2": "U16",
    "f2": "F16",
    "i4": "I32",
    "u4": "U32",
    "f4": "F32",
    "f8": "F64",
    "i8": "I64",
    "u8": "U64",
}

# torch dtype attribute name -> safetensors dtype name (dcp.py maps it back).
TORCH_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}


@dataclass(frozen=True)
class Memory:
    """One registrable piece of memory: host memory, or (``cuda``) memory
    of a CUDA device, whose ordinal the driver tells at registration."""

    dtype: str
    shape: tuple[int, ...]
    address: int
    nbytes: int
    owner: Any
    cuda: bool = False


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _is_numpy_array(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def describe(name: str, obj: Any) -> Memory:
    """The memory of a torch tensor, numpy array or CUDA array (an object
    with ``__cuda_array_interface__``) registered as `name`.

    Raises NotContiguous for strided views, UnsupportedTensor for anything
    else gpusnap cannot store byte for byte (a device tensor that is not
    CUDA memory among them).
    """
    if _is_torch_tensor(obj):
        return _torch_memory(name, obj)
    if _is_numpy_array(obj):
        return _numpy_memory(name, obj)
    interface = getattr(obj, "__cuda_array_interface__", None)
    if interface is not None:
        return _cuda_array_memory(name, obj, interface)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return _dlpack_memory(name, obj)
    raise UnsupportedTensor(
        f"tensor {name!r}: a {type(obj).__module__}.{type(obj).__qualname__} is "
        "neither a torch.Tensor, a numpy.ndarray, an object with "
        "__cuda_array_interface__ nor one exporting DLPack"
    )


def _torch_memory(name: str, t: Any) -> Memory:
    import torch

    if t.device.type == "meta":
        raise UnsupportedTensor(f"tensor {name!r} is a meta tensor: it has no data")
    if t.device.type not in ("cpu", "cuda"):
        raise UnsupportedTensor(
            f"tensor {name!r} is on {t.device}: gpusnap copies CPU and CUDA tensors only"
        )
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise UnsupportedTensor(f"tensor {name!r}: layout {t.layout} cannot be stored")
    dtype = TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
    if dtype is None:
        raise UnsupportedTensor(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
    if not t.is_contiguous():
        raise NotContiguous(
            f"tensor {name!r} (shape {tuple(t.shape)}, strides {t.stride()}) is not "
            "contiguous: register a contiguous tensor (the one the model keeps), "
            "not a view of it"
        )
    nbytes = t.numel() * t.element_size()
    # The storage object keeps the memory alive even if the tensor is later
    # pointed at other storage (param.data = ...), which the pointer check
    # then reports.
    return Memory(
        dtype,
        tuple(t.shape),
        t.data_ptr(),
        nbytes,
        t.untyped_storage(),
        cuda=t.device.type == "cuda",
    )


def _numpy_memory(name: str, a: Any) -> Memory:
    if not a.flags.c_contiguous:
        raise NotContiguous(
            f"array {name!r} (shape {a.shape}, strides {a.strides}) is not C-contiguous"
        )
    if not a.flags.writeable:
        raise UnsupportedTensor(f"array {name!r} is read-only: a restore could not fill it")
    dtype = _NUMPY_DTYPES.get(a.dtype.str[1:]) if a.dtype.isnative or a.dtype.itemsize == 1 else None
    if dtype is None:
        raise UnsupportedTensor(f"array {name!r}: dtype {a.dtype} cannot be stored")
    return Memory(dtype, tuple(int(d) for d in a.shape), int(a.ctypes.data), int(a.nbytes), a)


def _cuda_array_memory(name: str, obj: Any, interface: Any) -> Memory:
    """An object exporting ``__cuda_array_interface__`` (v2 or v3): its
    data must be C-contiguous, writable and unmasked."""
    where = f"tensor {name!r} (__cuda_array_interface__ of a {type(obj).__qualname__})"
    try:
        shape = tuple(int(d) for d in interface["shape"])
        typestr = str(interface["typestr"])
        address, readonly = interface["data"]
        address = int(address or 0)
    except (KeyError, TypeError, ValueError) as e:
        raise UnsupportedTensor(f"{where}: a malformed interface ({e!r})") from None
    if int(interface.get("version", 0)) < 2:
        raise UnsupportedTensor(f"{where}: interface version {interface.get('version')} < 2")
    if interface.get("mask") is not None:
        raise UnsupportedTensor(f"{where}: a masked array cannot be stored")
    if readonly:
        raise UnsupportedTensor(f"{where}: read-only memory: a restore could not fill it")
    if any(d < 0 for d in shape):
        raise UnsupportedTensor(f"{where}: a negative dimension in shape {shape}")
    order, code = typestr[:1], typestr[1:]
    dtype = _NUMPY_DTYPES.get(code)
    if dtype is None or (order == ">" and code[-1] != "1"):
        raise UnsupportedTensor(f"{where}: typestr {typestr!r} cannot be stored")
    itemsize = int(code[1:])
    elements = 1
    for d in shape:
        elements *= d
    strides = interface.get("strides")
    if strides is not None and elements > 1:
        expected, step = [], itemsize
        for d in reversed(shape):
            expected.append(step)
            step *= d
        if any(
            d > 1 and int(s) != e
            for d, s, e in zip(shape, strides, reversed(expected), strict=True)
        ):
            raise NotContiguous(f"{where}: strides {tuple(strides)} of shape {shape} are not C-contiguous")
    nbytes = elements * itemsize
    if address == 0 and nbytes != 0:
        raise UnsupportedTensor(f"{where}: a null data pointer for {nbytes} bytes")
    return Memory(dtype, shape, address, nbytes, obj, cuda=True)


# DLPack (dlpack.h, v0.8 and later): device types, (type code, bits) of
# the dtypes gpusnap stores, and the structures a "dltensor" capsule holds.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
_DL_HOST_DEVICES = (_DL_CPU, _DL_CUDA_HOST)
_DL_DTYPES = {
    (0, 8): "I8",
    (0, 16): "I16",
    (0, 32): "I32",
    (0, 64): "I64",
    (1, 8): "U8",
    (1, 16): "U16",
    (1, 32): "U32",
    (1, 64): "U64",
    (2, 16): "F16",
    (2, 32): "F32",
    (2, 64): "F64",
    (4, 16): "BF16",
    (6, 8): "BOOL",
}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    """The first member of a ``DLManagedTensor``."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@dataclass(frozen=True)
class _Exported:
    """What a DLPack capsule describes, and the capsule (which keeps the
    memory alive while it is held: never consumed, so dropping it runs
    the producer's deleter)."""

    capsule: Any
    device_type: int
    dtype: tuple[int, int, int]
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None
    address: int


def _export(where: str, obj: Any) -> _Exported:
    try:
        device_type = int(obj.__dlpack_device__()[0])
        # stream None: the producer makes the data ready for the legacy
        # default stream, which gpusnap's copies are ordered after unless
        # told another stream.
        capsule = obj.__dlpack__() if device_type in _DL_HOST_DEVICES else obj.__dlpack__(stream=None)
        pointer = _capsule_pointer(capsule, b"dltensor")
    except Exception as e:  # noqa: BLE001 - any producer's failure is the tensor's refusal
        raise UnsupportedTensor(f"{where}: exporting it through DLPack failed ({e!r})") from None
    if not pointer:
        raise UnsupportedTensor(f"{where}: an empty DLPack capsule")
    t = _DLTensor.from_address(pointer)
    ndim = int(t.ndim)
    if not 0 <= ndim <= 64:
        raise UnsupportedTensor(f"{where}: a DLPack tensor of {ndim} dimensions")
    shape = tuple(int(t.shape[i]) for i in range(ndim))
    strides = tuple(int(t.strides[i]) for i in range(ndim)) if t.strides else None
    return _Exported(
        capsule,
        int(t.device.device_type),
        (int(t.dtype.code), int(t.dtype.bits), int(t.dtype.lanes)),
        shape,
        strides,
        int(t.data or 0) + int(t.byte_offset),
    )


def _dlpack_memory(name: str, obj: Any) -> Memory:
    """An object exporting DLPack on the CPU or a CUDA device; its memory
    must be C-contiguous."""
    where = f"tensor {name!r} (DLPack of a {type(obj).__qualname__})"
    e = _export(where, obj)
    if e.device_type not in (*_DL_HOST_DEVICES, _DL_CUDA, _DL_CUDA_MANAGED):
        raise UnsupportedTensor(
            f"{where}: DLPack device type {e.device_type} is neither the CPU nor CUDA"
        )
    code, bits, lanes = e.dtype
    dtype = _DL_DTYPES.get((code, bits)) if lanes == 1 else None
    if dtype is None:
        raise UnsupportedTensor(f"{where}: DLPack dtype (code {code}, {bits} bits, {lanes} lanes) cannot be stored")
    if any(d < 0 for d in e.shape):
        raise UnsupportedTensor(f"{where}: a negative dimension in shape {e.shape}")
    elements = 1
    for d in e.shape:
        elements *= d
    if e.strides is not None and elements > 1:
        step, expected = 1, []
        for d in reversed(e.shape):
            expected.append(step)
            step *= d
        if any(
            d > 1 and s != x for d, s, x in zip(e.shape, e.strides, reversed(expected), strict=True)
        ):
            raise NotContiguous(f"{where}: strides {e.strides} (elements) of shape {e.shape} are not C-contiguous")
    nbytes = elements * bits // 8
    if e.address == 0 and nbytes != 0:
        raise UnsupportedTensor(f"{where}: a null data pointer for {nbytes} bytes")
    return Memory(
        dtype, e.shape, e.address, nbytes, (obj, e.capsule), cuda=e.device_type not in _DL_HOST_DEVICES
    )


def current_layout(obj: Any) -> tuple[int, tuple[int, ...]]:
    """Where the object's data is now, and its shape."""
    if _is_torch_tensor(obj):
        return int(obj.data_ptr()), tuple(int(d) for d in obj.shape)
    if _is_numpy_array(obj):
        return int(obj.ctypes.data), tuple(int(d) for d in obj.shape)
    interface = getattr(obj, "__cuda_array_interface__", None)
    if interface is not None:
        return int(interface["data"][0] or 0), tuple(int(d) for d in interface["shape"])
    exported = _export(f"a {type(obj).__qualname__}", obj)
    return exported.address, exported.shape


def stream_hint(obj: Any) -> int | None:
    """The stream a ``__cuda_array_interface__`` (v3) producer says its
    data is being written on (1: the legacy default stream, 2: the
    per-thread default stream, else a CUstream), which gpusnap's copies
    must be ordered after; None when it names none (or the object is not
    such an array)."""
    if _is_torch_tensor(obj) or _is_numpy_array(obj):
        return None
    interface = getattr(obj, "__cuda_array_interface__", None)
    if interface is None or int(interface.get("version", 0)) < 3:
        return None
    stream = interface.get("stream")
    if stream is None:
        return None
    if isinstance(stream, bool) or not isinstance(stream, int) or stream <= 0:
        raise InvalidStream(
            f"__cuda_array_interface__ of a {type(obj).__qualname__}: stream {stream!r} is not "
            "a stream (0 is disallowed by the interface; 1 is the legacy default stream)"
        )
    return stream


@dataclass
class Entry:
    """A registered tensor: how to find the live object again, where its
    memory was when it was registered, and what was registered for it:
    the live memory itself, or (``shadow``) a private copy that a capture
    refreshes first and a restore copies back, for state that the trainer
    writes while a capture runs (a module's buffers, updated in the forward
    pass)."""

    name: str
    memory: Memory
    resolve: Callable[[], Any]
    address: int
    shape: tuple[int, ...]
    shadow: Any = None

    def check(self) -> Any:
        """The live object; raises TensorReallocated when its data moved."""
        try:
            live = self.resolve()
        except (AttributeError, KeyError, IndexError) as e:
            raise TensorReallocated(
                f"tensor {self.name!r} is gone from the object it was registered from ({e})"
            ) from None
        if live is None:
            raise TensorReallocated(f"tensor {self.name!r} is now None")
        address, shape = current_layout(live)
        if address != self.address or shape != self.shape:
            raise TensorReallocated(
                f"tensor {self.name!r} was reallocated since it was registered "
                f"(data at {address:#x}, shape {shape}; registered at "
                f"{self.address:#x}, shape {self.shape}): gpusnap refuses "
                "to capture the stale copy; register it again on a new Client"
            )
        return live

    def refresh(self, live: Any) -> None:
        """Before a capture: the shadow takes the live value."""
        if self.shadow is not None:
            self.shadow.copy_(live.detach())

    def put_back(self, live: Any) -> None:
        """After a restore: the live tensor takes the shadow's value."""
        if self.shadow is not None:
            import torch

            with torch.no_grad():
                live.copy_(self.shadow)

"""What a registered tensor or array is to gpusnap: a dtype name, a shape, an
address and a byte length, in host memory or in a CUDA device's memory,
plus the object that keeps that memory alive. Also the check, before every
snapshot and restore, that the memory has not moved since registration.

Host memory: CPU torch tensors and numpy arrays. Device memory: CUDA torch
tensors and any object with a ``__cuda_array_interface__`` (versions 2 and
3: CuPy arrays, Numba device arrays, ...), contiguous and writable.

torch and numpy are optional: each is imported only when an object of its
kind is seen.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from gpusnap._native import (
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
    raise UnsupportedTensor(
        f"tensor {name!r}: a {type(obj).__module__}.{type(obj).__qualname__} is "
        "neither a torch.Tensor, a numpy.ndarray nor an object with "
        "__cuda_array_interface__"
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


def current_address(obj: Any) -> int:
    """Where the object's data is now."""
    if _is_torch_tensor(obj):
        return int(obj.data_ptr())
    if _is_numpy_array(obj):
        return int(obj.ctypes.data)
    return int(obj.__cuda_array_interface__["data"][0] or 0)


def current_shape(obj: Any) -> tuple[int, ...]:
    """The object's shape now."""
    if _is_torch_tensor(obj) or _is_numpy_array(obj):
        return tuple(int(d) for d in obj.shape)
    return tuple(int(d) for d in obj.__cuda_array_interface__["shape"])


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
        address = current_address(live)
        shape = current_shape(live)
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

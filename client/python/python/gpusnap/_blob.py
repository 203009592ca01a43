"""Small non-tensor state (a data loader's position, counters, RNG state)
as a fixed-capacity byte buffer in a snapshot.

A blob is registered as a U8 tensor of `HEADER + capacity` bytes: the
magic `GSB1`, an encoding byte, three zero bytes, the payload length as a
little-endian u64, then the payload. Encodings are JSON, msgpack or raw
bytes, never pickle: restoring a snapshot must not run code.
"""

from __future__ import annotations

import ctypes
import json
import struct
from typing import Any

from gpusnap._native import BlobTooLarge, Corrupt, InvalidRegistration

MAGIC = b"GSB1"
HEADER = struct.Struct("<4sB3xQ")
ENCODINGS = {"raw": 0, "json": 1, "msgpack": 2}
_NAMES = {v: k for k, v in ENCODINGS.items()}
# A fixed default, not one derived from the first value: a restarted trainer
# must register the same size as the run that saved, whatever its state
# holds at registration.
DEFAULT_CAPACITY = 1024 * 1024


def _msgpack() -> Any:
    try:
        import msgpack  # type: ignore[import-untyped]
    except ImportError:
        raise InvalidRegistration(
            "encoding 'msgpack' needs the msgpack package (pip install msgpack)"
        ) from None
    return msgpack


def encode(value: Any, encoding: str) -> bytes:
    if encoding == "raw":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise InvalidRegistration(
                f"encoding 'raw' takes bytes, not {type(value).__name__}"
            )
        return bytes(value)
    if encoding == "json":
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()
        except (TypeError, ValueError) as e:
            raise InvalidRegistration(f"blob is not JSON-serializable: {e}") from None
    if encoding == "msgpack":
        try:
            packed: bytes = _msgpack().packb(value, use_bin_type=True)
            return packed
        except (TypeError, ValueError) as e:
            raise InvalidRegistration(f"blob is not msgpack-serializable: {e}") from None
    raise InvalidRegistration(f"unknown blob encoding {encoding!r} (json, msgpack or raw)")


def decode(payload: bytes, encoding: str) -> Any:
    if encoding == "raw":
        return payload
    if encoding == "json":
        return json.loads(payload)
    return _msgpack().unpackb(payload, raw=False, strict_map_key=False)


class BlobBuffer:
    """The registered bytes of one blob."""

    def __init__(self, name: str, encoding: str, capacity: int) -> None:
        if encoding not in ENCODINGS:
            raise InvalidRegistration(
                f"blob {name!r}: unknown encoding {encoding!r} (json, msgpack or raw)"
            )
        if capacity <= 0:
            raise InvalidRegistration(f"blob {name!r}: capacity must be positive")
        self.name = name
        self.encoding = encoding
        self.capacity = capacity
        self.storage = (ctypes.c_ubyte * (HEADER.size + capacity))()

    @property
    def address(self) -> int:
        return ctypes.addressof(self.storage)

    @property
    def nbytes(self) -> int:
        return HEADER.size + self.capacity

    def store(self, value: Any) -> None:
        """Encodes `value` into the buffer (before a capture)."""
        payload = encode(value, self.encoding)
        if len(payload) > self.capacity:
            raise BlobTooLarge(
                f"blob {self.name!r} encodes to {len(payload)} bytes, over its capacity "
                f"of {self.capacity}: register it with a larger capacity="
            )
        view = memoryview(self.storage).cast("B")
        HEADER.pack_into(view, 0, MAGIC, ENCODINGS[self.encoding], len(payload))
        view[HEADER.size : HEADER.size + len(payload)] = payload
        # Zero the rest, so a snapshot holds nothing of an older value.
        view[HEADER.size + len(payload) :] = bytes(self.capacity - len(payload))

    def load(self) -> Any:
        """Decodes what a restore put into the buffer."""
        view = memoryview(self.storage).cast("B")
        magic, code, length = HEADER.unpack_from(view, 0)
        if magic != MAGIC or code not in _NAMES or length > self.capacity:
            raise Corrupt(
                f"blob {self.name!r}: the restored bytes are not a gpusnap blob "
                f"(magic {magic!r}, encoding {code}, length {length} of {self.capacity})"
            )
        if _NAMES[code] != self.encoding:
            raise Corrupt(
                f"blob {self.name!r} was saved as {_NAMES[code]}, registered as {self.encoding}"
            )
        payload = bytes(view[HEADER.size : HEADER.size + length])
        try:
            return decode(payload, self.encoding)
        except ValueError as e:
            raise Corrupt(f"blob {self.name!r} does not decode as {self.encoding}: {e}") from None

"""A scripted stand-in for gpusnapd, for the error paths a real daemon only
reaches on a failing disk: it speaks the wire protocol (a 4-byte
little-endian length, then JSON) on a Unix socket, passes a staging memfd
sealed as the daemon seals it, and answers each request with what its
script says.

Only what the tests need: one connection at a time, one slot, no ring.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket as socketlib
import struct
import threading
from pathlib import Path
from typing import Any, Callable

from gpusnap import _native

#: Bytes per element of the dtypes the tests register.
DTYPE_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8}

#: A reply to a request, or None to send nothing; events go with `events`.
Answer = Callable[[dict[str, Any]], dict[str, Any] | None]


class FakeDaemon:
    """Serves connections on ``socket`` until closed. ``answers`` maps a
    request type to a function of the request body returning the reply
    body (``hello``, ``register``, ``begin``, ``release``, ``attached``
    have defaults);
    ``events`` maps a request type to event bodies sent after its reply."""

    def __init__(
        self,
        directory: Path,
        answers: dict[str, Answer] | None = None,
        events: dict[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        self.socket = directory / "fake-gpusnapd.sock"
        self.answers: dict[str, Answer] = {
            "hello": lambda _: {
                "type": "welcome",
                "protocol_version": _native.PROTOCOL_VERSION,
                "daemon_version": "fake",
                "uid": os.getuid(),
            },
            "begin": lambda body: {"type": "slot", "step": body["step"], "slot": 0},
            "captured": lambda body: {"type": "accepted", "step": body["step"]},
            "release": lambda _: {"type": "released"},
            # Protocol version 3: the client reports its staging pinning
            # once per registration.
            "attached": lambda _: {"type": "attach_noted"},
        }
        self.answers.update(answers or {})
        self.events = events or {}
        self.requests: list[str] = []
        self.failure: BaseException | None = None
        self._listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        self._listener.bind(str(self.socket))
        self._listener.listen(4)
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()
        if self.failure is not None:
            raise AssertionError("the fake daemon failed") from self.failure

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._listener.accept()
                except socketlib.timeout:
                    continue
                with conn:
                    self._converse(conn)
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.failure = e

    def _converse(self, conn: socketlib.socket) -> None:
        conn.settimeout(0.2)
        buffered = b""
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except socketlib.timeout:
                continue
            if not data:
                return
            buffered += data
            while len(buffered) >= 4:
                (length,) = struct.unpack("<I", buffered[:4])
                if len(buffered) < 4 + length:
                    break
                request = json.loads(buffered[4 : 4 + length])
                buffered = buffered[4 + length :]
                self._answer(conn, request)

    def _answer(self, conn: socketlib.socket, request: dict[str, Any]) -> None:
        body = request["body"]
        kind = body["type"]
        self.requests.append(kind)
        if kind == "register" and "register" not in self.answers:
            info, memfd = staging_for(body["tensors"])
            try:
                frame = encode({"id": request["id"], "body": {"type": "registered", **info}})
                socketlib.send_fds(conn, [frame], [memfd])
            finally:
                os.close(memfd)
        else:
            reply = self.answers[kind](body)
            if reply is not None:
                conn.sendall(encode({"id": request["id"], "body": reply}))
        for event in self.events.get(kind, []):
            conn.sendall(encode({"id": 0, "body": event}))


def encode(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack("<I", len(payload)) + payload


def staging_for(tensors: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """One slot holding ``tensors`` back to back, and its memfd, sealed
    against shrinking and growing as the daemon seals it."""
    offsets = []
    end = 0
    for t in tensors:
        offsets.append(end)
        count = 1
        for d in t["shape"]:
            count *= d
        end += count * DTYPE_BYTES[t["dtype"]]
    slot_bytes = max(1, -(-end // 4096)) * 4096
    info = {
        "memory": {"kind": "host_memfd"},
        "memfd_bytes": slot_bytes,
        "slots": 1,
        "slot_bytes": slot_bytes,
        "data_bytes": end,
        "offsets": offsets,
        "ring_offset": slot_bytes,
        "ring_chunks": 0,
        "chunk_bytes": 4096,
        "policy": "block",
    }
    memfd = os.memfd_create("fake-staging", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, slot_bytes)
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return info, memfd

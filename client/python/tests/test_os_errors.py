"""The operating system's error behind a daemon failure reaches Python as
typed attributes (``kind``, ``errno``, ``os_error``), from the wire, not
from message text; and a busy (job, rank) is retried by the native client
under one bound."""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import numpy as np
import pytest

import gpusnap
from _fixtures import FakeDaemon


def test_a_failed_commit_carries_its_kind_and_errno(tmp_path):
    failed = {
        "type": "failed",
        "step": 1,
        "kind": "storage",
        "message": "write state.safetensors: No space left on device (os error 28)",
        "os_error": "ENOSPC",
    }
    fake = FakeDaemon(tmp_path, events={"captured": [failed]})
    try:
        with gpusnap.Client("osjob", socket=fake.socket) as c:
            c.register("x", np.arange(8, dtype=np.float32))
            c.snapshot(1)
            with pytest.raises(gpusnap.SnapshotFailed) as info:
                c.wait_committed(1)
    finally:
        fake.close()
    e = info.value
    assert e.step == 1
    assert e.kind == "storage"
    assert e.errno == errno.ENOSPC
    assert e.os_error == "ENOSPC"


def test_a_failure_without_an_os_error_says_none(tmp_path):
    failed = {"type": "failed", "step": 2, "kind": "internal", "message": "the persist panicked"}
    fake = FakeDaemon(tmp_path, events={"captured": [failed]})
    try:
        with gpusnap.Client("osjob", socket=fake.socket) as c:
            c.register("x", np.arange(8, dtype=np.float32))
            c.snapshot(2)
            with pytest.raises(gpusnap.SnapshotFailed) as info:
                c.wait_committed(2)
    finally:
        fake.close()
    assert (info.value.kind, info.value.errno, info.value.os_error) == ("internal", None, None)


def test_a_storage_error_of_a_restore_carries_its_errno(tmp_path):
    def refuse(_: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "error",
            "kind": "storage",
            "message": "read state.safetensors: Input/output error (os error 5)",
            "os_error": "EIO",
        }

    fake = FakeDaemon(tmp_path, answers={"restore": refuse})
    try:
        with gpusnap.Client("osjob", socket=fake.socket) as c:
            c.register("x", np.zeros(8, dtype=np.float32))
            with pytest.raises(gpusnap.StorageError) as info:
                c.restore(3)
    finally:
        fake.close()
    assert info.value.errno == errno.EIO
    assert info.value.os_error == "EIO"
    assert "restore" in fake.requests


def test_an_internal_error_of_the_daemon_carries_its_errno(tmp_path):
    # The daemon reports a failed system call of its own (a staging memfd
    # it could not create, a thread it could not start) as internal, with
    # the errno behind it.
    def refuse(_: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "error",
            "kind": "internal",
            "message": "memfd_create: Too many open files (os error 24)",
            "os_error": "EMFILE",
        }

    fake = FakeDaemon(tmp_path, answers={"restore": refuse})
    try:
        with gpusnap.Client("osjob", socket=fake.socket) as c:
            c.register("x", np.zeros(8, dtype=np.float32))
            with pytest.raises(gpusnap.InternalError) as info:
                c.restore(3)
    finally:
        fake.close()
    assert info.value.errno == errno.EMFILE
    assert info.value.os_error == "EMFILE"


def test_an_errno_the_protocol_does_not_name_is_a_number_without_a_name(tmp_path):
    # EHWPOISON (133) is not among the names the protocol lists: the wire
    # carries the number, `errno` has it, and `os_error` is None (never a
    # made-up name such as "errno 133").
    def refuse(_: dict[str, Any]) -> dict[str, Any]:
        return {"type": "error", "kind": "storage", "message": "read: poisoned", "os_error": 133}

    fake = FakeDaemon(tmp_path, answers={"restore": refuse})
    try:
        with gpusnap.Client("osjob", socket=fake.socket) as c:
            c.register("x", np.zeros(8, dtype=np.float32))
            with pytest.raises(gpusnap.StorageError) as info:
                c.restore(3)
    finally:
        fake.close()
    assert (info.value.errno, info.value.os_error) == (133, None)


def test_an_internal_error_without_an_os_error_says_none():
    from gpusnap import _native

    with pytest.raises(gpusnap.InternalError) as info:
        _native._panic_inside_a_call()
    assert (info.value.errno, info.value.os_error) == (None, None)


def test_no_daemon_carries_the_connect_errno(tmp_path):
    with pytest.raises(gpusnap.DaemonUnavailable) as info:
        gpusnap.Client("j", socket=tmp_path / "none.sock", connect_timeout=0.1)
    assert info.value.errno == errno.ENOENT
    assert info.value.os_error == "ENOENT"


def hold_rank(daemon: Any, job: str) -> Any:
    """A connection that registers (job, 0), as a live trainer would."""
    held = np.zeros(4, dtype=np.float32)
    c = gpusnap._native.Client(job, socket=str(daemon.socket))
    c.register("held", "F32", [4], held.ctypes.data, held.nbytes, held)
    c.sync_registration()
    return c


def test_the_native_client_retries_a_busy_rank_within_busy_timeout(daemon):
    holder = hold_rank(daemon, "busyjob")
    try:
        x = np.zeros(4, dtype=np.float32)
        c = gpusnap._native.Client(
            "busyjob", socket=str(daemon.socket), connect_timeout=5.0, busy_timeout=0.4
        )
        c.register("x", "F32", [4], x.ctypes.data, x.nbytes, x)
        started = time.monotonic()
        with pytest.raises(gpusnap.Busy, match=r"still busy after 0\.4 s"):
            c.sync_registration()
        took = time.monotonic() - started
        # The bound is busy_timeout, not connect_timeout (nor both).
        assert 0.35 <= took < 2.0, took
        # Retried until the holder lets go.
        release = threading.Timer(0.3, holder.close)
        release.start()
        c2 = gpusnap._native.Client("busyjob", socket=str(daemon.socket), busy_timeout=10.0)
        c2.register("x", "F32", [4], x.ctypes.data, x.nbytes, x)
        try:
            c2.sync_registration()
        finally:
            release.join()
            c2.close()
        c.close()
    finally:
        holder.close()


def test_busy_timeout_must_be_a_number_of_seconds(daemon):
    with pytest.raises(ValueError, match="busy_timeout"):
        gpusnap._native.Client("j", socket=str(daemon.socket), busy_timeout=-1.0)

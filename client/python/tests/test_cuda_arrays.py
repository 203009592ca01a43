"""CUDA arrays (``__cuda_array_interface__`` objects over device memory made
with the driver API, see _cuda.py) snapshotted and restored through the
real daemon, mixed with numpy arrays: the copies ordered after the
trainer's stream, overlapped use that never blocks the host on the device,
blocking use, pointers the driver refuses, injected driver faults and
staging that cannot be page-locked. On the driver double in CI (its slow,
asynchronous streams make a missing wait show as wrong bytes), on the real
driver in the GPU suite."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import gpusnap
from gpusnap import _native

from _cuda import DeviceArray, Driver, driver

CUDA_ERROR_OUT_OF_MEMORY = 2
# Long enough that the copies are still queued when a test looks.
SLOW_OP_US = 150_000
DEFAULT_OP_US = 200


@pytest.fixture
def cuda() -> Iterator[Driver]:
    d = driver()
    yield d
    if d.is_double:
        d.set_op_delay_us(DEFAULT_OP_US)
        d.clear_faults()
        assert d.violations() == 0, "the driver double saw a misuse"


def pattern(nbytes: int, seed: int) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(nbytes))


def test_the_driver_is_seen_and_reported(cuda):
    info = _native.cuda_driver()
    assert info["available"], info
    assert info["devices"] >= 1 and info["version"] >= 13000, info
    assert info["library"], info


def test_overlapped_capture_orders_after_the_trainers_stream_and_never_blocks_the_host(
    daemon, cuda
):
    w = DeviceArray(cuda, (64, 32), "<f4", pattern(64 * 32 * 4, 1))
    host = np.arange(100, dtype=np.int64)
    with gpusnap.Client("arrays", socket=daemon.socket, rng=False) as snap:
        snap.register("w", w)
        snap.register("host", host)
        snap.prepare()
        assert snap.cuda_devices == [0]
        if cuda.is_double:
            cuda.set_op_delay_us(SLOW_OP_US)
        # The trainer's last kernel of the step, still queued: the capture
        # must see what it writes.
        cuda.fill_async(w.ptr, 0x11, w.nbytes)
        h = snap.snapshot_begin(1)
        assert h.wait_captured() is None, "overlapped: nothing to report yet"
        if cuda.is_double:
            assert not h.copies_done(), "the host did not wait for the device's copies"
        # The optimizer step: queued on the same stream, so it runs after
        # the copies; host memory may be written at once.
        cuda.fill_async(w.ptr, 0x22, w.nbytes)
        host[:] = -1
        commit = h.wait_committed()
        assert commit.step == 1 and h.done
        assert snap.stats.captured == 1 and snap.stats.failed == 0
        cuda.synchronize()
        assert w.read() == b"\x22" * w.nbytes
    # A fresh trainer with fresh buffers gets the step back.
    if cuda.is_double:
        cuda.set_op_delay_us(DEFAULT_OP_US)
    w2 = DeviceArray(cuda, (64, 32), "<f4", bytes(64 * 32 * 4))
    host2 = np.zeros(100, dtype=np.int64)
    with gpusnap.Client("arrays", socket=daemon.socket, rng=False) as snap:
        snap.register("w", w2)
        snap.register("host", host2)
        assert snap.restore() == 1
    assert w2.read() == b"\x11" * w2.nbytes
    assert np.array_equal(host2, np.arange(100, dtype=np.int64))


def test_blocking_use_waits_on_the_host_and_a_named_stream_orders_the_copies(daemon, cuda):
    w = DeviceArray(cuda, (4096,), "|u1", pattern(4096, 2))
    stream = cuda.new_stream()
    try:
        with gpusnap.Client("blocking", socket=daemon.socket, rng=False) as snap:
            snap.register("w", w)
            if cuda.is_double:
                cuda.set_op_delay_us(SLOW_OP_US)
            cuda.fill_async(w.ptr, 0x33, w.nbytes, stream)
            h = snap.snapshot_begin(7, stream=stream)
            info = h.wait_captured(blocking=True)
            assert info is not None and info.step == 7 and info.bytes == 4096
            assert h.copies_done() and h.done
            snap.wait_committed(7)
            cuda.synchronize(stream)
            cuda.fill_async(w.ptr, 0, w.nbytes, stream)
            assert snap.restore(7, stream=stream) == 7
            # The restore ordered the stream after its copies: a read
            # queued behind it sees the restored bytes.
            cuda.synchronize(stream)
            assert w.read() == b"\x33" * 4096
            with pytest.raises(gpusnap.InvalidStream, match="not a CUDA stream"):
                snap.snapshot_begin(8, stream="default").wait_captured(blocking=True)
    finally:
        cuda.destroy_stream(stream)


def test_a_snapshot_during_cuda_graph_capture_is_refused_and_the_graph_left_intact(
    daemon, cuda
):
    w = DeviceArray(cuda, (1024,), "|u1", pattern(1024, 5))
    stream = cuda.new_stream()
    try:
        with gpusnap.Client("graph", socket=daemon.socket, rng=False) as snap:
            snap.register("w", w)
            snap.prepare()
            cuda.begin_graph_capture(stream)
            try:
                h = snap.snapshot_begin(1, stream=stream)
                with pytest.raises(gpusnap.GraphCapture, match="capturing a CUDA graph"):
                    h.wait_captured()
            finally:
                # Fails if the refused snapshot invalidated the capture.
                cuda.end_graph_capture(stream)
            snap.snapshot_begin(2, stream=stream).wait_committed()
            assert [s.step for s in snap.list()] == [2]
    finally:
        cuda.destroy_stream(stream)


def test_the_stream_a_cuda_array_names_orders_the_copies_and_two_names_conflict(daemon, cuda):
    stream = cuda.new_stream()
    other = cuda.new_stream()
    try:
        w = DeviceArray(cuda, (2048,), "|u1", pattern(2048, 6), stream=stream)
        with gpusnap.Client("named", socket=daemon.socket, rng=False) as snap:
            snap.register("w", w)
            if cuda.is_double:
                cuda.set_op_delay_us(SLOW_OP_US)
            # The producer's write, on the stream its interface names: the
            # copies follow it without a stream= (interface v3 semantics).
            cuda.fill_async(w.ptr, 0x44, w.nbytes, stream)
            snap.snapshot_begin(1).wait_committed()
            cuda.synchronize(stream)
            cuda.fill_async(w.ptr, 0, w.nbytes, stream)
            assert snap.restore(1) == 1
            cuda.synchronize(stream)
            assert w.read() == b"\x44" * 2048
        v = DeviceArray(cuda, (16,), "|u1", bytes(16), stream=other)
        with gpusnap.Client("conflict", socket=daemon.socket, rng=False) as snap:
            snap.register("w", w)
            snap.register("v", v)
            with pytest.raises(gpusnap.InvalidStream, match="different streams"):
                snap.snapshot_begin(1).wait_captured()
            # Naming the stream settles it.
            snap.snapshot_begin(2, stream=stream).wait_committed()
    finally:
        cuda.synchronize(stream)
        cuda.destroy_stream(stream)
        cuda.destroy_stream(other)


def test_dlpack_exporters_on_cuda_and_on_the_cpu_register_snapshot_and_restore(daemon, cuda):
    from _cuda import DlpackArray

    class HostDlpack:
        """Only DLPack, over a numpy array (numpy exports kDLCPU)."""

        def __init__(self, a: np.ndarray) -> None:
            self.a = a

        def __dlpack__(self, stream=None):
            return self.a.__dlpack__()

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    device = DlpackArray(cuda, pattern(4096, 7))
    host = HostDlpack(np.arange(50, dtype=np.float32))
    with gpusnap.Client("dlpack", socket=daemon.socket, rng=False) as snap:
        snap.register("device", device)
        snap.register("host", host)
        assert snap.cuda_devices == [0]
        snap.snapshot(3)
        snap.wait_committed(3)
        device.array.write(bytes(4096))
        host.a[:] = 0
        assert snap.restore() == 3
    assert device.array.read() == pattern(4096, 7)
    assert np.array_equal(host.a, np.arange(50, dtype=np.float32))
    [described] = [t for t in _native_describe(daemon, "dlpack", 3) if t["name"] == "device"]
    assert (described["dtype"], described["shape"]) == ("U32", [1024])


def _native_describe(daemon, job: str, step: int) -> list[dict]:
    native = _native.Client(job, socket=str(daemon.socket))
    try:
        return native.describe(step)["tensors"]
    finally:
        native.close()


class _Posing:
    """An object claiming device memory at ``ptr`` of ``nbytes``."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.ptr, self.nbytes = ptr, nbytes

    @property
    def __cuda_array_interface__(self):
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3}


def test_pointers_the_driver_refuses_fail_at_registration_naming_the_tensor(daemon, cuda):
    host = np.zeros(4096, dtype=np.uint8)
    small = DeviceArray(cuda, (1024,), "|u1", bytes(1024))
    with gpusnap.Client("refused", socket=daemon.socket, rng=False) as snap:
        with pytest.raises(gpusnap.InvalidDevicePointer, match='"host memory"'):
            snap.register("host memory", _Posing(host.ctypes.data, 4096))
        with pytest.raises(gpusnap.InvalidDevicePointer, match='"past the end"'):
            snap.register("past the end", _Posing(small.ptr, 4096))
        with pytest.raises(gpusnap.UnsupportedTensor, match="read-only"):

            class ReadOnly(_Posing):
                @property
                def __cuda_array_interface__(self):
                    return {**super().__cuda_array_interface__, "data": (self.ptr, True)}

            snap.register("ro", ReadOnly(small.ptr, 1024))
        with pytest.raises(gpusnap.NotContiguous):

            class Strided(_Posing):
                @property
                def __cuda_array_interface__(self):
                    return {
                        **super().__cuda_array_interface__,
                        "shape": (8, 8),
                        "strides": (1, 8),
                    }

            snap.register("strided", Strided(small.ptr, 64))
        # Nothing was registered by the failures: a good one still goes.
        snap.register("small", small)
        assert snap.tensor_names == ["small"]
        snap.snapshot(1)


def test_an_injected_copy_fault_is_a_clear_error_and_training_goes_on(daemon, cuda):
    if not cuda.is_double:
        pytest.skip("injects driver faults, which only the CUDA driver double can")
    w = DeviceArray(cuda, (256,), "<f4", pattern(1024, 3))
    with gpusnap.Client("faults", socket=daemon.socket, rng=False) as snap:
        snap.register("w", w)
        snap.prepare()
        cuda.inject_fault("cuMemcpyDtoHAsync_v2", 1, CUDA_ERROR_OUT_OF_MEMORY)
        h = snap.snapshot_begin(1)
        with pytest.raises(gpusnap.CudaError) as failed:
            h.wait_captured()
        assert failed.value.call == "cuMemcpyDtoHAsync_v2"
        assert failed.value.cuda_error == "CUDA_ERROR_OUT_OF_MEMORY"
        assert snap.stats.failed == 1
        with pytest.raises(gpusnap.CudaError):
            snap.wait_committed(1)
        # The next snapshot goes through; nothing of step 1 was committed.
        snap.snapshot(2)
        snap.wait_committed(2)
        assert [s.step for s in snap.list()] == [2]


def test_staging_that_cannot_be_pinned_goes_on_unpinned_unless_pinning_is_required(
    daemon, cuda
):
    w = DeviceArray(cuda, (512,), "<f4", pattern(2048, 4))
    with gpusnap.Client("pinned", socket=daemon.socket, rng=False) as snap:
        snap.register("w", w)
        assert snap.staging_pinning == []
        snap.prepare()
        [state] = snap.staging_pinning
        assert state["state"] == "pinned" and state["bytes"] > 0, state
    if not cuda.is_double:
        return
    cuda.inject_fault("cuMemHostRegister_v2", 1, CUDA_ERROR_OUT_OF_MEMORY)
    with gpusnap.Client("unpinned", socket=daemon.socket, rng=False) as snap:
        snap.register("w", w)
        snap.prepare()
        [state] = snap.staging_pinning
        assert state["state"] == "unpinned", state
        assert "CUDA_ERROR_OUT_OF_MEMORY" in state["reason"], state
        snap.snapshot(1)
        snap.wait_committed(1)
    cuda.inject_fault("cuMemHostRegister_v2", 1, CUDA_ERROR_OUT_OF_MEMORY)
    with gpusnap.Client("required", socket=daemon.socket, rng=False, require_pinned=True) as snap:
        snap.register("w", w)
        with pytest.raises(gpusnap.PinningRequired, match="CUDA_ERROR_OUT_OF_MEMORY"):
            snap.prepare()


NO_DRIVER_CHILD = """
import sys, numpy as np, gpusnap
from gpusnap import _native

info = _native.cuda_driver()
if info["available"]:
    print("DRIVER", info["library"])
    sys.exit(0)

class Posing:
    __cuda_array_interface__ = {"shape": (16,), "typestr": "|u1", "data": (4096, False), "version": 3}

with gpusnap.Client("nodriver", socket=sys.argv[1], rng=False) as snap:
    try:
        snap.register("w", Posing())
    except gpusnap.NoCudaDriver as e:
        assert isinstance(e, gpusnap.BackendUnavailable)
        print("REFUSED", e)
    host = np.arange(16, dtype=np.uint8)
    snap.register("host", host)
    snap.snapshot(1)
    snap.wait_committed(1)
    host[:] = 0
    assert snap.restore() == 1 and list(host) == list(range(16))
print("HOST OK")
"""


def test_without_a_driver_a_cuda_array_is_no_cuda_driver_and_host_snapshots_go_on(daemon):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    child = subprocess.run(
        [sys.executable, "-c", NO_DRIVER_CHILD, str(daemon.socket)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stdout + child.stderr
    if child.stdout.startswith("DRIVER"):
        pytest.skip(f"a CUDA driver is installed system-wide ({child.stdout.strip()})")
    assert "REFUSED CUDA: no usable CUDA driver" in child.stdout, child.stdout + child.stderr
    assert "HOST OK" in child.stdout, child.stdout

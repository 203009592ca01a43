"""The API with numpy arrays only (no torch needed)."""

from __future__ import annotations

import random

import time

import numpy as np
import pytest

import gpusnap


def client(daemon, job="np-job", **kw) -> gpusnap.Client:
    return gpusnap.Client(job, socket=daemon.socket, **kw)


def test_snapshot_commit_and_restore_in_place(daemon):
    a = np.arange(1000, dtype=np.float32)
    b = np.full((3, 4), 7, dtype=np.int64)
    state = {"epoch": 3, "seen": [1, 2, 3]}
    with client(daemon) as snap:
        snap.register("a", a)
        snap.register("b", b)
        snap.register("loader", blob=state)
        assert snap.restore() is None
        assert snap.last_restore is None
        info = snap.snapshot(5)
        assert info.step == 5 and not info.skipped and info.bytes > a.nbytes + b.nbytes
        assert snap.wait_committed(5).step == 5
        assert [s.step for s in snap.list()] == [5]
        # The native listing: no remote tier on the test daemon.
        listing = snap._native.list()
        assert listing["complete"] == [{"job": "np-job", "steps": [5]}]
        assert listing["remote_complete"] == [] and "remote_error" not in listing
        assert snap.latest() == 5
    a[:] = 0
    b[:] = 0
    state["epoch"] = 99
    with client(daemon) as snap:
        snap.register("a", a)
        snap.register("b", b)
        snap.register("loader", blob=state)
        assert snap.restore() == 5
        restored = snap.last_restore
        assert restored is not None and restored.step == 5
        assert restored.source in ("memory", "disk") and restored.walked_back == ()
        assert restored.bytes > a.nbytes + b.nbytes
    assert np.array_equal(a, np.arange(1000, dtype=np.float32))
    assert (b == 7).all()
    assert state == {"epoch": 3, "seen": [1, 2, 3]}


def test_overlapped_snapshot_and_context_manager(daemon):
    a = np.ones(1 << 20, dtype=np.float32)
    with client(daemon) as snap:
        snap.register("a", a)
        h = snap.snapshot_begin(1)
        assert h.step == 1
        info = h.wait_captured()
        assert info.step == 1 and info.bytes >= a.nbytes
        assert h.wait_committed().step == 1
        with snap.snapshot_begin(2) as h2:
            pass
        assert h2.done
        snap.wait_committed(2)
        assert snap.stats.captured == 2 and snap.stats.failed == 0


def test_the_copies_of_a_begun_snapshot_finish_without_a_wait_and_say_so(daemon):
    a = np.arange(1 << 20, dtype=np.float32)
    with client(daemon) as snap:
        snap.register("a", a)
        snap.prepare()
        h = snap.snapshot_begin(1)
        deadline = time.monotonic() + 20
        while not h.copies_done():
            assert time.monotonic() < deadline, "the copies never finished in the background"
            time.sleep(0.001)
        assert not h.done, "only the copies finished: the capture is still open"
        assert h.wait_captured().step == 1
        assert h.copies_done()
        h.wait_committed()
        # A handle whose begin failed says its copies are done (there are none).
        snap.close()
        failed = snap.snapshot_begin(2)
        assert failed.copies_done()


def test_rng_state_comes_back(daemon):
    a = np.zeros(4, dtype=np.float32)
    random.seed(1)
    np.random.seed(2)
    with client(daemon) as snap:
        snap.register("a", a)
        snap.snapshot(1)
        snap.wait_committed(1)
        want = (random.random(), np.random.rand())
        random.seed(9)
        np.random.seed(9)
        assert snap.restore() == 1
    assert (random.random(), np.random.rand()) == want


class Counter:
    """A stateful object, as a data loader with state_dict() would be."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_every_kind_of_blob_round_trips(daemon):
    # Large at the first registration, small at the second: the capacity
    # must not depend on it, or the restore would not match.
    packed = {"k": b"\x00\x01binary", "n": 7, "big": "x" * 300_000}
    raw = bytearray(b"raw state")
    frozen = b"set once"
    counter = Counter()
    with client(daemon, job="blobs") as snap:
        snap.register("packed", blob=packed, encoding="msgpack")
        snap.register("raw", blob=raw)
        snap.register("frozen", blob=frozen)
        snap.register("counter", blob=counter)
        assert snap.blob("raw") is None
        with pytest.raises(gpusnap.BlobTooLarge, match="capacity"):
            snap.register("huge", blob={"x": "y" * (2 << 20)})
        counter.position = 41
        raw[:] = b"newer raw state"
        snap.snapshot(1)
        snap.wait_committed(1)
    want_packed = dict(packed)
    packed.clear()
    raw[:] = b"x"
    counter.position = 0
    with client(daemon, job="blobs") as snap:
        snap.register("packed", blob=packed, encoding="msgpack")
        snap.register("raw", blob=raw)
        snap.register("frozen", blob=b"")
        snap.register("counter", blob=counter)
        assert snap.restore() == 1
        assert snap.blob("frozen") == b"set once"
        with pytest.raises(gpusnap.NotRegistered):
            snap.blob("nope")
    assert packed == want_packed
    assert raw == bytearray(b"newer raw state")
    assert counter.position == 41


def test_prepare_and_a_fresh_restore_set_up_staging_before_the_first_snapshot(make_daemon):
    d = make_daemon({"staging": {"budget_bytes": '"64MiB"'}})
    with gpusnap.Client("prep", socket=d.socket) as snap:
        snap.register("a", np.zeros(1 << 20, dtype=np.float32))
        assert snap.status()["staging_bytes_used"] == 0
        assert snap.restore() is None
        assert snap.status()["staging_bytes_used"] >= 4 << 20
    with gpusnap.Client("prep2", socket=d.socket) as snap:
        snap.register("a", np.zeros(1 << 20, dtype=np.float32))
        snap.prepare()
        assert snap.status()["staging_bytes_used"] >= 4 << 20
    # Too big for the budget: said at set-up, before training starts.
    with gpusnap.Client("prep3", socket=d.socket) as snap:
        snap.register("a", np.zeros(64 << 20, dtype=np.uint8))
        with pytest.raises(gpusnap.StagingFull):
            snap.restore()

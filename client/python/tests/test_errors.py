"""Every error path of the package: what is raised, where, and that a
failed snapshot never raises before the caller waits for it."""

from __future__ import annotations

import inspect
import threading
import time

import numpy as np
import pytest

import gpusnap


def client(daemon, job="errors", **kw) -> gpusnap.Client:
    return gpusnap.Client(job, socket=daemon.socket, **kw)


def test_every_exception_is_a_gpusnap_error():
    classes = [
        c for _, c in inspect.getmembers(gpusnap, inspect.isclass) if issubclass(c, BaseException)
    ]
    assert len(classes) >= 30
    for c in classes:
        assert issubclass(c, gpusnap.Error), c
        assert c.__module__ == "gpusnap", c
    assert issubclass(gpusnap.NotContiguous, gpusnap.InvalidRegistration)
    assert issubclass(gpusnap.MessageTooLarge, gpusnap.ProtocolError)
    assert issubclass(gpusnap.Error, Exception)


def test_a_rust_panic_arrives_as_internal_error_not_a_crash():
    from gpusnap import _native

    with pytest.raises(gpusnap.InternalError, match="a deliberate panic"):
        _native._panic_inside_a_call()


def test_no_daemon_is_daemon_unavailable_and_the_wait_releases_the_gil(tmp_path):
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    started = time.monotonic()
    with pytest.raises(gpusnap.DaemonUnavailable, match="not reachable"):
        gpusnap.Client("j", socket=tmp_path / "none.sock", connect_timeout=0.5)
    ended = time.monotonic()
    stop.set()
    t.join()
    assert ended - started >= 0.45
    # The other thread ran in the middle of the native call's retries.
    middle = [x for x in ticks if started + 0.15 < x < ended - 0.15]
    assert len(middle) > 10, f"{len(middle)} ticks while the client waited"


def test_bad_registrations_are_refused_with_clear_errors(daemon):
    with client(daemon) as snap:
        a = np.zeros((4, 6), dtype=np.float32)
        with pytest.raises(gpusnap.NotContiguous, match="'strided'"):
            snap.register("strided", a[:, ::2])
        with pytest.raises(gpusnap.UnsupportedTensor, match="complex"):
            snap.register("complex", np.zeros(3, dtype=np.complex64))
        with pytest.raises(gpusnap.UnsupportedTensor, match="neither a torch.Tensor"):
            snap.register("list", [1, 2, 3])
        frozen = np.zeros(3)
        frozen.flags.writeable = False
        with pytest.raises(gpusnap.UnsupportedTensor, match="read-only"):
            snap.register("frozen", frozen)
        snap.register("a", a)
        with pytest.raises(gpusnap.DuplicateName):
            snap.register("a", np.zeros(2))
        with pytest.raises(gpusnap.InvalidRegistration, match="shares memory"):
            snap.register("alias", a.reshape(-1)[:8])
        with pytest.raises(gpusnap.InvalidRegistration, match="not both"):
            snap.register("both", a, blob={})
        with pytest.raises(gpusnap.InvalidRegistration, match="JSON"):
            snap.register("set", blob={"s": {1, 2}})
        with pytest.raises(gpusnap.InvalidRegistration, match="unknown encoding .pickle."):
            snap.register("enc", blob={}, encoding="pickle")
        # After all that the client still works.
        assert snap.snapshot(1).step == 1


def test_nothing_registered_fails_at_the_wait_not_at_begin(daemon):
    with client(daemon, rng=False) as snap:
        h = snap.snapshot_begin(1)
        with pytest.raises(gpusnap.NotRegistered):
            h.wait_captured()
        assert snap.stats.failed == 1 and "step 1" in snap.stats.last_error


def test_a_blob_past_its_capacity_fails_that_snapshot_only(daemon):
    state = {"x": ""}
    with client(daemon) as snap:
        snap.register("state", blob=state, capacity=100)
        state["x"] = "y" * 200
        h = snap.snapshot_begin(1)
        with pytest.raises(gpusnap.BlobTooLarge, match="capacity of 100"):
            h.wait_captured()
        state["x"] = "small"
        assert snap.snapshot(2).step == 2
        snap.wait_committed(2)


def test_an_already_committed_step_is_skipped(daemon):
    with client(daemon) as snap:
        snap.register("a", np.ones(16))
        snap.snapshot(3)
        snap.wait_committed(3)
        h = snap.snapshot_begin(3)
        info = h.wait_captured()
        assert info.skipped and info.reason
        with pytest.raises(gpusnap.Skipped) as e:
            h.wait_committed()
        assert e.value.step == 3
        assert snap.stats.skipped == 1


def test_restore_of_a_missing_step_or_another_layout_touches_nothing(daemon):
    with client(daemon) as snap:
        snap.register("a", np.arange(8, dtype=np.float32))
        snap.snapshot(1)
        snap.wait_committed(1)
    other = np.full(9, 5, dtype=np.float32)
    with client(daemon) as snap:
        snap.register("a", other)
        with pytest.raises(gpusnap.ShapeMismatch, match="'a'|\"a\""):
            snap.restore()
        assert (other == 5).all()
    same = np.zeros(8, dtype=np.float32)
    with client(daemon) as snap:
        snap.register("a", same)
        with pytest.raises(gpusnap.NotFound):
            snap.restore(step=999)
        assert (same == 0).all()
        assert snap.restore(step=1) == 1
        assert np.array_equal(same, np.arange(8, dtype=np.float32))


def test_a_second_client_of_the_same_rank_is_busy(daemon):
    with client(daemon, job="busy") as first, client(
        daemon, job="busy", connect_timeout=0.5
    ) as second:
        first.register("a", np.ones(4))
        second.register("a", np.ones(4))
        first.snapshot(1)
        h = second.snapshot_begin(2)
        with pytest.raises(gpusnap.Busy):
            h.wait_captured()


def test_staging_over_the_budget_is_staging_full(make_daemon):
    d = make_daemon({"staging": {"budget_bytes": '"4MiB"'}})
    with gpusnap.Client("big", socket=d.socket) as snap:
        snap.register("a", np.zeros(8 << 20, dtype=np.uint8))
        h = snap.snapshot_begin(1)
        with pytest.raises(gpusnap.StagingFull):
            h.wait_captured()


def test_a_corrupt_file_on_disk_is_refused_at_restore(make_daemon):
    d = make_daemon()
    a = np.arange(1 << 16, dtype=np.float32)
    with gpusnap.Client("rot", socket=d.socket) as snap:
        snap.register("a", a)
        snap.snapshot(1)
        snap.wait_committed(1)
    d.stop()  # the restore must come from disk, not the hot tier
    data = d.root / "rot" / "0" / "step-1" / "state.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF
    data.write_bytes(bytes(raw))
    d.start()
    target = np.zeros_like(a)
    with gpusnap.Client("rot", socket=d.socket) as snap:
        snap.register("a", target)
        with pytest.raises(gpusnap.Corrupt):
            snap.restore()
    assert (target == 0).all()


def test_a_closed_client_says_so(daemon):
    snap = client(daemon)
    snap.close()
    with pytest.raises(gpusnap.Disconnected, match="closed"):
        snap.list()


def test_bad_arguments_are_value_errors_or_invalid_registrations(daemon):
    with pytest.raises(ValueError, match="connect_timeout"):
        gpusnap.Client("j", socket=daemon.socket, connect_timeout=-1)
    with pytest.raises(gpusnap.InvalidRegistration, match="outside a world"):
        gpusnap.Client("j", socket=daemon.socket, rank=2, world_size=2)
    with pytest.raises(gpusnap.InvalidRegistration):
        gpusnap.Client("bad/job name", socket=daemon.socket).snapshot(1)


def test_wait_committed_of_a_failed_capture_raises_its_own_error(daemon):
    state = {"x": ""}
    with client(daemon, job="failed-wait") as snap:
        snap.register("state", blob=state, capacity=64)
        state["x"] = "y" * 100
        snap.snapshot_begin(4)
        with pytest.raises(gpusnap.BlobTooLarge) as e:
            snap.wait_committed(4)
        assert e.value.step == 4


class Picky:
    def state_dict(self) -> dict:
        return {"v": 1}

    def load_state_dict(self, state: dict) -> None:
        raise KeyError("not what I expected")


def test_a_blob_whose_load_fails_raises_a_gpusnap_error(daemon):
    with client(daemon, job="picky") as snap:
        snap.register("picky", blob=Picky())
        snap.snapshot(1)
        snap.wait_committed(1)
        with pytest.raises(gpusnap.Error, match="blob 'picky'.*not what I expected"):
            snap.restore()


def test_a_step_snapshotted_again_after_a_failure_reports_the_new_outcome(daemon):
    state = {"x": ""}
    with client(daemon, job="again") as snap:
        snap.register("state", blob=state, capacity=64)
        state["x"] = "y" * 100
        with pytest.raises(gpusnap.BlobTooLarge):
            snap.snapshot(5)
        state["x"] = ""
        assert snap.snapshot(5).step == 5
        assert snap.wait_committed(5).step == 5

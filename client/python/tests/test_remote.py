"""The remote tier from Python, against a real S3 server (SeaweedFS, as
testkit/python/gpusnapd_testkit.py starts it): a node lost with its disk is
replaced by an empty one, and the trainer there resumes from the object
store with the same rule the ranks agree by (a step complete remotely
counts as complete and as this rank's own); gpusnap.dcp's reader loads a
checkpoint there the same way (with torch only)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import gpusnap
from conftest import Daemon, testkit


@pytest.fixture
def s3(tmp_path: Path):
    with testkit.SeaweedFs(tmp_path / "s3") as server:
        yield server


def node(tmp_path: Path, name: str, s3: testkit.SeaweedFs) -> Daemon:
    workdir = tmp_path / name
    workdir.mkdir()
    d = Daemon(workdir, {"remote": s3.remote_settings("py")})
    d.start()
    return d


def wait_complete(d: Daemon, job: str, step: int, limit_s: float = 90.0) -> None:
    deadline = time.monotonic() + limit_s
    series = f'gpusnap_remote_complete_step{{job="{job}"}}'
    while (d.metric(series) or 0) < step:
        assert time.monotonic() < deadline, f"step {step} not complete remotely:\n{d.log_tail()}"
        time.sleep(0.2)


def test_a_replaced_node_resumes_from_the_object_store(tmp_path, s3):
    a = node(tmp_path, "a", s3)
    weights = np.arange(3 << 20, dtype=np.float32)
    counter = np.zeros(1, dtype=np.int64)
    try:
        with gpusnap.Client("pyjob", socket=a.socket) as snap:
            snap.register("w", weights)
            snap.register("n", counter)
            for step in (1, 2):
                weights += 1
                counter[0] = step
                snap.snapshot(step)
                snap.wait_committed(step)
        wait_complete(a, "pyjob", 2)
    finally:
        a.close()
    shutil.rmtree(a.root)
    expected = weights.copy()
    weights[:] = 0
    counter[:] = 0
    b = node(tmp_path, "b", s3)
    try:
        with gpusnap.Client("pyjob", socket=b.socket) as snap:
            snap.register("w", weights)
            snap.register("n", counter)
            listing = snap._native.list()
            assert listing["remote_complete"] == [{"job": "pyjob", "steps": [1, 2]}]
            assert "remote_error" not in listing
            assert snap.latest() == 2, "a step complete remotely is one to restore"
            assert snap.restore() == 2
            info = snap.last_restore
            assert info is not None and info.source == "remote" and info.walked_back == ()
        assert np.array_equal(weights, expected)
        assert counter[0] == 2
        assert b.metric('gpusnap_remote_downloads_total{job="pyjob",outcome="ok"}') == 1
    finally:
        b.close()


def wait_uploaded(d: Daemon, job: str, limit_s: float = 90.0) -> None:
    """Until a step of `job` is complete remotely and no rank lags."""
    deadline = time.monotonic() + limit_s
    while not (
        (d.metric(f'gpusnap_remote_complete_step{{job="{job}"}}') or 0) >= 1
        and d.metric(f'gpusnap_remote_upload_lag_steps{{job="{job}"}}') == 0
    ):
        assert time.monotonic() < deadline, f"{job} not uploaded:\n{d.log_tail()}"
        time.sleep(0.2)


@pytest.mark.filterwarnings("ignore:torch.distributed is .*uninitialized")
def test_a_dcp_checkpoint_loads_on_a_replaced_node(tmp_path, s3):
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp

    import gpusnap.dcp as gdcp

    state = {"w": torch.arange(4096.0), "b": torch.full((7,), 3, dtype=torch.int64)}
    a = node(tmp_path, "a", s3)
    try:
        dcp.save(state, storage_writer=gdcp.StorageWriter("dcpjob", socket=a.socket))
        wait_uploaded(a, "dcpjob")
    finally:
        a.close()
    shutil.rmtree(a.root)
    b = node(tmp_path, "b", s3)
    try:
        target = {"w": torch.zeros(4096), "b": torch.zeros(7, dtype=torch.int64)}
        dcp.load(target, storage_reader=gdcp.StorageReader("dcpjob", socket=b.socket))
        assert torch.equal(target["w"], state["w"]) and torch.equal(target["b"], state["b"])
        assert (b.metric('gpusnap_remote_downloads_total{job="dcpjob",outcome="ok"}') or 0) >= 1
    finally:
        b.close()

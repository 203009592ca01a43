"""gpusnap.dcp: torch.distributed.checkpoint saves and loads through a real
gpusnapd, with DCP's default planners."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.default_planner import (  # noqa: E402
    DefaultLoadPlanner,
    DefaultSavePlanner,
)
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex  # noqa: E402
from torch.distributed.checkpoint.planner import (  # noqa: E402
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.checkpoint.staging import AsyncStager  # noqa: E402
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys  # noqa: E402

import gpusnap  # noqa: E402
import gpusnap.dcp as gdcp  # noqa: E402
from gpusnap import _native  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is .*uninitialized"
)


def writer(daemon: Any, job: str = "dcp", **kw: Any) -> gdcp.StorageWriter:
    return gdcp.StorageWriter(job, socket=daemon.socket, **kw)


def reader(daemon: Any, job: str = "dcp", **kw: Any) -> gdcp.StorageReader:
    return gdcp.StorageReader(job, socket=daemon.socket, **kw)


def failure(info: pytest.ExceptionInfo[CheckpointException]) -> BaseException:
    """The error a rank raised inside DCP, which wraps it."""
    ((exc, _),) = info.value.failures.values()
    return exc


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return torch.equal(flat(a), flat(b))


def assert_same_state(got: Any, want: Any, path: str = "") -> None:
    """Nested dicts/lists equal, every tensor bit for bit."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert same_bits(got, want), f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, set(got) ^ set(want))
        for k in want:
            assert_same_state(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_state(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


class Net(nn.Module):
    """Embedding, a transformer layer, batch norm (int64 buffer) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.embed(x)).mean(1)
        return self.head(self.norm(h))


def trained(seed: int, steps: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, 32, (4, 6))
        model(x).square().mean().backward()
        optim.step()
        optim.zero_grad()
    return model, optim


def checkpoint_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def test_model_and_adam_round_trip_bit_for_bit(daemon):
    model, optim = trained(0, 3)
    state = checkpoint_state(model, optim)
    state["extra"] = {
        "epoch": 7,
        "tag": "run-a",
        "history": [0.5, 0.25],
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # a non-contiguous view
        "nested": [torch.ones(2), {"deep": torch.full((2, 2), 9.0)}],
    }
    # fqns with the characters the names escape.
    state["a/b.c%d"] = torch.arange(4, dtype=torch.int32)
    state["7"] = torch.tensor(1.5)
    w = writer(daemon)
    saved = dcp.save(state, storage_writer=w, planner=DefaultSavePlanner())
    assert w.last_step == 1

    # The metadata rebuilt from the daemon's tensor tables is DCP's own.
    r = reader(daemon)
    md = r.read_metadata()
    assert r.loaded_step == 1
    assert md.state_dict_metadata == saved.state_dict_metadata
    assert md.planner_data == saved.planner_data
    assert isinstance(md.state_dict_metadata["extra.tag"], BytesStorageMetadata)
    assert md.storage_meta is not None and md.storage_meta.checkpoint_id == "gpusnap://dcp/1"

    fresh_model, fresh_optim = trained(1, 1)
    target = checkpoint_state(fresh_model, fresh_optim)
    target["extra"] = {
        "epoch": 0,
        "tag": "",
        "history": [],
        "bf16": torch.zeros(2, 3, dtype=torch.bfloat16),
        "mask": torch.zeros(3, dtype=torch.bool),
        "scalar": torch.tensor(0, dtype=torch.int64),
        "empty": torch.ones(0, 4),
        "strided": torch.zeros(4, 3),
        "nested": [torch.zeros(2), {"deep": torch.zeros(2, 2)}],
    }
    target["a/b.c%d"] = torch.zeros(4, dtype=torch.int32)
    target["7"] = torch.tensor(0.0)
    dcp.load(target, storage_reader=reader(daemon), planner=DefaultLoadPlanner())
    set_state_dict(
        fresh_model,
        fresh_optim,
        model_state_dict=target["model"],
        optim_state_dict=target["optim"],
    )

    assert_same_state(fresh_model.state_dict(), model.state_dict())
    assert_same_state(fresh_optim.state_dict(), optim.state_dict())
    assert_same_state(target["extra"], state["extra"])
    assert same_bits(target["a/b.c%d"], state["a/b.c%d"])
    assert same_bits(target["7"], state["7"])

    # The model trains on identically from there.
    x = torch.randint(0, 32, (4, 6))
    model.eval()
    fresh_model.eval()
    assert same_bits(fresh_model(x), model(x))


def test_a_checkpoint_rebuilds_without_a_target_state_dict(daemon):
    state = {"w": torch.arange(5.0), "cfg": {"lr": 0.1, "layers": [torch.ones(1), torch.zeros(2)]}}
    dcp.save(state, storage_writer=writer(daemon))
    # DCP's loader of a whole checkpoint (as dcp_to_torch_save does)
    # rebuilds the nested structure from planner_data.
    rebuilt = _load_state_dict_from_keys(storage_reader=reader(daemon))
    assert_same_state(rebuilt, state)
    only_w = _load_state_dict_from_keys({"w"}, storage_reader=reader(daemon))
    assert_same_state(only_w, {"w": torch.arange(5.0)})


def test_the_snapshot_is_one_gpusnap_snapshot_per_rank_with_dcp_names(daemon):
    state = {"model": {"fc.weight": torch.ones(2, 3)}, "n": 5}
    dcp.save(state, storage_writer=writer(daemon, "names"))
    c = _native.Client("names", socket=str(daemon.socket))
    try:
        listing = c.list()
        assert [(s["rank"], s["step"], s["world_size"]) for s in listing["snapshots"]] == [
            (0, 1, 1)
        ]
        assert listing["complete"] == [{"job": "names", "steps": [1]}]
        table = {t["name"]: (t["dtype"], t["shape"]) for t in c.describe(1, rank=0)["tensors"]}
    finally:
        c.close()
    assert table["t/model.fc%2Eweight/0,0/2,3/"] == ("F32", [2, 3])
    assert table["b/n/"][0] == "U8"
    assert table["dcp/1"][0] == "U8"
    assert len(table) == 3
    # The store holds it as any gpusnap snapshot: a committed step directory.
    assert daemon.snapshot_dirs("names") == ["step-1"]


def test_steps_increase_and_a_reader_loads_the_newest_or_the_one_asked(make_daemon):
    daemon = make_daemon({"store": {"keep_snapshots": "8"}})
    value = torch.zeros(8)
    for n in (1, 2):
        value.fill_(n)
        w = writer(daemon)
        dcp.save({"v": value, "n": n}, storage_writer=w)
        assert w.last_step == n
    w = writer(daemon, step=10)
    value.fill_(10)
    dcp.save({"v": value, "n": 10}, storage_writer=w)
    assert w.last_step == 10
    w = writer(daemon)
    value.fill_(11)
    dcp.save({"v": value, "n": 11}, storage_writer=w)
    assert w.last_step == 11
    assert gdcp.latest_step("dcp", socket=daemon.socket) == 11

    def load(step: int | None) -> tuple[int, int]:
        target = {"v": torch.empty(8), "n": -1}
        r = reader(daemon, step=step)
        dcp.load(target, storage_reader=r)
        assert bool((target["v"] == target["n"]).all())
        assert r.loaded_step == target["n"]
        return target["n"], int(target["v"][0])

    assert load(None) == (11, 11)
    assert load(1) == (1, 1)
    assert load(2) == (2, 2)
    assert load(10) == (10, 10)


def table(daemon: Any, job: str, step: int, rank: int = 0) -> dict[str, tuple[str, list[int]]]:
    c = _native.Client(job, socket=str(daemon.socket))
    try:
        d = c.describe(step, rank=rank)
    finally:
        c.close()
    return {t["name"]: (t["dtype"], t["shape"]) for t in d["tensors"]}


def wait_listed(daemon: Any, job: str, step: int, rank: int = 0, timeout: float = 30.0) -> None:
    """Waits (bounded) until the daemon lists (job, rank, step): a staged
    capture whose save failed commits on its own time, not the future's."""
    deadline = time.monotonic() + timeout
    while True:
        c = _native.Client(job, socket=str(daemon.socket))
        try:
            listing = c.list()
        finally:
            c.close()
        if any(
            (s["job"], s["rank"], s["step"]) == (job, rank, step) for s in listing["snapshots"]
        ):
            return
        assert time.monotonic() < deadline, f"{job} rank {rank} step {step} was never committed"
        time.sleep(0.05)


def complete_steps(daemon: Any, job: str) -> list[int]:
    c = _native.Client(job, socket=str(daemon.socket))
    try:
        listing = c.list()
    finally:
        c.close()
    return [s for j in listing["complete"] if j["job"] == job for s in j["steps"]]


def test_async_save_stages_so_the_trainer_may_change_its_tensors_at_once(daemon):
    model, optim = trained(0, 2)
    state = checkpoint_state(model, optim)
    state["extra"] = {"epoch": 3, "history": [0.5], "x": torch.arange(10.0)}
    want = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optim": {k: v.clone() for k, v in state["optim"]["state"]["embed.weight"].items()},
        "x": torch.arange(10.0),
    }
    w = writer(daemon)
    assert isinstance(w, AsyncStager)
    done = dcp.async_save(state, storage_writer=w)
    # The trainer goes on at once: in-place updates, the objects changed.
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-1.0)
    for t in state["optim"]["state"]["embed.weight"].values():
        t.fill_(-2)
    state["extra"]["x"].fill_(-3.0)
    state["extra"]["epoch"] = 99
    state["extra"]["history"].append(9.0)
    metadata = done.result(timeout=60)
    assert w.last_step == 1
    assert "extra.x" in metadata.state_dict_metadata

    fresh_model, fresh_optim = trained(1, 1)
    target = checkpoint_state(fresh_model, fresh_optim)
    target["extra"] = {"epoch": 0, "history": [], "x": torch.zeros(10)}
    dcp.load(target, storage_reader=reader(daemon))
    set_state_dict(
        fresh_model, fresh_optim,
        model_state_dict=target["model"], optim_state_dict=target["optim"],
    )
    assert_same_state(fresh_model.state_dict(), want["model"])
    assert_same_state(fresh_optim.state_dict()["state"][0], want["optim"])
    assert_same_state(target["extra"], {"epoch": 3, "history": [0.5], "x": want["x"]})
    # One staged snapshot as rank 0 of a world of 2, rank 1 its seal.
    assert list(table(daemon, "dcp", 1, rank=1)) == ["dcp/1/seal"]
    assert "t/extra.x/0/10/" in table(daemon, "dcp", 1, rank=0)
    assert complete_steps(daemon, "dcp") == [1]



def test_stage_captures_and_hands_dcp_tensors_without_data(daemon):
    x = torch.arange(6.0, requires_grad=True)
    w = writer(daemon)
    staged = w.stage({"a": {"x": x, "l": [x, 3]}, "n": 4})
    # What DCP's background save plans with holds none of the trainer's
    # memory: meta tensors of the same dtype, shape and requires_grad.
    assert staged["a"]["x"].device.type == "meta" and staged["a"]["x"].requires_grad
    assert staged["a"]["x"].shape == x.shape and staged["a"]["x"].dtype == x.dtype
    assert staged["a"]["l"][0].device.type == "meta" and staged["a"]["l"][1] == 3
    assert staged["n"] == 4
    # The capture was taken when stage returned; with no save to check and
    # seal it, it is committed data but not a checkpoint.
    (record,) = w._pending
    assert record.committed.result(timeout=60)["step"] == 1
    assert set(table(daemon, "dcp", 1)) == {"t/a.x/0/6/g", "t/a.l.0/0/6/g", "b/a.l.1/", "b/n/",
                                            "dcp/1"}
    assert complete_steps(daemon, "dcp") == []


def test_async_save_equals_a_synchronous_save(daemon):
    model, optim = trained(2, 2)
    state = checkpoint_state(model, optim)
    state["extra"] = {"tag": "t", "bf16": torch.arange(4, dtype=torch.bfloat16),
                      "strided": torch.arange(12.0).reshape(3, 4).t(), "0": torch.ones(1)}
    sync_md = dcp.save(state, storage_writer=writer(daemon, "sync"))
    async_md = dcp.async_save(state, storage_writer=writer(daemon, "async")).result(timeout=60)
    assert async_md.state_dict_metadata == sync_md.state_dict_metadata
    assert async_md.planner_data == sync_md.planner_data
    assert table(daemon, "async", 1).keys() == table(daemon, "sync", 1).keys()
    for name, (dtype, shape) in table(daemon, "sync", 1).items():
        if name != "dcp/1":
            assert table(daemon, "async", 1)[name] == (dtype, shape), name
    md_sync = reader(daemon, "sync").read_metadata()
    md_async = reader(daemon, "async").read_metadata()
    assert md_async.state_dict_metadata == md_sync.state_dict_metadata
    assert md_async.planner_data == md_sync.planner_data
    loaded = [_load_state_dict_from_keys(storage_reader=reader(daemon, job))
              for job in ("sync", "async")]
    assert_same_state(loaded[1], loaded[0])


class DropsAKey(DefaultSavePlanner):
    """A planner that leaves one item out: not what the stage planned."""

    def create_local_plan(self):  # type: ignore[no-untyped-def]
        plan = super().create_local_plan()
        return dataclasses.replace(
            plan, items=[i for i in plan.items if i.index.fqn != "y"]
        )


def test_async_save_errors_come_through_the_future_and_are_never_a_checkpoint(daemon):
    state = {"x": torch.ones(4), "y": torch.zeros(2)}
    # A checkpoint_id that names another step than the writer staged.
    done = dcp.async_save(state, storage_writer=writer(daemon, step=1),
                          checkpoint_id="gpusnap://dcp/2")
    with pytest.raises(CheckpointException) as info:
        done.result(timeout=60)
    assert isinstance(failure(info), ValueError)
    assert "names another checkpoint" in str(failure(info))
    # A planner that saves other items than the stage planned.
    done = dcp.async_save(state, storage_writer=writer(daemon, step=3), planner=DropsAKey())
    with pytest.raises(CheckpointException) as info:
        done.result(timeout=60)
    assert isinstance(failure(info), gpusnap.InvalidSpec)
    assert "no rank's plan saves" in str(failure(info))
    # The staged snapshots are committed, but never sealed: no checkpoint.
    wait_listed(daemon, "dcp", 1)
    wait_listed(daemon, "dcp", 3)
    assert table(daemon, "dcp", 1).keys() == {"t/x/0/4/", "t/y/0/2/", "dcp/1"}
    assert table(daemon, "dcp", 3).keys() == {"t/x/0/4/", "t/y/0/2/", "dcp/1"}
    assert complete_steps(daemon, "dcp") == []
    with pytest.raises(gpusnap.NotFound, match="step 3 is not complete"):
        reader(daemon, step=3).read_metadata()
    assert gdcp.latest_step("dcp", socket=daemon.socket) is None
    # A capture the daemon refuses (a step already committed): the
    # caller's async_save returns, the future raises.
    dcp.save(state, storage_writer=writer(daemon, step=5))
    done = dcp.async_save({"x": torch.full((4,), 7.0), "y": torch.zeros(2)},
                          storage_writer=writer(daemon, step=5))
    with pytest.raises(CheckpointException) as info:
        done.result(timeout=60)
    assert isinstance(failure(info), gpusnap.Skipped)
    target = {"x": torch.zeros(4), "y": torch.ones(2)}
    dcp.load(target, storage_reader=reader(daemon))
    assert torch.equal(target["x"], torch.ones(4)), "the committed step is untouched"
    # The writer goes on working after the failures.
    dcp.async_save(state, storage_writer=writer(daemon, step=6)).result(timeout=60)
    assert complete_steps(daemon, "dcp") == [5, 6]


def test_a_second_async_save_while_one_is_in_flight(make_daemon):
    daemon = make_daemon({"store": {"keep_snapshots": "8"}})
    w = writer(daemon)
    value = torch.zeros(1 << 18)
    futures = []
    for n in (1, 2, 3):
        value.fill_(n)
        futures.append(dcp.async_save({"v": value, "n": n}, storage_writer=w))
    value.fill_(-1)
    for f in futures:
        f.result(timeout=60)
    assert complete_steps(daemon, "dcp") == [1, 2, 3]
    for n in (1, 2, 3):
        target = {"v": torch.empty(1 << 18), "n": 0}
        dcp.load(target, storage_reader=reader(daemon, step=n))
        assert target["n"] == n and bool((target["v"] == n).all()), n


def test_checkpoint_ids_name_the_job_and_step(daemon):
    assert gdcp.StorageWriter.validate_checkpoint_id("gpusnap://job/3")
    assert gdcp.StorageReader.validate_checkpoint_id("gpusnap://job")
    assert not gdcp.StorageReader.validate_checkpoint_id("/tmp/ckpt")
    assert gdcp.parse_checkpoint_id("gpusnap://a/b/4") == ("a/b", 4)
    assert gdcp.parse_checkpoint_id("gpusnap://run") == ("run", None)
    w = writer(daemon, "ignored")
    dcp.save({"x": torch.ones(3)}, storage_writer=w, checkpoint_id="gpusnap://ids/5")
    assert (w.job, w.last_step) == ("ids", 5)
    target = {"x": torch.zeros(3)}
    dcp.load(target, storage_reader=reader(daemon, "other"), checkpoint_id="gpusnap://ids/5")
    assert bool((target["x"] == 1).all())


def test_a_missing_step_raises_not_found(daemon):
    target = {"x": torch.zeros(2)}
    # No checkpoint of the job at all: read_metadata raises NotFound, and
    # dcp.load raises DCP's CheckpointException with that NotFound in it
    # (DCP wraps every error a rank raises).
    with pytest.raises(gpusnap.NotFound, match="no complete checkpoint"):
        reader(daemon).read_metadata()
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=reader(daemon))
    assert isinstance(failure(info), gpusnap.NotFound)
    assert "no complete checkpoint" in str(failure(info))
    assert gdcp.latest_step("dcp", socket=daemon.socket) is None
    dcp.save({"x": torch.ones(2)}, storage_writer=writer(daemon))
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=reader(daemon, step=7))
    assert isinstance(failure(info), gpusnap.NotFound)
    assert "job 'dcp' has no step 7" in str(failure(info))
    assert bool((target["x"] == 0).all()), "a failed load wrote nothing"
    dcp.load(target, storage_reader=reader(daemon, step=1))
    assert bool((target["x"] == 1).all())


def test_saving_a_committed_step_again_is_refused(daemon):
    dcp.save({"x": torch.ones(2)}, storage_writer=writer(daemon, step=3))
    with pytest.raises(CheckpointException) as info:
        dcp.save({"x": torch.zeros(2)}, storage_writer=writer(daemon, step=3))
    exc = failure(info)
    assert isinstance(exc, gpusnap.Skipped) and "already committed" in str(exc)
    target = {"x": torch.zeros(2)}
    dcp.load(target, storage_reader=reader(daemon))
    assert bool((target["x"] == 1).all()), "the first save is untouched"


def test_a_snapshot_not_written_by_dcp_is_not_a_checkpoint(daemon):
    value = torch.ones(4)
    with gpusnap.Client("plain", socket=daemon.socket, rng=False) as snap:
        snap.register("w", value)
        snap.snapshot(1)
        snap.wait_committed(1)
    with pytest.raises(gpusnap.NotFound, match="not a gpusnap.dcp checkpoint"):
        reader(daemon, "plain").read_metadata()
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(4)}, storage_reader=reader(daemon, "plain"))
    assert isinstance(failure(info), gpusnap.NotFound)


def test_missing_keys_in_the_checkpoint_are_dcps_error(daemon):
    dcp.save({"x": torch.ones(2)}, storage_writer=writer(daemon))
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: y"):
        dcp.load({"x": torch.zeros(2), "y": torch.zeros(1)}, storage_reader=reader(daemon))


def test_item_names_escape_and_parse_back():
    def item(fqn: str, offsets: tuple[int, ...], size: tuple[int, ...]) -> WriteItem:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties

        return WriteItem(
            index=MetadataIndex(fqn, offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(size)),
                properties=TensorProperties(dtype=torch.float32, requires_grad=True),
                size=torch.Size((8, 4)),
            ),
        )

    cases = [
        ("model.layer.weight", ("model", "layer", "weight")),
        ("optim.state.fc.w.exp_avg", ("optim", "state", "fc.w", "exp_avg")),
        ("optim.param_groups.0.lr", ("optim", "param_groups", 0, "lr")),
        ("s.0", ("s", "0")),  # a string that reads as an int
        ("a/b%2F.c", ("a/b%2F.c",)),
        ("x..y", ("x", "", "y")),
    ]
    for fqn, path in cases:
        name = gdcp.item_name(item(fqn, (4, 0), (4, 4)), {fqn: path})
        assert name.count("/") == 4, name
        parsed = gdcp._parse_name(name)
        assert parsed is not None and (parsed.fqn, parsed.path) == (fqn, path), name
        assert (parsed.offsets, parsed.size, parsed.flags) == ((4, 0), (8, 4), "g")
        # Without DCP's flatten mapping: the fqn comes back, no mapping.
        parsed = gdcp._parse_name(gdcp.item_name(item(fqn, (0, 0), (8, 4))))
        assert parsed is not None and (parsed.fqn, parsed.path, parsed.flags) == (fqn, None, "ng")
    assert gdcp.item_name(item("optim.param_groups.0.lr", (0, 0), (8, 4)), {
        "optim.param_groups.0.lr": ("optim", "param_groups", 0, "lr")
    }) == "t/optim.param_groups.0.lr/0,0/8,4/g"
    with pytest.raises(gpusnap.InvalidSpec, match="over the 1024"):
        gdcp.item_name(item("x" * 1100, (0, 0), (8, 4)))


def test_a_reader_takes_a_step_complete_in_the_object_store_and_refuses_one_that_is_nowhere():
    def listing(
        ranks_at: dict[int, list[int]], complete: list[int], remote: list[int], error: str = ""
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "snapshots": [
                {
                    "job": "dcp",
                    "rank": r,
                    "world_size": 2,
                    "step": step,
                    "bytes": 1,
                    "tensors": 1,
                    "created_unix_ms": 0,
                }
                for step, ranks in ranks_at.items()
                for r in ranks
            ],
            "complete": [{"job": "dcp", "steps": complete}] if complete else [],
            "remote_complete": [{"job": "dcp", "steps": remote}] if remote else [],
        }
        if error:
            out["remote_error"] = error
        return out

    def resolve(got: dict[str, Any], step: int | None = None) -> tuple[int, int | None]:
        # No daemon: _resolve_step reads the listing alone.
        return gdcp.StorageReader("dcp", step, socket="/nonexistent")._resolve_step(got)

    # Step 6 is complete only remotely, 4 here: the newest is 6, and a node
    # without a rank of it cannot say its world size.
    assert resolve(listing({4: [0, 1]}, [4], [2, 6])) == (6, None)
    assert resolve(listing({4: [0, 1]}, [4], [2, 6]), step=4) == (4, 2)
    # Only rank 0 is here for step 6: rank 1's restore downloads it.
    assert resolve(listing({4: [0, 1], 6: [0]}, [4], [6])) == (6, 2)
    assert resolve(listing({}, [], [2]), step=2) == (2, None)
    # Neither complete here nor remotely: refused, as before.
    with pytest.raises(gpusnap.NotFound, match="step 6 is not complete: rank.s. .1. of 2"):
        resolve(listing({4: [0, 1], 6: [0]}, [4], [2]), step=6)
    with pytest.raises(gpusnap.NotFound, match="has no step 7"):
        resolve(listing({4: [0, 1]}, [4], [2]), step=7)
    with pytest.raises(gpusnap.NotFound, match="could not be listed: timed out"):
        resolve(listing({6: [0]}, [], [], error="timed out"))
    assert gdcp._complete_steps(listing({4: [0, 1]}, [4], [2, 6]), "dcp") == [2, 4, 6]


def test_bytes_items_carry_what_dcp_serialized(daemon):
    # A list of no tensors is one item to DCP (a dict would be flattened).
    obj = ["x" * 5000, (1, 2.5, None), b"\x00\xff" * 100, {3, 4}]
    dcp.save({"obj": obj, "empty": "", "i": 0}, storage_writer=writer(daemon))
    target = {"obj": None, "empty": None, "i": None}
    dcp.load(target, storage_reader=reader(daemon))
    assert target == {"obj": obj, "empty": "", "i": 0}


def test_tied_and_overlapping_tensors_save_and_load(daemon):
    emb = nn.Embedding(16, 8)
    head = nn.Linear(8, 16, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    base = torch.arange(32, dtype=torch.float32)
    state = {"model": model.state_dict(), "whole": base, "half": base[8:24]}
    dcp.save(state, storage_writer=writer(daemon))
    fresh = nn.ModuleDict({"emb": nn.Embedding(16, 8), "head": nn.Linear(8, 16, bias=False)})
    target = {"model": fresh.state_dict(), "whole": torch.zeros(32), "half": torch.zeros(16)}
    dcp.load(target, storage_reader=reader(daemon))
    assert torch.equal(target["model"]["emb.weight"], emb.weight.detach())
    assert torch.equal(target["model"]["head.weight"], emb.weight.detach())
    assert torch.equal(target["whole"], base)
    assert torch.equal(target["half"], base[8:24])


def hold_rank(daemon: Any, job: str, rank: int = 0) -> Any:
    """A connection that registers (job, rank), as a trainer would."""
    held = torch.zeros(4)
    c = _native.Client(job, socket=str(daemon.socket), rank=rank, world_size=1)
    c.register("held", "F32", [4], held.data_ptr(), 16, held)
    c.sync_registration()
    return c


def test_a_reader_waits_for_a_held_rank_up_to_its_bound(daemon):
    dcp.save({"x": torch.arange(3.0)}, storage_writer=writer(daemon))
    holder = hold_rank(daemon, "dcp")
    target = {"x": torch.zeros(3)}
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=reader(daemon, busy_timeout=0.3))
    assert isinstance(failure(info), gpusnap.Busy)
    assert "still busy after 0.3 s" in str(failure(info))
    release = threading.Timer(0.5, holder.close)
    release.start()
    try:
        dcp.load(target, storage_reader=reader(daemon, busy_timeout=30))
    finally:
        release.join()
    assert torch.equal(target["x"], torch.arange(3.0))


def test_a_writer_waits_for_a_held_rank(daemon):
    holder = hold_rank(daemon, "dcp")
    with pytest.raises(CheckpointException) as info:
        dcp.save({"x": torch.ones(2)}, storage_writer=writer(daemon, busy_timeout=0.2))
    assert isinstance(failure(info), gpusnap.Busy)
    release = threading.Timer(0.5, holder.close)
    release.start()
    try:
        w = writer(daemon, busy_timeout=30)
        dcp.save({"x": torch.ones(2)}, storage_writer=w)
    finally:
        release.join()
    assert w.last_step == 1


def test_cached_save_plans_are_refused(daemon):
    state = {"x": torch.ones(2)}
    try:
        planner = DefaultSavePlanner(enable_plan_caching=True)
        dcp.save(state, storage_writer=writer(daemon), planner=planner)
        # The second save's cached plan would carry the first save's step.
        with pytest.raises(CheckpointException) as info:
            dcp.save(
                state,
                storage_writer=writer(daemon),
                planner=DefaultSavePlanner(enable_plan_caching=True),
            )
        assert isinstance(failure(info), ValueError)
        assert "plan caching" in str(failure(info))
    finally:
        for cache in ("_cached_save_plan", "_cached_all_plans", "_cached_global_plan",
                      "_cached_metadata", "_cached_final_save_plan"):
            getattr(SavePlanner, cache, {}).clear()


# ---- two ranks over gloo ----


def _two_ranks(rank: int, init_file: str, socket: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        full = torch.arange(32.0).reshape(8, 4)
        rows = distribute_tensor(full.clone(), mesh, [Shard(0)])
        cols = distribute_tensor(full.clone() * 2, mesh, [Shard(1)])
        state = {
            # Plain tensors every rank holds: DCP saves each one once, on a
            # rank its planner picks.
            "rep": {f"r{i}": torch.full((3,), float(i)) for i in range(4)},
            "rows": rows,
            "cols": cols,
            "meta": {"epoch": 4},
        }
        w = gdcp.StorageWriter("two", socket=socket)
        saved = dcp.save(state, storage_writer=w)
        assert w.last_step == 1
        md = gdcp.StorageReader("two", socket=socket).read_metadata()
        assert md.state_dict_metadata == saved.state_dict_metadata
        assert md.planner_data == saved.planner_data

        # Load back: the plain tensors on every rank (each reads what the
        # other rank saved), and the sharded ones into another layout: rows
        # replicated (every chunk, from both ranks), cols re-sharded by row.
        target = {
            "rep": {f"r{i}": torch.zeros(3) for i in range(4)},
            "rows": distribute_tensor(torch.zeros(8, 4), mesh, [Replicate()]),
            "cols": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]),
            "meta": {"epoch": 0},
        }
        r = gdcp.StorageReader("two", socket=socket)
        dcp.load(target, storage_reader=r)
        assert r.loaded_step == 1
        for i in range(4):
            assert torch.equal(target["rep"][f"r{i}"], torch.full((3,), float(i))), i
        assert torch.equal(target["rows"].to_local(), full)
        assert torch.equal(target["cols"].full_tensor(), full * 2)
        assert torch.equal(target["cols"].to_local(), (full * 2)[4 * rank : 4 * rank + 4])
        assert target["meta"] == {"epoch": 4}

        # Without collectives every rank plans alone and saves all it holds
        # (the plain tensors on both ranks): copies a load reads once.
        try:
            dcp.save(
                state,
                storage_writer=gdcp.StorageWriter("two", socket=socket),
                use_collectives=False,
            )
        except ValueError as e:
            assert "pass step= explicitly" in str(e), e
        else:
            raise AssertionError("ranks planning alone guessed a step")
        w = gdcp.StorageWriter("two", step=2, socket=socket)
        dcp.save(state, storage_writer=w, use_collectives=False)
        target = {
            "rep": {f"r{i}": torch.zeros(3) for i in range(4)},
            "rows": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]),
            "cols": distribute_tensor(torch.zeros(8, 4), mesh, [Replicate()]),
            "meta": {"epoch": 0},
        }
        dcp.load(target, storage_reader=gdcp.StorageReader("two", socket=socket))
        for i in range(4):
            assert torch.equal(target["rep"][f"r{i}"], torch.full((3,), float(i))), i
        assert torch.equal(target["rows"].full_tensor(), full)
        assert torch.equal(target["cols"].to_local(), full * 2)
        assert target["meta"] == {"epoch": 4}
        # async_save with the writer as stager: each rank captures what it
        # holds (the plain tensors on both ranks, DCP's dedup then gives
        # each to one rank) and the trainer changes its tensors at once.
        try:
            dcp.async_save(state, storage_writer=gdcp.StorageWriter("two", socket=socket))
        except ValueError as e:
            assert "pass step= to the writer" in str(e), e
        else:
            raise AssertionError("ranks staging alone guessed a step")
        done = dcp.async_save(state, storage_writer=gdcp.StorageWriter("two", 3, socket=socket))
        for t in state["rep"].values():
            t.fill_(-1.0)
        rows.to_local().fill_(-1.0)
        done.result(timeout=120)
        for i in range(4):
            state["rep"][f"r{i}"].fill_(float(i))
        target = {
            "rep": {f"r{i}": torch.zeros(3) for i in range(4)},
            "rows": distribute_tensor(torch.zeros(8, 4), mesh, [Replicate()]),
            "cols": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]),
            "meta": {"epoch": 0},
        }
        r = gdcp.StorageReader("two", socket=socket)
        dcp.load(target, storage_reader=r)
        assert r.loaded_step == 3 and r.world_size == 2
        for i in range(4):
            assert torch.equal(target["rep"][f"r{i}"], torch.full((3,), float(i))), i
        assert torch.equal(target["rows"].to_local(), full)
        assert torch.equal(target["cols"].full_tensor(), full * 2)
        assert target["meta"] == {"epoch": 4}
        c = _native.Client("two", socket=socket)
        try:
            listing = c.list()
            tables = {
                k: sorted(t["name"] for t in c.describe(1, rank=k)["tensors"]) for k in range(2)
            }
            copies = {
                k: sorted(t["name"] for t in c.describe(2, rank=k)["tensors"]) for k in range(2)
            }
            assert all(f"t/rep.r{i}/0/3/" in copies[k] for i in range(4) for k in range(2))
        finally:
            c.close()
        Path(out_dir, f"rank{rank}").write_text(repr((listing["complete"], tables)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_save_shards_and_read_each_others_snapshots(daemon, tmp_path):
    """Two processes: DTensor shards and replicated plain tensors saved
    once, loaded back into other layouts (every rank reads the other's
    snapshot); then a save without collectives (replicas on both ranks)."""
    mp = pytest.importorskip("torch.multiprocessing")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(
        _two_ranks,
        args=(str(tmp_path / "init"), str(daemon.socket), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    complete, tables = eval((tmp_path / "rank0").read_text())  # noqa: S307 - our own repr
    assert complete == [{"job": "two", "steps": [1, 2, 3]}]
    # Each rank saved its own shards; the plain tensors are spread over
    # the ranks, each saved once.
    rep = [n for k in tables for n in tables[k] if n.startswith("t/rep.")]
    assert sorted(rep) == sorted(f"t/rep.r{i}/0/3/" for i in range(4))
    assert "t/rows/0,0/8,4/" in tables[0] and "t/rows/4,0/8,4/" in tables[1]
    assert "t/cols/0,0/8,4/" in tables[0] and "t/cols/0,2/8,4/" in tables[1]
    assert all("dcp/1" in t for t in tables.values())

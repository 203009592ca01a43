"""Which step a restore picks (the agreement's candidates, with the remote
tier's steps) and what a restore reports: pure functions, no daemon."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import gpusnap
from gpusnap import _agree


def listing(
    snapshots: list[tuple[str, int, int]],
    complete: dict[str, list[int]],
    remote_complete: dict[str, list[int]] | None = None,
    remote_error: str | None = None,
) -> dict[str, Any]:
    """A listing as the native client gives it: snapshots (job, rank,
    step) of a world of 2."""
    out: dict[str, Any] = {
        "snapshots": [
            {
                "job": job,
                "rank": rank,
                "world_size": 2,
                "step": step,
                "bytes": 1,
                "tensors": 1,
                "created_unix_ms": 0,
            }
            for job, rank, step in snapshots
        ],
        "complete": [{"job": j, "steps": s} for j, s in complete.items()],
        "remote_complete": [{"job": j, "steps": s} for j, s in (remote_complete or {}).items()],
    }
    if remote_error is not None:
        out["remote_error"] = remote_error
    return out


def test_a_step_complete_in_the_object_store_is_complete_and_every_ranks_own():
    got = listing(
        [("j", 0, 2), ("j", 1, 2), ("j", 0, 4), ("other", 0, 9)],
        {"j": [2], "other": [9]},
        {"j": [1, 6], "other": [12]},
    )
    assert _agree.local_complete_steps(got, "j") == [2]
    assert _agree.remote_complete_steps(got, "j") == [1, 6]
    assert _agree.complete_steps(got, "j") == [1, 2, 6]
    # Rank 0 committed 2 and 4 here; rank 1 only 2: both can restore 1 and 6.
    assert _agree.own_steps(got, "j", 0) == [1, 2, 4, 6]
    assert _agree.own_steps(got, "j", 1) == [1, 2, 6]
    # Without torch.distributed: the newest complete step, the remote one.
    own, complete = _agree.own_steps(got, "j", 0), _agree.complete_steps(got, "j")
    assert _agree.newest_common_step(own, complete) == 6


def test_without_the_remote_tier_only_local_steps_count():
    # A listing of an older daemon (no remote_complete) or one whose object
    # store could not be listed (remote_error, no remote steps).
    old = listing([("j", 0, 2), ("j", 1, 2)], {"j": [2]})
    del old["remote_complete"]
    unlisted = listing([("j", 0, 2), ("j", 1, 2)], {"j": [2]}, remote_error="timed out")
    for got in (old, unlisted):
        assert _agree.remote_complete_steps(got, "j") == []
        assert _agree.complete_steps(got, "j") == [2]
        assert _agree.own_steps(got, "j", 1) == [2]
    assert _agree.complete_steps(listing([], {}), "j") == []
    assert _agree.newest_common_step([], []) is None


def test_ranks_on_two_nodes_agree_on_a_step_only_the_object_store_has_for_one(monkeypatch):
    # Rank 0's node lost its store (a replaced node): it has only the
    # remote steps. Rank 1's node has its own 8, not uploaded yet.
    nodes = [
        listing([], {}, {"j": [4, 6]}),
        listing([("j", 1, 4), ("j", 1, 6), ("j", 1, 8)], {}, {"j": [4, 6]}),
    ]
    barrier = threading.Barrier(2)
    proposals: list[int] = [0, 0]
    rank_of: dict[int, int] = {}

    def all_reduce_min(_dist: Any, value: int) -> int:
        proposals[rank_of[threading.get_ident()]] = value
        barrier.wait()
        agreed = min(proposals)
        barrier.wait()
        return agreed

    monkeypatch.setattr(_agree, "_distributed", lambda: object())
    monkeypatch.setattr(_agree, "_all_reduce_min", all_reduce_min)
    results: list[int | None] = [None, None]

    def rank(r: int) -> None:
        rank_of[threading.get_ident()] = r
        got = nodes[r]
        results[r] = _agree.newest_common_step(
            _agree.own_steps(got, "j", r), _agree.complete_steps(got, "j")
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [6, 6]


def test_a_restore_reports_its_source_and_the_steps_it_walked_back_past():
    info = gpusnap.RestoreInfo._from_native(
        {
            "step": 6,
            "source": "remote",
            "bytes": 4096,
            "daemon_fill_s": 0.5,
            "copy_s": 0.25,
            "walked_back": [
                {"step": 8, "source": "disk", "reason": "checksum mismatch"},
                {"step": 7, "source": "remote", "reason": "manifest truncated"},
            ],
        }
    )
    assert info.source == "remote"
    assert info.walked_back == (
        gpusnap.WalkBack(8, "disk", "checksum mismatch"),
        gpusnap.WalkBack(7, "remote", "manifest truncated"),
    )
    plain = gpusnap.RestoreInfo._from_native(
        {"step": 2, "source": "memory", "bytes": 1, "daemon_fill_s": 0.0, "copy_s": 0.0}
    )
    assert plain.walked_back == ()


@pytest.mark.parametrize("name", ["RestoreInfo", "WalkBack"])
def test_the_restore_records_are_exported(name):
    assert name in gpusnap.__all__

"""Which step every rank of a job can restore.

The remote tier: a step the daemon lists as complete in the object store
(`remote_complete`: a COMPLETE marker naming every rank) is complete, and
it is one of every rank's own steps, whatever this node's store holds: a
restore of it downloads the rank's snapshot. So the complete steps are
those complete locally and those complete remotely (`complete_steps`),
and a rank's own steps are its committed steps and the remotely complete
ones (`own_steps`).

Without torch.distributed: the newest complete step of the job (every
rank of the job's world size committed it on this node's store, or it is
complete in the object store). With torch.distributed initialized and
more than one rank, ranks may live on different nodes, each with its own
daemon: each rank proposes its newest own step no newer than the
candidate, and an `all_reduce(MIN)` makes the smallest proposal the new
candidate, until a round changes nothing (every rank has the candidate). When every rank has
the newest common step, that is two all_reduce calls: one proposes, one
confirms. One alone is not enough when a rank skipped a step another has.
A rank that fails before it can propose (it cannot list its snapshots)
proposes FAILED, and every rank raises.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Mapping, NoReturn

from gpusnap._native import Error

NONE = -1
# What a rank that failed before agreeing proposes: every rank then raises
# instead of waiting in all_reduce for a rank that will never call it.
FAILED = -2


def _job_steps(entries: Iterable[Mapping[str, Any]], job: str) -> set[int]:
    return {int(s) for j in entries if j["job"] == job for s in j["steps"]}


def local_complete_steps(listing: Mapping[str, Any], job: str) -> list[int]:
    """The steps of `job` every rank committed on this node's store, oldest
    first."""
    return sorted(_job_steps(listing.get("complete", []), job))


def remote_complete_steps(listing: Mapping[str, Any], job: str) -> list[int]:
    """The steps of `job` complete in the object store, oldest first (none
    when the remote tier is off or could not be listed)."""
    return sorted(_job_steps(listing.get("remote_complete", []), job))


def complete_steps(listing: Mapping[str, Any], job: str) -> list[int]:
    """The steps of `job` a restore of every rank finds, oldest first:
    complete locally or in the object store."""
    return sorted(
        _job_steps(listing.get("complete", []), job)
        | _job_steps(listing.get("remote_complete", []), job)
    )


def own_steps(listing: Mapping[str, Any], job: str, rank: int) -> list[int]:
    """The steps rank `rank` of `job` can restore through this daemon,
    oldest first: its committed snapshots here, and the steps complete in
    the object store (the daemon downloads them)."""
    local = {
        int(s["step"])
        for s in listing.get("snapshots", [])
        if s["job"] == job and s["rank"] == rank
    }
    return sorted(local | _job_steps(listing.get("remote_complete", []), job))


def _distributed() -> Any | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _all_reduce_min(dist: Any, value: int) -> int:
    import torch

    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def fail(error: BaseException) -> NoReturn:
    """Raises `error`, after telling the other ranks (when there are any)
    that this one cannot take part in the agreement."""
    dist = _distributed()
    if dist is not None:
        _all_reduce_min(dist, FAILED)
    raise error


def newest_common_step(own_steps: Iterable[int], complete_steps: Iterable[int]) -> int | None:
    """The step to restore: `own_steps` are the steps this rank can
    restore (`own_steps`: its committed steps and those complete in the
    object store), `complete_steps` the ones the local daemon lists as
    complete, locally or remotely (`complete_steps`)."""
    dist = _distributed()
    if dist is None:
        steps = list(complete_steps)
        return max(steps) if steps else None
    own = sorted(set(own_steps))
    candidate = None
    while True:
        proposal = max((s for s in own if candidate is None or s <= candidate), default=NONE)
        agreed = _all_reduce_min(dist, proposal)
        if agreed == FAILED:
            raise Error(
                "another rank of the job failed before the ranks agreed on the step to "
                "restore (its own error says why)"
            )
        if agreed == NONE:
            return None
        if agreed == candidate:
            return agreed
        candidate = agreed

"""Which step every rank of a job can restore.

Without torch.distributed: the newest step the daemon lists as complete
for the job (every rank of the job's world size committed it on this
node's store). With torch.distributed initialized and more than one rank,
ranks may live on different nodes, each with its own daemon: each rank
proposes its newest committed step no newer than the candidate, and an
`all_reduce(MIN)` makes the smallest proposal the new candidate, until a
round changes nothing (every rank has the candidate). When every rank has
the newest common step, that is two all_reduce calls: one proposes, one
confirms. One alone is not enough when a rank skipped a step another has.
A rank that fails before it can propose (it cannot list its snapshots)
proposes FAILED, and every rank raises.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, NoReturn

from gpusnap._native import Error

NONE = -1
# What a rank that failed before agreeing proposes: every rank then raises
# instead of waiting in all_reduce for a rank that will never call it.
FAILED = -2


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
    """The step to restore: `own_steps` are this rank's committed steps,
    `complete_steps` the ones the local daemon lists as complete."""
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

"""One rank of a 2-rank gloo job, run by test_distributed.py.

Usage: dist_rank.py SOCKET INIT_FILE RANK STEPS [--rank1-fails]
Commits the comma-separated STEPS as this rank, then restores with a fresh
client and prints "restored <step>" (agreed over torch.distributed). With
--rank1-fails, rank 1's tensor is reallocated before the restore, which
fails there before the agreement; every rank prints "failed <Exception>".
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import gpusnap


def main() -> None:
    socket, init_file, rank, steps = sys.argv[1:5]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=int(rank), world_size=2)
    value = torch.zeros(16)
    with gpusnap.Client("dist", socket=socket) as snap:
        assert (snap.rank, snap.world_size) == (int(rank), 2)
        snap.register("w", value)
        for step in [int(s) for s in steps.split(",") if s]:
            value.fill_(step)
            snap.snapshot(step)
            snap.wait_committed(step)
    dist.barrier()
    value.zero_()
    fails = "--rank1-fails" in sys.argv and rank == "1"
    with gpusnap.Client("dist", socket=socket) as snap:
        snap.register("w", value)
        if fails:
            value.set_(torch.zeros(32))
        try:
            step = snap.restore()
        except gpusnap.Error as e:
            print(f"failed {type(e).__name__}", flush=True)
            dist.destroy_process_group()
            return
    assert step is None or bool((value == step).all()), (step, value)
    print(f"restored {step}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

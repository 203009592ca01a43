"""A small, deterministic CPU training run through gpusnap, run as its own
process by the tests (so that it can be SIGKILLed).

Usage: trainer.py SOCKET JOB STEPS EVERY OUT_DIR [--no-snapshots] [--pace=SECONDS]

Logs "step loss" per line to OUT_DIR/losses.txt (flushed each step) and,
at the end, saves the model, optimizer, scheduler and RNG state to
OUT_DIR/final.pt. A restarted run restores the newest snapshot and carries
on from the step after it. Snapshots overlap the next step's forward and
backward: captured after optimizer.step(), waited for before the next one.
A snapshot failure is logged and training goes on.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gpusnap


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 128),
        nn.LayerNorm(128),
        nn.ReLU(),
        nn.Linear(128, 8),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.9)
    return model, optimizer, scheduler


def main() -> None:
    socket, job, steps, every, out = sys.argv[1:6]
    snapshots = "--no-snapshots" not in sys.argv
    pace = next((float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--pace=")), 0.0)
    steps, every, out = int(steps), int(every), Path(out)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(1)
    np.random.seed(2)
    model, optimizer, scheduler = model_and_optimizer()
    torch.manual_seed(3)
    progress = {"samples": 0}

    snap = None
    start = 0
    if snapshots:
        snap = gpusnap.Client(job, socket=socket, connect_timeout=2.0)
        snap.register_module(model)
        snap.register_optimizer(optimizer)
        snap.register("scheduler", blob=scheduler)
        snap.register("progress", blob=progress)
        start = snap.restore() or 0
        print(f"trainer: starting after step {start}", flush=True)

    losses = open(out / "losses.txt", "a")
    handle = None
    for step in range(start + 1, steps + 1):
        # Data from every generator a real pipeline would use.
        x = torch.randn(16, 32) + float(np.random.rand()) + random.random()
        y = torch.randint(0, 8, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if handle is not None:
            try:
                handle.wait_captured()
            except gpusnap.Error as e:
                print(f"trainer: snapshot {handle.step} failed: {e}", flush=True)
            handle = None
        optimizer.step()
        scheduler.step()
        progress["samples"] += 16
        losses.write(f"{step} {loss.item()!r}\n")
        losses.flush()
        time.sleep(pace)
        if snap is not None and step % every == 0:
            handle = snap.snapshot_begin(step)
    if handle is not None:
        try:
            handle.wait_captured()
        except gpusnap.Error as e:
            print(f"trainer: snapshot {handle.step} failed: {e}", flush=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": dict(progress),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state()[1].tolist(),
            "python_rng": random.getstate(),
        },
        out / "final.pt",
    )
    if snap is not None:
        snap.close()


if __name__ == "__main__":
    main()

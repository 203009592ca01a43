"""A small, deterministic training run through gpusnap, run as its own
process by the tests (so that it can be SIGKILLed).

Usage: trainer.py SOCKET JOB STEPS EVERY OUT_DIR [--no-snapshots] [--pace=SECONDS]
                  [--device=cpu|cuda] [--cuda-arrays]

--device=cuda trains on the GPU (parameters, buffers, optimizer state, data
and dropout on CUDA, so the CUDA generator's state matters). --cuda-arrays
also keeps a mirror of the parameters in CUDA device memory made with the
driver API (tests/_cuda.py: the driver double in CI), written after every
optimizer step and registered as a __cuda_array_interface__ object: it is
captured with the rest, restored, checked against the restored parameters,
and saved with the final state.

Logs "step loss" per line to OUT_DIR/losses.txt (flushed each step) and,
at the end, saves the model, optimizer, scheduler and RNG state to
OUT_DIR/final.pt. A restarted run restores the newest snapshot and carries
on from the step after it. Snapshots overlap the next step's forward and
backward: captured after optimizer.step(), waited for before the next one.
A snapshot failure is logged and training goes on.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

# Deterministic cuBLAS (torch.use_deterministic_algorithms on CUDA).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np
import torch
from torch import nn

import gpusnap


def model_and_optimizer(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, object]:
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
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.9)
    return model, optimizer, scheduler


def option(name: str, default: str) -> str:
    prefix = f"--{name}="
    return next((a.removeprefix(prefix) for a in sys.argv if a.startswith(prefix)), default)


class Mirror:
    """The parameters' bytes, kept in CUDA device memory as well."""

    def __init__(self, model: nn.Module) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _cuda import DeviceArray, driver

        self.model = model
        self.array = DeviceArray(driver(), (len(self.params_bytes()),), "|u1", self.params_bytes())

    def params_bytes(self) -> bytes:
        return b"".join(
            p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            for p in self.model.parameters()
        )

    def update(self) -> None:
        self.array.write(self.params_bytes())

    def check(self) -> None:
        if self.array.read() != self.params_bytes():
            raise SystemExit("trainer: the restored device mirror differs from the parameters")


def main() -> None:
    socket, job, steps, every, out = sys.argv[1:6]
    snapshots = "--no-snapshots" not in sys.argv
    pace = float(option("pace", "0"))
    device = torch.device(option("device", "cpu"))
    steps, every, out = int(steps), int(every), Path(out)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(1)
    np.random.seed(2)
    model, optimizer, scheduler = model_and_optimizer(device)
    torch.manual_seed(3)
    progress = {"samples": 0}
    mirror = Mirror(model) if "--cuda-arrays" in sys.argv else None

    snap = None
    start = 0
    if snapshots:
        snap = gpusnap.Client(job, socket=socket, connect_timeout=2.0)
        snap.register_module(model)
        snap.register_optimizer(optimizer)
        snap.register("scheduler", blob=scheduler)
        snap.register("progress", blob=progress)
        if mirror is not None:
            snap.register("mirror", mirror.array)
        start = snap.restore() or 0
        if mirror is not None and start:
            mirror.check()
        print(f"trainer: starting after step {start}", flush=True)

    losses = open(out / "losses.txt", "a")
    handle = None
    for step in range(start + 1, steps + 1):
        # Data from every generator a real pipeline would use.
        x = torch.randn(16, 32, device=device) + float(np.random.rand()) + random.random()
        y = torch.randint(0, 8, (16,), device=device)
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
        if mirror is not None:
            mirror.update()
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
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "mirror": mirror.array.read() if mirror is not None else None,
            "numpy_rng": np.random.get_state()[1].tolist(),
            "python_rng": random.getstate(),
        },
        out / "final.pt",
    )
    if snap is not None:
        snap.close()


if __name__ == "__main__":
    main()

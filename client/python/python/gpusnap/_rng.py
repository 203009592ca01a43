"""The random number generators a training step depends on, as one JSON
blob: Python's `random`, numpy's global generator (when numpy is loaded),
torch's CPU generator and every CUDA generator (when CUDA is initialized).
"""

from __future__ import annotations

import base64
import random
import sys
from typing import Any

from gpusnap._native import Corrupt

NAME = "gpusnap.rng"
# Python's MT state is ~6.4 KiB of JSON, numpy's ~7 KiB, torch's CPU state
# 5056 bytes (6.7 KiB in base64), each CUDA generator 16 bytes.
CAPACITY = 64 * 1024


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def capture() -> dict[str, Any]:
    state: dict[str, Any] = {}
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch_cpu"] = _b64(torch.get_rng_state().numpy().tobytes())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["torch_cuda"] = [
                _b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()
            ]
    return state


def restore(state: Any) -> None:
    if not isinstance(state, dict) or "python" not in state:
        raise Corrupt(f"{NAME}: the restored RNG state is not one gpusnap wrote")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch = sys.modules.get("torch")
    if torch is not None and "torch_cpu" in state:
        raw = base64.b64decode(state["torch_cpu"])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        cuda = state.get("torch_cuda")
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in cuda]
            )

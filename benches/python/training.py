"""The training figure of `benches/run python`: a real model's step time
snapshotted every step against the same model not snapshotted, on the same
device in the same run, and the host stall of each snapshot.

The model is a residual MLP (``depth`` blocks of LayerNorm, width -> 4 *
width, GELU, 4 * width -> width, plus a residual; a LayerNorm and a
1000-class head) trained with AdamW on fixed random data, float32,
``micro_batches`` forward and backward passes of ``batch`` rows per
optimizer step (gradient accumulation). What gpusnap captures is what a
checkpoint must hold: the parameters and AdamW's state after
``optimizer.step()`` (gradients are not registered).

The snapshotted loop is the overlapped one a trainer writes::

    opt.zero_grad(); loss = forward_backward(); loss.item()
    if handle: handle.wait_captured()     # before opt.step() changes the state
    opt.step(); handle = snap.snapshot_begin(step)

On CUDA tensors ``wait_captured()`` only makes the current stream wait for
the copies (the host never blocks), and the next step's forward and
backward run while the copies do. ``loss.item()`` every step (a trainer
logging its loss) keeps the host in step with the device in both loops, so
the stall measures gpusnap's own host time and not the host waiting for a
device it ran ahead of. Device synchronizations only at the ends of a run;
the per-step times are CUDA events on the trainer's stream (the host clock
on CPU).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SEED = 0x7472_6169
CLASSES = 1000
DATA_BATCHES = 2  # distinct micro-batches of input, cycled
WARMUP_STEPS = 3  # before registration: AdamW's state exists, kernels are chosen
BLOCKING_SNAPSHOTS = 3  # the copy, persist and blocking-stall figures
ROUNDS = 2  # not snapshotted, snapshotted; twice, interleaved
HOT_SETTLE_WAIT_S = 120.0

STEP_TIME_RATIO_TARGET = 1.05
STALL_TARGET_S = 0.001

CPU_CAVEAT = (
    "CPU figures: the model and its state are in host memory, so gpusnap's copies "
    "are memcpy on the client's threads and wait_captured() waits on the host for "
    "them, and the copies, the daemon's persist (CRCs, writes) and its hot copy share "
    "the machine's cores with the forward and backward passes. The targets (step-time "
    "ratio <= 1.05, stall < 1 ms) are for CUDA tensors, whose copies run on the copy "
    "engines while the device computes."
)


@dataclass(frozen=True)
class Shape:
    width: int
    depth: int
    batch: int  # rows per micro-batch
    micro_batches: int
    steps: int  # timed steps per run

    @property
    def rows_per_step(self) -> int:
        return self.batch * self.micro_batches


# Sized so that on an H100 the forward and backward passes (float32, about
# 18 M parameters, 131072 rows per step: roughly 0.3 s) take far longer
# than the device-to-host copy of the 213 MB state (under 20 ms at PCIe
# rates) and than its persist at 1 GB/s; on CPU small enough for CI.
DEFAULT_SHAPES = {
    "cuda": Shape(width=1024, depth=2, batch=16384, micro_batches=8, steps=16),
    "cpu": Shape(width=256, depth=2, batch=256, micro_batches=2, steps=8),
}


def shape_for(
    device: str,
    width: int | None = None,
    depth: int | None = None,
    batch: int | None = None,
    micro_batches: int | None = None,
    steps: int | None = None,
) -> Shape:
    """The device's default shape with any of its fields given instead."""
    d = DEFAULT_SHAPES[device]
    return Shape(
        width=width or d.width,
        depth=depth or d.depth,
        batch=batch or d.batch,
        micro_batches=micro_batches or d.micro_batches,
        steps=steps or d.steps,
    )


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------- gpusnap's waits


def wait_blocking(handle: Any) -> Any:
    """`wait_captured(blocking=True)`: the host waits for the copies and
    the daemon's acceptance and gets the CaptureInfo."""
    return handle.wait_captured(blocking=True)


def wait_hot(client: Any, job: str, step: int, log: Callable[[str], None]) -> float | None:
    """Seconds until the daemon's hot tier holds `step` of `job` and nothing
    is in flight; None when that does not happen in HOT_SETTLE_WAIT_S."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < HOT_SETTLE_WAIT_S:
        status = client.status()
        jobs: list[dict[str, Any]] = status.get("jobs", [])
        entry = next((j for j in jobs if j.get("job") == job), {})
        if entry.get("hot_step") == step and status.get("snapshots_in_flight") == 0:
            return time.monotonic() - t0
        time.sleep(0.01)
    log(f"warning: the hot copy of gpusnap step {step} did not show in {HOT_SETTLE_WAIT_S:.0f} s")
    return None


# ---------------------------------------------------------------- the model


def build_model(shape: Shape) -> torch.nn.Module:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up = nn.Linear(width, 4 * width)
            self.down = nn.Linear(4 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    layers: list[nn.Module] = [Block(shape.width) for _ in range(shape.depth)]
    layers += [nn.LayerNorm(shape.width), nn.Linear(shape.width, CLASSES)]
    return nn.Sequential(*layers)


class Trainer:
    """The model, AdamW, the data, and the optimizer steps taken so far
    (`steps`, which numbers the snapshots)."""

    def __init__(self, shape: Shape, device: str) -> None:
        import torch

        torch.manual_seed(SEED)
        self.shape = shape
        self.device = device
        self.model = build_model(shape).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(SEED)
        self.inputs = torch.randn(
            (DATA_BATCHES, shape.batch, shape.width), generator=gen, device=device
        )
        self.targets = torch.randint(
            CLASSES, (DATA_BATCHES, shape.batch), generator=gen, device=device
        )
        self.steps = 0

    def forward_backward(self) -> torch.Tensor:
        import torch

        loss = None
        for m in range(self.shape.micro_batches):
            i = m % DATA_BATCHES
            out = self.model(self.inputs[i])
            loss = torch.nn.functional.cross_entropy(out, self.targets[i])
            (loss / self.shape.micro_batches).backward()
        assert loss is not None
        return loss

    def optimizer_step(self) -> None:
        self.opt.step()
        self.steps += 1

    def step(self) -> float:
        """One whole step, untimed (warm-up, before a blocking snapshot)."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_backward().item()
        self.optimizer_step()
        return loss

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def state_bytes(self) -> int:
        """Parameters and the optimizer's state tensors: what a snapshot holds
        but the optimizer's scalars blob."""
        import torch

        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for per_param in self.opt.state.values():
            for value in per_param.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    def describe(self) -> dict[str, Any]:
        import torch

        s = self.shape
        return {
            "model": (
                f"residual MLP: {s.depth} blocks of LayerNorm, Linear({s.width}, "
                f"{4 * s.width}), GELU, Linear({4 * s.width}, {s.width}); LayerNorm, "
                f"Linear({s.width}, {CLASSES}); float32, AdamW(lr=1e-4), cross-entropy"
            ),
            "width": s.width,
            "depth": s.depth,
            "batch_rows": s.batch,
            "micro_batches": s.micro_batches,
            "rows_per_step": s.rows_per_step,
            "parameters": self.parameters(),
            "state_bytes": self.state_bytes(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }


# ---------------------------------------------------------------- the loop


class Clock:
    """Marks in the trainer's order: CUDA events on the current stream (read
    once the run is synchronized), or the host clock on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        if self.cuda:
            return float(a.elapsed_time(b)) / 1000.0
        return float(b - a)


@dataclass
class Run:
    """One timed run of `steps` steps."""

    snapshotted: bool
    steps: int
    wall_s: float = 0.0  # host clock, device synchronized at both ends
    step_s: list[float] = field(default_factory=list)  # the device's clock
    forward_backward_s: list[float] = field(default_factory=list)
    begin_s: list[float] = field(default_factory=list)  # host time in snapshot_begin
    wait_s: list[float] = field(default_factory=list)  # host time in wait_captured
    snapshot_steps: list[int] = field(default_factory=list)
    wait_returned: list[str] = field(default_factory=list)  # "None" or "CaptureInfo"
    skipped_at_wait: int = 0
    persist_s: list[float] = field(default_factory=list)
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    drain_s: float | None = None  # after the run, until its last snapshot is durable
    hot_copy_after_drain_s: float | None = None

    @property
    def stalls_s(self) -> list[float]:
        return [b + w for b, w in zip(self.begin_s, self.wait_s, strict=True)]


def train_run(trainer: Trainer, steps: int, client: Any = None) -> Run:
    """`steps` steps; with `client`, a snapshot of every step in the
    overlapped loop (module docstring)."""
    clock = Clock(trainer.device)
    run = Run(snapshotted=client is not None, steps=steps)
    marks: list[tuple[Any, Any]] = []
    pending: Any = None

    def finish_pending() -> None:
        nonlocal pending
        w0 = time.perf_counter()
        info = pending.wait_captured()
        run.wait_s.append(time.perf_counter() - w0)
        run.wait_returned.append("None" if info is None else type(info).__name__)
        if info is not None and info.skipped:
            run.skipped_at_wait += 1
        pending = None

    synchronize(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        start = clock.mark()
        trainer.opt.zero_grad(set_to_none=True)
        loss = trainer.forward_backward()
        forward_backward_end = clock.mark()
        loss.item()  # the trainer logs its loss
        if pending is not None:
            finish_pending()
        trainer.optimizer_step()
        if client is not None:
            b0 = time.perf_counter()
            pending = client.snapshot_begin(trainer.steps)
            run.begin_s.append(time.perf_counter() - b0)
            run.snapshot_steps.append(trainer.steps)
        marks.append((start, forward_backward_end))
    if pending is not None:
        finish_pending()
    end = clock.mark()
    synchronize(trainer.device)
    run.wall_s = time.perf_counter() - t0
    starts = [m[0] for m in marks] + [end]
    run.step_s = [clock.seconds(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    run.forward_backward_s = [clock.seconds(a, b) for a, b in marks]
    return run


def drain(client: Any, job: str, run: Run, log: Callable[[str], None]) -> None:
    """Waits until every snapshot of `run` is durable (or skipped, or
    failed), then for the daemon's hot copy of the last, so the next run
    starts on an idle daemon."""
    import gpusnap

    t0 = time.perf_counter()
    last = None
    for step in run.snapshot_steps:
        try:
            commit = client.wait_committed(step)
        except gpusnap.Skipped:
            run.skipped += 1
            continue
        except gpusnap.Error as e:
            run.failed.append(f"step {step}: {type(e).__name__}: {e}")
            continue
        run.persist_s.append(commit.persist_s)
        last = step
    run.drain_s = time.perf_counter() - t0
    if last is not None:
        run.hot_copy_after_drain_s = wait_hot(client, job, last, log)


def blocking_snapshots(
    client: Any, trainer: Trainer, job: str, count: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """`count` untimed steps, each followed by a blocking snapshot (the
    device synchronized first): the copy time (CaptureInfo.capture_s), the
    blocking stall, the persist."""
    rows = []
    for _ in range(count):
        trainer.step()
        synchronize(trainer.device)
        step = trainer.steps
        t0 = time.perf_counter()
        handle = client.snapshot_begin(step)
        info = wait_blocking(handle)
        t1 = time.perf_counter()
        if info.skipped:
            raise RuntimeError(f"gpusnap skipped the snapshot of step {step}: {info.reason}")
        commit = client.wait_committed(step)
        t2 = time.perf_counter()
        rows.append(
            {
                "step": step,
                "stall_s": t1 - t0,
                "capture_s": info.capture_s,
                "client_stall_s": info.stall_s,
                "captured_bytes": info.bytes,
                "persist_s": commit.persist_s,
                "durable_s": t2 - t0,
                "hot_copy_after_commit_s": wait_hot(client, job, step, log),
            }
        )
    return rows


# ---------------------------------------------------------------- the figure


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: with fewer than 100 values p99 is the largest."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def measure(
    trainer: Trainer,
    socket: Any,
    job: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Registers the warmed-up trainer with gpusnap (through the daemon at
    `socket`), takes the blocking snapshots, then ROUNDS rounds of a run
    not snapshotted and a run snapshotted every step; the figures."""
    import gpusnap

    steps = trainer.shape.steps
    figure: dict[str, Any] = {"device": trainer.device, **trainer.describe()}
    figure["steps_per_run"] = steps
    figure["rounds"] = ROUNDS
    client = gpusnap.Client(job, socket=socket, rng=False)
    available, reason = True, None
    blocking: list[dict[str, Any]] = []
    base: list[Run] = []
    snap: list[Run] = []
    try:
        t0 = time.perf_counter()
        try:
            client.register_module(trainer.model)
            client.register_optimizer(trainer.opt)
            client.prepare()
        except gpusnap.BackendUnavailable as e:
            available, reason = False, f"{type(e).__name__}: {e}"
            log(f"training: gpusnap unavailable: {reason}")
        figure["register_s"] = time.perf_counter() - t0 if available else None
        figure["registered_tensors"] = len(client.tensor_names) if available else None
        if available:
            log(f"training: {BLOCKING_SNAPSHOTS} blocking snapshots (copy and persist times)")
            blocking = blocking_snapshots(client, trainer, job, BLOCKING_SNAPSHOTS, log)
        for r in range(ROUNDS):
            log(f"training: round {r + 1} of {ROUNDS}: {steps} steps not snapshotted")
            base.append(train_run(trainer, steps))
            if available:
                log(f"training: round {r + 1} of {ROUNDS}: {steps} steps snapshotted every step")
                run = train_run(trainer, steps, client)
                drain(client, job, run, log)
                snap.append(run)
        figure["client_stats"] = asdict(client.stats)
    finally:
        client.close()
    figure["gpusnap_available"] = available
    figure["gpusnap_unavailable_reason"] = reason
    figure.update(figures(base, snap, blocking))
    if trainer.device == "cpu":
        figure["caveat"] = CPU_CAVEAT
    figure["blocking_snapshots"] = blocking
    figure["runs"] = [asdict(r) for r in base + snap]
    return figure


def figures(base: list[Run], snap: list[Run], blocking: list[dict[str, Any]]) -> dict[str, Any]:
    def per_step(runs: list[Run]) -> float | None:
        steps = sum(r.steps for r in runs)
        return sum(r.wall_s for r in runs) / steps if steps else None

    def joined(runs: list[Run], key: str) -> list[float]:
        return [v for r in runs for v in getattr(r, key)]

    base_step = per_step(base)
    snap_step = per_step(snap)
    stalls = joined(snap, "stalls_s")
    copy_s = median([b["capture_s"] for b in blocking if b["capture_s"] is not None])
    forward_backward_s = median(joined(base, "forward_backward_s"))
    persist = [b["persist_s"] for b in blocking] + joined(snap, "persist_s")
    persist_s = median(persist)
    step_ratio = ratio(snap_step, base_step)
    stall_p99 = percentile(stalls, 99)
    failed = [f for r in snap for f in r.failed]
    return {
        # The step time: host wall time of each run (device synchronized at
        # its ends) over its steps, both runs of each kind together.
        "step_s": base_step,
        "snapshotted_step_s": snap_step,
        "step_time_ratio": step_ratio,
        "step_time_ratio_target": STEP_TIME_RATIO_TARGET,
        "step_time_ratio_met": None if step_ratio is None else step_ratio <= STEP_TIME_RATIO_TARGET,
        # The same from the device's clock, per step.
        "step_median_s": median(joined(base, "step_s")),
        "snapshotted_step_median_s": median(joined(snap, "step_s")),
        "step_median_ratio": ratio(median(joined(snap, "step_s")), median(joined(base, "step_s"))),
        # The host stall per snapshot in overlapped use.
        "stall_p50_s": percentile(stalls, 50),
        "stall_p99_s": stall_p99,
        "stall_max_s": max(stalls) if stalls else None,
        "stall_target_s": STALL_TARGET_S,
        "stall_met": None if stall_p99 is None else stall_p99 < STALL_TARGET_S,
        "begin_p50_s": percentile(joined(snap, "begin_s"), 50),
        "begin_p99_s": percentile(joined(snap, "begin_s"), 99),
        "wait_captured_p50_s": percentile(joined(snap, "wait_s"), 50),
        "wait_captured_p99_s": percentile(joined(snap, "wait_s"), 99),
        "wait_captured_returned": sorted({v for r in snap for v in r.wait_returned}),
        "snapshots": len(stalls),
        "snapshots_committed": sum(len(r.persist_s) for r in snap),
        "snapshots_skipped": sum(r.skipped for r in snap),
        "snapshots_failed": failed,
        # The precondition of the ratio: forward and backward longer than
        # the copy (and the daemon persisting a snapshot within a step, or
        # policy "block" makes the next snapshot_begin wait for a slot).
        "forward_backward_median_s": forward_backward_s,
        "snapshotted_forward_backward_median_s": median(joined(snap, "forward_backward_s")),
        "copy_median_s": copy_s,
        "copy_vs_forward_backward": ratio(copy_s, forward_backward_s),
        "precondition_held": (
            None if copy_s is None or forward_backward_s is None else forward_backward_s > copy_s
        ),
        "persist_median_s": persist_s,
        "persist_kept_up": (
            None if persist_s is None or snap_step is None else persist_s <= snap_step
        ),
        # After a snapshotted run, until its last snapshot is durable: about
        # one persist when the daemon kept up, more when snapshots queued.
        "drain_median_s": median([r.drain_s for r in snap if r.drain_s is not None]),
        # Blocking use of the same state, for comparison.
        "blocking_stall_median_s": median([b["stall_s"] for b in blocking]),
        "blocking_durable_median_s": median([b["durable_s"] for b in blocking]),
        "captured_bytes": blocking[0]["captured_bytes"] if blocking else None,
    }


def lines(t: dict[str, Any]) -> list[str]:
    """The figure's lines in the report's table."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.3f} ms"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}x"

    def yes(v: bool | None) -> str:
        return "-" if v is None else ("yes" if v else "NO")

    out = [
        f"training ({t['device']}): {t['model']}; {t['parameters']:,} parameters, state "
        f"{t['state_bytes'] / 1e6:.1f} MB, {t['rows_per_step']} rows per step "
        f"({t['micro_batches']} x {t['batch_rows']}), {t['rounds']} x {t['steps_per_run']} "
        "steps each way",
        f"  step time: {ms(t['step_s'])} not snapshotted, {ms(t['snapshotted_step_s'])} "
        f"snapshotted every step: {x(t['step_time_ratio'])} (target <= "
        f"{t['step_time_ratio_target']}x: {yes(t['step_time_ratio_met'])}); device-clock "
        f"medians {ms(t['step_median_s'])} and {ms(t['snapshotted_step_median_s'])}",
        f"  host stall per snapshot (overlapped): p50 {ms(t['stall_p50_s'])}, p99 "
        f"{ms(t['stall_p99_s'])}, max {ms(t['stall_max_s'])} over {t['snapshots']} "
        f"(target < {ms(t['stall_target_s'])}: {yes(t['stall_met'])}); snapshot_begin p50 "
        f"{ms(t['begin_p50_s'])}, wait_captured p50 {ms(t['wait_captured_p50_s'])}",
        f"  precondition: forward+backward {ms(t['forward_backward_median_s'])} vs copy "
        f"{ms(t['copy_median_s'])} ({yes(t['precondition_held'])}); persist "
        f"{ms(t['persist_median_s'])} per snapshot (kept up with the steps: "
        f"{yes(t['persist_kept_up'])}; the last durable {ms(t['drain_median_s'])} after a "
        f"run's end); blocking stall {ms(t['blocking_stall_median_s'])}",
        f"  snapshots: {t['snapshots_committed']} committed, {t['snapshots_skipped']} "
        f"skipped, {len(t['snapshots_failed'])} failed",
    ]
    if not t["gpusnap_available"]:
        out.append(f"  gpusnap unavailable: {t['gpusnap_unavailable_reason']}")
    if t.get("caveat"):
        out.append(f"  {t['caveat']}")
    return out

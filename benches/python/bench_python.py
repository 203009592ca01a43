#!/usr/bin/env python3
"""`benches/run python`: a PyTorch trainer's checkpoint, three ways, on the
same model state in one run, and the step time of a real model snapshotted
every step against the same model not snapshotted.

* ``torch.save`` of the state dict to a file on the run's disk, then
  ``fsync`` of the file and its directory: the trainer waits for all of it
  (from CUDA tensors torch.save copies each storage to CPU memory first).
* ``torch.distributed.checkpoint.async_save`` (single process, no process
  group, ``FileSystemWriter``, which fsyncs): the trainer waits until
  ``async_save`` returns and its state is staged (on CPU the default stager
  copies it before returning; on CUDA DCP's ``DefaultStager`` with pinned
  memory stages it in the background and the harness waits for
  ``staging_completion``), and for the previous save's future when that is
  not done yet.
* gpusnap through a real ``gpusnapd`` started here on a private config: the
  trainer waits for ``snapshot_begin`` + ``wait_captured``. On CUDA tensors
  twice: overlapped (``wait_captured()`` makes the current stream wait for
  the copies and returns at once) and blocking
  (``wait_captured(blocking=True)``: the host waits for the copies).

For each: the stall per snapshot (the training loop blocked) and the time
until durable (from the start of the snapshot: torch.save + fsync; the
future's ``result()``; ``wait_committed``), medians over ``--snapshots``
rounds, each beside gpusnap's as a ratio. The rounds interleave the
methods, so a noisy machine moves them alike.

The training figure (on unless ``--no-training``): a residual MLP with
AdamW, ``--train-steps`` steps not snapshotted and the same number
snapshotted every step in the overlapped loop (``opt.step()``, then
``snapshot_begin(step)``; the next step's forward and backward run while the
copies do; ``wait_captured()`` right before the next ``opt.step()``), two
rounds of each interleaved: the step-time ratio, the host stall per
snapshot, and the copy time beside the forward and backward time (the
ratio's precondition).

Progress goes to stderr; with ``--json`` stdout holds one JSON object and the
table goes to stderr. Start it through ``benches/run python`` (it prepares
the torch environment and builds the daemon); see benches/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "testkit" / "python"))
import gpusnapd_testkit as testkit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # noqa: E402
from training import wait_blocking  # noqa: E402

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
F32_BYTES = 4

# The tensor set (like benches/src/tensors.rs, float32 only): about 60% of
# the tensors small (norms, biases: 1-16 KiB, at most 5% of the bytes), large
# ones (64-512 MiB) up to half the bytes, medium ones filling the rest.
SMALL_SHARE = 0.6
SMALL_BYTES_SHARE_MAX = 0.05
LARGE_BYTES_CYCLE = (256 * MIB, 512 * MIB, 64 * MIB, 128 * MIB)
PLAN_SEED = 0x6770_7573

# Memory the run holds at once, in copies of the state (CPU run): the
# trainer's tensors, the daemon's two staging slots, its hot tier, and the
# copy async_save's stager makes.
COPIES_CPU = 5
# On CUDA the host holds the daemon's two staging slots and its hot copy,
# async_save's pinned staged copy and torch.save's CPU copy.
COPIES_CUDA = 5
MEMORY_MARGIN = 1 * GIB
STAGING_BUDGET_COPIES = 3
HOT_TIER_SLACK = 64 * MIB
STREAM_RING_BYTES = 2 * MIB  # the smallest the daemon takes: two 1 MiB chunks

DAEMON_SHUTDOWN_DEADLINE_S = 120
SMOKE_SIZE = 64 * MIB
SMOKE_TENSORS = 30
SMOKE_TRAIN_STEPS = 3

MEMORY_CHOICE = (
    "staging.double = true with staging.budget_bytes = 3x the state (two slots of the "
    "state's size fit, the budget is a cap, not an allocation) and hot_tier.budget_bytes "
    "= the state + 64 MiB: the daemon holds three copies, the trainer one, and "
    "async_save's stager makes a fifth while it saves, 10 GiB at 2 GiB, within the VM's "
    "24 GiB. After each gpusnap commit the harness waits (untimed) until the daemon's hot "
    "copy of that step is made, so the daemon's background work does not overlap the "
    "next method's timing."
)


def log(message: str) -> None:
    print(f"bench-python: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments


def parse_size(text: str) -> int:
    """`2G`, `256M`, `64K`, `4096`; K/M/G/T are powers of 1024, a trailing
    `B` or `iB` is accepted (as benches/src/units.rs)."""
    t = text.strip()
    for suffix in ("iB", "ib", "B", "b"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    shifts = {"k": 10, "m": 20, "g": 30, "t": 40}
    shift = shifts.get(t[-1:].lower(), 0)
    digits = t[:-1] if shift else t
    try:
        n = int(digits.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size like 2G, 256M, 64K or 4096"
        ) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return n << shift


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n // size} {unit}" if n % size == 0 else f"{n / size:.2f} {unit}"
    return f"{n} B"


def default_gpusnapd() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "release" / "gpusnapd"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benches/run python",
        description=(
            "torch.save + fsync and torch.distributed.checkpoint.async_save against "
            "gpusnap (a real gpusnapd), on the same state in one run: the trainer's "
            "stall per snapshot and the time until durable, medians, as ratios to "
            "gpusnap's."
        ),
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("2G"),
        help="state size: float32 tensors totalling this (K, M, G are powers "
        "of 1024) [default: 2G]",
    )
    p.add_argument(
        "--snapshots", type=int, default=3, help="timed snapshots per method [default: 3]"
    )
    p.add_argument(
        "--tensors",
        type=int,
        default=200,
        help="how many tensors the state is cut into, of mixed sizes [default: 200]",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the state and the training figure's model live [default: cpu]",
    )
    p.add_argument(
        "--no-training",
        dest="training",
        action="store_false",
        help="leave out the training figure (a model's step time snapshotted every "
        "step vs not at all)",
    )
    p.add_argument(
        "--training-only",
        action="store_true",
        help="run only the training figure, not the three-way comparison",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check that the harness runs (CI): --size 64M --tensors 30 "
        "--snapshots 1 and 3 training steps per run; its figures mean nothing",
    )
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="timed training steps per run (two runs each way) [default: 16 on cuda, 8 on cpu]",
    )
    p.add_argument(
        "--train-width",
        type=int,
        default=None,
        help="the model's width; each block is width -> 4*width -> width "
        "[default: 1024 on cuda, 256 on cpu]",
    )
    p.add_argument(
        "--train-depth",
        type=int,
        default=None,
        help="residual MLP blocks [default: 2]",
    )
    p.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help="rows per micro-batch [default: 16384 on cuda, 256 on cpu]",
    )
    p.add_argument(
        "--train-micro-batches",
        type=int,
        default=None,
        help="forward and backward passes per optimizer step (gradient accumulation) "
        "[default: 8 on cuda, 2 on cpu]",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout (the table goes to stderr)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="run in a fresh directory under DIR [default: under /var/tmp]",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the run directory (checkpoints, daemon config and log)",
    )
    p.add_argument(
        "--gpusnapd",
        type=Path,
        default=None,
        help="the gpusnapd binary [default: the workspace's target/release/"
        "gpusnapd, which benches/run builds]",
    )
    p.add_argument(
        "--ignore-memory",
        action="store_true",
        help="run even when the copies of the state the run holds do not fit in MemAvailable",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.tensors, args.snapshots = SMOKE_SIZE, SMOKE_TENSORS, 1
        if args.train_steps is None:
            args.train_steps = SMOKE_TRAIN_STEPS
    if args.training_only and not args.training:
        p.error("--training-only and --no-training leave nothing to run")
    for flag in ("train_steps", "train_width", "train_depth", "train_batch", "train_micro_batches"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.snapshots < 1:
        p.error("--snapshots must be at least 1")
    if args.tensors < 3:
        p.error("--tensors must be at least 3 (small, medium and large ones)")
    if args.size < args.tensors * F32_BYTES * 2:
        p.error(f"--size {args.size} is too small for {args.tensors} tensors")
    if args.gpusnapd is None:
        args.gpusnapd = default_gpusnapd()
    return args


# ---------------------------------------------------------------- the state


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    elements: int

    @property
    def nbytes(self) -> int:
        return self.elements * F32_BYTES


def shape_of(elements: int) -> tuple[int, ...]:
    """1-D, or 2-D with the largest power of two up to 4096 dividing it as columns."""
    cols = 1
    while cols < 4096 and elements % (cols * 2) == 0:
        cols *= 2
    rows = elements // cols
    return (elements,) if rows <= 1 or cols == 1 else (rows, cols)


def large_sizes(total: int, cap: int) -> list[int]:
    """Large tensor byte sizes, cycling through LARGE_BYTES_CYCLE while they
    fit in half the total, at most `cap` of them."""
    sizes: list[int] = []
    used = 0
    added = True
    while added and len(sizes) < cap:
        added = False
        for size in LARGE_BYTES_CYCLE:
            if len(sizes) < cap and used + size <= total // 2:
                sizes.append(size)
                used += size
                added = True
    return sizes


def plan_tensors(size_bytes: int, count: int) -> list[TensorPlan]:
    """A deterministic set of `count` float32 tensors of mixed sizes whose
    bytes add up to `size_bytes` rounded down to 4."""
    rng = random.Random(PLAN_SEED)
    total = size_bytes // F32_BYTES
    small_n = max(1, int(count * SMALL_SHARE))
    large = [b // F32_BYTES for b in large_sizes(size_bytes, count - small_n - 1)]
    medium_n = count - small_n - len(large)
    small_cap = max(1, int(total * SMALL_BYTES_SHARE_MAX) // small_n)
    small = [min(rng.randint(4, 64) * 64, small_cap) for _ in range(small_n)]
    rest = total - sum(small) - sum(large)
    if rest < medium_n:
        raise ValueError(f"{size_bytes} bytes are too few for {count} tensors")
    weights = [rng.uniform(0.5, 1.5) for _ in range(medium_n)]
    # Whole rows of 1024 where they are big enough; the last takes the remainder.
    medium = [max(1, int(rest * w / sum(weights)) // 1024 * 1024 or 1) for w in weights]
    medium[-1] = rest - sum(medium[:-1])
    kinds = [("small", n) for n in small] + [("medium", n) for n in medium]
    kinds += [("large", n) for n in large]
    rng.shuffle(kinds)
    return [
        TensorPlan(f"layers.{i:03d}.{kind}", shape_of(n), n) for i, (kind, n) in enumerate(kinds)
    ]


def make_state(plan: list[TensorPlan], device: str) -> dict[str, torch.Tensor]:
    import torch

    gen = torch.Generator(device=device).manual_seed(PLAN_SEED)
    return {
        t.name: torch.rand(t.shape, generator=gen, dtype=torch.float32, device=device) for t in plan
    }


def mutate(state: dict[str, torch.Tensor], k: int) -> None:
    """Adds 1 to one element of every tensor (a different one each time),
    so every snapshot differs from the one before."""
    import torch

    with torch.no_grad():
        for t in state.values():
            flat = t.view(-1)
            flat[k % flat.numel()] += 1.0


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------- the machine


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        return None
    return None


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (from /proc/mounts)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


class CacheDropper:
    """Drops clean cached pages before each timed snapshot (root only), so
    every method starts with the same free memory; says once when it cannot."""

    def __init__(self) -> None:
        self.works = self._drop()
        if not self.works:
            log("warning: cannot drop the page cache (/proc/sys/vm/drop_caches; run as root)")

    @staticmethod
    def _drop() -> bool:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return True
        except OSError:
            return False

    def drop(self) -> None:
        if self.works:
            self._drop()
        else:
            os.sync()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class WorkDir:
    path: Path
    remove: bool

    @staticmethod
    def choose(base: Path | None, keep: bool) -> WorkDir:
        base = (base or Path("/var/tmp")).resolve()
        base.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="gpusnap-bench-python-", dir=base))
        work = WorkDir(path, remove=not keep)
        if fs_type(path) == "tmpfs":
            work.cleanup()
            raise SystemExit(
                f"bench-python: {base} is on tmpfs (memory): a disk cannot be measured "
                "there; pass --dir on a disk"
            )
        return work

    def cleanup(self) -> None:
        if self.remove:
            shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------- the daemon


class Daemon(testkit.DaemonProcess):
    """The benchmark's gpusnapd: its own config (below) in `workdir`, started
    by the shared launcher (testkit/python/gpusnapd_testkit.py, which fills
    in the socket, the metrics port and the store root and waits as
    testkit/defaults.toml says), stopped with SIGTERM (must exit 0), killed
    on error paths (`close`)."""

    def __init__(self, binary: Path, workdir: Path, size_bytes: int) -> None:
        config: testkit.Tables = {
            "daemon": {
                "socket_mode": "0600",
                "slot_wait_s": 600,
                "shutdown_deadline_s": DAEMON_SHUTDOWN_DEADLINE_S,
            },
            "store": {"keep_snapshots": 1},
            "staging": {
                "budget_bytes": STAGING_BUDGET_COPIES * size_bytes + 64 * MIB,
                "double": True,
                "policy": "block",
                "stream_ring_bytes": STREAM_RING_BYTES,
            },
            "hot_tier": {"budget_bytes": size_bytes + HOT_TIER_SLACK},
        }
        super().__init__(binary, workdir, config, testkit.load_defaults().waits)

    def start(self) -> Daemon:
        if not self.binary.is_file():
            raise RuntimeError(
                f"no gpusnapd at {self.binary}: build it (cargo build --release -p gpusnapd, "
                "as benches/run does) or pass --gpusnapd"
            )
        super().start()
        return self

    def stop_cleanly(self) -> None:
        """SIGTERM and wait; an exit other than 0 (or none in time) is an error."""
        rc = self.stop()
        if rc != 0:
            raise RuntimeError(f"gpusnapd exited with {rc} on SIGTERM; its log:\n{self.log_tail()}")


# ---------------------------------------------------------------- the methods


@dataclass
class Sample:
    """One snapshot of one method."""

    round: int
    stall_s: float
    durable_s: float
    extra: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    name: str

    def setup(self) -> None: ...

    def prepare(self) -> None: ...

    def snapshot(self, k: int) -> Sample: ...

    def close(self) -> None: ...


class TorchSave:
    """torch.save to one file per snapshot, then fsync of it and its
    directory; the previous file is removed (untimed) before the next. From
    CUDA tensors torch.save copies each storage to CPU memory itself (a
    synchronous copy); the device is synchronized before the clock stops."""

    name = "torch_save"

    def __init__(self, state: dict[str, torch.Tensor], workdir: Path, device: str) -> None:
        self.state = state
        self.dir = workdir / "torch_save"
        self.device = device
        self.previous: Path | None = None

    def setup(self) -> None:
        self.dir.mkdir()

    def prepare(self) -> None:
        if self.previous is not None:
            self.previous.unlink()
            self.previous = None

    def snapshot(self, k: int) -> Sample:
        import torch

        path = self.dir / f"step-{k:06d}.pt"
        t0 = time.monotonic()
        with open(path, "wb") as f:
            torch.save(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(self.dir)
        synchronize(self.device)
        t1 = time.monotonic()
        self.previous = path
        return Sample(k, t1 - t0, t1 - t0, {"file_bytes": path.stat().st_size})

    def close(self) -> None:
        pass


def _not_set_up(*args: object, **kwargs: object) -> Any:
    raise RuntimeError("the method was not set up")


# What the harness asks of DCP's DefaultStager on CUDA: pinned staging
# memory, staged on DCP's background thread and stream with non-blocking
# copies (DCP's own defaults), but not in shared memory (/dev/shm), which
# only a process-based checkpointer needs and which containers often cap.
DCP_STAGING_OPTIONS = {
    "use_pinned_memory": True,
    "use_shared_memory": False,
    "use_async_staging": True,
    "use_non_blocking_copy": True,
}


def dcp_stager(device: str) -> tuple[Any, str]:
    """The `async_stager` for async_save on `device` (None: async_save's
    default) and a description of it for the report. On CUDA: DCP's
    DefaultStager with StagingOptions (torch 2.9 and later); where that API
    is missing, BlockingAsyncStager(cache_staged_state_dict=True), DCP's
    older pinned stager; the description names which."""
    import torch
    from torch.distributed.checkpoint import state_dict_saver

    version = torch.__version__
    if device == "cpu":
        return None, (
            f"async_save's default stager (async_stager=None), torch {version}: a copy of "
            "the state into fresh CPU memory before async_save returns"
        )
    params = inspect.signature(state_dict_saver.async_save).parameters
    if "async_stager" not in params or "no_dist" not in params:
        raise RuntimeError(
            f"torch {version}: dcp.async_save takes neither async_stager nor no_dist "
            f"(it takes {', '.join(params)})"
        )
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        return BlockingAsyncStager(cache_staged_state_dict=True), (
            f"BlockingAsyncStager(cache_staged_state_dict=True), torch {version} (no "
            "DefaultStager/StagingOptions here): pinned CPU memory allocated on the first "
            "save and reused, staged before async_save returns"
        )
    fields = {f.name for f in dataclasses.fields(StagingOptions)}
    if "use_pinned_memory" not in fields:
        raise RuntimeError(
            f"torch {version}: StagingOptions has no use_pinned_memory (it has "
            f"{', '.join(sorted(fields))})"
        )
    options = {k: v for k, v in DCP_STAGING_OPTIONS.items() if k in fields}
    spelled = ", ".join(f"{k}={v}" for k, v in options.items())
    return DefaultStager(StagingOptions(**options)), (
        f"DefaultStager(StagingOptions({spelled})), torch {version}"
    )


class AsyncSave:
    """torch.distributed.checkpoint.async_save (thread executor,
    FileSystemWriter with sync_files), one checkpoint directory per
    snapshot; on CUDA with DCP's pinned DefaultStager (`dcp_stager`), one
    stager for every save, as a trainer keeps one."""

    name = "async_save"

    def __init__(self, state: dict[str, torch.Tensor], workdir: Path, device: str) -> None:
        self.state = state
        self.dir = workdir / "async_save"
        self.device = device
        self.pending: Future[Any] | None = None  # the previous save's future
        self.previous: Path | None = None
        self.async_save: Callable[..., Any] = _not_set_up
        self.stager: Any = None
        self.stager_description: str | None = None

    def setup(self) -> None:
        from torch.distributed.checkpoint.state_dict_saver import async_save

        self.async_save = async_save
        self.dir.mkdir()
        # It says so once per save: no process group, so a single process.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        self.stager, self.stager_description = dcp_stager(self.device)

    def prepare(self) -> None:
        if self.previous is not None and (self.pending is None or self.pending.done()):
            shutil.rmtree(self.previous)
            self.previous = None

    def snapshot(self, k: int) -> Sample:
        path = self.dir / f"step-{k:06d}"
        t0 = time.monotonic()
        previous_wait = 0.0
        if self.pending is not None and not self.pending.done():
            self.pending.result()
            previous_wait = time.monotonic() - t0
        kwargs: dict[str, Any] = {"checkpoint_id": str(path), "no_dist": True}
        if self.stager is not None:
            kwargs["async_stager"] = self.stager
        response = self.async_save(self.state, **kwargs)
        returned = time.monotonic()
        # A stager that stages before returning gives a plain future; one
        # staging in the background (DefaultStager with use_async_staging)
        # an AsyncSaveResponse: the state may not change before its
        # staging_completion.
        if isinstance(response, Future):
            future = response
        else:
            response.staging_completion.result()
            future = response.upload_completion
        t1 = time.monotonic()
        self.pending = future
        future.result()
        t2 = time.monotonic()
        self.previous = path
        return Sample(
            k,
            t1 - t0,
            t2 - t0,
            {
                "async_save_return_s": returned - t0 - previous_wait,
                "staging_wait_s": t1 - returned,
                "previous_wait_s": previous_wait,
                "checkpoint_bytes": dir_bytes(path),
            },
        )

    def close(self) -> None:
        if self.pending is not None:
            self.pending.result()
        if self.stager is not None and hasattr(self.stager, "close"):
            self.stager.close()


class Unavailable(Exception):
    """A method that cannot run here (gpusnap on CUDA tensors, before the
    Python package takes them)."""


class GpusnapSession:
    """The one gpusnap client of the comparison, with the state registered
    once (and prepared: staging set up and page-locked), shared by the
    overlapped and the blocking method; steps are numbered across both."""

    def __init__(self, state: dict[str, torch.Tensor], socket: Path, job: str) -> None:
        self.state = state
        self.socket = socket
        self.job = job
        self.client: Any = None
        self.register_s: float | None = None
        self.unavailable: Unavailable | None = None
        self.step = 0

    def setup(self) -> None:
        """Registers and prepares, the first time; raises Unavailable each
        time when the package cannot register the state."""
        if self.unavailable is not None:
            raise self.unavailable
        if self.client is not None:
            return
        import gpusnap

        client = gpusnap.Client(self.job, socket=self.socket, rng=False)
        t0 = time.monotonic()
        try:
            for name, t in self.state.items():
                client.register(name, t)
            # What a trainer's restore() does on a fresh start: the daemon
            # sets up staging now, not inside the first snapshot.
            client.prepare()
        except gpusnap.BackendUnavailable as e:
            client.close()
            self.unavailable = Unavailable(f"{type(e).__name__}: {e}")
            raise self.unavailable from e
        except BaseException:
            client.close()
            raise
        self.register_s = time.monotonic() - t0
        self.client = client

    def next_step(self) -> int:
        self.step += 1
        return self.step

    def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            client.close()


class Gpusnap:
    """gpusnap through the harness's gpusnapd: snapshot_begin + wait_captured
    is the stall, wait_committed the durable point. Overlapped
    (`overlapped=True`, CUDA): `wait_captured()` orders the current stream
    after the copies and returns at once. Blocking: `wait_captured(blocking=
    True)`, the host waits for the copies and the daemon's acceptance (on
    CPU tensors the only way: the copies are the host's). After each commit
    it waits (untimed) until the daemon's hot copy of the step is made."""

    def __init__(self, session: GpusnapSession, name: str, overlapped: bool) -> None:
        self.session = session
        self.name = name
        self.overlapped = overlapped

    def setup(self) -> None:
        self.session.setup()

    def prepare(self) -> None:
        pass

    def snapshot(self, k: int) -> Sample:
        client = self.session.client
        step = self.session.next_step()
        t0 = time.monotonic()
        handle = client.snapshot_begin(step)
        info = handle.wait_captured() if self.overlapped else wait_blocking(handle)
        t1 = time.monotonic()
        # Overlapped on CUDA tensors the wait returns None (nothing waited
        # for on the host); a CaptureInfo otherwise.
        if info is not None and info.skipped:
            raise RuntimeError(f"gpusnap skipped the snapshot of step {step}: {info.reason}")
        commit = client.wait_committed(step)
        t2 = time.monotonic()
        hot_s = training.wait_hot(client, self.session.job, step, log)
        return Sample(
            k,
            t1 - t0,
            t2 - t0,
            {
                "step": step,
                "overlapped": self.overlapped,
                "client_stall_s": None if info is None else info.stall_s,
                "capture_s": None if info is None else info.capture_s,
                "captured_bytes": None if info is None else info.bytes,
                "daemon_persist_s": commit.persist_s,
                "commit_bytes": commit.bytes,
                "hot_copy_after_commit_s": hot_s,
            },
        )

    def close(self) -> None:
        self.session.close()


# ---------------------------------------------------------------- the run


@dataclass
class MethodRun:
    name: str
    available: bool = True
    error: str | None = None
    unavailable_reason: str | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.available and self.error is None


def median_of(run: MethodRun, key: Callable[[Sample], float]) -> float | None:
    if not run.ok or not run.samples:
        return None
    return statistics.median(key(s) for s in run.samples)


def ratio(peer: float | None, ours: float | None) -> float | None:
    if peer is None or ours is None or ours <= 0:
        return None
    return peer / ours


def setup_method(method: Method, run: MethodRun) -> None:
    log(f"{method.name}: setting up")
    try:
        method.setup()
    except Unavailable as e:
        run.available = False
        run.unavailable_reason = str(e)
        log(f"{method.name}: unavailable: {e}")
    except Exception as e:  # noqa: BLE001 - recorded, the other methods still run
        run.error = f"setup: {type(e).__name__}: {e}"
        log(f"{method.name}: FAILED: {run.error}")


def timed_snapshot(
    method: Method,
    run: MethodRun,
    k: int,
    state: dict[str, torch.Tensor],
    device: str,
    cache: CacheDropper,
) -> None:
    """One snapshot of one method: mutate, drop the cache, time it."""
    method.prepare()
    mutate(state, k)
    synchronize(device)
    cache.drop()
    try:
        sample = method.snapshot(k)
    except Exception as e:  # noqa: BLE001 - recorded, the other methods still run
        run.error = f"snapshot {k}: {type(e).__name__}: {e}"
        log(f"{method.name}: FAILED: {run.error}")
        return
    run.samples.append(sample)
    log(
        f"  {method.name:<10} snapshot {k}: stall {sample.stall_s:.3f} s, "
        f"durable {sample.durable_s:.3f} s"
    )


def run_rounds(
    methods: list[Method],
    runs: dict[str, MethodRun],
    snapshots: int,
    state: dict[str, torch.Tensor],
    device: str,
    cache: CacheDropper,
) -> None:
    for k in range(1, snapshots + 1):
        log(f"round {k} of {snapshots}")
        for method in methods:
            run = runs[method.name]
            if run.ok:
                timed_snapshot(method, run, k, state, device, cache)


def close_method(method: Method, run: MethodRun, errors: list[str]) -> None:
    try:
        method.close()
    except Exception as e:  # noqa: BLE001 - reported, the others still close
        errors.append(f"{method.name}: close: {type(e).__name__}: {e}")


@dataclass
class Context:
    args: argparse.Namespace
    work: WorkDir
    plan: list[TensorPlan]
    cache: CacheDropper
    daemon: Daemon
    job: str
    errors: list[str] = field(default_factory=list)
    register_s: float | None = None
    async_save_stager: str | None = None


def check_memory(args: argparse.Namespace) -> int | None:
    """MemAvailable; exits when the copies of the state the run holds do not fit."""
    available = mem_available_bytes()
    copies = COPIES_CPU if args.device == "cpu" else COPIES_CUDA
    need = copies * args.size + MEMORY_MARGIN
    if available is not None and need > available and not args.ignore_memory:
        largest = max(0, (available - MEMORY_MARGIN) // copies)
        raise SystemExit(
            f"bench-python: {copies} copies of {human_bytes(args.size)} and "
            f"{human_bytes(MEMORY_MARGIN)} need {human_bytes(need)}, but MemAvailable is "
            f"{human_bytes(available)}: use --size {largest // MIB}M or less, or "
            "--ignore-memory"
        )
    return available


def gpusnap_methods(session: GpusnapSession, device: str) -> list[Method]:
    """gpusnap's methods: on CUDA tensors overlapped ("gpusnap") and
    blocking ("gpusnap_blocking"); on CPU tensors the one way there is, a
    blocking wait, as "gpusnap"."""
    if device == "cpu":
        return [Gpusnap(session, "gpusnap", overlapped=False)]
    return [
        Gpusnap(session, "gpusnap", overlapped=True),
        Gpusnap(session, "gpusnap_blocking", overlapped=False),
    ]


def measure(ctx: Context) -> dict[str, MethodRun]:
    """Builds the state, sets up the three methods, runs the rounds."""
    args = ctx.args
    log(
        f"building the state: {human_bytes(args.size)} in {len(ctx.plan)} float32 tensors "
        f"on {args.device}"
    )
    state = make_state(ctx.plan, args.device)
    synchronize(args.device)
    session = GpusnapSession(state, ctx.daemon.socket, ctx.job)
    async_save = AsyncSave(state, ctx.work.path, args.device)
    methods: list[Method] = [TorchSave(state, ctx.work.path, args.device), async_save]
    methods += gpusnap_methods(session, args.device)
    runs = {m.name: MethodRun(m.name) for m in methods}
    try:
        for m in methods:
            setup_method(m, runs[m.name])
        ctx.register_s = session.register_s
        ctx.async_save_stager = async_save.stager_description
        run_rounds(methods, runs, args.snapshots, state, args.device, ctx.cache)
    finally:
        for m in methods:
            close_method(m, runs[m.name], ctx.errors)
    return runs


def run_comparison(
    args: argparse.Namespace, work: WorkDir, plan: list[TensorPlan]
) -> tuple[Context, dict[str, MethodRun]]:
    """The three-way comparison on its own gpusnapd."""
    daemon = Daemon(args.gpusnapd.resolve(), work.path, sum(t.nbytes for t in plan))
    ctx = Context(
        args,
        work,
        plan,
        CacheDropper(),
        daemon,
        job=f"bench-python-{os.getpid()}-{int(time.time())}",
    )
    try:
        log(f"starting {daemon.binary}")
        daemon.start()
        try:
            runs = measure(ctx)
        finally:
            try:
                daemon.stop_cleanly()
            except RuntimeError as e:
                ctx.errors.append(str(e))
    finally:
        daemon.close()
    return ctx, runs


def run_training(args: argparse.Namespace, work: WorkDir, errors: list[str]) -> dict[str, Any]:
    """The training figure (training.py) on a gpusnapd of its own, sized for
    the model's state, in the run directory's `training/`."""
    shape = training.shape_for(
        args.device,
        width=args.train_width,
        depth=args.train_depth,
        batch=args.train_batch,
        micro_batches=args.train_micro_batches,
        steps=args.train_steps,
    )
    log(
        f"training: building the model on {args.device} ({shape.depth} blocks of width "
        f"{shape.width}, {shape.micro_batches} x {shape.batch} rows per step)"
    )
    trainer = training.Trainer(shape, args.device)
    for _ in range(training.WARMUP_STEPS):
        trainer.step()
    training.synchronize(args.device)
    # The state, and room for the optimizer's scalars blob.
    size = trainer.state_bytes() + MIB
    workdir = work.path / "training"
    workdir.mkdir()
    daemon = Daemon(args.gpusnapd.resolve(), workdir, size)
    try:
        log(f"training: starting {daemon.binary} (state {human_bytes(size)})")
        daemon.start()
        try:
            job = f"bench-python-training-{os.getpid()}-{int(time.time())}"
            figure = training.measure(trainer, daemon.socket, job, log)
        finally:
            try:
                daemon.stop_cleanly()
            except RuntimeError as e:
                errors.append(f"training: {e}")
    finally:
        daemon.close()
    figure["config"] = daemon.config
    errors.extend(f"training: snapshot {f}" for f in figure["snapshots_failed"])
    return figure


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench-python: --device cuda, but torch sees no CUDA device")
    mem_available = check_memory(args) if not args.training_only else mem_available_bytes()
    plan = plan_tensors(args.size, args.tensors)
    work = WorkDir.choose(args.dir, args.keep)
    started = time.monotonic()
    errors: list[str] = []
    ctx: Context | None = None
    runs: dict[str, MethodRun] = {}
    figure: dict[str, Any] | None = None
    try:
        log(f"run directory {work.path} ({fs_type(work.path)})")
        if not args.training_only:
            ctx, runs = run_comparison(args, work, plan)
        if args.training:
            try:
                figure = run_training(args, work, errors)
            except Exception as e:  # noqa: BLE001 - reported; the comparison stands
                errors.append(f"training: {type(e).__name__}: {e}")
                log(f"training: FAILED: {type(e).__name__}: {e}")
    finally:
        if args.keep:
            log(f"kept {work.path}")
        work.cleanup()
    wall_s = time.monotonic() - started
    if ctx is None:
        report = machine_fields(args, work, mem_available, wall_s)
        report["errors"] = errors
    else:
        report = build_report(ctx, runs, mem_available, wall_s)
        report["errors"] = report["errors"] + errors
    report["training"] = figure
    return report, table(report)


# ---------------------------------------------------------------- the report


def method_figures(run: MethodRun, size_bytes: int) -> dict[str, Any]:
    stall = median_of(run, lambda s: s.stall_s)
    durable = median_of(run, lambda s: s.durable_s)
    first = run.samples[0].stall_s if run.samples and run.samples[0].round == 1 else None
    return {
        "stall_s": stall,
        "first_stall_s": first,
        "stall_min_s": min((s.stall_s for s in run.samples), default=None) if run.ok else None,
        "durable_s": durable,
        "durable_MBps": size_bytes / durable / 1e6 if durable else None,
    }


def machine_fields(
    args: argparse.Namespace, work: WorkDir, mem_available: int | None, wall_s: float
) -> dict[str, Any]:
    """What every report says about the run and the machine."""
    import gpusnap
    import torch

    fields: dict[str, Any] = {"benchmark": "python", "device": args.device, "smoke": args.smoke}
    if args.device == "cuda":
        fields["gpu"] = torch.cuda.get_device_name()
        fields["cuda_version"] = torch.version.cuda
    fields.update(
        {
            "torch_version": torch.__version__,
            "gpusnap_version": gpusnap.__version__,
            "python_version": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": platform.node(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "mem_available_bytes": mem_available,
            "dir": str(work.path),
            "dir_fs": fs_type(work.path.parent),
            "gpusnapd": str(args.gpusnapd),
            "wall_s": wall_s,
        }
    )
    return fields


# The stall and durable ratios: each peer's median over ours ("gpusnap"; on
# CUDA also over "gpusnap_blocking", and the blocking figure over the
# overlapped one).
PEERS = ("torch_save", "async_save")


def build_report(
    ctx: Context, runs: dict[str, MethodRun], mem_available: int | None, wall_s: float
) -> dict[str, Any]:
    args = ctx.args
    size = sum(t.nbytes for t in ctx.plan)
    figures = {name: method_figures(r, size) for name, r in runs.items()}
    ours = [name for name in ("gpusnap", "gpusnap_blocking") if name in runs]
    report: dict[str, Any] = {"benchmark": "python", "device": args.device}
    for name in runs:
        for key, value in figures[name].items():
            report[f"{name}_{key}"] = value
    for base in ours:
        for peer in PEERS + (("gpusnap_blocking",) if base == "gpusnap" else ()):
            if peer not in runs:
                continue
            for what in ("stall", "durable"):
                report[f"{peer}_{what}_vs_{base}"] = ratio(
                    figures[peer][f"{what}_s"], figures[base][f"{what}_s"]
                )
    g = runs["gpusnap"]
    report["gpusnap_available"] = g.available
    report["gpusnap_unavailable_reason"] = g.unavailable_reason
    report["gpusnap_register_s"] = ctx.register_s
    report["gpusnap_overlapped"] = args.device == "cuda"
    for name in ours:
        for key in ("client_stall_s", "capture_s", "daemon_persist_s", "hot_copy_after_commit_s"):
            values = [s.extra[key] for s in runs[name].samples if s.extra.get(key) is not None]
            report[f"{name}_{key.removesuffix('_s')}_median_s"] = (
                statistics.median(values) if values else None
            )
    report["async_save_stager"] = ctx.async_save_stager
    errors = ctx.errors + [f"{r.name}: {r.error}" for r in runs.values() if r.error]
    kinds: dict[str, int] = {}
    for t in ctx.plan:
        kind = t.name.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    report.update(
        {
            "size_bytes": size,
            "tensors": len(ctx.plan),
            "tensor_kinds": kinds,
            "largest_tensor_bytes": max(t.nbytes for t in ctx.plan),
            "snapshots_requested": args.snapshots,
            "page_cache_dropped": ctx.cache.works,
            "config": ctx.daemon.config,
            "memory_choice": MEMORY_CHOICE,
        }
    )
    report.update(machine_fields(args, ctx.work, mem_available, wall_s))
    report["gpusnapd"] = str(ctx.daemon.binary)
    report.update(
        {
            "methods": {
                name: {
                    "available": r.available,
                    "error": r.error,
                    "unavailable_reason": r.unavailable_reason,
                    "snapshots": [dataclasses.asdict(s) for s in r.samples],
                }
                for name, r in runs.items()
            },
            "errors": errors,
        }
    )
    return report


METHOD_LABELS = (
    ("torch_save", "torch.save"),
    ("async_save", "async_save"),
    ("gpusnap", "gpusnap"),
    ("gpusnap_blocking", "gpusnap (blocking)"),
)


def table(r: dict[str, Any]) -> str:
    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f} s"

    def times(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    lines: list[str] = []
    if "size_bytes" in r:
        lines += comparison_lines(r, secs, times)
    else:
        lines.append(
            f"python benchmark, training figure only, on {r['device']}, torch "
            f"{r['torch_version']}, {r['dir']} on {r['host']} ({r['kernel']}), {r['date']}"
        )
    if r.get("training") is not None:
        lines += training.lines(r["training"])
    for e in r["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines) + "\n"


def comparison_lines(
    r: dict[str, Any], secs: Callable[[float | None], str], times: Callable[[float | None], str]
) -> list[str]:
    overlapped = r["gpusnap_overlapped"]
    w = 19 if "gpusnap_blocking_stall_s" in r else 12
    lines = [
        f"python benchmark: {human_bytes(r['size_bytes'])} in {r['tensors']} float32 tensors "
        f"on {r['device']}, {r['snapshots_requested']} snapshots per method, torch "
        f"{r['torch_version']}, {r['dir']} on {r['host']} ({r['kernel']}), {r['date']}",
        f"{'method':<{w}} {'stall (median)':>15} {'vs gpusnap':>11} "
        f"{'durable (median)':>17} {'vs gpusnap':>11} {'durable MB/s':>13}",
    ]
    for name, label in METHOD_LABELS:
        if f"{name}_stall_s" not in r:
            continue
        mbps = r[f"{name}_durable_MBps"]
        stall_ratio = 1.0 if name == "gpusnap" else r[f"{name}_stall_vs_gpusnap"]
        durable_ratio = 1.0 if name == "gpusnap" else r[f"{name}_durable_vs_gpusnap"]
        if r[f"{name}_stall_s"] is None:
            stall_ratio = durable_ratio = None
        lines.append(
            f"{label:<{w}} {secs(r[f'{name}_stall_s']):>15} {times(stall_ratio):>11} "
            f"{secs(r[f'{name}_durable_s']):>17} {times(durable_ratio):>11} "
            f"{'-' if mbps is None else f'{mbps:.1f}':>13}"
        )
    if overlapped:
        lines.append(
            f"gpusnap is overlapped use (wait_captured() orders the stream after the copies; "
            f"stall {ms(r['gpusnap_stall_s'])}); against the blocking use: torch.save "
            f"{times(r.get('torch_save_stall_vs_gpusnap_blocking'))}, async_save "
            f"{times(r.get('async_save_stall_vs_gpusnap_blocking'))} stall"
        )
    if r.get("async_save_stager"):
        lines.append(f"async_save stager: {r['async_save_stager']}")
    if r["gpusnap_first_stall_s"] is not None:
        hot = [
            s["extra"].get("hot_copy_after_commit_s") for s in r["methods"]["gpusnap"]["snapshots"]
        ]
        lines.append(
            f"gpusnap's first snapshot stalled {secs(r['gpusnap_first_stall_s'])} (staging "
            f"was set up by prepare(), in gpusnap_register_s); the daemon's hot copy took "
            f"{', '.join(secs(h) for h in hot)} after each commit (untimed)"
        )
    if not r["gpusnap_available"]:
        lines.append(f"gpusnap unavailable: {r['gpusnap_unavailable_reason']}")
    return lines


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.3f} ms"


# ---------------------------------------------------------------- main


def raise_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the daemon is stopped on the way out."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    try:
        report, text = run(args)
    except (RuntimeError, OSError, ValueError) as e:
        log(f"FAILED: {e}")
        return 1
    if args.json:
        sys.stderr.write(text)
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(text)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

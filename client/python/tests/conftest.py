"""Fixtures: a real gpusnapd on a private socket and store.

The daemons are started by gpusnapd-testkit's Python launcher
(testkit/python/gpusnapd_testkit.py) on the test defaults the Rust tests use
too (testkit/defaults.toml), plus each test's settings. The daemon binary is
$GPUSNAP_DAEMON, else the workspace's target/debug/gpusnapd (tests/run builds
it before pytest runs).

Root-only tests skip with a reason that starts with "needs root", tests of
CUDA arrays on a CUDA driver (the real one or the project's driver double)
with "needs a CUDA driver", tests of CUDA torch tensors with "needs a CUDA
GPU"; they follow the project's protocol (testkit/src/skip.rs): under
GPUSNAP_REQUIRE_ROOT=1, GPUSNAP_REQUIRE_CUDA=1 or GPUSNAP_REQUIRE_GPU=1
respectively such a skip is a failure; otherwise it is appended to
$GPUSNAP_SKIP_LOG as "<test id>\\t<reason>".
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent

sys.path.insert(0, str(REPO / "testkit" / "python"))
import gpusnapd_testkit as testkit  # noqa: E402

ROOT_SKIP_PREFIX = "needs root"
# A CUDA driver: the real one, or the project's driver double
# (tests/cuda-double) on LD_LIBRARY_PATH, as tests/run puts it.
CUDA_DRIVER_SKIP_PREFIX = "needs a CUDA driver"
# A real GPU with PyTorch's CUDA (tests/gpu-suite runs these).
CUDA_GPU_SKIP_PREFIX = "needs a CUDA GPU"


def daemon_binary() -> Path:
    path = Path(os.environ.get("GPUSNAP_DAEMON", REPO / "target" / "debug" / "gpusnapd"))
    if not path.exists():
        pytest.fail(f"no gpusnapd at {path}: run `cargo build -p gpusnapd` or set GPUSNAP_DAEMON")
    return path


class Daemon(testkit.DaemonProcess):
    """One gpusnapd on the test defaults plus `settings` (table -> key -> a
    TOML value as text), config and log in `workdir`, store in `workdir/store`."""

    def __init__(
        self, workdir: Path, settings: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        defaults = testkit.load_defaults()
        config = defaults.config
        testkit.apply_overrides(config, settings or {})
        super().__init__(daemon_binary(), workdir, config, defaults.waits)

    def snapshot_dirs(self, job: str, rank: int = 0) -> list[str]:
        d = self.root / job / str(rank)
        return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        d.start()
        yield d
    finally:
        d.close()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """A factory for daemons with extra settings: make_daemon({"staging": {...}})."""
    started: list[Daemon] = []

    def make(settings: Mapping[str, Mapping[str, str]] | None = None, name: str = "d") -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir()
        d = Daemon(workdir, settings)
        started.append(d)
        d.start()
        return d

    yield make
    for d in started:
        d.close()


def python_child(script: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The command line that runs `script` with this interpreter."""
    return [sys.executable, str(script), *args]


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


# Skip reasons that a run may forbid: the prefix, and the variable that
# turns such a skip into a failure when it is 1.
REQUIRED_SKIPS = {
    ROOT_SKIP_PREFIX: "GPUSNAP_REQUIRE_ROOT",
    CUDA_DRIVER_SKIP_PREFIX: "GPUSNAP_REQUIRE_CUDA",
    CUDA_GPU_SKIP_PREFIX: "GPUSNAP_REQUIRE_GPU",
}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skip for lack of root, of a CUDA driver or of a CUDA GPU fails
    under its GPUSNAP_REQUIRE_* = 1, and is logged to GPUSNAP_SKIP_LOG
    otherwise."""
    report: pytest.TestReport = yield
    if report.skipped:
        _required_skip(item, report)
    return report


def _required_skip(item: pytest.Item, report: pytest.TestReport) -> None:
    reason = _skip_reason(report)
    variable = next((v for p, v in REQUIRED_SKIPS.items() if reason.startswith(p)), None)
    if variable is None:
        return
    required = os.environ.get(variable, "")
    if required not in ("", "0", "1"):
        raise pytest.UsageError(f"{variable}={required!r}: set it to 1, or 0 (or leave it unset)")
    if required == "1":
        report.outcome = "failed"
        report.longrepr = f"{reason}, and {variable}=1 forbids skipping"
        return
    log = os.environ.get("GPUSNAP_SKIP_LOG")
    if log:
        line = f"{item.nodeid}\t{reason}".replace("\n", " ") + "\n"
        with open(log, "a", encoding="utf-8") as f:
            f.write(line)

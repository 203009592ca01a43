"""Fixtures: a real gpusnapd on a private socket and store.

The daemon binary is $GPUSNAP_DAEMON, else the workspace's
target/debug/gpusnapd (tests/run builds it before pytest runs).
"""

from __future__ import annotations

import os
import signal
import socket as socketlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def daemon_binary() -> Path:
    path = Path(os.environ.get("GPUSNAP_DAEMON", REPO / "target" / "debug" / "gpusnapd"))
    if not path.exists():
        pytest.fail(f"no gpusnapd at {path}: run `cargo build -p gpusnapd` or set GPUSNAP_DAEMON")
    return path


def free_port() -> int:
    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One gpusnapd process on a config of its own."""

    def __init__(self, workdir: Path, settings: dict[str, dict[str, str]] | None = None) -> None:
        self.dir = workdir
        self.socket = workdir / "gpusnapd.sock"
        self.root = workdir / "store"
        self.log_path = workdir / "gpusnapd.log"
        self.metrics = f"127.0.0.1:{free_port()}"
        tables: dict[str, dict[str, str]] = {
            "daemon": {
                "socket": f'"{self.socket}"',
                "socket_mode": '"0666"',
                "slot_wait_s": "60",
                "shutdown_deadline_s": "30",
            },
            "metrics": {"listen": f'"{self.metrics}"'},
            "store": {
                "root": f'"{self.root}"',
                "io_buffer_bytes": "262144",
                "io_pool_bytes": "8388608",
                "queue_depth": "16",
            },
            "staging": {"budget_bytes": '"1GiB"', "stream_ring_bytes": '"1MiB"'},
            "hot_tier": {"budget_bytes": '"512MiB"'},
        }
        for table, keys in (settings or {}).items():
            tables.setdefault(table, {}).update(keys)
        self.config = workdir / "gpusnapd.toml"
        self.config.write_text(
            "".join(
                f"[{t}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                for t, keys in tables.items()
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        assert self.proc is None, "already running"
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "NOTIFY_SOCKET")}
        env["RUST_LOG"] = "info"
        self.proc = subprocess.Popen(
            [str(daemon_binary()), "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
        deadline = time.monotonic() + 30
        while True:
            with socketlib.socket(socketlib.AF_UNIX) as s:
                try:
                    s.connect(str(self.socket))
                    return self
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpusnapd exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gpusnapd did not listen in time:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(60)
        self.proc = None
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(60)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def snapshot_dirs(self, job: str, rank: int = 0) -> list[str]:
        d = self.root / job / str(rank)
        return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        if d.proc is not None:
            d.kill()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator:
    """A factory for daemons with extra settings: make_daemon({"staging": {...}})."""
    started: list[Daemon] = []

    def make(settings: dict[str, dict[str, str]] | None = None, name: str = "d") -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir()
        d = Daemon(workdir, settings).start()
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None:
            d.kill()


def python_child(script: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The command line that runs `script` with this interpreter."""
    return [sys.executable, str(script), *args]

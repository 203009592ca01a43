"""The Python launcher on its own: the shared defaults, the config it writes,
and start/stop/kill/close against a fake gpusnapd (a script that listens on
the config's socket and obeys a [fake] table), so the paths the real daemon
never takes on purpose run too. tests/run runs these with the package tests."""

from __future__ import annotations

import os
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpusnapd_testkit as testkit  # noqa: E402

FAKE = textwrap.dedent(
    """\
    import os, signal, socket, sys, time, tomllib
    config = tomllib.load(open(sys.argv[2], "rb"))
    fake = config.get("fake", {})
    print(f"fake gpusnapd: pid {os.getpid()}", file=sys.stderr, flush=True)
    for name in ("RUST_LOG", "NOTIFY_SOCKET"):
        if name not in os.environ:
            print(f"fake gpusnapd: {name} unset", file=sys.stderr, flush=True)
    if "exit_at_start" in fake:
        print("fake gpusnapd: exiting at start", file=sys.stderr, flush=True)
        sys.exit(fake["exit_at_start"])
    if fake.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        code = fake.get("exit_on_sigterm", 0)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    path = config["daemon"]["socket"]
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen()
    print("fake gpusnapd: listening", file=sys.stderr, flush=True)
    while True:
        s.accept()[0].close()
    """
)


@pytest.fixture
def fake_binary(tmp_path: Path) -> Path:
    path = tmp_path / "fake-gpusnapd"
    path.write_text(f"#!{sys.executable}\n{FAKE}")
    path.chmod(0o755)
    return path


def fake_daemon(
    binary: Path, workdir: Path, deadline_s: int = 30, **fake: testkit.Value
) -> testkit.DaemonProcess:
    config = testkit.load_defaults().config
    config["daemon"]["shutdown_deadline_s"] = deadline_s
    testkit.apply_overrides(config, {"fake": {k: testkit.toml_value(v) for k, v in fake.items()}})
    waits = testkit.Waits(start_s=10, stop_grace_s=0.5, kill_s=10)
    return testkit.DaemonProcess(binary, workdir, config, waits)


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_defaults_are_the_committed_file_with_launcher_waits() -> None:
    d = testkit.load_defaults()
    raw = tomllib.loads(testkit.DEFAULTS_TOML.read_text())
    assert d.config == raw["config"]
    assert d.waits.start_s == raw["launcher"]["start_wait_s"]
    assert "socket" not in d.config["daemon"] and "metrics" not in d.config
    d.config["staging"]["budget_bytes"] = "1MiB"
    assert testkit.load_defaults().config["staging"]["budget_bytes"] == "2GiB", "a fresh copy"


def test_overrides_replace_and_add_keys_and_bad_values_name_their_key() -> None:
    config = testkit.load_defaults().config
    testkit.apply_overrides(
        config, {"staging": {"budget_bytes": '"4MiB"'}, "persist": {"concurrent_writes": "1"}}
    )
    assert config["staging"] == {"budget_bytes": "4MiB", "stream_ring_bytes": "1MiB"}
    assert config["persist"] == {"concurrent_writes": 1}
    with pytest.raises(ValueError, match="staging.budget_bytes = 4MiB"):
        testkit.apply_overrides(config, {"staging": {"budget_bytes": "4MiB"}})


def test_the_written_config_reads_back_as_the_same_tables() -> None:
    config: testkit.Tables = {
        "a": {"s": 'quote " back \\ tab \t nl \n del \x7f é', "i": -3, "f": 0.5, "b": True},
        "b": {"inf": float("inf")},
    }
    assert tomllib.loads(testkit.render(config)) == config


def test_a_deep_workdir_gets_a_short_socket_that_close_removes(
    tmp_path: Path, fake_binary: Path
) -> None:
    deep = tmp_path / ("d" * testkit.SOCKET_PATH_MAX)
    deep.mkdir()
    d = fake_daemon(fake_binary, deep)
    assert not d.socket.is_relative_to(deep)
    assert len(os.fsencode(d.socket)) <= testkit.SOCKET_PATH_MAX
    with d:
        d.start()
    assert d.proc is None
    assert not d.socket.parent.exists()


def test_start_waits_for_the_socket_and_stop_returns_the_exit_status(
    tmp_path: Path, fake_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUST_LOG", "trace")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nowhere")
    d = fake_daemon(fake_binary, tmp_path, exit_on_sigterm=3)
    written = tomllib.loads(d.config_path.read_text())
    assert written["daemon"]["socket"] == str(tmp_path / "gpusnapd.sock")
    assert written["store"]["root"] == str(tmp_path / "store")
    assert written["metrics"]["listen"] == d.metrics_addr
    with d:
        d.start()
        assert d.stop() == 3
        d.start()
        assert d.stop() == 3
    log = d.log()
    assert log.count("fake gpusnapd: listening") == 2
    assert log.count("RUST_LOG unset") == 2 and log.count("NOTIFY_SOCKET unset") == 2


def test_a_daemon_ignoring_sigterm_is_killed_after_the_deadline_and_grace(
    tmp_path: Path, fake_binary: Path
) -> None:
    d = fake_daemon(fake_binary, tmp_path, deadline_s=0, ignore_sigterm=True)
    assert d.stop_limit_s == 0.5
    with d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        t = time.monotonic()
        with pytest.raises(testkit.DaemonError, match="did not exit within"):
            d.stop()
        assert time.monotonic() - t >= 0.5
        assert d.proc is None and not exists(pid)


def test_a_daemon_exiting_at_start_is_an_error_carrying_its_log(
    tmp_path: Path, fake_binary: Path
) -> None:
    d = fake_daemon(fake_binary, tmp_path, exit_at_start=7)
    want = r"exited at start \(7\)[\s\S]*exiting at start"
    with d, pytest.raises(testkit.DaemonError, match=want):
        d.start()


def test_close_kills_a_daemon_still_running(tmp_path: Path, fake_binary: Path) -> None:
    d = fake_daemon(fake_binary, tmp_path, ignore_sigterm=True)
    d.start()
    assert d.proc is not None
    pid = d.proc.pid
    d.close()
    assert d.proc is None and not exists(pid)
    with pytest.raises(testkit.DaemonError, match="not running"):
        d.kill()


def test_samples_are_found_by_series_exactly() -> None:
    body = 'x{job="a"} 1.5\nx{job="ab"} 2 1700000000\n'
    assert testkit.sample(body, 'x{job="a"}') == 1.5
    assert testkit.sample(body, 'x{job="ab"}') == 2.0
    assert testkit.sample(body, "x") is None

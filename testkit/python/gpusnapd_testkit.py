"""The Python side of gpusnapd-testkit: the real gpusnapd as a child process.

The same launcher as the Rust crate (testkit/src), on the same
testkit/defaults.toml: the Python tests (client/python/tests/conftest.py)
start their daemons from its ``[config.*]`` tables plus single overrides
(table -> key -> a TOML value, as text), the Python benchmark
(benches/python/bench_python.py) from a whole config of its own; both wait
as its ``[launcher]`` table says.

A daemon's config and log go in its scratch directory; the launcher fills in
``daemon.socket`` (there, or in a fresh directory under /tmp when the path
would pass the 107 bytes of sockaddr_un), ``metrics.listen`` (a free
127.0.0.1 port) and ``store.root`` (``<dir>/store``) unless the config names
them. ``start`` waits until the socket accepts a connection; ``stop`` sends
SIGTERM and waits ``daemon.shutdown_deadline_s`` plus the stop grace, then
SIGKILLs; ``close`` (also on leaving a ``with`` block) kills a daemon still
running, so none is left behind.

Needs Python 3.11 or newer (tomllib).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket as socketlib
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

DEFAULTS_TOML = Path(__file__).resolve().parents[1] / "defaults.toml"
SOCKET_PATH_MAX = 107
POLL_S = 0.02
LOG_TAIL_LINES = 40
HTTP_TIMEOUT_S = 10.0
# systemd's socket activation and readiness protocol, and a log filter that
# would override the config's.
ENV_REMOVED = ("LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET", "RUST_LOG")

Value = str | int | float | bool
Tables = dict[str, dict[str, Value]]


@dataclass(frozen=True)
class Waits:
    """How long the launcher waits (``[launcher]`` of the defaults)."""

    start_s: float
    stop_grace_s: float
    kill_s: float


@dataclass(frozen=True)
class Defaults:
    config: Tables
    waits: Waits


class DaemonError(RuntimeError):
    """A daemon that could not be started, stopped or killed."""


def load_defaults(path: Path = DEFAULTS_TOML) -> Defaults:
    """testkit/defaults.toml: a fresh copy of the config tables, and the waits."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    unknown = set(data) - {"launcher", "config"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    launcher = data["launcher"]
    waits = Waits(
        start_s=float(launcher["start_wait_s"]),
        stop_grace_s=float(launcher["stop_grace_s"]),
        kill_s=float(launcher["kill_wait_s"]),
    )
    config: Tables = {}
    for table, keys in data["config"].items():
        if not isinstance(keys, dict):
            raise ValueError(f"{path}: [config.{table}] is not a table")
        config[table] = {k: _scalar(f"{table}.{k}", v) for k, v in keys.items()}
    return Defaults(config, waits)


def _scalar(name: str, value: object) -> Value:
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"{name}: {value!r} is not a string, number or boolean")


def apply_overrides(config: Tables, overrides: Mapping[str, Mapping[str, str]]) -> None:
    """Sets each ``overrides[table][key]``, a TOML value written as text
    (``'"1MiB"'``, ``"16"``, ``"true"``), adding tables that are new."""
    for table, keys in overrides.items():
        for key, text in keys.items():
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{table}.{key} = {text}: not a TOML value: {e}") from None
            config.setdefault(table, {})[key] = _scalar(f"{table}.{key}", value)


def toml_value(value: Value) -> str:
    """One value in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render(config: Tables) -> str:
    """The config file."""
    return "".join(
        f"[{table}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
        for table, keys in config.items()
    )


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def socket_path(workdir: Path) -> tuple[Path, Path | None]:
    """``workdir/gpusnapd.sock`` when it fits in sockaddr_un, else a socket
    in a fresh directory under /tmp (returned second, for removal)."""
    inside = workdir / "gpusnapd.sock"
    if len(os.fsencode(inside)) <= SOCKET_PATH_MAX:
        return inside, None
    short = Path(tempfile.mkdtemp(prefix="gpusnapd-sock-", dir="/tmp"))
    return short / "gpusnapd.sock", short


def sample(body: str, series: str) -> float | None:
    """The value of the sample ``name{labels}`` in a Prometheus text body."""
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line[len(series) + 1 :].split()[0])
    return None


def http_get(addr: str, path: str) -> tuple[int, str]:
    """A bare HTTP/1.1 GET on loopback: status and body."""
    host, _, port = addr.rpartition(":")
    with socketlib.create_connection((host, int(port)), timeout=HTTP_TIMEOUT_S) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks).decode("utf-8", errors="replace")
    head, sep, body = reply.partition("\r\n\r\n")
    words = head.split(None, 2)
    if not sep or len(words) < 2 or not words[0].startswith("HTTP/"):
        raise DaemonError(f"GET http://{addr}{path}: not an HTTP reply: {reply[:80]!r}")
    if "transfer-encoding: chunked" in head.lower():
        raise DaemonError(
            f"GET http://{addr}{path}: a chunked reply, which this client does not decode"
        )
    return int(words[1]), body


class DaemonProcess:
    """One gpusnapd on one config in ``workdir``, running or stopped."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        config: Tables,
        waits: Waits,
        name: str = "gpusnapd",
    ) -> None:
        self.binary = binary
        self.dir = workdir
        self.waits = waits
        self._short_socket_dir: Path | None = None
        daemon = config.setdefault("daemon", {})
        if "socket" not in daemon:
            socket, self._short_socket_dir = socket_path(workdir)
            daemon["socket"] = str(socket)
        config.setdefault("metrics", {}).setdefault("listen", f"127.0.0.1:{free_port()}")
        config.setdefault("store", {}).setdefault("root", str(workdir / "store"))
        deadline = daemon.get("shutdown_deadline_s")
        if not isinstance(deadline, int) or isinstance(deadline, bool) or deadline < 0:
            raise ValueError(
                f"daemon.shutdown_deadline_s = {deadline!r}: set it (seconds) to bound stop()"
            )
        self.config = config
        self.socket = Path(str(daemon["socket"]))
        self.metrics_addr = str(config["metrics"]["listen"])
        self.root = Path(str(config["store"]["root"]))
        self.stop_limit_s = deadline + waits.stop_grace_s
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.config_path.write_text(render(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        """Starts the binary (again, after stop or kill: same socket and
        root) and waits until its socket accepts a connection."""
        if self.proc is not None:
            raise DaemonError(f"gpusnapd is already running (pid {self.proc.pid})")
        if not self.binary.is_file():
            raise DaemonError(f"no gpusnapd at {self.binary}")
        env = {k: v for k, v in os.environ.items() if k not in ENV_REMOVED}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + self.waits.start_s
        while True:
            with socketlib.socket(socketlib.AF_UNIX) as s:
                try:
                    s.connect(str(self.socket))
                    return self
                except OSError:
                    pass
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise DaemonError(f"gpusnapd exited at start ({rc}); its log:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                self.kill()
                raise DaemonError(
                    f"gpusnapd did not listen on {self.socket} within {self.waits.start_s} s "
                    f"(killed); its log:\n{self.log_tail()}"
                )
            time.sleep(POLL_S)

    def stop(self) -> int:
        """SIGTERM, then the exit status (whatever it is: the caller judges
        it); no exit within the shutdown deadline and the grace: SIGKILL,
        reaped, and a DaemonError."""
        if self.proc is None:
            raise DaemonError("gpusnapd is not running")
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(self.stop_limit_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonError(
                f"gpusnapd did not exit within {self.stop_limit_s} s of SIGTERM (killed); "
                f"its log:\n{self.log_tail()}"
            ) from None
        self.proc = None
        return rc

    def kill(self) -> int:
        """SIGKILL and reap: the exit status (minus the signal number)."""
        if self.proc is None:
            raise DaemonError("gpusnapd is not running")
        self.proc.kill()
        try:
            rc = self.proc.wait(self.waits.kill_s)
        except subprocess.TimeoutExpired:
            raise DaemonError(
                f"gpusnapd (pid {self.proc.pid}) was not reaped within {self.waits.kill_s} s "
                "of SIGKILL"
            ) from None
        self.proc = None
        return rc

    def close(self) -> None:
        """Kills the daemon if it still runs and removes a socket directory
        made under /tmp."""
        try:
            if self.proc is not None:
                self.kill()
        finally:
            if self._short_socket_dir is not None:
                shutil.rmtree(self._short_socket_dir, ignore_errors=True)
                self._short_socket_dir = None

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def http_get(self, path: str) -> tuple[int, str]:
        return http_get(self.metrics_addr, path)

    def metrics(self) -> str:
        """The body of ``GET /metrics`` (another status than 200 is an error)."""
        status, body = self.http_get("/metrics")
        if status != 200:
            raise DaemonError(f"GET http://{self.metrics_addr}/metrics: status {status}")
        return body

    def metric(self, series: str) -> float | None:
        return sample(self.metrics(), series)


# -- A real S3 server: SeaweedFS, as testkit/src/s3.rs starts it ----------

S3_REGION = "us-east-1"
S3_ACCESS_KEY = "gpusnaptestadmin"
S3_SECRET_KEY = "gpusnap-test-secret-key"
S3_BUCKET = "gpusnap-test"
S3_READY_S = 60.0
REPO = Path(__file__).resolve().parents[2]


def weed_binary() -> Path:
    """tests/seaweedfs-install's ``weed`` (installed on first use)."""
    out = subprocess.run(
        [str(REPO / "tests" / "seaweedfs-install")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _sigv4_headers(method: str, url: str, body: bytes) -> dict[str, str]:
    """AWS Signature Version 4 headers for one path-style request (the
    tests' own requests: a bucket's creation, a probe object)."""
    import hashlib
    import hmac
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    now = time.gmtime()
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", now)
    day = amz_date[:8]
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            urllib.parse.quote(parts.path or "/"),
            parts.query,
            "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
            signed,
            payload,
        ]
    )
    scope = f"{day}/{S3_REGION}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )

    def mac(key: bytes, text: str) -> bytes:
        return hmac.new(key, text.encode(), hashlib.sha256).digest()

    key = mac(("AWS4" + S3_SECRET_KEY).encode(), day)
    for part in (S3_REGION, "s3", "aws4_request"):
        key = mac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={S3_ACCESS_KEY}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return headers


class SeaweedFs:
    """``weed server -s3`` on loopback in ``workdir``, with one identity and
    the bucket ``S3_BUCKET``; ready once a signed PUT and GET of a probe
    object both succeed. ``kill`` is SIGKILL (weed's SIGTERM takes tens of
    seconds); ``close`` (also on leaving a ``with`` block) kills it."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.weed = weed_binary()
        self.ports = self._ports()
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.s3_config = workdir / "seaweedfs-s3.json"
        self.s3_config.write_text(
            '{"identities":[{"name":"admin","credentials":[{"accessKey":"'
            + S3_ACCESS_KEY
            + '","secretKey":"'
            + S3_SECRET_KEY
            + '"}],"actions":["Admin","Read","Write","List","Tagging"]}]}'
        )
        self.credentials_file = workdir / "s3-credentials.toml"
        self.credentials_file.write_text(
            f'access_key_id = "{S3_ACCESS_KEY}"\nsecret_access_key = "{S3_SECRET_KEY}"\n'
        )
        self.credentials_file.chmod(0o600)
        self.log_path = workdir / "seaweedfs.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _ports() -> dict[str, int]:
        """Free ports whose gRPC twin (+10000) is free too."""
        ports: dict[str, int] = {}
        for name in ("master", "volume", "filer", "s3"):
            for _ in range(100):
                port = free_port()
                if port + 10000 > 65535 or port in ports.values():
                    continue
                with socketlib.socket() as s:
                    try:
                        s.bind(("127.0.0.1", port + 10000))
                    except OSError:
                        continue
                ports[name] = port
                break
            else:
                raise DaemonError(f"no free port pair for SeaweedFS's {name}")
        return ports

    def remote_settings(self, prefix: str) -> dict[str, str]:
        """The daemon's ``[remote]`` table for this server (TOML values as
        text), with the short test timings of testkit/src/s3.rs."""
        return {
            "enabled": "true",
            "endpoint": toml_value(self.endpoint),
            "bucket": toml_value(S3_BUCKET),
            "prefix": toml_value(prefix),
            "region": toml_value(S3_REGION),
            "credentials_file": toml_value(str(self.credentials_file)),
            "request_timeout_s": "5",
            "retry_deadline_s": "30",
            "part_bytes": "5242880",
            "concurrency": "4",
        }

    def request(self, method: str, key: str, body: bytes = b"") -> tuple[int, bytes]:
        """A signed path-style request (``key`` under the endpoint)."""
        import urllib.error
        import urllib.request

        url = f"{self.endpoint}/{key}"
        req = urllib.request.Request(
            url, data=body if method == "PUT" else None, method=method,
            headers=_sigv4_headers(method, url, body),
        )
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def start(self) -> SeaweedFs:
        if self.proc is not None:
            raise DaemonError(f"weed is already running (pid {self.proc.pid})")
        p = self.ports
        args = [
            str(self.weed), "server", "-s3", f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
            f"-s3.config={self.s3_config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false", "-master.electionTimeout=500ms",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=128", "-volume.max=64",
            "-volume.preStopSeconds=0",
        ]
        (self.dir / "data").mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + S3_READY_S
        last = "nothing tried yet"
        while True:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise DaemonError(f"weed exited at start ({rc}); its log:\n{self._log_tail()}")
            try:
                status, body = self.request("PUT", S3_BUCKET)
                made = status < 300 or b"BucketAlreadyOwnedByYou" in body
                if made and self.request("PUT", f"{S3_BUCKET}/probe", b"ok")[0] < 300:
                    if self.request("GET", f"{S3_BUCKET}/probe") == (200, b"ok"):
                        return self
                last = f"status {status}: {body[:200]!r}"
            except OSError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                self.kill()
                raise DaemonError(
                    f"SeaweedFS at {self.endpoint} not ready in {S3_READY_S} s ({last}); "
                    f"its log:\n{self._log_tail()}"
                )
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None
        # weed leaves its Unix sockets in /tmp, named by port.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    close = kill

    def __enter__(self) -> SeaweedFs:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        except FileNotFoundError:
            return ""

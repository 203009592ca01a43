"""`gpusnap.Client`: what a PyTorch (or numpy) trainer uses.

It registers tensors (CPU and CUDA), modules, optimizers and small blobs
with the native client (`gpusnap._native.Client`, the Rust `gpusnap` crate),
checks before every snapshot and restore that no registered memory moved,
refreshes the blobs and the RNG state, orders the copies of CUDA tensors
after the trainer's current streams, and turns a failed snapshot into an
error that is raised only where the caller waits for it (and logged and
counted).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from gpusnap import _agree, _blob, _optim, _rng
from gpusnap import _native
from gpusnap._memory import Entry, describe, stream_hint
from gpusnap._native import (
    CaptureInProgress,
    DuplicateName,
    Error,
    InternalError,
    InvalidRegistration,
    InvalidStream,
    NotRegistered,
    Skipped,
)

# Failed steps remembered for wait_committed(step), newest last.
_FAILURES_KEPT = 64

log = logging.getLogger("gpusnap")


@dataclass(frozen=True)
class CaptureInfo:
    """What a snapshot's capture came to."""

    step: int
    skipped: bool
    bytes: int
    capture_s: float
    stall_s: float
    reason: str | None = None


@dataclass(frozen=True)
class CommitInfo:
    """A committed snapshot."""

    step: int
    bytes: int
    persist_s: float


@dataclass(frozen=True)
class WalkBack:
    """A newer step a restore passed over: its snapshot, read from
    ``source`` ("memory", "disk" or "remote"), failed verification
    (``reason`` says how)."""

    step: int
    source: str
    reason: str


@dataclass(frozen=True)
class RestoreInfo:
    """What a restore came to: the step, where the daemon read it
    (``source``: "memory", the hot tier; "disk", the node's store;
    "remote", downloaded from the object store), its bytes, the time the
    daemon took to fill its slot and the copies took, and the newer steps
    passed over because they failed verification, newest first
    (``walked_back``, empty when none was)."""

    step: int
    source: str
    bytes: int
    daemon_fill_s: float
    copy_s: float
    walked_back: tuple[WalkBack, ...] = ()

    @classmethod
    def _from_native(cls, info: dict[str, Any]) -> RestoreInfo:
        fields = dict(info)
        walked = fields.pop("walked_back", None) or []
        return cls(**fields, walked_back=tuple(WalkBack(**w) for w in walked))


@dataclass(frozen=True)
class Snapshot:
    """One committed snapshot of one rank, as the daemon lists it."""

    job: str
    rank: int
    world_size: int
    step: int
    bytes: int
    tensors: int
    created_unix_ms: int


@dataclass
class Stats:
    """Counts of this client's snapshots, by what they came to."""

    begun: int = 0
    captured: int = 0
    skipped: int = 0
    failed: int = 0
    last_error: str | None = None


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        default_rank, default_world = dist.get_rank(), dist.get_world_size()
    else:
        default_rank = int(os.environ.get("RANK", "0"))
        default_world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise InvalidRegistration(f"rank {rank} is outside a world of {world_size} ranks")
    return rank, world_size


@dataclass
class _Blob:
    buffer: _blob.BlobBuffer
    get: Callable[[], Any]
    put: Callable[[Any], None]
    restored: Any = None


@dataclass
class _Pending:
    """A handle's result, once its capture finished."""

    info: CaptureInfo | None = None
    error: BaseException | None = None
    done: bool = False


class Client:
    """A trainer's connection to gpusnapd.

    ``job`` names the snapshots; ``socket`` defaults to ``$GPUSNAP_SOCKET``
    or the daemon's default; ``rank``/``world_size`` default to
    torch.distributed's, else ``$RANK``/``$WORLD_SIZE``, else 0 of 1.
    ``rng=False`` leaves the random generators out of snapshots.
    ``require_pinned=True`` makes a registration fail (``PinningRequired``)
    when the daemon's staging cannot be page-locked for CUDA copies,
    instead of going on with slower pageable copies and a warning.
    """

    def __init__(
        self,
        job: str,
        *,
        socket: str | os.PathLike[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        rng: bool = True,
        connect_timeout: float = 10.0,
        call_timeout: float = 60.0,
        commit_timeout: float = 600.0,
        reconnect: bool = True,
        copy_threads: int | None = None,
        require_pinned: bool = False,
    ) -> None:
        rank, world_size = _rank_and_world(rank, world_size)
        self._native = _native.Client(
            job,
            socket=None if socket is None else os.fspath(socket),
            rank=rank,
            world_size=world_size,
            connect_timeout=connect_timeout,
            call_timeout=call_timeout,
            commit_timeout=commit_timeout,
            reconnect=reconnect,
            copy_threads=copy_threads,
            require_pinned=require_pinned,
        )
        self._entries: list[Entry] = []
        # Second names of one storage (tied weights): checked, not registered.
        self._aliases: list[Entry] = []
        self._failures: dict[int, BaseException] = {}
        self._names: set[str] = set()
        self._addresses: dict[tuple[int, int], str] = {}
        self._blobs: dict[str, _Blob] = {}
        self._optimizers: list[_optim.OptimizerState] = []
        # The open capture's step and where its result goes.
        self._open: tuple[int, _Pending] | None = None
        # A capture handed to the native client's finishing thread.
        self._handed: tuple[int, _Pending] | None = None
        # Ordinals of the CUDA devices holding registered tensors, and the
        # device of each registered CUDA tensor.
        self._cuda_devices: set[int] = set()
        self._device_of: dict[str, int] = {}
        self.stats = Stats()
        self.last_restore: RestoreInfo | None = None
        """What the last restore that brought back a step came to."""
        if rng:
            self._register_blob(
                _rng.NAME, "json", _rng.CAPACITY, get=_rng.capture, put=_rng.restore
            )

    # ---- properties ----

    @property
    def job(self) -> str:
        return self._native.job

    @property
    def rank(self) -> int:
        return self._native.rank

    @property
    def world_size(self) -> int:
        return self._native.world_size

    @property
    def cuda_devices(self) -> list[int]:
        """The CUDA devices holding registered tensors."""
        return sorted(self._cuda_devices)

    @property
    def staging_pinning(self) -> list[dict[str, Any]]:
        """What registration did to the daemon's staging memory for each
        copying device: ``{"state": "pinned", "bytes", "seconds"}``
        (page-locked for CUDA copies), ``{"state": "unpinned", "reason"}``
        or ``{"state": "not_needed"}`` (host copies); empty before the
        registration is sent (``prepare()``)."""
        return self._native.staging_pinning()

    @property
    def tensor_names(self) -> list[str]:
        """Every registered tensor name, in registration order."""
        return [name for name, _, _ in self._native.tensors()]

    # ---- registration ----

    def register(
        self,
        name: str,
        tensor: Any = None,
        *,
        blob: Any = None,
        encoding: str | None = None,
        capacity: int | None = None,
    ) -> None:
        """Registers a tensor as ``name``: a CPU or CUDA torch tensor, a
        numpy array, or a CUDA array (``__cuda_array_interface__``), or with
        ``blob=`` a small non-tensor value: a dict (saved as JSON, or
        msgpack with ``encoding="msgpack"``; restored in place), bytes or a
        bytearray (raw; a bytearray is restored in place), or an object
        with ``state_dict()``/``load_state_dict()`` (a stateful data
        loader). ``capacity`` bounds the encoded size (default 1 MiB); it
        must be the same in the run that saved and the one that restores."""
        if (tensor is None) == (blob is None):
            raise InvalidRegistration(f"register({name!r}): pass a tensor or blob=, not both")
        if tensor is not None:
            live = tensor
            self._register_tensor(name, tensor, lambda: live)
            return
        get, put, default_encoding = _blob_accessors(name, blob)
        encoding = encoding or default_encoding
        if capacity is None:
            capacity = _blob.DEFAULT_CAPACITY
        self._register_blob(name, encoding, capacity, get=get, put=put)

    def register_module(self, module: Any, prefix: str = "model") -> None:
        """Registers every parameter and persistent buffer of ``module``
        under ``prefix.<state_dict name>``. Parameters are captured in
        place; buffers (which the forward pass may update, as batch norm's
        running statistics) through a private copy taken when the snapshot
        begins. Tied weights (one storage under two names) are registered
        once."""
        import torch

        for key, value in module.state_dict(keep_vars=True).items():
            if not _is_tensor(value):
                raise InvalidRegistration(
                    f"{prefix}.{key}: module state {type(value).__name__} is not a tensor"
                )
            self._register_tensor(
                f"{prefix}.{key}",
                value,
                _module_resolver(module, key),
                dedup=True,
                shadow=not isinstance(value, torch.nn.Parameter),
            )

    def register_optimizer(self, optimizer: Any, prefix: str = "optimizer") -> None:
        """Registers the optimizer's state tensors and its scalars
        (param_groups' hyperparameters, non-tensor state). State that does
        not exist yet (before the first ``step()``) is registered at the
        first snapshot; a restore creates it first (as
        torch.distributed.checkpoint does) so it can be filled."""
        state = _optim.OptimizerState(optimizer, prefix)
        self._optimizers.append(state)
        self._register_blob(
            state.scalars_name,
            "json",
            state.scalars_capacity(),
            get=state.scalars,
            put=state.load_scalars,
        )
        self._register_optimizer_tensors(state)

    def _register_optimizer_tensors(self, state: _optim.OptimizerState) -> None:
        """Registers every state tensor of the optimizer not registered yet
        (state appears with a parameter's first step, which for some
        parameters comes later than for others)."""
        for name, tensor, resolve in state.tensors():
            if name not in self._names:
                self._register_tensor(name, tensor, resolve)

    def _register_tensor(
        self,
        name: str,
        tensor: Any,
        resolve: Callable[[], Any],
        dedup: bool = False,
        shadow: bool = False,
    ) -> None:
        self._finish_open()
        if name in self._names:
            raise DuplicateName(f"tensor {name!r} is already registered")
        live = describe(name, tensor)
        key = (live.address, live.nbytes)
        if dedup and live.nbytes > 0 and key in self._addresses:
            log.debug("%s shares its storage with %s: registered once", name, self._addresses[key])
            self._aliases.append(Entry(name, live, resolve, live.address, live.shape))
            return
        copy = tensor.detach().clone() if shadow else None
        memory = live if copy is None else describe(name, copy)
        args = (name, memory.dtype, list(memory.shape), memory.address, memory.nbytes, memory.owner)
        if memory.cuda:
            ordinal = self._native.register_cuda(*args)
            self._cuda_devices.add(ordinal)
            self._device_of[name] = ordinal
        else:
            self._native.register(*args)
        self._names.add(name)
        self._addresses[key] = name
        self._entries.append(Entry(name, memory, resolve, live.address, live.shape, copy))

    def _register_blob(
        self,
        name: str,
        encoding: str,
        capacity: int,
        get: Callable[[], Any],
        put: Callable[[Any], None],
    ) -> None:
        self._finish_open()
        if name in self._names:
            raise DuplicateName(f"blob {name!r} is already registered")
        buffer = _blob.BlobBuffer(name, encoding, capacity)
        buffer.store(get())
        self._native.register(name, "U8", [buffer.nbytes], buffer.address, buffer.nbytes, buffer)
        self._names.add(name)
        self._blobs[name] = _Blob(buffer, get, put)

    def prepare(self) -> None:
        """Sends the registration to the daemon now, so that the first
        snapshot does not pay for setting up its staging memory (which
        the daemon allocates and populates at registration). ``restore()``
        does this too. Raises what registering raises (``StagingFull``,
        ``Busy``, ``PermissionDenied``, ...)."""
        self._finish_open()
        self._check()
        self._native.sync_registration()

    def blob(self, name: str) -> Any:
        """The value a restore brought back for blob ``name`` (None before)."""
        try:
            return self._blobs[name].restored
        except KeyError:
            raise NotRegistered(f"no blob {name!r} is registered") from None

    # ---- snapshots ----

    def snapshot_begin(self, step: int, stream: Any = None) -> SnapshotHandle:
        """Starts the snapshot of ``step``: checks every tensor, refreshes
        blobs and RNG state, and starts the copies, which overlap whatever
        the trainer does next until ``wait_captured()``. The copies of CUDA
        tensors run on gpusnap's own copy stream, ordered after the work
        queued so far on ``stream``: by default each device's current torch
        stream (the legacy default stream without torch); or a
        ``torch.cuda.Stream``, a CuPy stream, a raw ``CUstream`` handle, or
        a dict of device ordinal to one of those. Never raises: a failure
        is logged, counted, and raised by the handle's waits."""
        handle = SnapshotHandle(self, step)
        self.stats.begun += 1
        try:
            self._finish_open()
            live = self._check()
            self._refresh(live)
            self._native.begin(step, self._streams(stream, live))
        except Exception as e:  # noqa: BLE001 - a snapshot must not kill training
            self._failed(step, e)
            handle._pending = _Pending(error=e, done=True)
            return handle
        self._open = (step, handle._pending)
        self._failures.pop(step, None)
        return handle

    def snapshot(self, step: int) -> CaptureInfo:
        """Snapshots ``step`` and waits until it is captured (it persists
        in the background; see ``wait_committed``)."""
        info = self.snapshot_begin(step).wait_captured(blocking=True)
        assert info is not None
        return info

    def wait_committed(self, step: int) -> CommitInfo:
        """Waits until the snapshot of ``step`` is durable."""
        if self.open_step == step or (self._handed is not None and self._handed[0] == step):
            self._finish_open()
        failure = self._failures.get(step)
        if failure is not None:
            raise failure
        info = self._native.wait_committed(step)
        return CommitInfo(**info)

    @property
    def open_step(self) -> int | None:
        """The step whose capture is under way, if one is."""
        return None if self._open is None else self._open[0]

    def _check(self) -> list[Any]:
        """What a capture or restore does first: registers optimizer state
        that appeared since, and checks that no registered memory moved.
        Returns the live object of every registered entry, in order."""
        for state in self._optimizers:
            self._register_optimizer_tensors(state)
        for alias in self._aliases:
            alias.check()
        return [entry.check() for entry in self._entries]

    def _refresh(self, live: list[Any]) -> None:
        """Before a capture: shadows and blobs take the current values."""
        for entry, obj in zip(self._entries, live, strict=True):
            entry.refresh(obj)
        for b in self._blobs.values():
            b.buffer.store(b.get())

    def _streams(self, stream: Any, live: list[Any]) -> list[tuple[int, int]] | None:
        """The trainer's streams to order CUDA copies after, as (device
        ordinal, CUstream) pairs: ``stream`` where given; else, per device,
        the stream its ``__cuda_array_interface__`` arrays name (v3's
        stream semantics), else torch's current stream (once torch's CUDA
        is initialized), else the legacy default stream."""
        if not self._cuda_devices:
            return None
        if stream is None:
            hints = self._stream_hints(live)
            torch = sys.modules.get("torch")
            if torch is not None and not (torch.cuda.is_available() and torch.cuda.is_initialized()):
                torch = None
            order = []
            for d in sorted(self._cuda_devices):
                if d in hints:
                    order.append((d, hints[d]))
                elif torch is not None:
                    order.append((d, int(torch.cuda.current_stream(d).cuda_stream)))
            return order or None
        if isinstance(stream, dict):
            return [(int(d), _stream_handle(s)) for d, s in stream.items()]
        device = getattr(getattr(stream, "device", None), "index", None)
        if device is None:
            if len(self._cuda_devices) != 1:
                raise InvalidStream(
                    f"one stream for tensors on CUDA devices {self.cuda_devices}: pass a dict "
                    "of device ordinal to stream"
                )
            device = next(iter(self._cuda_devices))
        return [(int(device), _stream_handle(stream))]

    def _stream_hints(self, live: list[Any]) -> dict[int, int]:
        """The stream each device's ``__cuda_array_interface__`` arrays
        name; InvalidStream when arrays of one device name different ones."""
        hints: dict[int, tuple[int, str]] = {}
        for entry, obj in zip(self._entries, live, strict=True):
            device = self._device_of.get(entry.name)
            hint = stream_hint(obj) if device is not None else None
            if hint is None or device is None:
                continue
            seen = hints.setdefault(device, (hint, entry.name))
            if seen[0] != hint:
                raise InvalidStream(
                    f"tensors {seen[1]!r} and {entry.name!r} on CUDA device {device} name "
                    f"different streams in their __cuda_array_interface__ ({seen[0]:#x}, "
                    f"{hint:#x}): pass stream= to say which the copies follow"
                )
        return {d: h for d, (h, _) in hints.items()}

    def _finish_open(self) -> None:
        """Finishes the open capture (and collects one handed off),
        recording its result for its handle."""
        if self._open is not None:
            step, pending = self._open
            self._open = None
            self._settle(step, pending, self._native.finish)
        self._collect_handed()

    def _hand_off(self) -> None:
        """Finishes the open capture without blocking on the device: the
        trainer's streams wait for the copies, the host only for copies of
        host memory; the native client's thread tells the daemon."""
        assert self._open is not None
        step, pending = self._open
        self._open = None
        try:
            self._native.finish_in_background()
        except Exception as e:  # noqa: BLE001 - reported where the caller waits
            self._fail_pending(step, pending, e)
            return
        self._handed = (step, pending)

    def _collect_handed(self) -> None:
        """Records the outcome of the capture handed off (waiting for it if
        its copies still run)."""
        if self._handed is None:
            return
        step, pending = self._handed
        self._handed = None

        def outcome() -> dict[str, Any]:
            got = self._native.background_outcome(step)
            if got is None:
                raise InternalError(f"the outcome of the capture of step {step} was not kept")
            return got

        self._settle(step, pending, outcome)

    def _settle(self, step: int, pending: _Pending, outcome: Callable[[], dict[str, Any]]) -> None:
        """Records what a capture came to for its handle, its stats and its
        failures."""
        try:
            info = CaptureInfo(**outcome())
        except Exception as e:  # noqa: BLE001 - reported where the caller waits
            self._fail_pending(step, pending, e)
            return
        else:
            if info.skipped:
                self.stats.skipped += 1
                log.warning("snapshot of step %d skipped: %s", step, info.reason)
            else:
                self.stats.captured += 1
            pending.info = info
        pending.done = True

    def _fail_pending(self, step: int, pending: _Pending, e: BaseException) -> None:
        self._failed(step, e)
        pending.error = e
        pending.done = True

    def _failed(self, step: int, e: BaseException) -> None:
        self.stats.failed += 1
        self.stats.last_error = f"step {step}: {e}"
        if getattr(e, "step", None) is None:
            try:
                e.step = step  # type: ignore[attr-defined]
            except AttributeError:
                pass
        self._failures[step] = e
        while len(self._failures) > _FAILURES_KEPT:
            del self._failures[next(iter(self._failures))]
        log.error("snapshot of step %d failed: %s", step, e)

    # ---- restore ----

    def latest(self) -> int | None:
        """The newest step every rank of the job has committed (on this
        node, or complete in the object store: a restore downloads it), or
        None."""
        try:
            self._finish_open()
            listing = self._native.list()
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait for this one
            _agree.fail(e)
        if listing.get("remote_error") is not None:
            log.warning(
                "the object store could not be listed (%s): only the steps on this node "
                "are candidates",
                listing["remote_error"],
            )
        # A step complete in the object store counts as complete, and as one
        # of this rank's own: restoring it downloads this rank's snapshot.
        own = _agree.own_steps(listing, self.job, self.rank)
        complete = _agree.complete_steps(listing, self.job)
        return _agree.newest_common_step(own, complete)

    def restore(self, step: int | None = None, stream: Any = None) -> int | None:
        """Restores ``step`` (default: the newest step every rank of the job
        has committed, ``latest()``: on this node or complete in the object
        store) into every registered tensor in place, and the blobs,
        optimizer scalars and RNG state; returns the step, or None when
        there is nothing to restore (the registration is then sent, as
        ``prepare()`` does). ``last_restore`` then says what the restore
        came to (``RestoreInfo``: where the daemon read it, the steps it
        passed over). A missing, mismatched or corrupt snapshot
        raises before anything is written. Without ``step`` and with
        several ranks this is a collective: every rank calls it. The
        host-to-device copies into CUDA tensors are ordered after the work
        queued on ``stream`` (as for ``snapshot_begin``), the work queued
        there later after them; the host waits for them too."""
        try:
            self._finish_open()
            self._check()
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait for this one
            if step is None:
                _agree.fail(e)
            raise
        if step is None:
            step = self.latest()
            if step is None:
                # A fresh start: have staging ready for the first snapshot.
                self._native.sync_registration()
                return None
        if self._optimizers:
            saved = [t["name"] for t in self._native.describe(step)["tensors"]]
            for state in self._optimizers:
                state.materialize(state.state_indices(saved))
                self._register_optimizer_tensors(state)
        native_info = self._native.restore(step, self._streams(stream, self._check()))
        if native_info is None:
            return None
        info = RestoreInfo._from_native(native_info)
        self.last_restore = info
        for passed in info.walked_back:
            log.warning(
                "restore passed over step %d (%s): %s", passed.step, passed.source, passed.reason
            )
        for entry in self._entries:
            entry.put_back(entry.resolve())
        # Decode every blob before loading any: a corrupt one is refused
        # before the trainer's objects change.
        values = {name: b.buffer.load() for name, b in self._blobs.items()}
        for name, value in values.items():
            b = self._blobs[name]
            b.restored = value
            try:
                b.put(value)
            except Error:
                raise
            except Exception as e:
                raise Error(f"blob {name!r}: loading the restored value failed: {e!r}") from e
        log.info(
            "restored step %d from %s (%d bytes) in %.3f s",
            info.step,
            info.source,
            info.bytes,
            info.daemon_fill_s + info.copy_s,
        )
        return int(info.step)

    # ---- listing ----

    def list(self, all_jobs: bool = False) -> list[Snapshot]:
        """Committed snapshots of this job (of every job this user may see
        with ``all_jobs``), oldest first."""
        listing = self._native.list(all_jobs)
        return [Snapshot(**s) for s in listing["snapshots"]]

    def status(self) -> dict[str, Any]:
        """The daemon's status."""
        return self._native.status()

    # ---- lifetime ----

    def close(self) -> None:
        """Finishes an open capture and closes the connection."""
        try:
            self._finish_open()
        finally:
            self._native.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"gpusnap.Client(job={self.job!r}, rank={self.rank}, "
            f"world_size={self.world_size}, tensors={len(self._entries)}, "
            f"blobs={len(self._blobs)})"
        )


class SnapshotHandle:
    """A snapshot whose capture is under way. Use it as a context manager
    (the capture is waited for on exit) or call ``wait_captured()`` before
    anything mutates the registered tensors again."""

    def __init__(self, client: Client, step: int) -> None:
        self._client = client
        self.step = step
        self._pending = _Pending()

    def wait_captured(self, blocking: bool | None = None) -> CaptureInfo | None:
        """What must happen before the registered tensors are written again.

        Overlapped (``blocking=False``; the default when CUDA tensors are
        registered): the trainer's CUDA streams are made to wait for the
        copies on the device, so the optimizer step queued next cannot
        change state under them, and this returns None without the host
        waiting for the device (copies of host memory, if any, are waited
        for). A gpusnap thread tells the daemon once the copies finished;
        the outcome comes with ``wait_committed()``, ``done`` and the
        client's stats.

        Blocking (``blocking=True``; the default for host-only
        registrations): waits until the data is in the daemon's staging
        memory and returns what the capture came to; raises the snapshot's
        error if it failed. Reports a skip (policy ``skip``) in the
        result's ``skipped``."""
        client = self._client
        if not self._pending.done:
            overlapped = bool(client._cuda_devices) if blocking is None else not blocking
            if client.open_step == self.step:
                if overlapped:
                    client._hand_off()
                else:
                    client._finish_open()
            if overlapped and not self._pending.done:
                return None
            if not self._pending.done and client._handed is not None:
                client._finish_open()
        if self._pending.error is not None:
            raise self._pending.error
        if self._pending.info is None:
            raise CaptureInProgress(f"the capture of step {self.step} did not finish")
        return self._pending.info

    def wait_committed(self) -> CommitInfo:
        """Waits until the snapshot is durable; raises ``Skipped`` for a
        skipped one."""
        info = self.wait_captured(blocking=True)
        assert info is not None
        if info.skipped:
            e = Skipped(f"snapshot of step {self.step} was skipped: {info.reason}")
            e.step = self.step
            raise e
        return self._client.wait_committed(self.step)

    @property
    def done(self) -> bool:
        """Whether the capture finished (either way)."""
        return self._pending.done

    def copies_done(self) -> bool:
        """Whether the copies into the daemon's staging have finished,
        without blocking (True too once the capture finished or failed).
        Once True, ``wait_captured()`` only tells the daemon and awaits its
        answer; the registered tensors must still not be written before it
        returns."""
        if self._pending.done:
            return True
        client = self._client
        handed = client._handed is not None and client._handed[0] == self.step
        if client.open_step != self.step and not handed:
            return True
        done = client._native.copies_done()
        return True if done is None else done

    def __enter__(self) -> SnapshotHandle:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.wait_captured()
            return
        # The body failed: finish the capture (the tensors must be
        # released) but let the body's exception through.
        try:
            self.wait_captured(blocking=True)
        except Error as e:
            log.error("snapshot of step %d failed too: %s", self.step, e)

    def __repr__(self) -> str:
        return f"gpusnap.SnapshotHandle(step={self.step}, done={self.done})"


def _stream_handle(stream: Any) -> int:
    """The CUstream of a torch or CuPy stream, or a raw handle."""
    for attribute in ("cuda_stream", "ptr"):
        handle = getattr(stream, attribute, None)
        if handle is not None:
            return int(handle)
    if isinstance(stream, int) and stream >= 0:
        return stream
    raise InvalidStream(
        f"a {type(stream).__name__} is not a CUDA stream (a torch.cuda.Stream, a CuPy "
        "stream or a CUstream handle)"
    )


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _module_resolver(module: Any, key: str) -> Callable[[], Any]:
    """Finds state_dict entry ``key`` of ``module`` again (the live
    parameter or buffer, which may have been replaced)."""
    owner_path, _, attr = key.rpartition(".")

    def resolve() -> Any:
        owner = module.get_submodule(owner_path) if owner_path else module
        return getattr(owner, attr)

    return resolve


def _blob_accessors(name: str, blob: Any) -> tuple[Callable[[], Any], Callable[[Any], None], str]:
    """How to read and restore a blob source, and its default encoding."""
    if isinstance(blob, dict):

        def put_dict(value: Any) -> None:
            blob.clear()
            blob.update(value)

        return (lambda: blob), put_dict, "json"
    if isinstance(blob, bytearray):

        def put_bytearray(value: Any) -> None:
            blob[:] = value

        return (lambda: bytes(blob)), put_bytearray, "raw"
    if isinstance(blob, (bytes, memoryview)):
        frozen = bytes(blob)
        return (lambda: frozen), (lambda value: None), "raw"
    if callable(getattr(blob, "state_dict", None)) and callable(
        getattr(blob, "load_state_dict", None)
    ):
        return blob.state_dict, blob.load_state_dict, "json"
    raise InvalidRegistration(
        f"blob {name!r}: a {type(blob).__name__} is not a dict, bytes, bytearray or an "
        "object with state_dict()/load_state_dict()"
    )


__all__ = ["Client", "SnapshotHandle", "CaptureInfo", "CommitInfo", "Snapshot", "Stats"]

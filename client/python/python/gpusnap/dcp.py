"""torch.distributed.checkpoint storage through gpusnapd.

    import torch.distributed.checkpoint as dcp
    import gpusnap.dcp

    dcp.save(state_dict, storage_writer=gpusnap.dcp.StorageWriter("run-7"))
    dcp.load(state_dict, storage_reader=gpusnap.dcp.StorageReader("run-7"))
    dcp.async_save(state_dict, storage_writer=gpusnap.dcp.StorageWriter("run-7", step))

A checkpoint is one step of a gpusnap job: every rank's ``write_data``
saves the items DCP's plan gives that rank as one gpusnap snapshot of
(job, rank, step), through the same store, commit protocol and
verification as ``gpusnap.Client``, and waits until it is committed. A
step is a complete checkpoint once every rank committed it (and sealed
it, for a staged save: see async_save below). Nothing else is
written: the global ``Metadata`` is rebuilt at load time from the
snapshots' tensor tables (``describe``), so every piece of it lives in the
tensor names:

    t/<key>/<offsets>/<size>/<flags>   one chunk of a tensor; its dtype and
                                       shape (the chunk's sizes) are the
                                       stored tensor's own
    b/<key>/<flags>                    a non-tensor item (the bytes DCP's
                                       planner serialized), as U8 [n]
    dcp/1                              each rank's marker (format 1), U8 JSON
                                       {"format", "rank", "world_size", "items"}
                                       (and "staged": true, see async_save)
    dcp/1/seal                         the only tensor of a staged save's seal
                                       rank, U8 JSON {"format", "rank",
                                       "world_size"}

``<key>`` is the item's object path in the state dict (DCP's flatten
mapping): its components joined by ``.``, an int component (a list index)
in decimal, a string component with ``%``, ``.`` and ``/`` percent-escaped
(and its first character too when it reads as an int), so that the key of
``{"model": {"fc.weight": t}}`` is ``model.fc%2Eweight`` and DCP's fqn is the
components joined by ``.``. ``<offsets>`` and ``<size>`` (the chunk's
offsets in the tensor and the tensor's global size) are comma-separated
decimals, empty for a 0-d tensor. ``<flags>``: ``g`` requires_grad, ``p``
pin_memory, ``l`` channels_last, ``r`` preserve_format, ``n`` no flatten
mapping (the key is the fqn split at ``.``, and the load gets no
planner_data for it).

The step: ``StorageWriter(job, step=None)`` saves one step past the newest
step any rank of the job has on the daemon (or complete in the object
store); the coordinator takes the
largest of the ranks' proposals and hands it to every rank in the plan, so
all ranks use the same step (with ``use_collectives=False`` every rank
plans alone: pass the step). ``StorageReader(job, step=None)`` loads the
newest step the daemon lists as complete for the job (on this node, or in
the object store: see below); the ranks' load plans
check that they all resolved the same one. ``latest_step(job)`` says which
that is, without loading.

The remote tier: a step the daemon lists as complete in the object store
(``remote_complete``: its COMPLETE marker names every rank) is complete
whatever this node's store holds: each rank's restore downloads the
snapshot this node lacks. A step neither complete here nor in the object
store is refused (``NotFound``).

``dcp.async_save(state_dict, storage_writer=StorageWriter(job, step))``:
the writer is DCP's ``AsyncStager``. ``stage`` runs in the caller's thread,
before any planning: it plans this rank's items as DCP's
``DefaultSavePlanner`` plans them locally (every item this rank holds,
replicated ones included: DCP dedups only in the global plan), captures
them into the daemon's staging as one snapshot (CPU memory by memcpy, CUDA
memory by device-to-host copies ordered after each device's current
stream; non-tensor items serialized) and returns once the daemon accepted
it, handing DCP a copy of the state dict whose tensors are meta tensors
(a DTensor over a meta local tensor; another tensor subclass is kept as it
is and only its metadata is read), so the trainer may change its tensors
at once. No copy of DCP's own is made. DCP's background thread then plans
as usual and ``write_data`` resolves no data: it checks that every item of
the final plan is in the staged snapshot under the same name, dtype and
shape, and the coordinator that every rank's staged items beyond its plan
are items another rank's plan saves (dedup's replicas, kept as copies, as
``use_collectives=False`` keeps them), waits for the daemon's commit and
then seals it. A staged step of W ranks is a world of 2W snapshots: rank r
holds the data, rank W + r only ``dcp/1/seal``, committed after rank r's
check passed, so the daemon lists the step as complete only once every
rank's plan matched what it staged; a save whose check fails (another
planner, a ``checkpoint_id`` or process group other than the writer's)
fails through the future, with DCP's ``CheckpointException``, and leaves
snapshots no reader loads. A capture error (daemon down, a step already
committed) is also raised through the future, not by ``async_save``.
Limits: the step is chosen when staging, before the ranks talk, so with
more than one rank pass ``step=`` (``async_save`` raises ``ValueError``
otherwise; one rank picks one past the newest step, and past the steps
this writer staged); give the job and step to the writer, not as
``async_save``'s ``checkpoint_id``; the ranks are the default process
group's (``process_group=``/``no_dist`` fail the check); the plan must be
``DefaultSavePlanner``'s (any of its options but ``flatten_state_dict``/
``flatten_sharded_tensors=False``); replicated plain tensors are kept on
every rank that holds them; a pinned CPU tensor is recorded as not
pinned; a trainer that dies after staging but before its save sealed the
step leaves the data committed but not a checkpoint; ``stage`` holds the
(job, rank) until the daemon committed the capture, so a second
``async_save`` while one is in flight waits in ``stage``, up to
``busy_timeout``, for the first's commit (one writer may serve many
``async_save`` calls, one after another, from one thread).

Errors are gpusnap's (``NotFound`` for a missing or incomplete step,
``Busy`` when another connection keeps a (job, rank) past ``busy_timeout``,
``Skipped`` for a step that is already committed, ...); ``dcp.save`` and
``dcp.load`` raise them inside DCP's ``CheckpointException`` (its
``failures``: rank -> (exception, traceback)), as DCP does with every error.

CPU and CUDA tensors save (a CUDA tensor's device-to-host copy is ordered
after the work queued on its device's current stream, and ``write_data``
returns once the snapshot is committed) and load (into targets anywhere
torch can copy to); every rank's snapshot must be on this node's daemon,
or the step complete in the object store, to load (read_metadata
describes every rank, and a rank's items may live in another rank's
snapshot); reading a rank's items restores that rank's
whole snapshot into scratch memory (the daemon restores exactly the
registered set), one source rank at a time; dtypes are those gpusnap
stores (no complex); a custom planner's ``planner_data`` other than DCP's
flatten mapping is not kept; ``enable_plan_caching`` is refused (a cached
plan would carry an earlier save's step). Non-tensor items are whatever
DCP's planner serialized (``torch.save``; its load planner unpickles them).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import re
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageReader as _StorageReader
from torch.distributed.checkpoint.storage import StorageWriter as _StorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from gpusnap import _agree, _native
from gpusnap._memory import TORCH_DTYPES, describe
from gpusnap._native import (
    BackendUnavailable,
    Corrupt,
    InvalidSpec,
    NotFound,
    Skipped,
    UnsupportedTensor,
)

log = logging.getLogger("gpusnap")

FORMAT = 1
MARKER = f"dcp/{FORMAT}"
SEAL = f"dcp/{FORMAT}/seal"
SCHEME = "gpusnap://"
# The version DCP's own FileSystemWriter records (torch 2.4 to 2.11).
DCP_VERSION = "1.0.0"
NAME_LEN_MAX = 1024

# safetensors dtype name -> torch dtype (those this torch has).
_DTYPES: dict[str, torch.dtype] = {
    st: getattr(torch, attr) for attr, st in TORCH_DTYPES.items() if hasattr(torch, attr)
}

_INT = re.compile(r"-?[0-9]+")


# ---- names ----


def _escape(component: str) -> str:
    text = component.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")
    if _INT.fullmatch(text):
        text = f"%{ord(text[0]):02X}{text[1:]}"
    return text


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            code = text[i + 1 : i + 3]
            if len(code) != 2 or not all(h in "0123456789ABCDEFabcdef" for h in code):
                raise ValueError(f"bad escape {text[i:i + 3]!r}")
            out.append(chr(int(code, 16)))
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _encode_key(path: Sequence[str | int]) -> str:
    return ".".join(str(c) if isinstance(c, int) else _escape(c) for c in path)


def _decode_key(key: str) -> tuple[str | int, ...]:
    return tuple(int(c) if _INT.fullmatch(c) else _unescape(c) for c in key.split("."))


def _fqn(path: Sequence[str | int]) -> str:
    return ".".join(map(str, path))


def _ints(values: Iterable[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",")) if text else ()


def _valid_path(path: Any, fqn: str) -> bool:
    return (
        isinstance(path, (tuple, list))
        and len(path) > 0
        and all(
            isinstance(c, str) or (isinstance(c, int) and not isinstance(c, bool)) for c in path
        )
        and _fqn(path) == fqn
    )


def _key_and_flags(fqn: str, mappings: Any) -> tuple[str, str]:
    """The name's key for `fqn`, and "n" when DCP gave no flatten mapping
    for it."""
    path = mappings.get(fqn) if isinstance(mappings, dict) else None
    if path is not None and _valid_path(path, fqn):
        return _encode_key(path), ""
    return _encode_key(fqn.split(".")), "n"


def _tensor_flags(props: TensorProperties) -> str:
    flags = ""
    if props.requires_grad:
        flags += "g"
    if props.pin_memory:
        flags += "p"
    if props.memory_format == torch.channels_last:
        flags += "l"
    elif props.memory_format == torch.preserve_format:
        flags += "r"
    elif props.memory_format != torch.contiguous_format:
        raise UnsupportedTensor(f"memory format {props.memory_format} cannot be recorded")
    return flags


def item_name(item: WriteItem, mappings: Any = None) -> str:
    """The gpusnap tensor name of a DCP write item (see the module doc)."""
    fqn = item.index.fqn
    key, flags = _key_and_flags(fqn, mappings)
    if item.type == WriteItemType.BYTE_IO:
        name = f"b/{key}/{flags}"
    else:
        td = item.tensor_data
        if td is None or td.chunk is None:
            raise InvalidSpec(f"{fqn}: a tensor write item without its chunk")
        if td.properties.layout != torch.strided:
            raise UnsupportedTensor(f"{fqn}: layout {td.properties.layout} cannot be stored")
        flags += _tensor_flags(td.properties)
        name = f"t/{key}/{_ints(td.chunk.offsets)}/{_ints(td.size)}/{flags}"
    if len(name.encode()) > NAME_LEN_MAX:
        raise InvalidSpec(
            f"{fqn}: its gpusnap name is {len(name.encode())} bytes, over the "
            f"{NAME_LEN_MAX} a tensor name may have"
        )
    return name


@dataclass(frozen=True)
class _Parsed:
    """What a stored tensor's name says about its DCP item."""

    fqn: str
    path: tuple[str | int, ...] | None  # None: no flatten mapping
    is_bytes: bool
    offsets: tuple[int, ...] = ()
    size: tuple[int, ...] = ()
    flags: str = ""


def _parse_name(name: str) -> _Parsed | None:
    """None for the marker; raises ValueError for a name that is not a
    gpusnap.dcp item."""
    if name == MARKER:
        return None
    parts = name.split("/")
    if parts[0] == "t" and len(parts) == 5:
        _, key, offsets, size, flags = parts
    elif parts[0] == "b" and len(parts) == 3:
        _, key, flags = parts
        offsets = size = ""
    else:
        raise ValueError("not a gpusnap.dcp item name")
    if set(flags) - set("gplrn"):
        raise ValueError(f"unknown flags {flags!r}")
    path = _decode_key(key)
    return _Parsed(
        fqn=_fqn(path),
        path=None if "n" in flags else path,
        is_bytes=parts[0] == "b",
        offsets=_parse_ints(offsets),
        size=_parse_ints(size),
        flags=flags,
    )


def _properties(dtype: torch.dtype, flags: str) -> TensorProperties:
    memory_format = torch.contiguous_format
    if "l" in flags:
        memory_format = torch.channels_last
    elif "r" in flags:
        memory_format = torch.preserve_format
    return TensorProperties(
        dtype=dtype,
        layout=torch.strided,
        requires_grad="g" in flags,
        memory_format=memory_format,
        pin_memory="p" in flags,
    )


# ---- plan and storage data (they travel between ranks pickled) ----


@dataclass(frozen=True)
class _Proposal:
    """A rank's local save plan's storage data: the step it would save, and
    for a staged save the names its staged snapshot holds."""

    step: int
    explicit: bool
    staged: frozenset[str] | None = None


@dataclass(frozen=True)
class _Placement:
    """A rank's global save plan's storage data: where its snapshot goes."""

    step: int
    rank: int
    world_size: int


@dataclass(frozen=True)
class Location:
    """Where a DCP item lives: the tensor ``name`` in the snapshot of
    ``rank`` (at the checkpoint's step)."""

    rank: int
    name: str


@dataclass(frozen=True)
class _ReadStep:
    """A rank's load plan's storage data: the step it resolved."""

    step: int


# ---- helpers ----


def parse_checkpoint_id(checkpoint_id: str | os.PathLike[str]) -> tuple[str, int | None]:
    """``gpusnap://<job>`` or ``gpusnap://<job>/<step>`` -> (job, step)."""
    text = os.fspath(checkpoint_id)
    if not isinstance(text, str) or not text.startswith(SCHEME):
        raise ValueError(f"{text!r} is not a gpusnap checkpoint id ({SCHEME}<job>[/<step>])")
    rest = text[len(SCHEME) :]
    job, sep, step = rest.rpartition("/")
    if not sep:
        job, step = rest, ""
    elif not _INT.fullmatch(step) or step.startswith("-"):
        job, step = rest, ""
    if not job:
        raise ValueError(f"{text!r} names no job")
    return job, int(step) if step else None


def _checkpoint_id(job: str, step: int | None) -> str:
    return f"{SCHEME}{job}" if step is None else f"{SCHEME}{job}/{step}"


def _dist_world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _item_tensor(data: Any, item: WriteItem) -> torch.Tensor:
    fqn = item.index.fqn
    if not isinstance(data, torch.Tensor):
        raise UnsupportedTensor(
            f"{fqn}: the planner resolved a {type(data).__name__} for a tensor item"
        )
    if data.device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(
            f"{fqn} is on {data.device}: gpusnap.dcp saves CPU and CUDA tensors only"
        )
    t = data.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    td = item.tensor_data
    assert td is not None and td.chunk is not None
    if tuple(t.shape) != tuple(td.chunk.sizes) or t.dtype != td.properties.dtype:
        raise InvalidSpec(
            f"{fqn}: the planner resolved a {t.dtype} tensor of shape {tuple(t.shape)}; "
            f"the plan says {td.properties.dtype} {tuple(td.chunk.sizes)}"
        )
    return t


def _bytes_tensor(data: Any, item: WriteItem) -> torch.Tensor:
    if not isinstance(data, io.BytesIO):
        raise UnsupportedTensor(
            f"{item.index.fqn}: the planner resolved a {type(data).__name__} for a "
            "bytes item (io.BytesIO expected)"
        )
    payload = data.getvalue()
    if not payload:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def _narrow(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        if offset != 0 or length != t.size(dim):
            t = t.narrow(dim, offset, length)
    return t


class _Spans:
    """Address ranges already registered on one client: a tensor that
    overlaps one (tied weights, views of one storage) is copied first, since
    a registration may not alias memory."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []

    def overlaps(self, start: int, length: int) -> bool:
        end = start + length
        return length > 0 and any(s < end and start < e for s, e in self.spans)

    def add(self, start: int, length: int) -> None:
        if length > 0:
            self.spans.append((start, start + length))


def _register(
    client: Any,
    name: str,
    t: torch.Tensor,
    spans: _Spans | None = None,
    cuda_devices: set[int] | None = None,
) -> int:
    """Registers `t` as `name` (a copy of it where it overlaps memory
    registered before); the ordinal of a CUDA tensor's device goes into
    `cuda_devices`."""
    memory = describe(name, t)
    if spans is not None and spans.overlaps(memory.address, memory.nbytes):
        memory = describe(name, t.clone())
    args = (name, memory.dtype, list(memory.shape), memory.address, memory.nbytes, memory.owner)
    if memory.cuda:
        ordinal = client.register_cuda(*args)
        if cuda_devices is not None:
            cuda_devices.add(ordinal)
    else:
        client.register(*args)
    if spans is not None:
        spans.add(memory.address, memory.nbytes)
    return memory.nbytes


def _capture_or_raise(
    client: Any, step: int, streams: list[tuple[int, int]] | None, what: str
) -> None:
    """Sends the registration and captures `step` (blocking); a skip
    raises ``Skipped`` naming `what` ("job 'j' rank 0: the snapshot")."""
    client.sync_registration()
    client.begin(step, streams)
    outcome = client.finish()
    if outcome["skipped"]:
        e = Skipped(f"{what} of step {step} was skipped: {outcome['reason']}")
        e.step = step
        raise e


def _current_streams(devices: set[int]) -> list[tuple[int, int]] | None:
    """Each device's current torch stream, for copies ordered after the
    work queued there."""
    if not devices:
        return None
    return [(d, int(torch.cuda.current_stream(d).cuda_stream)) for d in sorted(devices)]


@dataclass(frozen=True)
class _Connection:
    """How a rank connects. ``busy_timeout`` bounds how long the native
    client retries a registration refused as ``Busy`` (another connection
    holds the (job, rank)), with the client crate's own backoff and one
    deadline for all of the registration's retries; None:
    ``connect_timeout``."""

    socket: str | None
    connect_timeout: float
    call_timeout: float
    commit_timeout: float
    busy_timeout: float | None = None

    def open(self, job: str, rank: int = 0, world_size: int = 1) -> Any:
        return _native.Client(
            job,
            socket=self.socket,
            rank=rank,
            world_size=world_size,
            connect_timeout=self.connect_timeout,
            call_timeout=self.call_timeout,
            commit_timeout=self.commit_timeout,
            busy_timeout=self.busy_timeout,
        )


def _listing(conn: _Connection, job: str) -> dict[str, Any]:
    client = conn.open(job)
    try:
        listing: dict[str, Any] = client.list()
        return listing
    finally:
        client.close()


def _complete_steps(listing: dict[str, Any], job: str) -> list[int]:
    """The complete steps of ``job``, oldest first: every rank committed
    it on this node's store, or it is complete in the object store (a
    restore downloads it)."""
    return _agree.complete_steps(listing, job)


def latest_step(
    job: str, *, socket: str | os.PathLike[str] | None = None, connect_timeout: float = 10.0
) -> int | None:
    """The newest step of ``job`` every rank committed, on this node or
    complete in the object store (what ``StorageReader(job)`` loads), or
    None when there is none."""
    conn = _Connection(
        None if socket is None else os.fspath(socket), connect_timeout, 60.0, 600.0
    )
    steps = _complete_steps(_listing(conn, job), job)
    return steps[-1] if steps else None


# ---- staging (async_save) ----


def _dist_rank_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group
    (0, 1 without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """A tensor DCP plans exactly as it plans `t` (dtype, size,
    requires_grad; a DTensor's mesh and placements) but that has no data:
    a meta tensor, or a DTensor over one. Other tensor subclasses are kept
    as they are (the background save reads their metadata only)."""
    from torch.distributed.tensor import DTensor

    def meta(x: torch.Tensor) -> torch.Tensor:
        return torch.empty(
            x.size(), dtype=x.dtype, device="meta", requires_grad=x.requires_grad
        )

    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return meta(t)
    if isinstance(t, DTensor) and type(t._local_tensor) in (torch.Tensor, torch.nn.Parameter):
        return DTensor.from_local(
            meta(t._local_tensor),
            t.device_mesh,
            t.placements,
            run_check=False,
            shape=t.size(),
            stride=t.stride(),
        )
    return t


def _staged_copy(value: Any) -> Any:
    """`value` with every dict and list (the containers DCP's flattening
    walks) copied and every tensor replaced by its placeholder; other
    objects are kept (their bytes were serialized when they were staged)."""
    if isinstance(value, Mapping):
        return {k: _staged_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_staged_copy(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _placeholder(value)
    return value


@dataclass(eq=False)
class _Staged:
    """One capture ``stage`` took: snapshot (job, rank, step) of a world of
    2 * ``world_size`` ranks (rank ``world_size + rank`` is its seal), and
    the names, dtypes and shapes it holds."""

    job: str
    rank: int
    world_size: int
    step: int
    thread: int
    names: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = None
    committed: concurrent.futures.Future[dict[str, Any]] = field(
        default_factory=concurrent.futures.Future
    )
    claimed: threading.Event = field(default_factory=threading.Event)


def _await_commit(client: Any, record: _Staged) -> None:
    """The staged snapshot's waiter thread: its commit (or error) into
    ``record.committed``, then the connection closed, which lets go of the
    (job, rank)."""
    try:
        record.committed.set_result(client.wait_committed(record.step))
    except BaseException as e:  # noqa: BLE001 - handed to write_data
        record.committed.set_exception(e)
    finally:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - the outcome is already kept
            log.exception("dcp: closing the staging connection failed")


def _plan_names(plan: SavePlan) -> dict[str, WriteItem]:
    names: dict[str, WriteItem] = {}
    for item in plan.items:
        name = item_name(item, plan.planner_data)
        if name in names:
            raise InvalidSpec(f"{item.index}: two items of the plan are named {name!r}")
        names[name] = item
    return names


# ---- the writer ----


class StorageWriter(_StorageWriter, AsyncStager):
    """Saves a DCP checkpoint as step ``step`` of gpusnap job ``job`` (one
    snapshot per rank; ``step=None``: one past the newest step of the job).

    ``socket`` defaults to ``$GPUSNAP_SOCKET`` or the daemon's default;
    ``busy_timeout`` bounds how long a rank waits for another connection to
    let go of its (job, rank): use a job of its own for DCP checkpoints,
    not the job a ``gpusnap.Client`` of the same process registers.

    It is DCP's ``AsyncStager`` too: ``dcp.async_save(state_dict,
    storage_writer=writer)`` captures the state into the daemon's staging in
    the caller's thread (``stage``) and plans, checks and seals it in DCP's
    background thread (see the module doc).
    """

    # stage() is complete when it returns: async_save need not call
    # synchronize_staging.
    _synchronize_after_execute: bool = False

    def __init__(
        self,
        job: str,
        step: int | None = None,
        *,
        socket: str | os.PathLike[str] | None = None,
        connect_timeout: float = 10.0,
        call_timeout: float = 60.0,
        commit_timeout: float = 600.0,
        busy_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        if step is not None and step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        self.job = job
        self.step = step
        self.busy_timeout = busy_timeout
        self._conn = _Connection(
            None if socket is None else os.fspath(socket),
            connect_timeout,
            call_timeout,
            commit_timeout,
            busy_timeout,
        )
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = True
        self.rank: int | None = None
        self.use_collectives = True
        self.last_step: int | None = None
        """The step this writer's last ``write_data`` committed."""
        # Staged captures not yet claimed by a background save (at most
        # one: stage waits for the one before to be claimed), the one the
        # current thread's save claimed, and the next step stage picks.
        self._lock = threading.Lock()
        self._pending: deque[_Staged] = deque()
        self._local = threading.local()
        self._next_step = 0

    @property
    def checkpoint_id(self) -> str:
        record = self._record()
        if record is not None:
            return _checkpoint_id(record.job, record.step)
        return _checkpoint_id(self.job, self.step)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        # DCP's save calls reset first when it is given a checkpoint_id
        # (set_up_storage_writer otherwise): a save on another thread than
        # the one that staged (async_save's executor) takes the oldest
        # staged capture; any other save is an ordinary one.
        record = self._begin_save()
        self._local.began = True
        if record is None:
            if checkpoint_id:
                self.job, self.step = parse_checkpoint_id(checkpoint_id)
            return
        if checkpoint_id and record.error is None:
            job, step = parse_checkpoint_id(checkpoint_id)
            if job != record.job or (step is not None and step != record.step):
                # Raised in prepare_local_plan, where DCP hands one rank's
                # error to every rank.
                record.error = ValueError(
                    f"gpusnap.dcp.StorageWriter: async_save's checkpoint_id {checkpoint_id!r} "
                    f"names another checkpoint than the one staged "
                    f"({_checkpoint_id(record.job, record.step)}): give the job and step "
                    "to the writer (StorageWriter(job, step=...)), not to async_save"
                )

    def _begin_save(self) -> _Staged | None:
        record = self._claim()
        self._local.record = record
        self.save_id = uuid.uuid4().hex
        return record

    def _claim(self) -> _Staged | None:
        me = threading.get_ident()
        with self._lock:
            if not self._pending or self._pending[0].thread == me:
                return None
            record = self._pending.popleft()
        record.claimed.set()
        return record

    def _record(self) -> _Staged | None:
        record: _Staged | None = getattr(self._local, "record", None)
        return record

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            parse_checkpoint_id(checkpoint_id)
        except (ValueError, TypeError):
            return False
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self._local.__dict__.pop("began", False):
            self._begin_save()
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)
        self._local.rank = self.rank
        self._local.use_collectives = self.use_collectives

    # -- staging (the caller's thread of async_save) --

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Captures this rank's items into the daemon's staging and returns
        a copy of `state_dict` whose tensors have no data (meta tensors), for
        DCP's background save to plan with: the trainer may change its
        tensors once this returns. A capture error is raised by the save
        (through async_save's future), as every gpusnap snapshot error is
        raised where the caller waits."""
        rank, world = _dist_rank_world()
        step = self._stage_step(world)
        staged: dict[str, Any] = _staged_copy(state_dict)
        record = _Staged(self.job, rank, world, step, threading.get_ident())
        self._wait_claimed()
        try:
            self._capture(record, staged, state_dict)
        except Exception as e:
            log.warning("dcp: staging job %r rank %d step %d failed: %s", self.job, rank, step, e)
            record.error = e
        with self._lock:
            self._pending.append(record)
        return staged

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` returns once the capture is taken."""

    def close(self) -> None:
        """Nothing to release: each staged capture's connection closes
        itself once the daemon committed it."""

    def _stage_step(self, world: int) -> int:
        if self.step is not None:
            return self.step
        if world > 1:
            raise ValueError(
                "gpusnap.dcp.StorageWriter: async_save stages before the ranks plan "
                "together, so they cannot agree on a step: pass step= to the writer "
                "(or async_stager=DefaultStager() for DCP's own staging)"
            )
        proposal = self._proposal().step
        step = max(proposal, self._next_step)
        self._next_step = step + 1
        return step

    def _wait_claimed(self) -> None:
        """Waits (up to ``busy_timeout``) until the background save of the
        capture staged before has claimed it, so that each save takes its
        own; one never claimed (a stage without a save) is dropped."""
        with self._lock:
            last = self._pending[-1] if self._pending else None
        if last is None or last.claimed.wait(self.busy_timeout):
            return
        with self._lock:
            if last in self._pending:
                self._pending.remove(last)
        log.warning(
            "dcp: job %r step %d was staged but no save took it; it is never sealed",
            last.job,
            last.step,
        )

    def _capture(
        self, record: _Staged, staged: dict[str, Any], state_dict: dict[str, Any]
    ) -> None:
        """Plans this rank's items as DCP's default planner does (on the
        placeholders, so that the background plan names them alike),
        registers the trainer's memory behind them and captures it as
        (job, rank, step) of a world of 2 * world_size; a thread then waits
        for the commit and lets go of the (job, rank)."""
        coordinator = record.rank == 0
        names_planner = DefaultSavePlanner()
        names_planner.set_up_planner(staged, is_coordinator=coordinator)
        plan = names_planner.create_local_plan()
        source = DefaultSavePlanner()
        source.set_up_planner(state_dict, is_coordinator=coordinator)
        client = self._conn.open(record.job, record.rank, 2 * record.world_size)
        try:
            spans = _Spans()
            cuda_devices: set[int] = set()
            for name, item in _plan_names(plan).items():
                data = source.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    tensor = _bytes_tensor(data, item)
                else:
                    tensor = _item_tensor(data, item)
                record.nbytes[name] = _register(client, name, tensor, spans, cuda_devices)
                record.names[name] = (tensor.dtype, tuple(tensor.shape))
            marker = json.dumps(
                {
                    "format": FORMAT,
                    "rank": record.rank,
                    "world_size": record.world_size,
                    "items": len(record.names),
                    "staged": True,
                }
            ).encode()
            _register(client, MARKER, torch.frombuffer(bytearray(marker), dtype=torch.uint8))
            _capture_or_raise(
                client, record.step, _current_streams(cuda_devices),
                f"job {record.job!r} rank {record.rank}: the snapshot",
            )
        except BaseException:
            client.close()
            raise
        threading.Thread(
            target=_await_commit,
            args=(client, record),
            name=f"gpusnap-dcp-commit-{record.step}",
            daemon=True,
        ).start()

    # -- planning --

    def _proposal(self) -> _Proposal:
        if self.step is not None:
            return _Proposal(self.step, explicit=True)
        listing = _listing(self._conn, self.job)
        # Past the steps complete in the object store too: a node that
        # lost its store must not save a step the bucket already holds.
        steps = [s["step"] for s in listing.get("snapshots", []) if s["job"] == self.job]
        steps += _agree.remote_complete_steps(listing, self.job)
        return _Proposal(max(steps) + 1 if steps else 1, explicit=False)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        record = self._record()
        if record is None:
            return dataclasses.replace(plan, storage_data=self._proposal())
        if record.error is not None:
            raise record.error
        proposal = _Proposal(record.step, explicit=True, staged=frozenset(record.names))
        return dataclasses.replace(plan, storage_data=proposal)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if not all(getattr(p, "usable", True) for p in plans):
            raise ValueError(
                "gpusnap.dcp.StorageWriter: a cached save plan (enable_plan_caching) "
                "would reuse the step of an earlier save; disable plan caching"
            )
        proposals = [p.storage_data for p in plans]
        if not all(isinstance(p, _Proposal) for p in proposals):
            raise ValueError(
                "gpusnap.dcp.StorageWriter: a local plan lost the writer's storage_data"
            )
        _check_staged(plans, proposals)
        explicit = {p.step for p in proposals if p.explicit}
        if explicit:
            if len(explicit) > 1 or not all(p.explicit for p in proposals):
                raise ValueError(
                    "gpusnap.dcp.StorageWriter: the ranks were given different steps "
                    f"({sorted(explicit)}, some None)"
                )
            step = explicit.pop()
        else:
            step = max(p.step for p in proposals)
        rank = getattr(self._local, "rank", self.rank)
        if getattr(self._local, "use_collectives", self.use_collectives) or rank is None:
            world = len(plans)
            return [
                dataclasses.replace(p, storage_data=_Placement(step, i, world))
                for i, p in enumerate(plans)
            ]
        # use_collectives=False: every rank plans alone, as itself.
        world = _dist_world_size()
        if world > 1 and not proposals[0].explicit:
            raise ValueError(
                "gpusnap.dcp.StorageWriter: with use_collectives=False the ranks cannot "
                "agree on a step: pass step= explicitly"
            )
        return [
            dataclasses.replace(p, storage_data=_Placement(step, rank, world)) for p in plans
        ]

    def _placement(self, plan: SavePlan) -> _Placement:
        placement = plan.storage_data
        if isinstance(placement, _Placement):
            return placement
        raise ValueError(
            "gpusnap.dcp.StorageWriter: the final save plan has no placement "
            "(was prepare_global_plan skipped?)"
        )

    # -- data --

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        record = self._record()
        if record is not None:
            results = self._write_staged(record, plan)
        else:
            results = self._write_now(plan, planner)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_now(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        placement = self._placement(plan)
        step, rank, world = placement.step, placement.rank, placement.world_size
        client = self._conn.open(self.job, rank, world)
        results: list[WriteResult] = []
        try:
            spans = _Spans()
            cuda_devices: set[int] = set()
            total = 0
            for name, item in _plan_names(plan).items():
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    tensor = _bytes_tensor(data, item)
                else:
                    tensor = _item_tensor(data, item)
                nbytes = _register(client, name, tensor, spans, cuda_devices)
                total += nbytes
                results.append(WriteResult(item.index, nbytes, Location(rank, name)))
            marker = json.dumps(
                {"format": FORMAT, "rank": rank, "world_size": world, "items": len(results)}
            ).encode()
            _register(client, MARKER, torch.frombuffer(bytearray(marker), dtype=torch.uint8))
            _capture_or_raise(
                client, step, _current_streams(cuda_devices),
                f"job {self.job!r} rank {rank}: the snapshot",
            )
            committed = client.wait_committed(step)
        finally:
            client.close()
        self.last_step = step
        log.info(
            "dcp: job %r rank %d/%d committed step %d (%d items, %d bytes, %.3f s to persist)",
            self.job,
            rank,
            world,
            step,
            len(results),
            total,
            committed["persist_s"],
        )
        return results

    def _write_staged(self, record: _Staged, plan: SavePlan) -> list[WriteResult]:
        """Checks the final plan against the staged capture, waits for its
        commit, then seals it: only a sealed step is complete."""
        placement = self._placement(plan)
        got = (placement.step, placement.rank, placement.world_size)
        want = (record.step, record.rank, record.world_size)
        if got != want:
            raise ValueError(
                f"gpusnap.dcp.StorageWriter: the save placed this rank as (step, rank, world) "
                f"{got}, but it staged {want} (the default process group's rank and size): "
                "async_save with a process_group or no_dist cannot use the writer as stager"
            )
        results: list[WriteResult] = []
        for name, item in _plan_names(plan).items():
            staged = record.names.get(name)
            if staged is None:
                raise InvalidSpec(
                    f"{item.index}: the plan saves {name!r}, which the staged capture of job "
                    f"{record.job!r} step {record.step} does not hold (a planner other than "
                    "DCP's default one?)"
                )
            if item.type != WriteItemType.BYTE_IO:
                td = item.tensor_data
                assert td is not None and td.chunk is not None
                if staged != (td.properties.dtype, tuple(td.chunk.sizes)):
                    raise InvalidSpec(
                        f"{item.index}: staged as {staged[0]} {staged[1]}, planned as "
                        f"{td.properties.dtype} {tuple(td.chunk.sizes)}"
                    )
            results.append(
                WriteResult(item.index, record.nbytes[name], Location(record.rank, name))
            )
        committed = record.committed.result()
        self._seal(record)
        self.last_step = record.step
        log.info(
            "dcp: job %r rank %d/%d committed and sealed staged step %d (%d of %d staged "
            "items in the plan, %.3f s to persist)",
            record.job,
            record.rank,
            record.world_size,
            record.step,
            len(results),
            len(record.names),
            committed["persist_s"],
        )
        return results

    def _seal(self, record: _Staged) -> None:
        """Commits rank world_size + rank of the staged step: its one
        tensor says that this rank's final plan matched what it staged."""
        seal = json.dumps(
            {"format": FORMAT, "rank": record.rank, "world_size": record.world_size}
        ).encode()
        world = record.world_size
        client = self._conn.open(record.job, world + record.rank, 2 * world)
        try:
            _register(client, SEAL, torch.frombuffer(bytearray(seal), dtype=torch.uint8))
            _capture_or_raise(
                client, record.step, None, f"job {record.job!r} rank {record.rank}: the seal"
            )
            client.wait_committed(record.step)
        finally:
            client.close()

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # Every rank's write_data returned only after its snapshot was
        # committed (and a staged one sealed), and DCP calls finish only
        # once every rank's did: the checkpoint is complete, and its
        # metadata is in the names.
        log.debug(
            "dcp: job %r step %s finished: %d ranks, %d items",
            self.job,
            self.last_step,
            len(results),
            sum(len(r) for r in results),
        )


def _check_staged(plans: list[SavePlan], proposals: list[Any]) -> None:
    """For staged saves (the coordinator's check): every rank staged, each
    rank's final plan is in what it staged, and what it staged beyond its
    plan is saved by another rank too (the replicated items DCP's dedup
    gave another rank), so that the checkpoint holds no item the plans
    leave out."""
    staged = [p.staged for p in proposals]
    if all(s is None for s in staged):
        return
    if any(s is None for s in staged):
        raise ValueError(
            "gpusnap.dcp.StorageWriter: some ranks staged their items (async_save with the "
            "writer as stager) and some did not"
        )
    planned = [set(_plan_names(p)) for p in plans]
    for rank, (names, have) in enumerate(zip(planned, staged)):
        assert have is not None
        missing = names - have
        if missing:
            raise InvalidSpec(
                f"rank {rank}'s plan saves {sorted(missing)[:5]}, which it did not stage "
                "(a planner other than DCP's default one?)"
            )
        others = set().union(*(n for r, n in enumerate(planned) if r != rank))
        extra = have - names - others
        if extra:
            raise InvalidSpec(
                f"rank {rank} staged {sorted(extra)[:5]}, which no rank's plan saves "
                "(a planner other than DCP's default one?)"
            )


# ---- the reader ----


def _failed_metadata() -> Metadata:
    return Metadata(state_dict_metadata={}, storage_data={})


class StorageReader(_StorageReader):
    """Loads the DCP checkpoint of step ``step`` of gpusnap job ``job``
    (``step=None``: the newest step the daemon lists as complete).

    A missing step makes ``read_metadata`` raise ``gpusnap.NotFound``;
    ``dcp.load`` raises it inside DCP's ``CheckpointException`` (in its
    ``failures``), as DCP does with every rank's error. When a rank's items
    are in another rank's snapshot, reading them waits, up to
    ``busy_timeout`` seconds, while another process holds that (job, rank).
    """

    def __init__(
        self,
        job: str,
        step: int | None = None,
        *,
        socket: str | os.PathLike[str] | None = None,
        connect_timeout: float = 10.0,
        call_timeout: float = 60.0,
        commit_timeout: float = 600.0,
        busy_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self.job = job
        self.step = step
        self.busy_timeout = busy_timeout
        self._conn = _Connection(
            None if socket is None else os.fspath(socket),
            connect_timeout,
            call_timeout,
            commit_timeout,
            busy_timeout,
        )
        self.load_id = uuid.uuid4().hex
        self.is_coordinator = True
        self.rank = 0
        self.world_size = 0
        self.loaded_step: int | None = None
        """The step ``read_metadata`` resolved."""
        self._tables: dict[int, list[tuple[str, str, list[int]]]] = {}
        self._snapshot_world = 0
        self._locations: dict[MetadataIndex, tuple[Location, ...]] = {}
        self._failure: BaseException | None = None

    @property
    def checkpoint_id(self) -> str:
        return _checkpoint_id(self.job, self.step if self.loaded_step is None else self.loaded_step)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.job, self.step = parse_checkpoint_id(checkpoint_id)
        self.load_id = uuid.uuid4().hex
        self.loaded_step = None
        self._tables = {}
        self._locations = {}
        self._failure = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return StorageWriter.validate_checkpoint_id(checkpoint_id)

    # -- metadata --

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None and self._failure is not None:
            # dcp.load swallows read_metadata's error and asks again, for
            # rank-local metadata; an error then too would reach the caller
            # as "metadata is None". Hand DCP a placeholder instead, so that
            # set_up_storage_reader raises the real error (which DCP wraps
            # in its CheckpointException, as it does every rank's error).
            return _failed_metadata()
        self._failure = None
        try:
            return self._read_metadata()
        except Exception as e:
            self._failure = e
            raise

    def _resolve_step(self, listing: dict[str, Any]) -> tuple[int, int | None]:
        """(step, world size) of the checkpoint to load: a step every rank
        committed on this node, or one complete in the object store (each
        rank's restore downloads what this node lacks). The world size is
        None for a step only the object store holds (no rank of it here to
        say it)."""
        job = self.job
        snapshots = [s for s in listing.get("snapshots", []) if s["job"] == job]
        local_complete = set(_agree.local_complete_steps(listing, job))
        remote_complete = set(_agree.remote_complete_steps(listing, job))
        complete = _complete_steps(listing, job)
        remote_error = listing.get("remote_error")
        unlisted = (
            f" (the object store could not be listed: {remote_error})" if remote_error else ""
        )
        if self.step is None:
            if not complete:
                raise NotFound(
                    f"job {job!r} has no complete checkpoint"
                    + (
                        f" (steps with some ranks only: {sorted({s['step'] for s in snapshots})})"
                        if snapshots
                        else ""
                    )
                    + unlisted
                )
            step = complete[-1]
        else:
            step = self.step
        at_step = [s for s in snapshots if s["step"] == step]
        if not at_step:
            if step in remote_complete:
                return step, None
            raise NotFound(f"job {job!r} has no step {step}{unlisted}")
        worlds = {s["world_size"] for s in at_step}
        if len(worlds) != 1:
            raise Corrupt(
                f"job {job!r} step {step}: the ranks disagree on the world size ({worlds})"
            )
        world = worlds.pop()
        if step in remote_complete:
            # Every rank is in the object store: a rank missing here is
            # downloaded by its restore.
            return step, world
        ranks = {s["rank"] for s in at_step}
        if step not in local_complete or ranks != set(range(world)):
            missing = sorted(set(range(world)) - ranks)
            raise NotFound(
                f"job {job!r} step {step} is not complete: rank(s) {missing} of {world} "
                "have not committed it (on this node's daemon, nor in the object store)"
                + unlisted
            )
        return step, world

    def _read_metadata(self) -> Metadata:
        client = self._conn.open(self.job)
        try:
            step, world = self._resolve_step(client.list())
            if world is None:
                # Complete only in the object store: its manifests say the
                # world size.
                world = int(client.describe(step, rank=0, job=self.job)["world_size"])
            tables = {}
            for rank in range(world):
                d = client.describe(step, rank=rank, job=self.job)
                tables[rank] = [(t["name"], t["dtype"], list(t["shape"])) for t in d["tensors"]]
        finally:
            client.close()
        tables = _without_seals(self.job, step, tables)
        md, locations = _metadata_from_tables(self.job, step, tables)
        md.storage_meta = StorageMeta(
            checkpoint_id=_checkpoint_id(self.job, step), load_id=self.load_id
        )
        self.loaded_step = step
        self.world_size = len(tables)
        self._snapshot_world = world
        self._tables = tables
        self._locations = locations
        return md

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self._failure is not None:
            raise self._failure
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if isinstance(metadata.storage_data, dict) and metadata.storage_data:
            self._locations = dict(metadata.storage_data)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        assert self.loaded_step is not None, "read_metadata was not called"
        return dataclasses.replace(plan, storage_data=_ReadStep(self.loaded_step))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        steps = {p.storage_data.step for p in plans if isinstance(p.storage_data, _ReadStep)}
        if len(steps) > 1:
            raise ValueError(
                f"gpusnap.dcp.StorageReader: the ranks resolved different steps of job "
                f"{self.job!r} ({sorted(steps)}): pass step= explicitly"
            )
        return plans

    # -- data --

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.loaded_step is not None, "read_metadata was not called"
        by_rank: dict[int, list[tuple[ReadItem, Location]]] = {}
        for req in plan.items:
            places = self._locations.get(req.storage_index)
            if not places:
                raise NotFound(
                    f"{req.storage_index} is not in job {self.job!r} step {self.loaded_step}"
                )
            # A copy in this rank's own snapshot if there is one.
            where = next((p for p in places if p.rank == self.rank), places[0])
            by_rank.setdefault(where.rank, []).append((req, where))
        world = max(self.world_size, 1)
        # This rank's own snapshot first, then the others in turn, so that
        # ranks reading each other's snapshots do not all queue on rank 0.
        for source in sorted(by_rank, key=lambda k: (k - self.rank) % world):
            buffers = self._restore_rank(source)
            for req, where in by_rank[source]:
                src = buffers[where.name]
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(src.numpy().tobytes()))
                    continue
                src = _narrow(src, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != src.size():
                    raise InvalidSpec(
                        f"{req.storage_index}: the target is {tuple(target.size())}, the "
                        f"checkpoint's slice {tuple(src.size())}"
                    )
                target.copy_(src)
                planner.commit_tensor(req, target)
            del buffers
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _restore_rank(self, rank: int) -> dict[str, torch.Tensor]:
        """Restores every tensor of ``rank``'s snapshot into new CPU
        tensors (the daemon verifies them)."""
        step = self.loaded_step
        assert step is not None
        client = self._conn.open(self.job, rank, self._snapshot_world)
        try:
            buffers: dict[str, torch.Tensor] = {}
            for name, dtype, shape in self._tables[rank]:
                torch_dtype = _DTYPES.get(dtype)
                if torch_dtype is None:
                    raise UnsupportedTensor(f"{name}: dtype {dtype} has no torch dtype here")
                t = torch.empty(shape, dtype=torch_dtype)
                _register(client, name, t)
                buffers[name] = t
            # A held (job, rank) answers the registration this restore sends
            # first with Busy, which the native client retries up to
            # busy_timeout; the restore request itself is never answered
            # Busy (the store's InProgress and AlreadyCommitted, the kinds
            # the daemon sends as Busy, come only from writes).
            info = client.restore(step)
            if info is None:
                raise NotFound(f"job {self.job!r} rank {rank} has no step {step}")
        finally:
            client.close()
        marker = json.loads(buffers[MARKER].numpy().tobytes())
        if marker.get("format") != FORMAT or marker.get("rank") != rank:
            raise Corrupt(
                f"job {self.job!r} rank {rank} step {step}: its {MARKER} marker says {marker}"
            )
        log.debug(
            "dcp: restored job %r rank %d step %d from %s", self.job, rank, step, info["source"]
        )
        return buffers


def _without_seals(
    job: str, step: int, tables: dict[int, list[tuple[str, str, list[int]]]]
) -> dict[int, list[tuple[str, str, list[int]]]]:
    """The data ranks' tables of a step: a staged step of W ranks is a world
    of 2W snapshots, ranks W..2W-1 holding only the seal of rank r - W."""
    seals = {r for r, table in tables.items() if [n for n, _, _ in table] == [SEAL]}
    if not seals:
        return tables
    world = len(tables) // 2
    if len(tables) != 2 * world or seals != set(range(world, 2 * world)):
        raise Corrupt(
            f"job {job!r} step {step}: seals on ranks {sorted(seals)} of a world of "
            f"{len(tables)} (a staged step of W ranks has its seals on ranks W..2W-1)"
        )
    return {r: table for r, table in tables.items() if r < world}


def _metadata_from_tables(
    job: str, step: int, tables: dict[int, list[tuple[str, str, list[int]]]]
) -> tuple[Metadata, dict[MetadataIndex, tuple[Location, ...]]]:
    """DCP's Metadata from each rank's tensor table; its storage_data maps
    every item to where it lives: one location, or several when ranks
    saved copies of it (``dcp.save(..., use_collectives=False)`` saves
    every rank's replicated items on that rank)."""
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    mappings: dict[str, tuple[str | int, ...]] = {}
    paths: dict[str, tuple[str | int, ...] | None] = {}
    # Every item's locations, and every tensor's chunks.
    locations: dict[MetadataIndex, list[Location]] = {}
    chunk_shapes: dict[MetadataIndex, tuple[int, ...]] = {}
    chunks: dict[str, list[ChunkStorageMetadata]] = {}
    where = f"job {job!r} step {step}"
    for rank in sorted(tables):
        names = [name for name, _, _ in tables[rank]]
        if MARKER not in names:
            raise NotFound(
                f"{where} is not a gpusnap.dcp checkpoint: rank {rank}'s snapshot has no "
                f"{MARKER!r} tensor"
            )
        for name, dtype, shape in tables[rank]:
            try:
                parsed = _parse_name(name)
            except ValueError as e:
                raise Corrupt(f"{where} rank {rank}: tensor {name!r}: {e}") from None
            if parsed is None:
                continue
            fqn = parsed.fqn
            if fqn in paths and paths[fqn] != parsed.path:
                raise Corrupt(f"{where}: {fqn!r} is saved under two object paths")
            paths[fqn] = parsed.path
            if parsed.path is not None:
                mappings[fqn] = parsed.path
            here = Location(rank, name)
            md = state.get(fqn)
            if parsed.is_bytes:
                if dtype != "U8" or len(shape) != 1:
                    raise Corrupt(f"{where} rank {rank}: bytes item {name!r} is {dtype} {shape}")
                if md is not None and not isinstance(md, BytesStorageMetadata):
                    raise Corrupt(f"{where}: {fqn!r} is saved both as bytes and as a tensor")
                state[fqn] = BytesStorageMetadata()
                locations.setdefault(MetadataIndex(fqn), []).append(here)
                continue
            torch_dtype = _DTYPES.get(dtype)
            if torch_dtype is None:
                raise Corrupt(f"{where} rank {rank}: {name!r} has dtype {dtype}")
            if len(parsed.offsets) != len(shape) or len(parsed.size) != len(shape):
                raise Corrupt(
                    f"{where} rank {rank}: {name!r} has shape {shape}, which does not fit "
                    f"its offsets {parsed.offsets} and size {parsed.size}"
                )
            if any(o + n > s for o, n, s in zip(parsed.offsets, shape, parsed.size)):
                raise Corrupt(
                    f"{where} rank {rank}: chunk {name!r} {shape} lies outside its tensor"
                )
            props = _properties(torch_dtype, parsed.flags)
            if md is None:
                md = TensorStorageMetadata(
                    properties=props, size=torch.Size(parsed.size), chunks=[]
                )
                state[fqn] = md
            elif not isinstance(md, TensorStorageMetadata):
                raise Corrupt(f"{where}: {fqn!r} is saved both as bytes and as a tensor")
            elif md.size != torch.Size(parsed.size) or md.properties != props:
                raise Corrupt(
                    f"{where}: the chunks of {fqn!r} disagree on its size or properties "
                    f"({tuple(md.size)} {md.properties} vs {parsed.size} {props}, rank {rank})"
                )
            index = MetadataIndex(fqn, parsed.offsets)
            if index in chunk_shapes:
                if chunk_shapes[index] != tuple(shape):
                    raise Corrupt(
                        f"{where}: chunk {parsed.offsets} of {fqn!r} is {chunk_shapes[index]} "
                        f"on one rank and {tuple(shape)} on rank {rank}"
                    )
            else:
                chunk_shapes[index] = tuple(shape)
                chunks.setdefault(fqn, []).append(
                    ChunkStorageMetadata(
                        offsets=torch.Size(parsed.offsets), sizes=torch.Size(shape)
                    )
                )
            locations.setdefault(index, []).append(here)
    storage: dict[MetadataIndex, tuple[Location, ...]] = {}
    for fqn, fqn_chunks in chunks.items():
        md = state[fqn]
        assert isinstance(md, TensorStorageMetadata)
        # As DCP orders them: by the rank that saved them, then by offsets.
        fqn_chunks.sort(
            key=lambda c: (locations[MetadataIndex(fqn, c.offsets)][0].rank, tuple(c.offsets))
        )
        md.chunks.extend(fqn_chunks)
        for i, chunk in enumerate(fqn_chunks):
            index = MetadataIndex(fqn, chunk.offsets, i)
            storage[index] = tuple(locations[index])
    for index, places in locations.items():
        if index.offset is None:
            storage[index] = tuple(places)
    metadata = Metadata(
        state_dict_metadata=state,
        planner_data=mappings or None,
        storage_data=storage,
        version=DCP_VERSION,
    )
    return metadata, storage


__all__ = [
    "StorageWriter",
    "StorageReader",
    "Location",
    "item_name",
    "latest_step",
    "parse_checkpoint_id",
    "FORMAT",
]


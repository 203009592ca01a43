#!/usr/bin/env python3
"""Checks gpusnapd's commit protocol on the system calls `strace -f -y`
recorded (see `tests/strace-check`, which runs the daemon and calls this).

For every snapshot committed (a successful rename of `step-N.partial` to
`step-N` under `<root>/<job>/<rank>/`), in the order the log shows:

  S1  the partial directory was made (mkdir) before its data file;
  S2  the data file was created, its space reserved (fallocate) before the
      first write, written, trimmed (ftruncate) to the manifest's file_len,
      and every write to it returned before its last successful
      fdatasync/fsync entered; nothing touched it after that sync;
  S3  the manifest was created after that sync returned; every write to it
      returned before its own successful sync, which returned before
  S4  the fsync of the partial directory, which returned before
  S5  the rename, which returned before
  S6  an fsync of the rank directory, which returned before
  S7  the daemon sent the client its `committed` event for the step;
  S8  nothing wrote to, trimmed, reserved or removed a file of the
      committed directory afterwards except through retention (D1-D3);
  S9  the manifest written names the job, rank and step of its directory,
      the file length, the backend, and (with --workload) the chunk CRCs
      the workload computed for the content it captured.

How the data reached the file is checked by backend. `pwrite`/`buffered`:
every transfer is a pwrite64 on the file, their ranges cover the whole
file, and their number is the manifest's transfer count. `io_uring`: the
transfers are ring operations strace does not show. What it shows is
checked: the file was put in the lane thread's ring (io_uring_register
FILES_UPDATE naming the file), the io_uring_enter calls on that ring
between that and the fdatasync consumed exactly the manifest's transfer
count of submission entries, and no io_uring_enter touched the ring between
the fdatasync and the file leaving the ring. That the completions were all
reaped before the fdatasync is not visible here (completions sit in shared
memory); the pipeline's drain and the simulated storage prove it.

Job claims (a rename of `<root>/.claiming-<job>` to `<root>/<job>`):
  C1  OWNER was written, then synced, then the temporary directory fsynced,
      each returning before the next entered, all before the rename;
  C2  an fsync of the root followed the rename;
  C3  no job directory was ever made by mkdir in the root (only by the
      rename), and a new rank directory's parent was fsynced after its mkdir
      and before the rank's first snapshot directory was made.

Retention deletions (a rename of a committed `step-N` to `step-N.trash`):
  D1  at the rename, at least --keep newer committed snapshots of that
      rank stood (the newest is never the one removed);
  D2  an fsync of the rank directory returned before the first removal in
      the trash directory entered;
  D3  the trash directory was removed.

Everywhere:
  G1  after a failed fdatasync/fsync/sync_file_range on a descriptor, no
      write, trim, reservation or sync on it until it is closed, and no
      directory holding that file was renamed into place.

Prints its figures, then every violation; exits 1 on any violation, or
when fewer snapshots, claims or deletions were seen than --expect-* say
(so an empty or truncated log never passes), 2 when the log cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from strace_log import Call, Fd, ParseError, Str, parse, unescape  # noqa: E402

WRITES = {"write", "pwrite64", "pwritev", "pwritev2", "writev"}
SYNCS = {"fdatasync", "fsync", "sync_file_range"}
MUTATES = WRITES | {"ftruncate", "fallocate"}
RENAMES = {"rename", "renameat", "renameat2"}
MKDIRS = {"mkdir", "mkdirat"}
UNLINKS = {"unlink", "unlinkat", "rmdir"}
OPENS = {"open", "creat", "openat", "openat2"}
DATA_FILE = "state.safetensors"
MANIFEST_FILE = "MANIFEST.json"
OWNER_FILE = "OWNER"
CLAIM_PREFIX = ".claiming-"
STEP_DIR = re.compile(r"^step-(\d+)$")
PARTIAL_DIR = re.compile(r"^step-(\d+)\.partial$")
TRASH_DIR = re.compile(r"^step-(\d+)\.trash$")


@dataclass
class Figures:
    syscalls: int = 0
    lines: int = 0
    threads: int = 0
    snapshots: int = 0
    snapshots_pwrite: int = 0
    snapshots_ring: int = 0
    pwrites: int = 0
    ring_entries: int = 0
    manifests_matched: int = 0
    committed_events: int = 0
    claims: int = 0
    rank_dirs: int = 0
    deletions: int = 0
    failed_syncs: int = 0
    backends: dict = field(default_factory=lambda: defaultdict(int))


class Checker:
    def __init__(self, calls: list[Call], root: str, keep: int, chunk_bytes: int | None, workload: dict | None):
        self.calls = calls
        self.root = os.path.normpath(root)
        self.keep = keep
        self.chunk_bytes = chunk_bytes
        self.workload = workload
        self.violations: list[str] = []
        self.fig = Figures(syscalls=len(calls), threads=len({c.tid for c in calls}))
        self.cwd = None
        for c in calls:
            for a in c.args:
                if isinstance(a, Fd) and a.number == -100:
                    self.cwd = a.path
                    break
            if self.cwd:
                break
        # Every call touching a path, by path (a descriptor's path or a path
        # argument, resolved).
        self.by_path: dict[str, list[Call]] = defaultdict(list)
        # And by the directory holding that path.
        self.by_dir: dict[str, list[Call]] = defaultdict(list)
        self.by_name: dict[str, list[Call]] = defaultdict(list)
        for c in calls:
            self.by_name[c.name].append(c)
            for p in dict.fromkeys(self.paths_of(c)):
                self.by_path[p].append(c)
                self.by_dir[os.path.dirname(p)].append(c)

    # -- helpers ---------------------------------------------------------

    def violation(self, code: str, what: str, *calls: Call) -> None:
        text = f"{code}: {what}"
        for c in calls:
            if c is not None:
                text += f"\n      {c}"
        self.violations.append(text)

    def resolve(self, base: Fd | None, arg) -> str | None:
        if not isinstance(arg, Str):
            return None
        p = arg.data.decode("utf-8", "replace")
        if not p.startswith("/"):
            anchor = base.path if base is not None else self.cwd
            if anchor is None:
                return None
            p = os.path.join(anchor, p)
        return os.path.normpath(p)

    def path_args(self, c: Call) -> list[str]:
        """The path arguments of a path-taking call, resolved."""
        n = c.name
        if n in ("rename", "mkdir", "unlink", "rmdir", "open", "creat"):
            if n == "rename":
                return [p for p in (self.resolve(None, c.args[0]), self.resolve(None, c.args[1])) if p]
            p = self.resolve(None, c.args[0]) if c.args else None
            return [p] if p else []
        if n in ("openat", "openat2", "mkdirat", "unlinkat"):
            p = self.resolve(c.fd(0), c.args[1]) if len(c.args) > 1 else None
            return [p] if p else []
        if n in ("renameat", "renameat2"):
            return [p for p in (self.resolve(c.fd(0), c.args[1]), self.resolve(c.fd(2), c.args[3])) if p]
        return []

    def paths_of(self, c: Call) -> list[str]:
        out = self.path_args(c)
        if c.name not in ("openat", "openat2", "mkdirat", "unlinkat", "renameat", "renameat2"):
            f = c.fd(0)
            if f is not None and f.path.startswith("/"):
                out.append(os.path.normpath(f.path))
        return out

    def fd_path(self, c: Call) -> str | None:
        f = c.fd(0)
        return os.path.normpath(f.path) if f is not None and f.path.startswith("/") else None

    def on(self, path: str, names: set, lo: int = -1, hi: int | None = None) -> list[Call]:
        """Calls named `names` on the descriptor of `path`, entered in (lo, hi)."""
        return [
            c
            for c in self.by_path.get(path, [])
            if c.name in names and self.fd_path(c) == path and c.start > lo and (hi is None or c.start < hi)
        ]

    def renames(self, src_re, dst_re) -> list[tuple[Call, str, str]]:
        out = []
        for c in self.calls:
            if c.name in RENAMES and c.ok:
                paths = self.path_args(c)
                if len(paths) == 2 and src_re(paths[0]) and dst_re(paths[1]):
                    out.append((c, paths[0], paths[1]))
        return out

    def rank_of(self, d: str):
        """(job, rank) of `<root>/<job>/<rank>`, else None."""
        rel = os.path.relpath(d, self.root)
        parts = rel.split(os.sep)
        if len(parts) == 2 and not parts[0].startswith(".") and parts[1].isdigit():
            return parts[0], int(parts[1])
        return None

    def first_sync_after(self, path: str, after: int, before: int | None = None) -> Call | None:
        for c in self.on(path, SYNCS, after, before):
            if c.ok:
                return c
        return None

    # -- G1 --------------------------------------------------------------

    def check_failed_syncs(self) -> set[str]:
        """G1; returns the directories holding a file whose sync failed."""
        tainted_dirs = set()
        open_fds: dict[int, list[Call]] = {}
        dead: dict[int, Call] = {}
        for c in self.calls:
            f = c.fd(0)
            if c.name in OPENS and c.ok:
                dead.pop(c.ret, None)
                continue
            if f is None:
                continue
            if c.name == "close":
                dead.pop(f.number, None)
                continue
            if f.number in dead and (c.name in MUTATES or c.name in SYNCS) and c.start > dead[f.number].end:
                self.violation("G1", f"{c.name} on {f.path} after a failed sync of it", dead[f.number], c)
            if c.name in SYNCS and not c.ok and c.ret is not None:
                self.fig.failed_syncs += 1
                dead[f.number] = c
                tainted_dirs.add(os.path.dirname(os.path.normpath(f.path)))
        del open_fds
        return tainted_dirs

    # -- snapshots -------------------------------------------------------

    def check_snapshots(self, tainted: set[str]) -> dict:
        committed = {}
        commits = self.renames(
            lambda s: PARTIAL_DIR.match(os.path.basename(s)) is not None,
            lambda d: STEP_DIR.match(os.path.basename(d)) is not None,
        )
        events = self.committed_events()
        for rename, partial, final in commits:
            m = PARTIAL_DIR.match(os.path.basename(partial))
            step = int(m.group(1))
            owner = self.rank_of(os.path.dirname(partial))
            if owner is None or os.path.dirname(partial) != os.path.dirname(final) or os.path.basename(final) != f"step-{step}":
                self.violation("S5", f"rename of {partial} to {final} is not step-N.partial -> step-N in one rank directory", rename)
                continue
            self.fig.snapshots += 1
            job, rank = owner
            if partial in tainted:
                self.violation("G1", f"{partial} renamed into place after a failed sync of a file in it", rename)
            manifest = self.check_one_snapshot(rename, partial, final, job, rank, step, events)
            committed[(job, rank, step)] = (rename, final, manifest)
        return committed

    def committed_events(self) -> dict[int, list[Call]]:
        """The daemon's writes of a `committed` event, by step."""
        out: dict[int, list[Call]] = defaultdict(list)
        pat = re.compile(rb'"type":"committed","step":(\d+)[,}]')
        for c in self.by_name["write"] + self.by_name["sendto"] + self.by_name["sendmsg"] + self.by_name["writev"]:
            f = c.fd(0)
            if not c.ok or f is None or "UNIX" not in f.path:
                continue
            if c.name in ("write", "sendto"):
                blobs = [a.data for a in c.args if isinstance(a, Str)]
            else:
                # sendmsg/writev: the strings inside their iovec structures.
                blobs = [unescape(s) for raw in c.raw_args for s in re.findall(r'"((?:[^"\\]|\\.)*)"', raw)]
            steps = {int(m.group(1)) for b in blobs for m in pat.finditer(b)}
            for step in steps:
                out[step].append(c)
        for told in out.values():
            told.sort(key=lambda c: c.start)
        return out

    def check_one_snapshot(self, rename: Call, partial: str, final: str, job: str, rank: int, step: int, events):
        data = os.path.join(partial, DATA_FILE)
        man = os.path.join(partial, MANIFEST_FILE)
        name = f"{job}/{rank}/step-{step}"
        mkdirs = [c for c in self.by_path.get(partial, []) if c.name in MKDIRS and c.ok and c.start < rename.start]
        if not mkdirs:
            self.violation("S1", f"{name}: its partial directory was never made", rename)
            return None
        mk = mkdirs[-1]
        creates = [
            c
            for c in self.by_path.get(data, [])
            if c.name in OPENS and c.ok and "O_CREAT" in " ".join(c.raw_args) and mk.end < c.start < rename.start
        ]
        if len(creates) != 1:
            self.violation("S2", f"{name}: {len(creates)} creations of its data file after its mkdir (one expected)", mk, rename)
            return None
        create = creates[0]
        syncs = [c for c in self.on(data, SYNCS, create.end, rename.start) if c.ok]
        failed = [c for c in self.on(data, SYNCS, create.end, rename.start) if not c.ok]
        if failed:
            self.violation("S2", f"{name}: committed although a sync of its data file failed", failed[0], rename)
        if not syncs:
            self.violation("S2", f"{name}: its data file was never synced before the rename", create, rename)
            return None
        dsync = syncs[-1]
        writes = self.on(data, WRITES, create.end, rename.start)
        late = [w for w in writes if w.end > dsync.start]
        if late:
            self.violation("S2", f"{name}: a write to the data file had not returned when its last sync entered", late[0], dsync)
        after = self.on(data, MUTATES | SYNCS, dsync.end, None)
        for c in after:
            self.violation("S8", f"{name}: its data file was touched after its sync", dsync, c)
        reserve = self.on(data, {"fallocate"}, create.end, dsync.start)
        trims = [c for c in self.on(data, {"ftruncate"}, create.end, dsync.start) if c.ok]
        if not reserve or not reserve[0].ok:
            self.violation("S2", f"{name}: no successful fallocate of its data file", create, dsync)
        elif writes and writes[0].start < reserve[0].end:
            self.violation("S2", f"{name}: a write to the data file entered before its space was reserved", reserve[0], writes[0])
        if len(trims) != 1:
            self.violation("S2", f"{name}: {len(trims)} ftruncates of the data file before its sync (one expected)", create, dsync)
        trimmed = trims[-1].args[1] if trims and isinstance(trims[-1].args[1], int) else None
        if trims and writes and any(w.end > trims[-1].start for w in writes):
            self.violation("S2", f"{name}: a write returned after the trim", trims[-1])

        # S3: the manifest.
        mcreates = [c for c in self.by_path.get(man, []) if c.name in OPENS and c.ok and c.start < rename.start and c.start > mk.end]
        if len(mcreates) != 1:
            self.violation("S3", f"{name}: {len(mcreates)} creations of its manifest (one expected)", rename)
            return None
        mcreate = mcreates[0]
        if mcreate.start < dsync.end:
            self.violation("S3", f"{name}: the manifest was created before the data file's sync returned", dsync, mcreate)
        mwrites = self.on(man, WRITES, mcreate.end, rename.start)
        if not mwrites:
            self.violation("S3", f"{name}: nothing was written to its manifest", mcreate)
            return None
        if mwrites[0].start < dsync.end:
            self.violation("S3", f"{name}: the manifest was written before the data file's sync returned", dsync, mwrites[0])
        msyncs = [c for c in self.on(man, SYNCS, mcreate.end, rename.start) if c.ok]
        if not msyncs:
            self.violation("S3", f"{name}: its manifest was never synced before the rename", mwrites[-1], rename)
            return None
        msync = msyncs[-1]
        for w in mwrites:
            if w.end > msync.start:
                self.violation("S3", f"{name}: a manifest write had not returned when its sync entered", w, msync)
        # S4: the partial directory.
        psync = self.first_sync_after(partial, msync.end, rename.start)
        if psync is None:
            self.violation("S4", f"{name}: the partial directory was not fsynced between the manifest's sync and the rename", msync, rename)
        # S5: the rename after all of it.
        if rename.start < msync.end or (psync is not None and rename.start < psync.end):
            self.violation("S5", f"{name}: the rename entered before the syncs returned", msync, rename)
        # S6: the rank directory fsynced after the rename, before the client
        # is told; S7: the client told, after that.
        told = events.get(step, [])
        rank_dir = os.path.dirname(final)
        rsync = self.first_sync_after(rank_dir, rename.end, told[0].start if told else None)
        if rsync is None:
            self.violation("S6", f"{name}: the rank directory was not fsynced between the rename and the committed event", rename, told[0] if told else None)
        if not told:
            self.violation("S7", f"{name}: no committed event for step {step} was sent", rename)
        else:
            self.fig.committed_events += 1
            if len(told) > 1:
                self.violation("S7", f"{name}: {len(told)} committed events for step {step}", *told)
            if rsync is not None and told[0].start < rsync.end:
                self.violation("S7", f"{name}: the committed event was sent before the rank directory's fsync returned", rsync, told[0])
            if told[0].start < rename.end:
                self.violation("S7", f"{name}: the committed event was sent before the rename", rename, told[0])
        # S8: nothing writes into the committed directory.
        for c in self.by_dir.get(final, []):
            if c.start > rename.end and c.name in MUTATES:
                p = self.fd_path(c)
                if p is not None and os.path.dirname(p) == final:
                    self.violation("S8", f"{name}: a file of the committed snapshot was written", rename, c)
        manifest = self.check_manifest(name, mwrites, job, rank, step, trimmed)
        self.check_transfers(name, data, create, dsync, writes, manifest, trimmed)
        return manifest

    def check_manifest(self, name, mwrites, job, rank, step, trimmed):
        blob = b""
        for w in mwrites:
            s = w.string(1)
            if s is None or s.truncated:
                self.violation("S9", f"{name}: the manifest write is not shown whole (raise strace -s)", w)
                return None
            blob += s.data
        try:
            m = json.loads(blob)
        except ValueError as e:
            self.violation("S9", f"{name}: the manifest written is not JSON: {e}", mwrites[0])
            return None
        want = {"job": job, "rank": rank, "step": step}
        for k, v in want.items():
            if m.get(k) != v:
                self.violation("S9", f"{name}: the manifest says {k}={m.get(k)!r}, its directory {v!r}", mwrites[0])
        if trimmed is not None and m.get("file_len") != trimmed:
            self.violation("S9", f"{name}: manifest file_len {m.get('file_len')} but the file was trimmed to {trimmed}", mwrites[0])
        if self.chunk_bytes is not None and m.get("chunk_bytes") != self.chunk_bytes:
            self.violation("S9", f"{name}: manifest chunk_bytes {m.get('chunk_bytes')}, configured {self.chunk_bytes}", mwrites[0])
        self.fig.backends[m.get("io_backend", "?")] += 1
        return m

    def check_transfers(self, name, data, create, dsync, writes, manifest, trimmed):
        if manifest is None:
            return
        chunk = manifest["chunk_bytes"]
        expected = -(-manifest["header_len"] // chunk) + -(-manifest["data_len"] // chunk)
        ring = self.ring_of(data, create, dsync)
        if writes and ring is not None:
            self.violation("S2", f"{name}: its data file was written both by pwrite and through a ring", writes[0], ring[0])
            return
        if ring is not None:
            self.fig.snapshots_ring += 1
            register, ring_fd, unregister = ring
            enters = [
                c
                for c in self.by_name["io_uring_enter"]
                if c.fd(0) is not None and c.fd(0) is not None and c.fd(0).number == ring_fd and c.tid == register.tid
            ]
            inside = [c for c in enters if register.end < c.start < dsync.start]
            submitted = sum(c.ret for c in inside if c.ok)
            self.fig.ring_entries += submitted
            if submitted != expected:
                self.violation("S2", f"{name}: the ring took {submitted} submission entries for its data file, the manifest says {expected} transfers", register, dsync)
            if inside and inside[-1].end > dsync.start:
                self.violation("S2", f"{name}: an io_uring_enter on the file's ring had not returned when its sync entered", inside[-1], dsync)
            hi = unregister.start if unregister is not None else None
            for c in enters:
                if c.start > dsync.start and (hi is None or c.start < hi):
                    self.violation("S2", f"{name}: io_uring_enter on the file's ring after its sync", dsync, c)
            if unregister is None:
                self.violation("S2", f"{name}: its data file never left the ring", register)
            return
        if not writes:
            self.violation("S2", f"{name}: its data file was never written (no pwrite, no ring)", create, dsync)
            return
        self.fig.snapshots_pwrite += 1
        ok = [w for w in writes if w.ok and w.name == "pwrite64"]
        self.fig.pwrites += len(ok)
        if len(ok) != len(writes):
            self.violation("S2", f"{name}: a write to the data file failed or was not a pwrite64", next(w for w in writes if w not in ok))
        if len(ok) != expected:
            self.violation("S2", f"{name}: {len(ok)} pwrites of its data file, the manifest says {expected} transfers", create, dsync)
        covered = 0
        for w in sorted(ok, key=lambda w: w.args[3] if isinstance(w.args[3], int) else -1):
            at = w.args[3]
            if not isinstance(at, int) or at > covered or w.ret != w.args[2]:
                self.violation("S2", f"{name}: the pwrites leave a hole at {covered} or are short", w)
                return
            covered = max(covered, at + w.ret)
        if trimmed is not None and covered < trimmed:
            self.violation("S2", f"{name}: the pwrites cover {covered} bytes of a {trimmed}-byte file", create, dsync)

    def ring_of(self, data, create, dsync):
        """(register call, ring fd, unregister call or None) when the data
        file was put in a ring between its creation and its sync."""
        fd_number = create.ret
        for c in self.by_name["io_uring_register"]:
            if c.name != "io_uring_register" or not (create.end < c.start < dsync.start) or not c.ok:
                continue
            if len(c.raw_args) < 3 or "FILES_UPDATE" not in c.raw_args[1]:
                continue
            if f"{fd_number}<{data}>" in c.raw_args[2] or data in c.raw_args[2]:
                ring_fd = c.fd(0).number
                unregister = next(
                    (
                        u
                        for u in self.by_name["io_uring_register"]
                        if u.start > dsync.end
                        and u.fd(0) is not None
                        and u.fd(0).number == ring_fd
                        and len(u.raw_args) > 2
                        and "FILES_UPDATE" in u.raw_args[1]
                    ),
                    None,
                )
                return c, ring_fd, unregister
        return None

    # -- claims and rank directories -------------------------------------

    def check_claims(self) -> None:
        claims = self.renames(
            lambda s: os.path.dirname(s) == self.root and os.path.basename(s).startswith(CLAIM_PREFIX),
            lambda d: os.path.dirname(d) == self.root,
        )
        for rename, temp, job_dir in claims:
            job = os.path.basename(job_dir)
            self.fig.claims += 1
            if os.path.basename(temp) != CLAIM_PREFIX + job:
                self.violation("C1", f"claim {temp} renamed to {job_dir}, not its own job", rename)
            owner = os.path.join(temp, OWNER_FILE)
            mk = [c for c in self.by_path.get(temp, []) if c.name in MKDIRS and c.ok and c.start < rename.start]
            if not mk:
                self.violation("C1", f"job {job}: its claim directory was never made", rename)
                continue
            writes = self.on(owner, WRITES, mk[-1].end, rename.start)
            syncs = [c for c in self.on(owner, SYNCS, mk[-1].end, rename.start) if c.ok]
            if not writes or not syncs:
                self.violation("C1", f"job {job}: OWNER was not written and synced before the rename", rename)
                continue
            content = writes[0].string(1)
            if content is None or not re.fullmatch(rb"\d+\n", content.data):
                self.violation("C1", f"job {job}: OWNER holds {content.data if content else None!r}, not a uid and a newline", writes[0])
            if any(w.end > syncs[-1].start for w in writes):
                self.violation("C1", f"job {job}: an OWNER write had not returned when its sync entered", writes[-1], syncs[-1])
            tsync = self.first_sync_after(temp, syncs[-1].end, rename.start)
            if tsync is None:
                self.violation("C1", f"job {job}: the claim directory was not fsynced between OWNER's sync and the rename", syncs[-1], rename)
            rsync = self.first_sync_after(self.root, rename.end)
            if rsync is None:
                self.violation("C2", f"job {job}: the root was never fsynced after the rename", rename)
            for c in self.on(os.path.join(job_dir, OWNER_FILE), MUTATES, rename.end):
                self.violation("C1", f"job {job}: OWNER written after the claim", rename, c)
        for c in self.calls:
            if c.name in MKDIRS:
                for p in self.path_args(c):
                    if os.path.dirname(p) == self.root and not os.path.basename(p).startswith("."):
                        self.violation("C3", f"job directory {p} made by mkdir, not by a claim's rename", c)
                    if self.rank_of(p) is not None and c.ok:
                        self.check_rank_dir(c, p)

    def check_rank_dir(self, mk: Call, rank_dir: str) -> None:
        self.fig.rank_dirs += 1
        job_dir = os.path.dirname(rank_dir)
        first = next(
            (
                c
                for c in self.by_dir.get(rank_dir, [])
                if c.start > mk.end and c.name in MKDIRS and any(os.path.dirname(p) == rank_dir for p in self.path_args(c))
            ),
            None,
        )
        psync = self.first_sync_after(job_dir, mk.end, first.start if first else None)
        if psync is None:
            self.violation("C3", f"new rank directory {rank_dir}: its job directory was not fsynced before the rank's first snapshot", mk, first)

    # -- retention -------------------------------------------------------

    def check_deletions(self, committed: dict) -> None:
        trashes = self.renames(
            lambda s: STEP_DIR.match(os.path.basename(s)) is not None,
            lambda d: TRASH_DIR.match(os.path.basename(d)) is not None,
        )
        removed_at: dict[tuple, int] = {}
        for rename, final, trash in trashes:
            removed_at[(final,)] = rename.start
        for rename, final, trash in trashes:
            self.fig.deletions += 1
            owner = self.rank_of(os.path.dirname(final))
            step = int(STEP_DIR.match(os.path.basename(final)).group(1))
            name = f"{final}"
            if owner is None or trash != final + ".trash":
                self.violation("D1", f"{final} renamed to {trash}, not its own .trash in its rank directory", rename)
                continue
            job, rank = owner
            if (job, rank, step) not in committed:
                self.violation("D1", f"{name}: removed but never committed in this trace", rename)
                continue
            standing = [
                s
                for (j, r, s), (crename, cfinal, _) in committed.items()
                if j == job and r == rank and s > step and crename.end < rename.start and removed_at.get((cfinal,), 1 << 62) > rename.start
            ]
            if len(standing) < self.keep:
                self.violation("D1", f"{name}: removed while only {len(standing)} newer snapshots stood (keep {self.keep})", rename)
            rank_dir = os.path.dirname(final)
            removals = [
                c
                for c in self.by_path.get(trash, []) + self.by_dir.get(trash, [])
                if c.name in UNLINKS and c.start > rename.end and any(p == trash or os.path.dirname(p) == trash for p in self.path_args(c))
            ]
            removals.sort(key=lambda c: c.start)
            rsync = self.first_sync_after(rank_dir, rename.end)
            if rsync is None:
                self.violation("D2", f"{name}: the rank directory was never fsynced after the rename to .trash", rename)
            elif removals and removals[0].start < rsync.end:
                self.violation("D2", f"{name}: removal began before the rank directory's fsync returned", rsync, removals[0])
            if not any(c.ok and self.path_args(c) == [trash] for c in removals):
                self.violation("D3", f"{name}: the trash directory was never removed", rename)
        # A committed directory is never removed under its own name.
        for (job, rank, step), (crename, cfinal, _) in committed.items():
            for c in self.by_path.get(cfinal, []) + self.by_dir.get(cfinal, []):
                if c.name in UNLINKS and c.start > crename.end and any(p == cfinal or os.path.dirname(p) == cfinal for p in self.path_args(c)):
                    self.violation("S8", f"{cfinal}: removed under its committed name", crename, c)

    # -- workload --------------------------------------------------------

    def check_workload(self, committed: dict) -> None:
        if self.workload is None:
            return
        for snap in self.workload["snapshots"]:
            key = (snap["job"], snap["rank"], snap["step"])
            if key not in committed:
                self.violation("W1", f"{key}: the workload saw it committed, the trace has no commit of it")
                continue
            rename, _, manifest = committed[key]
            if manifest is None:
                continue
            if manifest.get("file_len") != snap["file_bytes"]:
                self.violation("W1", f"{key}: the daemon reported {snap['file_bytes']} bytes, its manifest says {manifest.get('file_len')}", rename)
            if manifest.get("data_len") != snap["tensor_bytes"]:
                self.violation("W1", f"{key}: {snap['tensor_bytes']} bytes captured, the manifest's data_len is {manifest.get('data_len')}", rename)
            if manifest.get("chunk_crc32") != snap["chunk_crc32"]:
                self.violation("W1", f"{key}: the manifest's chunk CRCs are not those of the content captured", rename)
            else:
                self.fig.manifests_matched += 1

    def run(self) -> None:
        tainted = self.check_failed_syncs()
        committed = self.check_snapshots(tainted)
        self.check_claims()
        self.check_deletions(committed)
        self.check_workload(committed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", help="the strace -o log")
    ap.add_argument("--root", required=True, help="the daemon's store.root")
    ap.add_argument("--keep", type=int, required=True, help="the daemon's store.keep_snapshots")
    ap.add_argument("--chunk-bytes", type=int, help="the daemon's store.io_buffer_bytes")
    ap.add_argument("--workload", help="the workload's JSON report (gpusnap-strace-workload --out)")
    ap.add_argument("--backend", help="the backend every manifest must name (io_uring, pwrite, buffered)")
    ap.add_argument("--expect-snapshots", type=int, default=1)
    ap.add_argument("--expect-claims", type=int, default=0)
    ap.add_argument("--expect-deletions", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="print only violations and the verdict")
    args = ap.parse_args(argv)
    try:
        with open(args.log, encoding="utf-8", errors="surrogateescape") as f:
            calls, other = parse(f)
    except (OSError, ParseError) as e:
        print(f"check_order: cannot read {args.log}: {e}", file=sys.stderr)
        return 2
    workload = None
    if args.workload:
        with open(args.workload, encoding="utf-8") as f:
            workload = json.load(f)
    ck = Checker(calls, args.root, args.keep, args.chunk_bytes, workload)
    ck.fig.lines = other["lines"]
    ck.run()
    fig = ck.fig
    if args.backend is not None:
        wrong = {b: n for b, n in fig.backends.items() if b != args.backend}
        if wrong:
            ck.violation("B1", f"manifests name backends {dict(wrong)}, expected only {args.backend}")
        if args.backend == "io_uring" and fig.snapshots_pwrite:
            ck.violation("B1", f"{fig.snapshots_pwrite} snapshots written by pwrite under the io_uring backend")
        if args.backend != "io_uring" and fig.snapshots_ring:
            ck.violation("B1", f"{fig.snapshots_ring} snapshots written through a ring under the {args.backend} backend")
    short = []
    if fig.snapshots < args.expect_snapshots:
        short.append(f"{fig.snapshots} snapshots committed in the trace, at least {args.expect_snapshots} expected")
    if fig.claims < args.expect_claims:
        short.append(f"{fig.claims} job claims in the trace, at least {args.expect_claims} expected")
    if fig.deletions < args.expect_deletions:
        short.append(f"{fig.deletions} retention deletions in the trace, at least {args.expect_deletions} expected")
    for s in short:
        ck.violation("N1", s)
    if not args.quiet:
        print(f"log lines parsed:            {fig.lines}")
        print(f"syscalls parsed:             {fig.syscalls} ({fig.threads} threads)")
        print(f"snapshots checked:           {fig.snapshots} (pwrite-visible {fig.snapshots_pwrite}, through io_uring {fig.snapshots_ring})")
        print(f"  data pwrites checked:      {fig.pwrites}")
        print(f"  ring submissions counted:  {fig.ring_entries}")
        print(f"  committed events checked:  {fig.committed_events}")
        print(f"  manifests = workload CRCs: {fig.manifests_matched}")
        print(f"  backends in manifests:     {dict(fig.backends)}")
        print(f"job creations checked:       {fig.claims} (rank directories {fig.rank_dirs})")
        print(f"deletions checked:           {fig.deletions}")
        print(f"failed syncs seen:           {fig.failed_syncs}")
        if fig.snapshots_ring:
            print(
                "note: under io_uring the data transfers are ring operations, not system calls: strace shows the\n"
                "      file put in the lane's ring, the submission count and no ring call after the fdatasync, but\n"
                "      not which file each operation wrote nor that every completion was reaped before the\n"
                "      fdatasync (completions sit in memory shared with the kernel); the pwrite runs and the\n"
                "      simulated storage prove that part"
            )
        print(f"violations:                  {len(ck.violations)}")
    for v in ck.violations:
        print("VIOLATION " + v)
    return 1 if ck.violations else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Self-test of check_order.py: a small hand-written strace log of a clean
run (a job claim, its rank directory, snapshots written by pwrite workers
and through io_uring, the client's committed events, one retention
deletion) must pass, and every copy of it with one violation planted must
fail with that violation's code. Also: an empty or cut-short log fails the
expected counts, and a log the parser cannot read is an error, never a pass.

Exits non-zero, naming the case, when any case comes out otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_order  # noqa: E402

ROOT = "/r"
RANK = "/r/j/0"
SOCK = '7<UNIX-STREAM:[11->12,"/s"]>'


def q(data: bytes) -> str:
    """`data` as strace prints a string."""
    out = []
    for b in data:
        c = chr(b)
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\x{b:02x}")
    return '"' + "".join(out) + '"'


def manifest(step: int, backend: str) -> bytes:
    return json.dumps(
        {
            "format": "gpusnap-manifest",
            "job": "j",
            "rank": 0,
            "step": step,
            "io_backend": backend,
            "file_len": 8000,
            "header_len": 4096,
            "data_len": 3904,
            "chunk_bytes": 4096,
            "chunk_crc32": [1],
        },
        indent=2,
    ).encode()


def claim() -> list[tuple[str, int, str]]:
    t = "/r/.claiming-j"
    return [
        ("claim.mkdir", 100, f'mkdir("{t}", 0777) = 0'),
        ("claim.open", 100, f'openat(AT_FDCWD</>, "{t}/OWNER", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0640) = 5<{t}/OWNER>'),
        ("claim.write", 100, f'write(5<{t}/OWNER>, "0\\n", 2) = 2'),
        ("claim.sync", 100, f"fdatasync(5<{t}/OWNER>) = 0"),
        ("claim.close", 100, f"close(5<{t}/OWNER>) = 0"),
        ("claim.dopen", 100, f'openat(AT_FDCWD</>, "{t}", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 5<{t}>'),
        ("claim.dsync", 100, f"fsync(5<{t}>) = 0"),
        ("claim.dclose", 100, f"close(5<{t}>) = 0"),
        ("claim.rename", 100, f'rename("{t}", "/r/j") = 0'),
        ("claim.ropen", 100, 'openat(AT_FDCWD</>, "/r", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 5</r>'),
        ("claim.rsync", 100, "fsync(5</r>) = 0"),
        ("claim.rclose", 100, "close(5</r>) = 0"),
        ("rank.mkdir", 101, f'mkdir("{RANK}", 0777) = 0'),
        ("rank.open", 101, 'openat(AT_FDCWD</>, "/r/j", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 5</r/j>'),
        ("rank.sync", 101, "fsync(5</r/j>) = 0"),
        ("rank.close", 101, "close(5</r/j>) = 0"),
    ]


def snapshot(step: int, ring: bool) -> list[tuple[str, int, str]]:
    p = f"{RANK}/step-{step}.partial"
    d = f"{p}/state.safetensors"
    m = f"{p}/MANIFEST.json"
    s = f"s{step}"
    body = manifest(step, "io_uring" if ring else "pwrite")
    lines = [
        (f"{s}.mkdir", 101, f'mkdir("{p}", 0777) = 0'),
        (f"{s}.dcreate", 101, f'openat(AT_FDCWD</>, "{d}", O_WRONLY|O_CREAT|O_EXCL|O_DIRECT|O_CLOEXEC, 0640) = 6<{d}>'),
        (f"{s}.falloc", 101, f"fallocate(6<{d}>, 0, 0, 8000) = 0"),
    ]
    if ring:
        ringfd = "9<anon_inode:[io_uring]>"
        lines += [
            (f"{s}.reg", 101, f"io_uring_register({ringfd}, IORING_REGISTER_FILES_UPDATE, {{offset=0, fds=[8<{d}>]}}, 1) = 1"),
            (f"{s}.close6", 101, f"close(6<{d}>) = 0"),
            (f"{s}.enter1", 101, f"io_uring_enter({ringfd}, 1, 0, 0, NULL, 128) = 1"),
            (f"{s}.enter2", 101, f"io_uring_enter({ringfd}, 1, 0, 0, NULL, 128) = 1"),
            (f"{s}.wait", 101, f"io_uring_enter({ringfd}, 0, 2, IORING_ENTER_GETEVENTS|IORING_ENTER_EXT_ARG, 0x7f00, 24) = 0"),
            (f"{s}.trim", 101, f"ftruncate(8<{d}>, 8000) = 0"),
            (f"{s}.dsync", 101, f"fdatasync(8<{d}>) = 0"),
            (f"{s}.unreg", 101, f"io_uring_register({ringfd}, IORING_REGISTER_FILES_UPDATE, {{offset=0, fds=[-1]}}, 1) = 1"),
            (f"{s}.dclose", 101, f"close(8<{d}>) = 0"),
        ]
    else:
        lines += [
            # A worker's pwrite interrupted by the lane's line: joined.
            (f"{s}.pw1a", 102, f'pwrite64(6<{d}>, {q(bytes(8))}..., 4096, 0 <unfinished ...>'),
            (f"{s}.lane", 101, 'write(2</log>, "writing\\n", 8) = 8'),
            (f"{s}.pw1b", 102, "<... pwrite64 resumed>) = 4096"),
            (f"{s}.pw2", 103, f'pwrite64(6<{d}>, {q(b"ab")}..., 4096, 4096) = 4096'),
            (f"{s}.trim", 101, f"ftruncate(6<{d}>, 8000) = 0"),
            (f"{s}.dsync", 101, f"fdatasync(6<{d}>) = 0"),
            (f"{s}.dclose", 101, f"close(6<{d}>) = 0"),
        ]
    lines += [
        (f"{s}.mcreate", 101, f'openat(AT_FDCWD</>, "{m}", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0640) = 6<{m}>'),
        (f"{s}.mwrite", 101, f"write(6<{m}>, {q(body)}, {len(body)}) = {len(body)}"),
        (f"{s}.msync", 101, f"fdatasync(6<{m}>) = 0"),
        (f"{s}.mclose", 101, f"close(6<{m}>) = 0"),
        (f"{s}.popen", 101, f'openat(AT_FDCWD</>, "{p}", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 6<{p}>'),
        (f"{s}.psync", 101, f"fsync(6<{p}>) = 0"),
        (f"{s}.pclose", 101, f"close(6<{p}>) = 0"),
        (f"{s}.rename", 101, f'rename("{p}", "{RANK}/step-{step}") = 0'),
        (f"{s}.ropen", 101, f'openat(AT_FDCWD</>, "{RANK}", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 6<{RANK}>'),
        (f"{s}.rsync", 101, f"fsync(6<{RANK}>) = 0"),
        (f"{s}.rclose", 101, f"close(6<{RANK}>) = 0"),
    ]
    event = b'P\x00\x00\x00{"id":0,"body":{"type":"committed","step":%d,"bytes":8000,"persist_ns":1}}' % step
    lines.append((f"{s}.told", 104, f"sendto({SOCK}, {q(event)}, {len(event)}, MSG_NOSIGNAL, NULL, 0) = {len(event)}"))
    return lines


def deletion(step: int) -> list[tuple[str, int, str]]:
    f = f"{RANK}/step-{step}"
    t = f + ".trash"
    k = f"d{step}"
    return [
        (f"{k}.rename", 101, f'rename("{f}", "{t}") = 0'),
        (f"{k}.ropen", 101, f'openat(AT_FDCWD</>, "{RANK}", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 6<{RANK}>'),
        (f"{k}.rsync", 101, f"fsync(6<{RANK}>) = 0"),
        (f"{k}.rclose", 101, f"close(6<{RANK}>) = 0"),
        (f"{k}.topen", 101, f'openat(AT_FDCWD</>, "{t}", O_RDONLY|O_NOFOLLOW|O_CLOEXEC|O_DIRECTORY) = 6<{t}>'),
        (f"{k}.unlink1", 101, f'unlinkat(6<{t}>, "state.safetensors", 0) = 0'),
        (f"{k}.unlink2", 101, f'unlinkat(6<{t}>, "MANIFEST.json", 0) = 0'),
        (f"{k}.tclose", 101, f"close(6<{t}>) = 0"),
        (f"{k}.rmdir", 101, f'unlinkat(AT_FDCWD</>, "{t}", AT_REMOVEDIR) = 0'),
    ]


def clean() -> list[tuple[str, int, str]]:
    # keep_snapshots 1: step 1 goes once step 2 is committed; step 3 (ring)
    # is committed after it.
    return claim() + snapshot(1, False) + snapshot(2, False) + deletion(1) + snapshot(3, True)


# The same calls as a store that resolves every path beneath a descriptor
# of its root makes them (openat2, mkdirat, renameat, unlinkat relative to
# that descriptor).
RELATIVE = [
    (re.compile(r'^mkdir\("/r/([^"]*)", (\d+)\)'), r'mkdirat(3</r>, "\1", \2)'),
    (
        re.compile(r'^openat\(AT_FDCWD</>, "/r/([^"]*)", ([^,)]*)(?:, (\d+))?\)'),
        lambda m: f'openat2(3</r>, "{m.group(1)}", {{flags={m.group(2)}, mode={m.group(3) or 0}, resolve=RESOLVE_NO_MAGICLINKS|RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS}}, 24)',
    ),
    (re.compile(r'^rename\("/r/([^"]*)", "/r/([^"]*)"\)'), r'renameat(3</r>, "\1", 3</r>, "\2")'),
    (re.compile(r'^unlinkat\(AT_FDCWD</>, "/r/([^"]*)"'), r'unlinkat(3</r>, "\1"'),
]


def render(lines, relative: bool = False) -> str:
    out = []
    for i, (_, tid, text) in enumerate(lines):
        if relative:
            for pattern, repl in RELATIVE:
                text = pattern.sub(repl, text)
        out.append(f"{tid} 10:00:{i // 1000:02d}.{i % 1000:06d} {text}")
    return "\n".join(out) + "\n"


def index(lines, key):
    for i, (k, _, _) in enumerate(lines):
        if k == key:
            return i
    raise KeyError(key)


def drop(*keys):
    def mutate(lines):
        for k in keys:
            del lines[index(lines, k)]
        return lines

    return mutate


def move_after(key, anchor):
    def mutate(lines):
        item = lines.pop(index(lines, key))
        lines.insert(index(lines, anchor) + 1, item)
        return lines

    return mutate


def move_before(key, anchor):
    def mutate(lines):
        item = lines.pop(index(lines, key))
        lines.insert(index(lines, anchor), item)
        return lines

    return mutate


def replace(key, old, new):
    def mutate(lines):
        i = index(lines, key)
        k, tid, text = lines[i]
        assert old in text, (key, old, text)
        lines[i] = (k, tid, text.replace(old, new))
        return lines

    return mutate


def insert_after(anchor, key, tid, text):
    def mutate(lines):
        lines.insert(index(lines, anchor) + 1, (key, tid, text))
        return lines

    return mutate


def chain(*mutations):
    def mutate(lines):
        for m in mutations:
            lines = m(lines)
        return lines

    return mutate


D2 = f"{RANK}/step-2.partial/state.safetensors"
M2 = f"{RANK}/step-2.partial/MANIFEST.json"
FAILED_SYNC = f"fdatasync(6<{D2}>) = -1 EIO (Input/output error)"

# (name, mutation, the violation code the checker must report)
CASES = [
    ("data sync after the rename", move_after("s2.dsync", "s2.rename"), "S2"),
    ("manifest sync after the rename", move_after("s2.msync", "s2.rename"), "S3"),
    ("manifest written before the data sync", chain(move_before("s2.mcreate", "s2.dsync"), move_before("s2.mwrite", "s2.dsync")), "S3"),
    ("a data write returns after the sync entered", move_after("s2.pw1b", "s2.dsync"), "S2"),
    ("no fallocate before the writes", drop("s2.falloc"), "S2"),
    ("a data write missing (a hole)", drop("s2.pw2"), "S2"),
    ("partial directory not fsynced", drop("s2.psync"), "S4"),
    ("rename before the partial directory's fsync", move_before("s2.rename", "s2.popen"), "S4"),
    ("rank directory not fsynced after the rename", drop("s2.rsync"), "S6"),
    ("rank directory fsynced only before the rename", move_before("s2.rsync", "s2.rename"), "S6"),
    ("committed event before the rank directory's fsync", move_before("s2.told", "s2.rsync"), "S6"),
    (
        "committed event while the rank directory's fsync runs",
        chain(
            replace("s2.rsync", ") = 0", " <unfinished ...>"),
            move_after("s2.told", "s2.rsync"),
            insert_after("s2.told", "x", 101, "<... fsync resumed>) = 0"),
        ),
        "S7",
    ),
    ("no committed event", drop("s2.told"), "S7"),
    ("committed snapshot written afterwards", insert_after("s2.told", "x", 101, f'pwrite64(6<{RANK}/step-2/state.safetensors>, "x", 1, 0) = 1'), "S8"),
    ("manifest names another step", replace("s2.mwrite", '\\"step\\": 2', '\\"step\\": 7'), "S9"),
    (
        "write after a failed sync",
        chain(
            replace("s2.dsync", "fdatasync(6<" + D2 + ">) = 0", FAILED_SYNC),
            insert_after("s2.dsync", "x", 102, f'pwrite64(6<{D2}>, "x", 4096, 0) = 4096'),
            insert_after("x", "y", 101, f"fdatasync(6<{D2}>) = 0"),
        ),
        "G1",
    ),
    ("renamed after a failed sync", chain(insert_after("s2.msync", "x", 101, f"fdatasync(6<{M2}>) = -1 EIO (Input/output error)")), "G1"),
    ("OWNER not synced before the rename", move_after("claim.sync", "claim.rename"), "C1"),
    ("claim directory not fsynced", drop("claim.dsync"), "C1"),
    ("root not fsynced after the claim", drop("claim.rsync"), "C2"),
    ("job directory made by mkdir", insert_after("claim.rclose", "x", 100, 'mkdir("/r/k", 0777) = 0'), "C3"),
    ("rank directory's parent not fsynced", drop("rank.sync"), "C3"),
    ("trash removed before the rank directory's fsync", move_before("d1.unlink1", "d1.rsync"), "D2"),
    ("trash never removed", drop("d1.rmdir"), "D3"),
    ("retention removes the newest", move_before("d1.rename", "s2.mkdir"), "D1"),
    ("ring used after the data sync", insert_after("s3.dsync", "x", 101, "io_uring_enter(9<anon_inode:[io_uring]>, 1, 0, 0, NULL, 128) = 1"), "S2"),
    ("ring took too few entries", drop("s3.enter2"), "S2"),
    ("ring file never unregistered", drop("s3.unreg"), "S2"),
]


def run_checker(text: str, *extra: str) -> tuple[int, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
        f.write(text)
        path = f.name
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = check_order.main([path, "--root", ROOT, "--keep", "1", "--chunk-bytes", "4096", *extra])
    finally:
        os.unlink(path)
    return rc, out.getvalue()


EXPECT = ["--expect-snapshots", "3", "--expect-claims", "1", "--expect-deletions", "1"]


def main() -> int:
    failures = []
    checked = 0
    for relative in (False, True):
        form = "dirfd-relative calls" if relative else "absolute paths"
        text = render(clean(), relative)
        if relative and ("openat2(" not in text or "renameat(" not in text or "mkdirat(" not in text):
            failures.append("the dirfd-relative form did not rewrite the calls")
        rc, out = run_checker(text, *EXPECT)
        checked += 1
        if rc != 0 or "snapshots checked:           3" not in out:
            failures.append(f"[{form}] the clean log must pass with 3 snapshots (rc {rc}):\n{out}")
        for name, mutation, code in CASES:
            rc, out = run_checker(render(mutation(clean()), relative), *EXPECT)
            checked += 1
            if rc != 1 or f"VIOLATION {code}:" not in out:
                failures.append(f"[{form}] {name}: expected a {code} violation (rc {rc}):\n{out}")
    # Vacuity: nothing, or too little, never passes.
    rc, out = run_checker("", *EXPECT)
    if rc != 1 or "VIOLATION N1:" not in out:
        failures.append(f"an empty log must fail the expected counts (rc {rc}):\n{out}")
    cut = clean()[: index(clean(), "s2.mkdir")]
    rc, out = run_checker(render(cut), *EXPECT)
    if rc != 1 or "VIOLATION N1:" not in out:
        failures.append(f"a log cut after one snapshot must fail the expected counts (rc {rc}):\n{out}")
    rc, out = run_checker(render(clean()), "--backend", "pwrite", *EXPECT)
    if rc != 1 or "VIOLATION B1:" not in out:
        failures.append(f"a ring snapshot under --backend pwrite must fail (rc {rc}):\n{out}")
    rc, out = run_checker("101 10:00:00.000001 <... fsync resumed>) = 0\n", *EXPECT)
    if rc != 2:
        failures.append(f"an unreadable log must be an error (rc {rc}):\n{out}")
    checked += 4
    if failures:
        for f in failures:
            print("selftest FAILED: " + f)
        print(f"selftest: {len(failures)} of {checked} cases failed")
        return 1
    print(
        f"selftest: {checked} cases passed: the clean log passes and each of {len(CASES)} planted violations"
        " is caught, with absolute paths and with dirfd-relative calls; an empty log, a cut log,"
        " a wrong backend and an unreadable log fail"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

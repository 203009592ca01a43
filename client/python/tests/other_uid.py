"""Run by test_uids.py as root, which drops to another uid (argv[4]) after
the imports (the interpreter and the virtual environment may live where
that user cannot read); then snapshots its own job and reports what it may
see and touch of the other user's job as JSON on stdout."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import numpy.random  # noqa: F401 - loaded lazily by numpy, needed after the uid drop

import gpusnap


def attempt(fn) -> str:
    try:
        return f"returned {fn()!r}"
    except gpusnap.Error as e:
        return type(e).__name__


def main() -> None:
    socket, own_job, other_job, uid = sys.argv[1:5]
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
    report: dict[str, object] = {"uid": os.getuid()}
    a = np.arange(64, dtype=np.float32)
    with gpusnap.Client(own_job, socket=socket) as snap:
        snap.register("a", a)
        snap.snapshot(1)
        report["own_commit"] = snap.wait_committed(1).step
        report["visible_jobs"] = sorted({s.job for s in snap.list(all_jobs=True)})
    target = np.zeros(64, dtype=np.float32)
    with gpusnap.Client(other_job, socket=socket) as other:
        other.register("a", target)
        report["restore_other"] = attempt(other.restore)
        report["restore_other_step"] = attempt(lambda: other.restore(step=1))
        report["snapshot_other"] = attempt(lambda: other.snapshot(2))
    report["target_untouched"] = bool((target == 0).all())
    print(json.dumps(report))


if __name__ == "__main__":
    main()

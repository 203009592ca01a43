"""Two jobs of two users on one daemon: each sees and touches only its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import gpusnap
from conftest import Daemon

HERE = Path(__file__).resolve().parent
NOBODY = 65534


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another uid")
def test_two_jobs_of_two_uids_stay_apart():
    # The socket must be reachable by the other user: a world-readable dir.
    workdir = Path(tempfile.mkdtemp(prefix="gpusnap-uids-"))
    try:
        workdir.chmod(0o755)
        d = Daemon(workdir).start()
        try:
            mine = np.arange(64, dtype=np.float32) * 2
            with gpusnap.Client("root-job", socket=d.socket) as snap:
                snap.register("a", mine)
                snap.snapshot(1)
                snap.wait_committed(1)
            child = subprocess.run(
                [
                    sys.executable,
                    str(HERE / "other_uid.py"),
                    str(d.socket),
                    "nobody-job",
                    "root-job",
                    str(NOBODY),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                cwd="/",
            )
            assert child.returncode == 0, child.stderr
            report = json.loads(child.stdout.strip().splitlines()[-1])
            assert report["uid"] == NOBODY
            assert report["own_commit"] == 1
            assert report["visible_jobs"] == ["nobody-job"]
            # The other job's snapshots are invisible, and registering as it
            # (which a restore with nothing to restore does) is refused.
            assert report["restore_other"] == "PermissionDenied"
            assert report["restore_other_step"] == "PermissionDenied"
            assert report["snapshot_other"] == "PermissionDenied"
            assert report["target_untouched"]
            # Root sees both jobs; its own snapshot is intact.
            with gpusnap.Client("root-job", socket=d.socket) as snap:
                assert {s.job for s in snap.list(all_jobs=True)} == {"root-job", "nobody-job"}
                got = np.zeros(64, dtype=np.float32)
                snap.register("a", got)
                assert snap.restore() == 1
                assert np.array_equal(got, mine)
        finally:
            d.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

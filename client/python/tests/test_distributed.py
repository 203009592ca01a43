"""Several ranks agree on the step to restore over torch.distributed, also
when each rank's snapshots live on another node's daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent


def run_ranks(tmp_path: Path, sockets: list[Path], steps: list[str], *extra: str) -> list[str]:
    init = tmp_path / "init"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "dist_rank.py"),
                str(sockets[r]),
                str(init),
                str(r),
                steps[r],
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    return [out.strip().splitlines()[-1] for out in outputs]


@pytest.mark.parametrize(
    "steps, agreed",
    [
        # The newest common step is everyone's newest but one.
        (["2,4,6", "2,4"], "4"),
        # Rank 1 skipped 4 and rank 0 skipped 5: only 2 is common.
        (["2,4,6", "2,5"], "2"),
        # Nothing in common.
        (["2", "3"], "None"),
    ],
)
def test_ranks_on_two_nodes_agree_on_the_newest_common_step(make_daemon, tmp_path, steps, agreed):
    # One daemon per "node": neither daemon alone knows a complete step.
    nodes = [make_daemon(name="node0"), make_daemon(name="node1")]
    results = run_ranks(tmp_path, [d.socket for d in nodes], steps)
    assert results == [f"restored {agreed}"] * 2


def test_ranks_on_one_node_agree_too(daemon, tmp_path):
    results = run_ranks(tmp_path, [daemon.socket] * 2, ["3,6,9", "3,6"])
    assert results == ["restored 6"] * 2


def test_a_rank_that_fails_before_agreeing_does_not_leave_the_others_waiting(daemon, tmp_path):
    results = run_ranks(tmp_path, [daemon.socket] * 2, ["2", "2"], "--rank1-fails")
    assert results == ["failed Error", "failed TensorReallocated"]

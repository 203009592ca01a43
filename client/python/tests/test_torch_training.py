"""Real training runs through gpusnap: a trainer SIGKILLed at a random step
and restarted ends bit for bit where an uninterrupted run ends, on the CPU,
on the CPU with a mirror of its parameters in CUDA device memory (the
driver double in CI, see _cuda.py), and on a CUDA GPU; a daemon restart in
the middle of training loses nothing committed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import gpusnap  # noqa: E402

HERE = Path(__file__).resolve().parent
TRAINER = HERE / "trainer.py"


def run_trainer(socket, job, steps, every, out: Path, *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(TRAINER), str(socket), job, str(steps), str(every), str(out), *extra],
        stdout=open(out / "stdout.txt", "a"),
        stderr=subprocess.STDOUT,
    )


def losses(out: Path) -> dict[int, str]:
    """The last loss logged for each step."""
    result: dict[int, str] = {}
    for line in (out / "losses.txt").read_text().splitlines():
        step, loss = line.split()
        result[int(step)] = loss
    return result


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "losses.txt").exists() and step in losses(out):
            return
        assert proc.poll() is None, (out / "stdout.txt").read_text()
        time.sleep(0.005)
    raise AssertionError(f"the trainer did not reach step {step}")


def assert_same_final_state(a: Path, b: Path) -> None:
    fa = torch.load(a / "final.pt", weights_only=False, map_location="cpu")
    fb = torch.load(b / "final.pt", weights_only=False, map_location="cpu")
    for name, t in fa["model"].items():
        assert torch.equal(t, fb["model"][name]), name
    sa, sb = fa["optimizer"]["state"], fb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for key, t in sa[index].items():
            assert torch.equal(t, sb[index][key]), (index, key)
    assert fa["optimizer"]["param_groups"] == fb["optimizer"]["param_groups"]
    assert fa["scheduler"] == fb["scheduler"]
    assert fa["progress"] == fb["progress"]
    assert torch.equal(fa["torch_rng"], fb["torch_rng"])
    assert len(fa["cuda_rng"]) == len(fb["cuda_rng"])
    for ra, rb in zip(fa["cuda_rng"], fb["cuda_rng"], strict=True):
        assert torch.equal(ra, rb), "CUDA RNG"
    assert fa["mirror"] == fb["mirror"], "the device mirror"
    assert fa["numpy_rng"] == fb["numpy_rng"]
    assert fa["python_rng"] == fb["python_rng"]


STEPS, EVERY = 60, 5

# The trainer's options of each variant of the kill-and-resume run.
VARIANTS = {
    "cpu": (),
    "cpu+cuda-arrays": ("--cuda-arrays",),
    "cuda": ("--device=cuda",),
}


def require_variant(variant: str) -> None:
    """Skips (under the project's protocol) where the variant cannot run."""
    if "cuda-arrays" in variant:
        from _cuda import driver

        driver()
    if variant == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run of each variant, without gpusnap at all (made
    on first use)."""
    return {}


def reference(references: dict[str, Path], tmp_path_factory, variant: str) -> Path:
    if variant not in references:
        out = tmp_path_factory.mktemp(f"reference-{variant}")
        proc = run_trainer(
            "unused", "unused", STEPS, EVERY, out, "--no-snapshots", *VARIANTS[variant]
        )
        assert proc.wait(300) == 0, (out / "stdout.txt").read_text()
        references[variant] = out
    return references[variant]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_trainer_killed_at_a_random_step_resumes_bit_for_bit(
    daemon, tmp_path, tmp_path_factory, references, variant
):
    require_variant(variant)
    extra = VARIANTS[variant]
    expected = reference(references, tmp_path_factory, variant)
    seed = int(os.environ.get("GPUSNAP_TEST_SEED", time.time_ns() % 1_000_000))
    kill_at = random.Random(seed).randrange(EVERY + 1, STEPS - 5)
    print(f"killing the trainer after step {kill_at} (GPUSNAP_TEST_SEED={seed})")
    out = tmp_path / "run"
    # Paced, so the kill lands within a step or two of kill_at.
    proc = run_trainer(daemon.socket, "mlp", STEPS, EVERY, out, "--pace=0.02", *extra)
    wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    killed_after = max(losses(out))
    assert killed_after < STEPS, "the trainer finished before it was killed"
    proc = run_trainer(daemon.socket, "mlp", STEPS, EVERY, out, *extra)
    assert proc.wait(300) == 0, (out / "stdout.txt").read_text()
    log = (out / "stdout.txt").read_text()
    resumed = int(log.split("starting after step ")[-1].split()[0])
    assert resumed > 0 and resumed % EVERY == 0 and resumed <= killed_after, log
    assert losses(out) == losses(expected)
    assert_same_final_state(out, expected)
    if "cuda-arrays" in variant:
        final = torch.load(out / "final.pt", weights_only=False)
        assert final["mirror"], "the device mirror was saved"


def test_training_survives_a_daemon_restart_and_keeps_what_was_committed(make_daemon, tmp_path):
    d = make_daemon()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snap = gpusnap.Client("restart", socket=d.socket, connect_timeout=0.3, call_timeout=5)
    snap.register_module(model)
    snap.register_optimizer(optimizer)
    failed_steps = []
    committed = []
    for step in range(1, 31):
        loss = model(torch.randn(8, 64)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 10:
            d.kill()
        if step == 16:
            d.start()
        if step % 2 == 0:
            h = snap.snapshot_begin(step)
            try:
                h.wait_committed()
                committed.append(step)
            except gpusnap.Error as e:
                failed_steps.append((step, type(e).__name__))
    assert failed_steps, "no snapshot failed while the daemon was down"
    assert all(10 <= s < 16 for s, _ in failed_steps), failed_steps
    assert snap.stats.failed == len(failed_steps)
    assert committed[-1] == 30 and 8 in committed
    want = {k: v.clone() for k, v in model.state_dict().items()}
    snap.close()
    # A new trainer restores step 30 exactly.
    fresh = torch.nn.Linear(64, 64)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    with gpusnap.Client("restart", socket=d.socket) as again:
        again.register_module(fresh)
        again.register_optimizer(fresh_optimizer)
        assert again.restore() == 30
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
    momentum = [fresh_optimizer.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(m.abs().sum() > 0 for m in momentum)

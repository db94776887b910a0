"""Recipes under torchrun (gloo on localhost): rank 0 writes the run, an elastic restart resumes it."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

# 5 steps: the kill comes after 2 (checkpointed) and leaves 3 to resume; the episodes lengthen as it learns
ARGS = ["--experiment", "cartpole", "--quick", "--env-backend", "torch", "--population-size", "32",
        "--max-epochs", "5", "--checkpoint-every", "1", "--no-progress"]


def _torchrun(out, *extra):
    """torchrun in the background; what it prints goes to ``<out>.log`` (read it with ``_output``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extra, "-m", "eggroll_optim.recipes", *ARGS, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", EGGROLL_DIST_TIMEOUT="60")
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _output(out) -> str:
    return open(f"{out}.log").read()


def _finish(proc, out, timeout: float) -> str:
    """Wait for a torchrun started by ``_torchrun``; its output, or an AssertionError with its tail."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its workers
        proc.wait(30)
        raise AssertionError(f"{out.name} did not finish: " + _output(out)[-3000:]) from None
    return _output(out)


def _final_model(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def _workers(pid: int) -> list[int]:
    """The recipe processes torchrun started (its children running eggroll_optim.recipes)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().split()
                cmdline = open(f"/proc/{entry}/cmdline").read()
            except OSError:
                continue
            if int(stat[3]) == pid and "eggroll_optim.recipes" in cmdline:
                found.append(int(entry))
    return sorted(found)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find torchrun's workers")
def test_a_killed_worker_resumes_from_the_checkpoint_and_ends_identical(tmp_path):
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    # the uninterrupted reference runs beside the killed run: on two cores each one's imports and restarts
    # leave room for the other
    runs = [_torchrun(plain), _torchrun(killed, "--max-restarts", "1")]
    try:
        run = runs[1]
        deadline = time.monotonic() + 240
        metrics = killed / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # mid-run, checkpointed: kill
            assert run.poll() is None and time.monotonic() < deadline, _output(killed)
            time.sleep(0.1)
        workers = _workers(run.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        output = _finish(run, killed, 240)
        assert run.returncode == 0, output
        assert "exitcode: -9" in output, output  # torchrun saw the kill and restarted the group
        output = _finish(runs[0], plain, 240)
        assert runs[0].returncode == 0, output
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    assert sorted(p.name for p in plain.iterdir()) >= ["checkpoint.pt", "metrics.jsonl", "summary.json"]
    for (name, a), b in zip(_final_model(plain).items(), _final_model(killed).values()):
        assert torch.equal(a, b), name

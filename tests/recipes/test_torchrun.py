"""Recipes under torchrun (gloo on localhost): rank 0 writes the run, an elastic restart resumes it."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

ARGS = ["--experiment", "cartpole", "--quick", "--env-backend", "torch", "--population-size", "32",
        "--max-epochs", "8", "--checkpoint-every", "1", "--no-progress"]


def _torchrun(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extra, "-m", "eggroll_optim.recipes", *ARGS, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", EGGROLL_DIST_TIMEOUT="60")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
    plain = _torchrun(tmp_path / "plain")
    output = plain.communicate(timeout=300)[0]
    assert plain.returncode == 0, output
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) >= ["checkpoint.pt", "metrics.jsonl", "summary.json"]

    run = _torchrun(tmp_path / "killed", "--max-restarts", "1")
    deadline = time.monotonic() + 240
    metrics = tmp_path / "killed" / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # mid-run, checkpointed: kill
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
        time.sleep(0.1)
    workers = _workers(run.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    try:
        output = run.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        run.kill()
        raise AssertionError("the restarted workers did not finish: " + run.communicate()[0][-3000:]) from None
    assert run.returncode == 0, output
    assert "exitcode: -9" in output, output  # torchrun saw the kill and restarted the group
    for (name, a), b in zip(_final_model(tmp_path / "plain").items(), _final_model(tmp_path / "killed").values()):
        assert torch.equal(a, b), name

"""Smoke tests of the examples: each script's ``--quick --check`` run on CPU must exit 0 and
print a final metric that beats its initial one (``RESULT initial=... final=...``)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RESULT = re.compile(r"^RESULT initial=(\S+) final=(\S+)", re.MULTILINE)

# (script, True when higher is better)
CASES = [
    ("drop_in_training_loop.py", False),   # test MSE
    ("ask_tell_custom_fitness.py", True),  # test accuracy
    ("functional_api.py", False),          # test MSE
    ("rl_gymnasium.py", True),             # mean return of the mean policy
]


def run_example(script: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # One intra-op thread: these models are tiny, and on a small shared CPU (CI, a test run
    # beside other jobs) OpenMP threads that wait on each other are several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXAMPLES / script), "--quick", "--check", "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=EXAMPLES.parent)


@pytest.mark.slow
@pytest.mark.parametrize("script,higher_is_better", CASES, ids=[c[0] for c in CASES])
def test_example_quick_mode_improves(script, higher_is_better):
    proc = run_example(script)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "device cpu" in proc.stdout and "torch " in proc.stdout, proc.stdout
    match = RESULT.search(proc.stdout)
    assert match, f"{script} printed no RESULT line:\n{proc.stdout}"
    initial, final = map(float, match.groups())
    improved = final > initial if higher_is_better else final < initial
    assert improved, f"{script}: final {final} does not beat initial {initial}"


@pytest.mark.slow
def test_example_check_fails_when_it_should():
    """``--check`` is a real check: with no training steps the script must exit non-zero."""
    cmd = [sys.executable, str(EXAMPLES / "functional_api.py"), "--quick", "--check", "--device", "cpu", "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0, proc.stdout
    assert "check failed" in proc.stderr

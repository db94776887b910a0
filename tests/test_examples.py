"""Smoke tests of the examples: each script's ``--quick --check`` run on CPU must exit 0 and
print a final metric that beats its initial one (``RESULT initial=... final=...``).

Each script runs as ``python SCRIPT --quick --check --device cpu`` would, in its own process forked
from a server that imported torch and ``eggroll_optim`` once (``tests/forked.py``: a fresh interpreter
paid ~7 s of imports and teardown per script), on one intra-op thread; the module starts them all at
once (as many at a time as there are cores, plus one) and each test waits for its own."""
from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from forked import run_script

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RESULT = re.compile(r"^RESULT initial=(\S+) final=(\S+)", re.MULTILINE)

# (script, True when higher is better)
CASES = [
    ("drop_in_training_loop.py", False),   # test MSE
    ("ask_tell_custom_fitness.py", True),  # test accuracy
    ("functional_api.py", False),          # test MSE
    ("rl_gymnasium.py", True),             # mean return of the mean policy
]


CHECK_FAILS = ("functional_api.py", "--epochs", "1")  # no training steps: --check must fail


def run_example(script: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # One intra-op thread: these models are tiny, and on a small shared CPU (CI, a test run
    # beside other jobs) OpenMP threads that wait on each other are several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_script(EXAMPLES / script, "--quick", "--check", "--device", "cpu", *extra, timeout=timeout, env=env,
                      cwd=EXAMPLES.parent)


@pytest.fixture(scope="module")
def runs():
    """``{command: future of its CompletedProcess}``: every run of this module, started together."""
    commands = [(script,) for script, _ in CASES] + [CHECK_FAILS]
    pool = ThreadPoolExecutor(max_workers=min(len(commands), (os.cpu_count() or 1) + 1))
    yield {command: pool.submit(run_example, *command) for command in commands}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("script,higher_is_better", CASES, ids=[c[0] for c in CASES])
def test_example_quick_mode_improves(script, higher_is_better, runs):
    proc = runs[(script,)].result()
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "device cpu" in proc.stdout and "torch " in proc.stdout, proc.stdout
    match = RESULT.search(proc.stdout)
    assert match, f"{script} printed no RESULT line:\n{proc.stdout}"
    initial, final = map(float, match.groups())
    improved = final > initial if higher_is_better else final < initial
    assert improved, f"{script}: final {final} does not beat initial {initial}"


@pytest.mark.slow
def test_example_check_fails_when_it_should(runs):
    """``--check`` is a real check: with no training steps the script must exit non-zero."""
    proc = runs[CHECK_FAILS].result()
    assert proc.returncode != 0, proc.stdout
    assert "check failed" in proc.stderr

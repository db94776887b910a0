"""The benchmark scripts' --quick mode on CPU: exit 0, JSON with the expected keys, a table printed last.

Each script runs as run_all.sh runs it, ``python SCRIPT ARGS``, with one CPU thread, which keeps
the quick runs short and steady on a loaded machine: in its own process, forked from a server that
imported torch and ``eggroll_optim`` once (``tests/forked.py``: a fresh interpreter paid ~7 s of
imports and teardown per script). The module starts them all at once (as many at a time as there
are cores, plus one: the tests check outputs, not timings) and each test waits for its own.
run_all.sh is checked with a stub interpreter that fails one script, to show the others still run
and every JSON lands in the output folder; ``sweep_kernels.py`` on a machine without a GPU, in a
fresh interpreter that starts with ``CUDA_VISIBLE_DEVICES`` empty.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from forked import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
META = {"card", "device", "torch", "date", "command", "quick"}
CEILINGS = {"matmul_bf16_tflops", "matmul_tf32_tflops", "copy_gbps"}

pytestmark = pytest.mark.slow


CPU = ("--device", "cpu", "--threads", "1")
RUNS = {  # name: (script, flags); each run writes <name>.json
    **{script: (script, ("--quick", *CPU)) for script in
       ("bench_microbench", "bench_mnist_step", "bench_cartpole", "bench_population")},
    # --population/--batch without --quick: the CPU 512/64 mode, at a smaller size
    "flags": ("bench_mnist_step", (*CPU, "--population", "32", "--batch", "8", "--budget", "0.05")),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{name: (future of its CompletedProcess, its --out)}`` for every script run here, started together."""
    folder = tmp_path_factory.mktemp("bench")
    pool = ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 1)
    started = {name: (pool.submit(run_script, os.path.join(BENCH, f"{script}.py"), *flags,
                                  "--out", folder / f"{name}.json", cwd=ROOT), folder / f"{name}.json")
               for name, (script, flags) in RUNS.items()}
    started["sweep"] = (pool.submit(subprocess.run, [sys.executable, os.path.join(BENCH, "sweep_kernels.py")],
                                    capture_output=True, text=True, timeout=120,
                                    env=dict(os.environ, CUDA_VISIBLE_DEVICES="")), None)
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


def run_quick(script: str, runs, last: str) -> tuple[dict, str]:
    future, out = runs[script]
    proc = future.result()
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert META <= set(data["meta"]), data["meta"]
    assert data["meta"]["quick"] is True and data["meta"]["device"] == "cpu"
    assert CEILINGS <= set(data["ceilings"]) and all(data["ceilings"][k] > 0 for k in CEILINGS)
    assert data["checks"] and all(v < 1e-2 for v in data["checks"].values()), data["checks"]
    assert data["failures"] == {}
    assert data["rows"] and data["figures"]
    final = proc.stdout.strip().splitlines()[-1].split()
    assert final and final[0] == last, f"the table's last row should be printed last, got {final}"
    return data, proc.stdout


def test_microbench_quick(runs):
    data, out = run_quick("bench_microbench", runs, "openes_fly")
    variants = {r["variant"] for r in data["rows"]}
    assert variants == {"inference", "pregen_kernel", "pregen_ops", "fly_counter",
                        "fly_counter_accum", "fly_randn", "fly_generate", "fly_keyed", "openes_stored",
                        "openes_stored_nomat", "openes_fly"}
    for r in data["rows"]:
        assert r["time_ms"] > 0 and r["ratio_vs_inference"] > 0 and r["floor_ms"] > 0
    assert data["rows"][0]["ratio_vs_inference"] == 1.0
    assert "openes_scaling" in data["config"]
    assert "Fig.2a microbench" in out


def test_mnist_step_quick(runs):
    data, out = run_quick("bench_mnist_step", runs, "naive")
    variants = [r["variant"] for r in data["rows"]]
    assert variants == ["inference", "functional_fx", "functional_hand", "optimizer", "naive"]
    for key in ("naive_over_functional_fx", "naive_over_functional_hand", "naive_over_optimizer",
                "optimizer_vs_inference", "naive_ms"):
        assert data["figures"][key] > 0, key
    assert data["config"]["es_floor_gflop"] > 0
    assert "peak_gb" in data["rows"][0]


def test_mnist_step_population_flags(runs):
    """--population/--batch override the sizes (the CPU 512/64 mode, at a smaller size)."""
    future, out = runs["flags"]
    proc = future.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["config"]["population"], data["config"]["batch"]) == (32, 8)


def test_cartpole_quick(runs):
    data, out = run_quick("bench_cartpole", runs, "gym_vector")
    seen = {(r["variant"], r["envs"]) for r in data["rows"]}
    for N in (16, 64):
        assert {("env_only", N), ("plain_policy", N), ("eggroll", N)} <= seen
    assert "eggroll_graph" in data["notes"] and "gym_vector" in data["notes"]
    for r in data["rows"]:
        assert r["msteps_per_s"] > 0


def test_population_quick(runs):
    data, out = run_quick("bench_population", runs, "64")
    assert [r["N"] for r in data["rows"]] == [16, 32, 64]
    for r in data["rows"]:
        assert r["step_ms"] > 0 and r["member_samples_per_s"] > 0 and r["ratio_vs_inference"] > 0
    assert data["rows"][-1]["chunk"] < data["rows"][-1]["N"], "the largest quick size runs chunked"
    assert any(k.startswith("chunked_vs_unchunked") for k in data["checks"])


def test_run_all_continues_after_a_failure(tmp_path):
    """A stub interpreter: bench_cartpole fails, the others write their JSON; run_all still exits 0."""
    stub = tmp_path / "py"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'case "$1" in -c) echo stub; exit 0;; esac\n'
        'out=""; prev=""; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done\n'
        'case "$1" in *bench_cartpole.py) echo boom >&2; exit 3;; esac\n'
        'echo "{\\"args\\": \\"$*\\"}" > "$out"; echo "# correctness ok"; echo table\n'
    )
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), BENCH_ARGS="--quick --device cpu")
    proc = subprocess.run(["bash", os.path.join(BENCH, "run_all.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    for name in ("bench_microbench", "bench_mnist_step", "bench_population"):
        data = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert "--quick --device cpu" in data["args"]
    assert "bench_cartpole rc=3" in proc.stdout and "bench_population rc=0" in proc.stdout
    text = open(os.path.join(BENCH, "run_all.sh")).read()
    assert "timeout" in text and "PYTHONUNBUFFERED=1" in text


def test_checks_poison_and_failures(capsys):
    """A NaN (an unwritten, poisoned element) fails a check; guard records it; finish exits 1."""
    import torch

    sys.path.insert(0, BENCH)
    try:
        import common
    finally:
        sys.path.remove(BENCH)
    ref = torch.randn(8, 8)
    log, failures = {}, {}
    assert common.check("ok", ref.float(), ref.double(), 1e-6, log) < 1e-6
    bad = ref.clone()
    bad[3, 4] = float("nan")
    assert not common.guard("nan", lambda: common.check("nan", bad, ref, 1e-2, log), failures)
    assert not common.guard("far", lambda: common.check("far", ref * 1.1, ref, 1e-2, log), failures)
    assert set(failures) == {"nan", "far"} and log["nan"] == float("inf")
    with pytest.raises(SystemExit) as exc:
        common.finish(failures)
    assert exc.value.code == 1
    fl = common.floor(2e12, 1e9, {"matmul_tf32_tflops": 100.0, "copy_gbps": 1000.0}, "tf32")
    assert fl["floor_bound"] == "flops" and abs(fl["floor_ms"] - 20.0) < 1e-9


def test_sweep_kernels_says_it_needs_a_gpu_on_cpu(runs):
    proc = runs["sweep"][0].result()
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr

"""Helpers for driving the recipes CLI: a tiny synthetic MNIST, tiny flags, and a subprocess runner.

Subprocesses get ``OMP_NUM_THREADS=1`` (tiny workloads; no spinning threads on a busy CI box),
no ``$EGGROLL_DATA_DIR`` and HTTP(S) proxies at a closed local port, so that a download attempt
by mistake fails at once instead of touching the network.
"""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
N_TRAIN, N_TEST = 64, 16
# the cheapest training run: the MNIST MLP on the synthetic set, 8 members, 4 images a step
TINY = ("--experiment", "mnist_mlp", "--quick", "--device", "cpu", "--no-progress", "--population-size", "8",
        "--batch-size", "4", "--train-subset", str(N_TRAIN), "--log-every", "1")


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> Path:
    """The four gzipped IDX files of a random MNIST-shaped set in ``root/MNIST/raw``; returns that folder."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": rng.integers(0, 10, n_test),
    }
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in NAMES.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arrays[key]), mtime=0))
    return folder


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EGGROLL_DATA_DIR"}
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed, HTTPS_PROXY=closed, no_proxy="", NO_PROXY="")
    return env


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """``python -m eggroll_optim.recipes ARGS`` in ``cwd``, stdout and stderr captured as text."""
    return subprocess.Popen([sys.executable, "-m", "eggroll_optim.recipes", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = start_cli(*args, cwd=cwd)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(predicate, timeout: float = 60, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def one_line_error(stderr: str) -> str:
    """The single ``eggroll: error: ...`` line of a failed run (warnings aside), checked."""
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  warnings.warn")]
    assert len(lines) == 1 and lines[0].startswith("eggroll: error: "), stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and mtime (to prove nothing was touched)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}

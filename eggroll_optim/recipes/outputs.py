"""What a run leaves in its folder besides the checkpoint: ``metrics.jsonl``, ``summary.json``,
``learning_curve.png``, and the helpers that fill them (one host sync per flush, the device and
versions a result was measured on)."""
from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path

import torch

from .checkpoint import atomic_write_text

__all__ = ["BOOKKEEPING", "METRICS", "SUMMARY", "MetricsLog", "environment", "flush", "peak_memory_gb",
           "plot_learning_curve", "write_summary"]

METRICS, SUMMARY = "metrics.jsonl", "summary.json"
BOOKKEEPING = ("step", "time", "metric", "lr", "sigma", "env_steps")  # columns that are not evaluations


def _complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` up to its last complete JSON line (a kill mid-append tears the last one)."""
    *complete, torn = path.read_text(encoding="utf-8", errors="replace").split("\n")
    kept = []
    for line in complete:  # ``torn``, after the last newline, was never finished
        try:
            json.loads(line)
        except ValueError:
            break
        kept.append(line)
    if torn or len(kept) < len(complete):
        warnings.warn(f"{path}: kept its first {len(kept)} complete lines, dropped a torn or damaged rest",
                      stacklevel=3)
    return kept


class MetricsLog:
    """``metrics.jsonl``: appended on each flush; a resumed run drops lines at or past its step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        kept = []
        if resume_step is not None and path.is_file():
            kept = [line for line in _complete_lines(path) if json.loads(line)["step"] < resume_step]
        atomic_write_text("".join(line + "\n" for line in kept), path)

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]


def flush(pending: list) -> list[dict]:
    """Turn the pending steps' device values into records with one host sync."""
    keys = sorted({k for *_, values in pending for k, v in values.items() if isinstance(v, torch.Tensor)})
    stacked = [values[k].detach().float().reshape(()) for *_, values in pending for k in keys]
    host = torch.stack(stacked).tolist() if stacked else []  # the one sync
    records = []
    for i, (step, elapsed, lr, sigma, values) in enumerate(pending):
        record = {"step": step, "time": round(elapsed, 4)}
        record.update({k: v for k, v in values.items() if not isinstance(v, torch.Tensor)})
        record.update(zip(keys, host[i * len(keys):(i + 1) * len(keys)]))
        record.update(lr=lr, sigma=sigma)
        records.append(record)
    pending.clear()
    return records


def write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / SUMMARY)


def peak_memory_gb(device: str) -> float | None:
    """Peak CUDA memory allocated by this process (None on CPU)."""
    device = torch.device(device)
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def environment(device: str) -> dict:
    """Where a result was measured: device name, torch and python versions."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "python": platform.python_version()}


def plot_learning_curve(records: list[dict], labels: dict[str, str], path: Path, title: str) -> str:
    """Plot the metric (and any evaluation columns) against the ES step; returns the path or a note.

    ``labels`` maps a column (``"metric"``, ``"test_acc"``...) to its axis label with units.

    A ``Figure`` drawn by the Agg canvas, without ``pyplot``: no figure manager, no global backend
    switch (a notebook that calls :func:`~eggroll_optim.recipes.runner.train` keeps its own), and
    ``pyplot``'s import is skipped.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no learning curve (pip install matplotlib)"
    evals = sorted({k for r in records for k in r} - set(BOOKKEEPING))
    fig = Figure(figsize=(6 + 5 * bool(evals), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + bool(evals), squeeze=False)
    axes[0][0].plot([r["step"] for r in records], [r["metric"] for r in records])
    axes[0][0].set(xlabel="ES step (population updates)", ylabel=labels.get("metric", "metric"))
    for key in evals:
        points = [(r["step"], r[key]) for r in records if key in r]
        axes[0][1].plot(*zip(*points), marker="o", label=labels.get(key, key))
    if evals:
        axes[0][1].set(xlabel="ES step (population updates)", ylabel=", ".join(labels.get(k, k) for k in evals))
        axes[0][1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)

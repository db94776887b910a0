"""The training loop every recipe shares: progress bar, ``metrics.jsonl``, checkpoints, summary.

A recipe supplies a :class:`Task` (model, optimizer, one ES step, an evaluation); :func:`train`
runs it for ``config.max_epochs`` steps into an output folder:

- ``metrics.jsonl``: one line per step, ``{"step", "time", "metric", "lr", "sigma", ...}``;
  ``time`` is seconds since the run started (a resumed run continues the clock);
- ``checkpoint.pt``: model, optimizer, scheduler, step, config, RNG state, written atomically
  every ``checkpoint_every`` steps and at the end; ``train(..., checkpoint=ckpt)`` continues it;
- ``summary.json`` and ``learning_curve.png`` (or a note when matplotlib is missing).

Host syncs: a step's values stay on the device until a flush (every ``log_every`` steps, an
evaluation or a checkpoint), which turns all pending values into floats with one ``tolist()``.
The per-step ``time`` is host time when the step was issued (exact on CPU; on CUDA the queue
may run ahead of the device between flushes).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import EggrollOptimizer
from .checkpoint import atomic_write_text, capture_rng_state, restore_rng_state, save_checkpoint

__all__ = ["CHECKPOINT", "RunConfig", "Task", "make_optimizer", "train"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class RunConfig:
    """Hyperparameters shared by every training recipe (the CLI flags of the same names)."""

    seed: int = 42
    device: str = "cpu"
    population_size: int = 2048
    rank: int = 4
    sigma: float = 0.1
    lr: float = 0.1
    lr_decay: float = 1.0
    sigma_decay: float = 0.999
    optimizer: str = "sgd"  # "sgd" (the seed's update) or "adam"
    max_epochs: int = 100  # ES steps
    chunk_size: int | None = None  # None: automatic
    log_every: int = 1
    eval_every: int = 10
    checkpoint_every: int = 25


class Task:
    """One recipe: ``model``, ``optimizer``, optional ``scheduler`` and the hooks below."""

    name = "task"
    metric_name = "metric"
    model: torch.nn.Module
    optimizer: EggrollOptimizer
    scheduler = None

    def train_step(self, step: int) -> dict:
        """One ES step; ``{"metric": tensor or float, ...}``, values left on the device."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """A periodic evaluation of the mean model: ``{name: float}``."""
        return {}

    def solved(self, record: dict) -> bool:
        """Stop early when a flushed step's record says the task is solved."""
        return False

    def final_evaluation(self) -> dict:
        """Evaluation written into ``summary.json`` at the end."""
        return self.evaluate()

    def warmup_input(self) -> torch.Tensor | None:
        """An input shaped like a step's (shared, or per member ``(N, ...)``), for ``warmup``."""
        return None

    @torch.no_grad()
    def warmup(self) -> float:
        """Run the perturbed model once and discard the population: one-time work (kernel
        compilation, autotuning, allocator growth) stays out of the training time. Returns seconds."""
        x = self.warmup_input()
        if x is None:
            return 0.0
        t0 = time.perf_counter()
        with self.optimizer.ask() as population:
            for _ in population.chunks():
                per_member = x.dim() > 1 and x.shape[0] == population.size and population.chunked
                self.model(population.slice(x) if per_member else x)
        self.optimizer.discard()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - t0


def make_optimizer(model: torch.nn.Module, cfg: RunConfig):
    """``EggrollOptimizer`` from the config, plus an ``ExponentialLR`` when ``lr_decay != 1``."""
    inner = {"sgd": None, "adam": torch.optim.Adam}
    if cfg.optimizer not in inner:
        raise ValueError(f"Invalid optimizer: {cfg.optimizer!r} (expected one of {sorted(inner)})")
    opt = EggrollOptimizer(
        model, lr=cfg.lr, sigma=cfg.sigma, rank=cfg.rank, population_size=cfg.population_size,
        seed=cfg.seed, optimizer=inner[cfg.optimizer], sigma_decay=cfg.sigma_decay, chunk_size=cfg.chunk_size,
    )
    scheduler = None if cfg.lr_decay == 1.0 else torch.optim.lr_scheduler.ExponentialLR(opt, cfg.lr_decay)
    return opt, scheduler


def _progress(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a recipes extra; without it, no bar
        enabled = False
        tqdm = None
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


class _NoBar:
    def update(self, n=1): pass
    def set_postfix(self, *args, **kwargs): pass
    def close(self): pass


class _MetricsLog:
    """``metrics.jsonl``: appended on each flush; a resumed run drops lines at or past its step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        kept = []
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < resume_step]
        atomic_write_text("".join(line + "\n" for line in kept), path)

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def _flush(pending: list) -> list[dict]:
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


def _checkpoint(task: Task, cfg: RunConfig, out: Path, step: int, elapsed: float, status: str) -> None:
    state = {
        "format": 1, "experiment": task.name, "step": step, "elapsed": elapsed, "status": status,
        "config": asdict(cfg), "model": task.model.state_dict(), "optimizer": task.optimizer.state_dict(),
        "scheduler": None if task.scheduler is None else task.scheduler.state_dict(), "rng": capture_rng_state(),
    }
    save_checkpoint(state, out / CHECKPOINT)


def _restore(task: Task, ckpt: dict) -> tuple[int, float, str]:
    if ckpt.get("experiment") != task.name:
        raise ValueError(f"Checkpoint is for experiment {ckpt.get('experiment')!r}, not {task.name!r}")
    task.model.load_state_dict(ckpt["model"])
    task.optimizer.load_state_dict(ckpt["optimizer"])
    if task.scheduler is not None and ckpt["scheduler"] is not None:
        task.scheduler.load_state_dict(ckpt["scheduler"])
    restore_rng_state(ckpt["rng"])
    return int(ckpt["step"]), float(ckpt["elapsed"]), ckpt["status"]


_BOOKKEEPING = ("step", "time", "metric", "lr", "sigma", "env_steps")


def _postfix(task: Task, record: dict) -> dict:
    """The progress bar's live values: the metric and any evaluation, from host floats."""
    return {task.metric_name: record["metric"], **{k: v for k, v in record.items() if k not in _BOOKKEEPING}}


def _hyper(opt: EggrollOptimizer) -> tuple[float, float]:
    group = opt.param_groups[0]
    return float(group["lr"]), float(group["sigma"])


def train(task: Task, cfg: RunConfig, out: Path, checkpoint: dict | None = None, progress: bool = True) -> dict:
    """Run ``task`` to ``cfg.max_epochs`` steps (or until solved) into ``out``; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start, elapsed, status = _restore(task, checkpoint) if checkpoint else (0, 0.0, "running")
    log = _MetricsLog(out / "metrics.jsonl", start if checkpoint else None)
    bar = _progress(cfg.max_epochs, min(start, cfg.max_epochs), task.name, progress)
    warmup_s = task.warmup()  # compilation and autotuning, reported apart from training time
    t0, pending, step = time.perf_counter() - elapsed, [], start
    try:
        while step < cfg.max_epochs and status != "solved":
            lr, sigma = _hyper(task.optimizer)
            values = task.train_step(step)
            pending.append((step, time.perf_counter() - t0, lr, sigma, values))
            step += 1
            last, evaluate = step == cfg.max_epochs, step % cfg.eval_every == 0
            save = last or step % cfg.checkpoint_every == 0
            if not (save or evaluate or step % cfg.log_every == 0):
                continue
            records = _flush(pending)
            if evaluate or last:
                records[-1].update(task.evaluate())
            log.append(records)
            bar.update(len(records))
            bar.set_postfix(_postfix(task, records[-1]), refresh=False)
            if any(task.solved(r) for r in records):
                status, save = "solved", True
            if save:
                status = "solved" if status == "solved" else "completed" if last else "running"
                _checkpoint(task, cfg, out, step, time.perf_counter() - t0, status)
    finally:
        bar.close()
    return _finish(task, cfg, out, log, start, step, time.perf_counter() - t0, status, warmup_s)


def _finish(task: Task, cfg: RunConfig, out: Path, log: _MetricsLog, start: int, step: int,
            elapsed: float, status: str, warmup_s: float = 0.0) -> dict:
    records = log.read()
    metrics = [r["metric"] for r in records]
    solved_at = next((r["step"] for r in records if task.solved(r)), None)
    summary = {
        "experiment": task.name, "status": "completed" if status == "running" else status,
        "steps": step, "solved_at_step": solved_at, "resumed_from_step": start or None, "metric_name": task.metric_name,
        "final_metric": metrics[-1] if metrics else None, "train_time_s": round(elapsed, 3),
        "warmup_s": round(warmup_s, 3),
        "peak_memory_gb": _peak_memory_gb(cfg.device),
        **task.final_evaluation(),
        "plot": plot_learning_curve(records, task.metric_name, out / "learning_curve.png"),
        "config": asdict(cfg), "environment": environment(cfg.device),
    }
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary


def _peak_memory_gb(device: str) -> float | None:
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


def plot_learning_curve(records: list[dict], metric_name: str, path: Path) -> str:
    """Plot the metric (and any evaluation columns) against the step; returns the path or a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no learning curve (pip install matplotlib)"
    evals = sorted({k for r in records for k in r} - set(_BOOKKEEPING))
    fig, axes = plt.subplots(1, 1 + bool(evals), figsize=(6 + 5 * bool(evals), 4), squeeze=False)
    axes[0][0].plot([r["step"] for r in records], [r["metric"] for r in records])
    axes[0][0].set(xlabel="ES step", ylabel=metric_name)
    for key in evals:
        points = [(r["step"], r[key]) for r in records if key in r]
        axes[0][1].plot(*zip(*points), marker="o", label=key)
    if evals:
        axes[0][1].set(xlabel="ES step")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)

"""The training loop every recipe shares: progress bar, ``metrics.jsonl``, checkpoints, summary.

A recipe supplies a :class:`Task` (model, optimizer, one ES step, an evaluation); :func:`train`
runs it for ``config.max_epochs`` steps into an output folder:

- ``metrics.jsonl``: one line per step, ``{"step", "time", "metric", "lr", "sigma", ...}``;
  ``time`` is seconds since the run started (a resumed run continues the clock);
- ``checkpoint.pt``: model, optimizer, scheduler, step, config, RNG state, written atomically
  every ``checkpoint_every`` steps, after any step that ends ``checkpoint_seconds`` or more
  after the last save, at the end, and on SIGINT/SIGTERM; ``train(..., checkpoint=ckpt)``
  continues it exactly;
- ``summary.json`` (``status``: ``completed``, ``solved`` or ``interrupted``) and
  ``learning_curve.png`` (or a note when matplotlib is missing).

SIGINT (Ctrl-C) or SIGTERM stops the run after the step in progress: it saves the checkpoint,
writes the summary with status ``"interrupted"`` and raises :class:`Interrupted`. A second
signal stops at once (``KeyboardInterrupt``; the last checkpoint stays as it was).

Host syncs: a step's values stay on the device until a flush (every ``log_every`` steps, an
evaluation or a checkpoint), which turns all pending values into floats with one ``tolist()``.
The per-step ``time`` is host time when the step was issued (exact on CPU; on CUDA the queue
may run ahead of the device between flushes).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from .. import EggrollOptimizer
from . import launch
from .checkpoint import FORMAT, capture_rng_state, restore_rng_state, save_checkpoint
from .errors import InputError
from .outputs import (BOOKKEEPING, METRICS, MetricsLog, environment, flush, peak_memory_gb, plot_learning_curve,
                      write_summary)
from .stopping import Interrupted, stop_requests

__all__ = ["CHECKPOINT", "Interrupted", "RunConfig", "Task", "make_optimizer", "step_function", "tf32_scope", "train"]

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
    optimizer: str = "sgd"  # "sgd" (the seed's update), "adam" or "adamw"
    weight_decay: float | None = None  # the inner optimizer's (adamw: decoupled; sgd, adam: L2); None: ADAMW_DECAY
    # with adamw, else 0
    max_epochs: int = 100  # ES steps
    chunk_size: int | None = None  # None: automatic
    log_every: int = 1
    eval_every: int = 10
    checkpoint_every: int = 25
    checkpoint_seconds: float = 60.0  # also save after a step that ends this long after the last save
    cuda_graph: bool = True  # on CUDA, one process: each ES step replayed from a CUDA graph (compile_step)
    tf32: bool = False  # on CUDA: float32 matmuls in TF32 during train() (the fused MLP's fastest kernels need it)


ADAMW_DECAY = 0.05  # --optimizer adamw without --weight-decay (MNIST MLP: benchmarks/RESULTS.md, section 7)


class Task:
    """One recipe: ``model``, ``optimizer``, optional ``scheduler`` and the hooks below."""

    name = "task"
    metric_name = "metric"
    labels: dict = {}  # plot axis labels with units: {"metric": ..., evaluation column: ...}
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

    per_member_input = False  # warmup_input is one input per member (population.per_member)

    def warmup_input(self) -> torch.Tensor | None:
        """An input shaped like a step's (shared, or per member ``(N, ...)``), for ``warmup``."""
        return None

    @torch.no_grad()
    def warmup(self) -> float:
        """Run the perturbed model and discard the population: one-time work (kernel compilation,
        autotuning, allocator growth) stays out of the training time. Returns seconds.

        Twice where the optimizer plans its pieces by measurement (``chunk_size="auto"``): a first
        call of an input shape measures a small probe piece of members and runs the rest after it
        (``memory.py``); the second runs the pieces every step will, so kernels tuned per shape are
        tuned here and not in the first step."""
        x = self.warmup_input()
        if x is None:
            return 0.0
        t0 = time.perf_counter()
        calls = 2 if getattr(self.optimizer, "_planner", None) is not None else 1
        with self.optimizer.ask() as population:
            for _ in population.chunks():
                for _ in range(calls):
                    self.model(population.per_member(x) if self.per_member_input else x)
        self.optimizer.discard()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - t0


def step_function(optimizer: EggrollOptimizer, closure, cfg: RunConfig, maximize: bool = False):
    """The recipes' ES step ``fn(*tensors) -> mean loss``: ``optimizer.compile_step(closure)`` (one CUDA
    graph a step) on CUDA in one process with ``cfg.cuda_graph``, else eager ``optimizer.step``."""
    if cfg.cuda_graph and torch.device(cfg.device).type == "cuda" and getattr(optimizer, "_group", None) is None:
        return optimizer.compile_step(closure, maximize=maximize)
    return lambda *tensors: optimizer.step(lambda: closure(*tensors), maximize=maximize)


def make_optimizer(model: torch.nn.Module, cfg: RunConfig):
    """``EggrollOptimizer`` from the config, plus an ``ExponentialLR`` when ``lr_decay != 1``."""
    inner = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.optimizer not in inner:
        raise ValueError(f"Invalid optimizer: {cfg.optimizer!r} (expected one of {sorted(inner)})")
    decay = cfg.weight_decay if cfg.weight_decay is not None else ADAMW_DECAY if cfg.optimizer == "adamw" else 0.0
    # plain SGD without decay is the default inner update (the seed's); any other: a factory of groups
    factory = None if (cfg.optimizer, decay) == ("sgd", 0.0) else partial(inner[cfg.optimizer], weight_decay=decay)
    opt = EggrollOptimizer(
        model, lr=cfg.lr, sigma=cfg.sigma, rank=cfg.rank, population_size=cfg.population_size,
        seed=cfg.seed, optimizer=factory, sigma_decay=cfg.sigma_decay, chunk_size=cfg.chunk_size,
        process_group=launch.group(),  # under torchrun: this rank evaluates its share of the population
    )
    scheduler = None if cfg.lr_decay == 1.0 else torch.optim.lr_scheduler.ExponentialLR(opt, cfg.lr_decay)
    return opt, scheduler


@contextmanager
def _progress(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a recipes extra; without it, no bar
        enabled = False
    bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) if enabled else _NoBar()
    try:
        yield bar
    finally:
        bar.close()


class _NoBar:
    def update(self, n=1): pass
    def set_postfix(self, *args, **kwargs): pass
    def close(self): pass


def _restore(task: Task, ckpt: dict) -> tuple[int, float, str]:
    if ckpt.get("experiment") != task.name:
        raise InputError(f"the checkpoint is for experiment {ckpt.get('experiment')!r}, not {task.name!r}")
    task.model.load_state_dict(ckpt["model"])
    task.optimizer.load_state_dict(ckpt["optimizer"])
    if task.scheduler is not None and ckpt["scheduler"] is not None:
        task.scheduler.load_state_dict(ckpt["scheduler"])
    restore_rng_state(ckpt["rng"])
    status = "solved" if ckpt["status"] == "solved" else "running"  # completed: may go on to a new max_epochs
    return int(ckpt["step"]), float(ckpt["elapsed"]), status


def _postfix(task: Task, record: dict) -> dict:
    """The progress bar's live values: the metric and any evaluation, from host floats."""
    return {task.metric_name: record["metric"], **{k: v for k, v in record.items() if k not in BOOKKEEPING}}


def _hyper(opt: EggrollOptimizer) -> tuple[float, float]:
    group = opt.param_groups[0]
    return float(group["lr"]), float(group["sigma"])


class _Run:
    """The state of one call of :func:`train`: step, clock, pending values, last save."""

    def __init__(self, task: Task, cfg: RunConfig, out: Path, log: MetricsLog, step: int, elapsed: float, bar):
        self.task, self.cfg, self.out, self.log, self.step, self.bar = task, cfg, out, log, step, bar
        self.t0 = time.perf_counter() - elapsed
        self.saved_at, self.pending = time.perf_counter(), []

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    def advance(self) -> str:
        """One ES step, then flush/evaluate/save as the intervals say; returns the run's status."""
        cfg = self.cfg
        lr, sigma = _hyper(self.task.optimizer)
        values = self.task.train_step(self.step)
        self.pending.append((self.step, self.clock(), lr, sigma, values))
        self.step += 1
        last, evaluate = self.step == cfg.max_epochs, self.step % cfg.eval_every == 0
        save = (last or self.step % cfg.checkpoint_every == 0
                or time.perf_counter() - self.saved_at >= cfg.checkpoint_seconds)
        if not (save or evaluate or self.step % cfg.log_every == 0):
            return "running"
        records = self.flush(evaluate or last)
        solved = any(self.task.solved(r) for r in records)
        status = "solved" if solved else "completed" if last else "running"
        if save or solved:
            self.save(status)
        return status

    def flush(self, evaluate: bool) -> list[dict]:
        records = flush(self.pending)
        if records and evaluate:
            records[-1].update(self.task.evaluate())
        self.log.append(records)
        if records:
            self.bar.update(len(records))
            self.bar.set_postfix(_postfix(self.task, records[-1]), refresh=False)
        return records

    def save(self, status: str) -> None:
        task = self.task
        state = {
            "format": FORMAT, "experiment": task.name, "step": self.step, "elapsed": self.clock(), "status": status,
            "config": asdict(self.cfg), "model": task.model.state_dict(), "optimizer": task.optimizer.state_dict(),
            "scheduler": None if task.scheduler is None else task.scheduler.state_dict(), "rng": capture_rng_state(),
        }
        save_checkpoint(state, self.out / CHECKPOINT)
        self.saved_at = time.perf_counter()


@contextmanager
def tf32_scope(cfg: RunConfig):
    """``cfg.tf32`` on CUDA: torch's TF32 flag for float32 matmuls (``torch.backends.cuda.matmul.allow_tf32``,
    which the kernels read too) on inside the block, and as it was after it: the flag is process-wide, and
    the next run of the process (``--experiment all``, a notebook) starts from the user's setting."""
    previous = torch.backends.cuda.matmul.allow_tf32
    if cfg.tf32 and torch.device(cfg.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def train(task: Task, cfg: RunConfig, out: Path, checkpoint: dict | None = None, progress: bool = True) -> dict:
    """Run ``task`` to ``cfg.max_epochs`` steps (or until solved) into ``out``, under ``tf32_scope(cfg)``;
    returns the summary.

    Raises :class:`Interrupted` (after saving) when SIGINT or SIGTERM arrives.
    """
    with tf32_scope(cfg):
        return _train(task, cfg, out, checkpoint, progress)


def _train(task: Task, cfg: RunConfig, out: Path, checkpoint: dict | None, progress: bool) -> dict:
    out = Path(out)
    start, elapsed, status = _restore(task, checkpoint) if checkpoint else (0, 0.0, "running")
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / METRICS, start if checkpoint else None)
    with stop_requests() as stop, _progress(cfg.max_epochs, min(start, cfg.max_epochs), task.name, progress) as bar:
        warmup_s = task.warmup()  # compilation and autotuning, reported apart from training time
        run = _Run(task, cfg, out, log, start, elapsed, bar)
        while run.step < cfg.max_epochs and status == "running" and not stop:
            status = run.advance()
        if stop and status == "running" and run.step < cfg.max_epochs:
            status = "interrupted"
            run.flush(evaluate=False)
            run.save(status)
    summary = _finish(task, cfg, out, log, start, run.step, run.clock(), status, warmup_s)
    if status == "interrupted":
        raise Interrupted(task.name, stop[0], run.step, out)
    return summary


def _finish(task: Task, cfg: RunConfig, out: Path, log: MetricsLog, start: int, step: int,
            elapsed: float, status: str, warmup_s: float = 0.0) -> dict:
    records = log.read()
    metrics = [r["metric"] for r in records]
    solved_at = next((r["step"] for r in records if task.solved(r)), None)
    summary = {
        "experiment": task.name, "status": "completed" if status == "running" else status,
        "steps": step, "solved_at_step": solved_at, "resumed_from_step": start or None, "metric_name": task.metric_name,
        "final_metric": metrics[-1] if metrics else None, "train_time_s": round(elapsed, 3),
        "warmup_s": round(warmup_s, 3), "peak_memory_gb": peak_memory_gb(cfg.device),
        **({} if status == "interrupted" else task.final_evaluation()),
        "plot": plot_learning_curve(records, {"metric": task.metric_name, **task.labels}, out / "learning_curve.png",
                                    f"{task.name} ({status if status != 'running' else 'completed'})"),
        "config": asdict(cfg), "environment": environment(cfg.device),
    }
    write_summary(out, summary)
    return summary

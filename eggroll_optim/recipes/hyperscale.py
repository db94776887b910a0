"""Throughput and memory of one full ES step (ask, forward of every member, tell) against ``N``.

Two workloads, each over a sweep of population sizes, evaluated in population chunks:

- ``cartpole_policy``: the 4-256-2 CartPole policy, every member running ``horizon`` steps of
  :class:`TorchCartPole` (no early exit, so no host sync inside the rollout);
- ``mnist_mlp``: the 784-256-10 MLP on one shared batch of ``batch_size`` (synthetic) images.

Throughput is member-evaluations/s (``N / step time``), plus env-steps/s or member-samples/s.
On CUDA the timed steps are bracketed by CUDA events and synchronised once per size; peak memory
is ``torch.cuda.max_memory_allocated`` over the timed steps. On CPU the time is wall time and
memory is the process's peak RSS so far (a high-water mark: it never goes down between sizes).
Results go to ``summary.json`` (rows, config, device, versions) and ``hyperscale.md`` in ``--out``.
``benchmarks/bench_population.py`` (benchmark 4) times this same ``measure`` and adds the
same-process inference baseline, the floor and correctness checks.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import EggrollOptimizer
from ..losses import per_member_cross_entropy
from .cartpole import make_policy
from .checkpoint import atomic_write_text
from .envs import TorchCartPole, rollout_returns
from .mnist import auto_chunk_size, make_mlp
from .errors import InputError
from .runner import step_function
from .outputs import environment

__all__ = ["HyperscaleConfig", "QUICK", "run"]


@dataclass
class HyperscaleConfig:
    seed: int = 42
    device: str = "cpu"
    populations: list[int] = field(default_factory=list)  # empty: default_populations(device)
    rank: int = 4
    sigma: float = 0.1
    lr: float = 0.1
    max_epochs: int = 3  # timed ES steps per size, after three warm-up steps
    horizon: int = 200  # CartPole env steps per member evaluation
    batch_size: int = 256  # MNIST samples per member evaluation
    chunk_size: int | None = None  # None: automatic (bounded activation memory)
    cuda_graph: bool = True  # MNIST on CUDA: each step replayed from a CUDA graph (compile_step)


QUICK = dict(populations=[16, 64], max_epochs=1, horizon=5, batch_size=8)


def default_populations(device: torch.device) -> list[int]:
    """2^10, 2^12, ..., 2^20 on CUDA; 2^10 ... 2^12 on CPU (2^14 takes ~30 s a step there)."""
    if device.type == "cuda":
        return [2**k for k in range(10, 21, 2)]
    return [2**k for k in range(10, 13)]


def _cartpole_step(cfg: HyperscaleConfig, N: int, chunk: int | None, device: torch.device):
    policy = make_policy().to(device)
    opt = EggrollOptimizer(policy, lr=cfg.lr, sigma=cfg.sigma, rank=cfg.rank, population_size=N,
                           seed=cfg.seed, chunk_size=chunk)
    envs = {}

    def step():
        population, returns = opt.ask(), []
        for members in population.chunks():
            n = members.stop - members.start
            if n not in envs:
                envs[n] = TorchCartPole(n, device=device)
            env = envs[n]
            r, _ = rollout_returns(lambda obs: policy(population.per_member(obs)).argmax(-1), env, cfg.horizon,
                                   seed=cfg.seed + members.start, check_every=None, paired=True)
            returns.append(r)
        opt.tell(torch.cat(returns))

    return step


def _mnist_step(cfg: HyperscaleConfig, N: int, chunk: int | None, device: torch.device):
    model = make_mlp().to(device)
    opt = EggrollOptimizer(model, lr=cfg.lr, sigma=cfg.sigma, rank=cfg.rank, population_size=N,
                           seed=cfg.seed, chunk_size=chunk)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.rand(cfg.batch_size, 784, generator=gen, device=device)  # shared by all members
    y = torch.randint(10, (cfg.batch_size,), generator=gen, device=device)
    step = step_function(opt, lambda x, y: per_member_cross_entropy(model(x), y), cfg)  # a CUDA graph on CUDA
    return lambda: step(x, y)


WORKLOADS = {  # name: (make_step, per-member activation elements, unit, units per member)
    "cartpole_policy": (_cartpole_step, lambda cfg: 256, "env_steps_per_s", lambda cfg: cfg.horizon),
    "mnist_mlp": (_mnist_step, lambda cfg: 256 * cfg.batch_size, "member_samples_per_s", lambda cfg: cfg.batch_size),
}


def _peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # not on Windows
        return None


def time_steps(step, steps: int, device: torch.device) -> float:
    """Seconds per call of ``step`` over ``steps`` calls, after three warm-up calls (a compiled step's
    eager step and its capture among them)."""
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()  # the one sync of this size
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def measure(cfg: HyperscaleConfig, workload: str, N: int, device: torch.device) -> dict:
    make_step, activation, unit, per_member = WORKLOADS[workload]
    chunk = cfg.chunk_size if cfg.chunk_size else auto_chunk_size(N, activation(cfg), device)
    row = {"workload": workload, "population": N, "chunk_size": chunk or N}
    try:
        seconds = time_steps(make_step(cfg, N, chunk, device), cfg.max_epochs, device)
    except torch.cuda.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    memory = _peak_memory_mib(device)
    return {**row, "step_s": seconds, "member_evals_per_s": N / seconds,
            unit: N * per_member(cfg) / seconds,
            ("peak_cuda_mib" if device.type == "cuda" else "peak_rss_mib"): memory}


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if value < 1e4 else f"{value:.3e}"
    return str(value)


COLUMNS = ["workload", "population", "chunk_size", "step_s", "member_evals_per_s", "env_steps_per_s",
           "member_samples_per_s", "peak_cuda_mib", "peak_rss_mib", "error"]


def markdown_table(rows: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def run(cfg: HyperscaleConfig, out: Path, checkpoint=None, progress: bool = True) -> dict:
    """Sweep both workloads over ``cfg.populations``; print and save the table into ``out``."""
    device, out = torch.device(cfg.device), Path(out)
    populations = cfg.populations or default_populations(device)
    if any(N < 2 or N % 2 for N in populations):
        raise InputError(f"--populations {populations}: expected even sizes >= 2")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for workload in WORKLOADS:
        for N in populations:
            rows.append(measure(cfg, workload, N, device))
            if progress:
                seconds = _fmt(rows[-1].get("step_s"))
                print(f"hyperscale: {workload} N={N} (2^{math.log2(N):.3g}): {seconds} s/step", flush=True)
    env = environment(cfg.device)
    result = {"experiment": "hyperscale", "status": "completed", "config": asdict(cfg) | {"populations": populations},
              "environment": env, "rows": rows}
    atomic_write_text(json.dumps(result, indent=2) + "\n", out / "summary.json")
    memory_note = ("peak memory: torch.cuda.max_memory_allocated over the timed steps" if device.type == "cuda"
                   else "peak memory: process peak RSS so far (a high-water mark across sizes)")
    header = (f"# EGGROLL hyperscale sweep\n\n{env['device_name']} ({env['device']}), torch {env['torch']}; "
              f"{cfg.max_epochs} timed ES step(s) per size after a warm-up; {memory_note}.\n\n")
    table = markdown_table(rows)
    atomic_write_text(header + table + "\n", out / "hyperscale.md")
    print(table)
    return result

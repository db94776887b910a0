"""Fitness shaping (SPEC §4): small pure functions ``(N,) -> (N,)``, higher fitness is better.

``SHAPINGS`` is the registry; ``resolve_shaping`` turns a name or callable into a function.
``check_fitness`` validates a raw fitness vector and applies the NaN policy; ``shape_fitness`` applies
the policy and a shaping (the functional step and ``EggrollOptimizer.tell`` both use it).
"""
from __future__ import annotations

from typing import Callable

import torch

from .kernels.fast.zscore import fused_zscore, fused_zscore_available

__all__ = [
    "SHAPINGS", "apply_nan_policy", "centered_rank", "check_fitness", "identity", "resolve_shaping",
    "shape_checked", "shape_in_graph",
    "shape_fitness", "validate_fitness", "widen", "zscore",
]

Shaping = Callable[[torch.Tensor], torch.Tensor]
NAN_POLICIES = ("raise", "worst", "skip")


def zscore(fitness: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(f - mean f) / sqrt(var f + eps)`` with the population variance (ddof 0).

    All-equal fitness gives exact zeros (the mean of equal floats can be off by one ulp). A contiguous
    1-D float32 CUDA fitness (up to 2^22 members) takes one Triton launch (``kernels.fast.zscore``: the
    same formula summed in another order, NaN everywhere for a NaN/inf member as here) instead of a
    dozen small kernels."""
    if fused_zscore_available(fitness):
        return fused_zscore(fitness, eps)
    low, high = torch.aminmax(fitness)
    centered = (fitness - fitness.mean()).masked_fill_(low == high, 0.0)
    return centered / torch.sqrt(centered.square().mean() + eps)


def centered_rank(fitness: torch.Tensor) -> torch.Tensor:
    """Ranks mapped linearly to ``[-0.5, 0.5]`` (lowest -> -0.5), ties get their average rank.

    A tie run's ranks are ``[first, last]``, found by two binary searches in the sorted values; their
    average ``(first + last) / 2``. No data-dependent shapes: no host sync (CUDA graphs)."""
    n = fitness.numel()
    values = fitness.sort().values
    first = torch.searchsorted(values, fitness, right=False)
    last = torch.searchsorted(values, fitness, right=True) - 1
    average = (first + last).to(fitness.dtype) / 2
    return average / (n - 1) - 0.5


def identity(fitness: torch.Tensor) -> torch.Tensor:
    """No shaping."""
    return fitness


SHAPINGS: dict[str, Shaping] = {"zscore": zscore, "centered_rank": centered_rank, "none": identity}


def resolve_shaping(shaping: str | Shaping) -> Shaping:
    """A registry name or a callable ``(N,) -> (N,)``."""
    if callable(shaping):
        return shaping
    if shaping not in SHAPINGS:
        raise ValueError(f"Unknown fitness_shaping {shaping!r}; expected one of {sorted(SHAPINGS)} or a callable")
    return SHAPINGS[shaping]


def _rank_last(fitness: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``bad`` members get ``min - max(spread, 1)`` of the finite ones: below every finite member. No host
    sync (an all-bad fitness gives NaN/inf here: the callers handle that case)."""
    low = torch.where(bad, torch.full_like(fitness, float("inf")), fitness).amin()
    high = torch.where(bad, torch.full_like(fitness, float("-inf")), fitness).amax()
    return torch.where(bad, low - (high - low).clamp_min(1.0), fitness)


def shape_in_graph(fitness: torch.Tensor, nan_policy: str, shaping: Shaping, flagged: torch.Tensor) -> torch.Tensor:
    """``shape_checked`` without a host sync, for a captured step (``capture.py``).

    ``flagged`` (a 0-dim int64 tensor) counts the steps that could not be scored: a NaN/inf member, or a
    shaping callable's NaN/inf. ``"worst"`` ranks NaN/inf members last as ``apply_nan_policy`` does;
    ``"raise"`` (it cannot raise inside a graph), ``"skip"``, every member non-finite, or a non-finite
    shaping give a zero fitness: a zero estimate."""
    fitness = widen(fitness)
    bad = ~torch.isfinite(fitness)
    any_bad = bad.any()
    flagged.add_(any_bad)
    if nan_policy == "worst":
        fitness, unusable = _rank_last(fitness, bad), bad.all()
    else:
        unusable = any_bad
    shaped = shaping(torch.where(unusable, torch.zeros_like(fitness), fitness))
    if shaping in SHAPINGS.values():  # finite for finite input
        return shaped
    finite = torch.isfinite(shaped).all()
    flagged.add_(~finite)
    return torch.where(finite, shaped, torch.zeros_like(shaped))


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` count as the same device when one of them has no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_fitness(
    fitness: torch.Tensor,
    population_size: int,
    device: torch.device | None = None,
    nan_policy: str = "raise",
) -> torch.Tensor:
    """Validate a raw fitness ``(N,)`` and handle NaN/inf.

    ``nan_policy="raise"`` raises ``ValueError`` naming how many members and which (first few);
    ``"worst"`` gives them a value below every finite member. One host sync per call.
    ``"skip"`` never syncs (CUDA graphs): if any member is NaN/inf, every member gets fitness 0,
    so the step's update is exactly zero and the weights stay as they were.
    """
    validate_fitness(fitness, population_size, device, nan_policy)
    return apply_nan_policy(fitness, nan_policy)


def apply_nan_policy(fitness: torch.Tensor, nan_policy: str) -> torch.Tensor:
    """``check_fitness``'s treatment of NaN/inf, for a fitness that ``validate_fitness`` accepted."""
    population_size = fitness.shape[0]
    if nan_policy == "skip":
        return torch.where(torch.isfinite(fitness).all(), fitness, torch.zeros_like(fitness))
    if bool(torch.isfinite(fitness).all()):
        return fitness
    bad = ~torch.isfinite(fitness)
    if nan_policy == "worst":
        if bool(bad.all()):
            raise ValueError("Every fitness value is NaN or inf; nothing to learn from")
        return _rank_last(fitness, bad)
    idx = bad.nonzero().flatten().tolist()
    raise ValueError(
        f"fitness has {len(idx)} NaN/inf member(s) of {population_size}, at indices {idx[:8]}"
        f"{' ...' if len(idx) > 8 else ''}; pass nan_policy='worst' to rank them last"
    )


def shape_fitness(fitness: torch.Tensor, nan_policy: str, shaping: Shaping = zscore) -> torch.Tensor:
    """``shaping(apply_nan_policy(fitness, nan_policy))`` for a fitness that ``validate_fitness`` accepted.
    The ``"skip"`` policy and the z-score fold into one launch where ``kernels.fast.zscore`` runs (the
    same numbers: all zeros when any member is NaN/inf).

    A float16/bfloat16 fitness is shaped in float32: its variance overflows float16 for spreads above
    ~256 (a z-score of all zeros: no update), and its ranks tie where float32 tells members apart."""
    fitness = widen(fitness)
    if nan_policy == "skip" and shaping is zscore and fused_zscore_available(fitness):
        return fused_zscore(fitness, skip_nonfinite=True)
    return shaping(apply_nan_policy(fitness, nan_policy))


def shape_checked(fitness: torch.Tensor, nan_policy: str, shaping: Shaping) -> torch.Tensor:
    """``shape_fitness``, and for a user's callable a check of what it returned: a finite tensor of the
    fitness's shape (``ValueError`` otherwise; the built-in shapings are finite for finite input)."""
    shaped = shape_fitness(fitness, nan_policy, shaping)
    if shaping in SHAPINGS.values():
        return shaped
    if not isinstance(shaped, torch.Tensor) or shaped.shape != fitness.shape:
        got = tuple(shaped.shape) if isinstance(shaped, torch.Tensor) else type(shaped).__name__
        raise ValueError(f"fitness_shaping must return a tensor of shape {tuple(fitness.shape)}, got {got}")
    if not bool(torch.isfinite(shaped).all()):
        raise ValueError("fitness_shaping returned NaN/inf (constant fitness divided by its std?); nothing was updated")
    return shaped


def widen(fitness: torch.Tensor) -> torch.Tensor:
    """A half-precision fitness as float32 (float32/float64 as they are): what the shaping reads."""
    return fitness.float() if fitness.dtype in (torch.float16, torch.bfloat16) else fitness


def validate_fitness(fitness, population_size: int, device: torch.device | None, nan_policy: str) -> None:
    """``check_fitness``'s checks of type, shape, dtype, device and policy (no look at the values)."""
    if not isinstance(fitness, torch.Tensor):
        raise TypeError(f"fitness must be a torch.Tensor of shape ({population_size},), got {type(fitness).__name__}")
    if fitness.shape != (population_size,):
        raise ValueError(f"fitness must have shape ({population_size},), got {tuple(fitness.shape)}")
    if not fitness.is_floating_point():
        raise TypeError(f"fitness must be a floating-point tensor, got {fitness.dtype}; use fitness.float()")
    if device is not None and not same_device(fitness.device, torch.device(device)):
        raise ValueError(f"fitness is on {fitness.device}, expected {device} (the parameters' device)")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"Unknown nan_policy {nan_policy!r}; expected one of {NAN_POLICIES}")

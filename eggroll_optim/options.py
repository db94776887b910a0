"""``EggrollOptimizer``'s arguments, checked before anything is built or touched: each error is a
``ValueError`` (a ``TypeError`` for a wrong kind of object) naming the value and what was expected."""
from __future__ import annotations

import torch.nn as nn

from .core import validate_hyperparameters

__all__ = ["validate_arguments"]


def validate_arguments(module, *, population_size, rank, sigma, lr, sigma_decay, chunk_size, max_memory,
                       nan_policy, unsupported, fused, noise_block) -> bool:
    """Raise on the first bad argument; returns whether ``chunk_size`` is ``"auto"`` (or ``None``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    validate_hyperparameters(population_size, rank, sigma, lr)
    if not sigma_decay > 0:
        raise ValueError(f"Invalid sigma_decay: {sigma_decay} (expected > 0)")
    auto = chunk_size is None or chunk_size == "auto"
    if not auto and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 2
                     or chunk_size % 2):
        raise ValueError(f"Invalid chunk_size: {chunk_size!r} (expected 'auto' or an even integer >= 2)")
    if max_memory is not None and (isinstance(max_memory, bool) or not max_memory > 0 or not auto):
        raise ValueError(f"Invalid max_memory: {max_memory!r} (expected bytes > 1 or a fraction in (0, 1], "
                         "with chunk_size='auto')")
    if nan_policy not in ("raise", "worst"):
        raise ValueError(f"Invalid nan_policy: {nan_policy!r} (expected 'raise' or 'worst')")
    if unsupported not in ("raise", "freeze"):
        raise ValueError(f"Invalid unsupported: {unsupported!r} (expected 'raise' or 'freeze')")
    if fused not in (None, True, False):
        raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
    if noise_block is not None and (not isinstance(noise_block, int) or noise_block < 1):
        raise ValueError(f"Invalid noise_block: {noise_block} (expected >= 1 pairs)")
    return auto

"""ES gradient from factors as one contraction (SPEC §5); never per-member matrices."""
from __future__ import annotations

import math

import torch

from .fast.pairs import layout_kernels_available, scaled_transpose

__all__ = ["accumulation_dtype", "es_gradient", "lowrank_gradient_sum", "fullrank_gradient_sum"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """bfloat16/float16 accumulate in float32 (SPEC §7)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def lowrank_gradient_sum(fitness: torch.Tensor, A_scaled: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Σ_i f_i A_scaled_i B_iᵀ`` as one GEMM ``(m, N r) @ (N r, n)``: ``(N,), (N, m, r), (N, n, r) -> (m, n)``.

    ``B`` laid out ``(n, N, r)``-major (as ``noise.antithetic`` returns it) is read without a copy.
    """
    acc = accumulation_dtype(A_scaled.dtype)
    N, m, r = A_scaled.shape
    if fitness.shape == (N,) and layout_kernels_available(A_scaled, fitness):  # one Triton pass: f·A transposed
        fA = scaled_transpose(A_scaled, fitness, acc).view(m, N * r)
    else:
        fA = (A_scaled.to(acc) * fitness.to(acc)[:, None, None]).permute(1, 0, 2).reshape(m, N * r)
    return fA @ B.to(acc).permute(1, 0, 2).reshape(B.shape[1], N * r).t()


def fullrank_gradient_sum(fitness: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``Σ_i f_i noise_i`` for full-rank noise ``(N, *shape)`` already carrying ``sigma * s_i``."""
    acc = accumulation_dtype(noise.dtype)
    return torch.tensordot(fitness.to(acc), noise.to(acc), dims=1)


def es_gradient(
    fitness: torch.Tensor, A_scaled: torch.Tensor, B: torch.Tensor, population_size: int | None = None
) -> torch.Tensor:
    """``g = (1/sqrt(N)) Σ_i f_i A_scaled_i B_iᵀ`` -> ``(m, n)`` (float32 for half inputs)."""
    N = A_scaled.shape[0] if population_size is None else population_size
    if fitness.shape != (A_scaled.shape[0],):
        raise ValueError(
            f"fitness must have shape ({A_scaled.shape[0]},) to match the factors, "
            f"got {tuple(fitness.shape)}"
        )
    return lowrank_gradient_sum(fitness, A_scaled, B) / math.sqrt(N)

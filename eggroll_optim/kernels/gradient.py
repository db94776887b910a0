"""ES gradient from factors as one contraction (SPEC §5); never per-member matrices."""
from __future__ import annotations

import math

import torch

from .fast.pairs import (
    antithetic_half,
    layout_kernels_available,
    pair_scaled_transpose,
    scaled_transpose,
)

__all__ = ["accumulation_dtype", "es_gradient", "lowrank_gradient_sum", "fullrank_gradient_sum"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """bfloat16/float16 accumulate in float32 (SPEC §7)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def lowrank_gradient_sum(fitness: torch.Tensor, A_scaled: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Σ_i f_i A_scaled_i B_iᵀ`` as one GEMM ``(m, N r) @ (N r, n)``: ``(N,), (N, m, r), (N, n, r) -> (m, n)``.

    ``B`` laid out ``(n, N, r)``-major (as ``noise.antithetic`` returns it) is read without a copy. For
    factors straight from ``noise.antithetic_pairs`` on CUDA (members ``2k``, ``2k + 1`` share ``B_k`` and
    carry ``±A_k``, unchanged since), the sum runs over the pairs:
    ``Σ_k (f_2k - f_2k+1) A_scaled_2k B_kᵀ``, half the GEMM's depth and bytes (the same sum, rounded
    differently).
    """
    acc = accumulation_dtype(A_scaled.dtype)
    N, m, r = A_scaled.shape
    if fitness.shape == (N,) and layout_kernels_available(A_scaled, fitness):  # one Triton pass: f·A transposed
        paired, half = antithetic_half(B)
        if paired and half is not None and antithetic_half(A_scaled)[0]:
            # (f_2k - f_2k+1) A_scaled_2k, transposed, in one pass
            fA = pair_scaled_transpose(A_scaled[0::2], fitness, acc).view(m, N // 2 * r)
            return fA @ half.to(acc).view(half.shape[0], N // 2 * r).t()
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

"""The ES gradient estimate (SPEC §5), one function for the functional API and the optimizer.

``es_gradients`` (``es_gradient`` for one parameter) is the only place of the ``1/sqrt(N)``; the sums below
it are one contraction each, never per-member matrices.
"""
from __future__ import annotations

import math

import torch

from ..noise import Pairs
from ..noise.layout import layout_kernels_available, pair_scaled_transpose, scaled_transpose

__all__ = [
    "accumulation_dtype", "es_gradient", "es_gradients", "fullrank_gradient_sum", "lowrank_gradient_sum",
    "pair_gradient_sum",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """bfloat16/float16 accumulate in float32 (SPEC §7)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def es_gradient(fitness: torch.Tensor, noise, population_size: int | None = None) -> torch.Tensor:
    """``g = (1/sqrt(N)) Σ_i f_i noise_i`` for one parameter (float32 for half inputs).

    Args:
        fitness: ``(n,)``, the shaped fitness of the members ``noise`` covers (the population, or a
            chunk of it).
        noise: ``Pairs`` -> ``Σ_k (f_2k - f_2k+1) A_pair_k B_kᵀ``, the sum over pairs;
            any other ``(A_scaled (n, m, r), B (n, k, r))`` -> ``Σ_i f_i A_scaled_i B_iᵀ``, over members;
            a tensor ``(n, *shape)`` (full-rank noise carrying ``sigma s_i``) -> ``Σ_i f_i noise_i``.
        population_size: the ``N`` of ``1/sqrt(N)``; default ``n`` (a chunk passes the population's).
    Returns:
        ``(m, k)`` for factors, ``shape`` for full-rank noise.
    """
    return es_gradients(fitness, [noise], population_size)[0]


def es_gradients(fitness: torch.Tensor, noises: list, population_size: int | None = None) -> list[torch.Tensor]:
    """``[es_gradient(fitness, noise, population_size) for noise in noises]``, bit for bit: the estimate of
    every parameter of a step against one fitness, with the pairs' fitness differences ``f_2k - f_2k+1``
    (where the torch path of ``pair_gradient_sum`` needs them) taken once per accumulation dtype instead
    of once per parameter."""
    shared: dict = {}  # accumulation dtype -> the pairs' differences (P, 1, 1)
    estimates = []
    for noise in noises:
        members = noise.shape[0] if isinstance(noise, torch.Tensor) else noise[0].shape[0]
        if fitness.shape != (members,):
            raise ValueError(f"fitness must have shape ({members},) to match the noise, got {tuple(fitness.shape)}")
        if isinstance(noise, torch.Tensor):
            total = fullrank_gradient_sum(fitness, noise)
        elif isinstance(noise, Pairs):
            total = pair_gradient_sum(fitness, noise, shared)
        else:
            total = lowrank_gradient_sum(fitness, *noise)
        estimates.append(total / math.sqrt(members if population_size is None else population_size))
    return estimates


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without a call when ``t`` has it already (the same tensor either way)."""
    return t if t.dtype == dtype else t.to(dtype)


def pair_gradient_sum(fitness: torch.Tensor, pairs: Pairs, shared: dict | None = None) -> torch.Tensor:
    """``Σ_k (f_2k - f_2k+1) A_pair_k B_kᵀ`` = ``Σ_i f_i A_scaled_i B_iᵀ`` over ``P`` pairs: ``(2P,) -> (m, n)``.

    One GEMM ``(m, P r) @ (P r, n)`` against ``B_pair``: half the depth and the bytes of the sum over
    members (the same sum, rounded differently); on CUDA the left operand, the pairs' fitness
    differences times ``A_pair``, transposed, is one Triton pass. ``shared``: a dict kept by a caller that
    sums several parameters against this fitness (``es_gradients``), where the torch path keeps the pairs'
    differences ``f_2k - f_2k+1`` per accumulation dtype, taken once."""
    A, B_pair = pairs.A_pair, pairs.B_pair  # (P, m, r), (n, P, r)
    acc = accumulation_dtype(A.dtype)
    P, m, r = A.shape
    if fitness.shape != (2 * P,):
        raise ValueError(f"pair_gradient_sum: fitness must have shape ({2 * P},), got {tuple(fitness.shape)}")
    if layout_kernels_available(pairs.A_scaled, fitness):
        fA = pair_scaled_transpose(A, fitness, acc)  # (m, P, r)
    else:
        differences = None if shared is None else shared.get(acc)
        if differences is None:
            f = _cast(fitness, acc)
            differences = (f[0::2] - f[1::2]).view(P, 1, 1)
            if shared is not None:
                shared[acc] = differences
        fA = (_cast(A, acc) * differences).permute(1, 0, 2)
    return fA.reshape(m, P * r) @ _cast(B_pair, acc).view(B_pair.shape[0], P * r).t()


def lowrank_gradient_sum(fitness: torch.Tensor, A_scaled: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Σ_i f_i A_scaled_i B_iᵀ`` as one GEMM ``(m, N r) @ (N r, n)``: ``(N,), (N, m, r), (N, n, r) -> (m, n)``.

    ``B`` laid out ``(n, N, r)``-major (as ``Pairs.B``) is read without a copy; on CUDA the left
    operand ``f_i A_scaled_i``, transposed, is one Triton pass. ``fitness`` of shape ``(1,)`` broadcasts."""
    acc = accumulation_dtype(A_scaled.dtype)
    N, m, r = A_scaled.shape
    if fitness.shape == (N,) and layout_kernels_available(A_scaled, fitness):
        fA = scaled_transpose(A_scaled, fitness, acc).view(m, N * r)
    else:
        fA = (A_scaled.to(acc) * fitness.to(acc)[:, None, None]).permute(1, 0, 2).reshape(m, N * r)
    return fA @ B.to(acc).permute(1, 0, 2).reshape(B.shape[1], N * r).t()


def fullrank_gradient_sum(fitness: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``Σ_i f_i noise_i`` for full-rank noise ``(N, *shape)`` already carrying ``sigma * s_i``."""
    acc = accumulation_dtype(noise.dtype)
    return torch.tensordot(_cast(fitness, acc), _cast(noise, acc), dims=1)

"""Low-rank antithetic noise: factors from a user generator, or regenerated from a key.

Layout (SPEC §2): members ``2k`` and ``2k+1`` share one draw ``(A_k, B_k)``; member ``2k`` gets
``+A_k`` and member ``2k+1`` gets ``-A_k``. ``A_scaled`` carries sign and ``sigma / sqrt(rank)``;
``B`` carries neither.

Keyed noise (SPEC §6) is a pure function of ``(seed, step, param, pair)``: pairs are grouped in
blocks of ``block_pairs`` and each block is drawn from its own ``torch.Generator`` seeded with a
splitmix64 hash of ``(seed, step, param, block)``. A slice of pairs (a chunk, a distributed rank)
is rebuilt by drawing only the blocks that cover it, so its numbers do not depend on how the
population was sliced.
"""
from __future__ import annotations

import math

import torch

from .kernels.fast.pairs import (
    antithetic_half,
    layout_kernels_available,
    mark_pairs,
    pair_rows,
    signed_pairs,
)

__all__ = [
    "DEFAULT_BLOCK_PAIRS",
    "antithetic",
    "antithetic_pairs",
    "antithetic_half",
    "draw_pair_factors",
    "keyed_pair_factors",
    "keyed_pair_normals",
    "noise_key",
    "noise_dtype",
]

DEFAULT_BLOCK_PAIRS = 256
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_key(*parts: int) -> int:
    """Hash integers (seed, step, param index, block, ...) into one 63-bit generator seed."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1


def noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Noise is drawn in the parameter's dtype, or float32 for half types (SPEC §6)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def draw_pair_factors(
    num_pairs: int,
    out_dim: int,
    in_dim: int,
    rank: int,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw unscaled factors ``A (P, out_dim, rank)`` and ``B (P, in_dim, rank)``, i.i.d. N(0, 1).

    The device is the generator's device unless ``device`` is given.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    A = torch.randn(num_pairs, out_dim, rank, generator=generator, dtype=dtype, device=device)
    B = torch.randn(num_pairs, in_dim, rank, generator=generator, dtype=dtype, device=device)
    return A, B


def antithetic_pairs(
    A: torch.Tensor, B: torch.Tensor, sigma: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleave pair factors into a population: ``(A_scaled, B)`` of ``antithetic``, without ``A_signed``.

    ``A (P, m, r)`` -> ``A_scaled (2P, m, r)`` = ``s_i * sigma / sqrt(r) * A`` with
    ``s = (+1, -1, +1, -1, ...)``; ``B (P, n, r)`` -> ``(2P, n, r)``, a view of an ``(n, 2P, r)``
    buffer: ``B.permute(1, 0, 2).reshape(n, 2P * r)`` is then free, which is how the shared-input
    projection ``x @ B`` and the gradient GEMM read it.
    """
    scale = sigma / math.sqrt(rank)
    if A.dtype != torch.float64 and layout_kernels_available(A):  # one pass on CUDA, the same values
        A_scaled = signed_pairs(A, scale)
    else:
        A_scaled = torch.stack((A, -A), dim=1).flatten(0, 1).mul_(scale)
    return mark_pairs(A_scaled, None), _pair_rows(B)


def antithetic(
    A: torch.Tensor, B: torch.Tensor, sigma: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``antithetic_pairs`` plus ``A_signed (2P, m, r)`` = ``s_i * A`` (the seed API returns it):
    ``(A_scaled, A_signed, B)``."""
    A_signed = torch.stack((A, -A), dim=1).flatten(0, 1)  # (2P, m, r)
    return mark_pairs(A_signed * (sigma / math.sqrt(rank)), None), A_signed, _pair_rows(B)


def _pair_rows(B: torch.Tensor) -> torch.Tensor:
    """``B (P, n, r)`` -> ``(2P, n, r)`` with members ``2k`` and ``2k + 1`` sharing ``B_k``, stored ``(n, 2P, r)``.

    On CUDA a Triton transpose-copy writes each pair's two rows at once and, in the same pass, the
    ``(n, P, r)`` copy that ``antithetic_half`` hands out (35 µs for the MNIST step's 2048 x 784 x 4 on
    an H200; torch's strided copy of the two rows alone took 48 µs); elsewhere torch copies."""
    P, n, r = B.shape
    if layout_kernels_available(B):
        B_pop, half = pair_rows(B, half=True)
        return mark_pairs(B_pop.view(n, 2 * P, r).permute(1, 0, 2), half)
    B_pop = B.new_empty(n, P, 2, r)
    B_pop.copy_(B.permute(1, 0, 2).unsqueeze(2).expand(n, P, 2, r))
    return mark_pairs(B_pop.view(n, 2 * P, r).permute(1, 0, 2), None)


def keyed_pair_normals(
    key: int,
    shapes: list[tuple[int, ...]],
    pair_start: int,
    pair_stop: int,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    block_pairs: int = DEFAULT_BLOCK_PAIRS,
    cache: dict | None = None,
) -> list[torch.Tensor]:
    """N(0, 1) tensors ``(P, *shape)`` for pairs ``[pair_start, pair_stop)``, one per shape.

    Block ``j`` of ``block_pairs`` pairs draws every shape in order from one generator seeded
    with ``noise_key(key, j)``; the requested pairs are sliced out of the covering blocks.
    ``cache`` (a dict the caller keeps) holds the last block drawn for each key, so consecutive
    small slices of one block (population chunks) draw it once instead of once per slice.
    """
    if not 0 <= pair_start < pair_stop:
        raise ValueError(f"Invalid pair range [{pair_start}, {pair_stop})")
    if block_pairs < 1:
        raise ValueError(f"Invalid block_pairs: {block_pairs} (expected >= 1)")
    device = torch.device(device)
    first, last = pair_start // block_pairs, (pair_stop - 1) // block_pairs
    blocks = []
    for block in range(first, last + 1):
        cached = cache.get(key) if cache is not None else None
        if cached is not None and cached[0] == block:
            blocks.append(cached[1])
            continue
        gen = torch.Generator(device=device).manual_seed(noise_key(key, block))
        blocks.append([torch.randn(block_pairs, *shape, generator=gen, dtype=dtype, device=device) for shape in shapes])
        if cache is not None:
            cache[key] = (block, blocks[-1])  # only the latest block per key: memory of one block
    lo = pair_start - first * block_pairs
    hi = lo + (pair_stop - pair_start)
    return [(parts[0] if len(parts) == 1 else torch.cat(parts))[lo:hi] for parts in zip(*blocks)]


def keyed_pair_factors(
    key: int,
    out_dim: int,
    in_dim: int,
    rank: int,
    pair_start: int,
    pair_stop: int,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    block_pairs: int = DEFAULT_BLOCK_PAIRS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regenerate the unscaled factors of pairs ``[pair_start, pair_stop)`` from ``key``.

    ``key`` is ``noise_key(seed, step, param_index)``. Returns ``A (P, m, r)``, ``B (P, n, r)``.
    """
    A, B = keyed_pair_normals(
        key, [(out_dim, rank), (in_dim, rank)], pair_start, pair_stop,
        device=device, dtype=dtype, block_pairs=block_pairs,
    )
    return A, B

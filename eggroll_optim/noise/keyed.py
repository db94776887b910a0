"""The draws: pair factors from a user's generator, or regenerated from a key (SPEC §6).

Keyed noise is a pure function of ``(seed, step, param, pair)``: pairs are grouped in blocks of
``block_pairs`` and each block is drawn from its own ``torch.Generator`` seeded with a splitmix64
hash of ``(seed, step, param, block)``. A slice of pairs (a chunk, a distributed rank) is rebuilt by
drawing only the blocks that cover it, so its numbers do not depend on how the population was sliced.
"""
from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_BLOCK_PAIRS",
    "GeneratorPool",
    "draw_pair_factors",
    "keyed_pair_factors",
    "keyed_pair_normals",
    "noise_dtype",
    "noise_key",
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
    generators: "GeneratorPool | None" = None,
) -> list[torch.Tensor]:
    """N(0, 1) tensors ``(P, *shape)`` for pairs ``[pair_start, pair_stop)``, one per shape.

    Block ``j`` of ``block_pairs`` pairs draws every shape in order from one generator seeded
    with ``noise_key(key, j)``; the requested pairs are sliced out of the covering blocks.
    ``cache`` (a dict the caller keeps) holds the last block drawn for each key, so consecutive
    small slices of one block (population chunks) draw it once instead of once per slice.
    ``generators`` (a ``GeneratorPool`` the caller keeps per parameter) lends the generators, kept
    across steps and re-seeded with the same keys: the same numbers.
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
        gen = generators.take(block) if generators is not None else torch.Generator(device=device)
        gen.manual_seed(noise_key(key, block))
        blocks.append([torch.randn(block_pairs, *shape, generator=gen, dtype=dtype, device=device) for shape in shapes])
        if cache is not None:
            cache[key] = (block, blocks[-1])  # only the latest block per key: memory of one block
    lo = pair_start - first * block_pairs
    hi = lo + (pair_stop - pair_start)
    if len(blocks) == 1 and (lo, hi) == (0, block_pairs):  # one whole block: its tensors, nothing to cut
        return list(blocks[0])
    return [(parts[0] if len(parts) == 1 else torch.cat(parts))[lo:hi] for parts in zip(*blocks)]


class GeneratorPool:
    """The generators of one parameter's keyed draws, kept across steps (``EggrollOptimizer``).

    An eager step takes one generator per block, re-seeded at each draw. A compiled step
    (``begin(distinct=True)``, ``capture.py``) takes for the ``j``-th draw of block ``b`` in the step
    generator ``(b, j)``, so each is seeded once a step and draws once: a CUDA graph registers them, and
    before each replay ``reseed(key)`` seeds every one as the step's draws would (seeding inside a
    capture only confirms the seed, and a generator that drew twice would continue its stream
    instead of restarting it). Its warm-up step makes the generators its capture will use.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.generators: dict[tuple[int, int], torch.Generator] = {}
        self._uses: dict[int, int] = {}
        self._distinct = False

    def begin(self, distinct: bool = False) -> None:
        self._uses.clear()
        self._distinct = distinct

    def take(self, block: int) -> torch.Generator:
        j = self._uses.get(block, 0) if self._distinct else 0
        self._uses[block] = j + 1
        gen = self.generators.get((block, j))
        if gen is None:
            gen = self.generators[(block, j)] = torch.Generator(device=self.device)
        return gen

    def reseed(self, key: int) -> None:
        """Seed every generator as a step with ``key`` (``noise_key(seed, step, param)``) seeds it."""
        for (block, _), gen in self.generators.items():
            gen.manual_seed(noise_key(key, block))


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

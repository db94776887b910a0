"""Counter noise: normals that are a pure function of ``(seed, index)`` (SPEC §6), drawn where used.

The noise of one optional kernel (``kernels.fast.counter_linear``), not the library's: the optimizer
and the functional API draw through ``eggroll_optim.noise``, whose docstring says why this stream
did not become the one keyed noise.

The stream is cut into blocks of
2048 values drawn from 256 consecutive Philox-4x32-7 counters under the 64-bit key ``seed``: value
``t`` of block ``c`` is lane ``t // 256`` of counter ``256 c + t % 256``. A counter's four 32-bit words
``w_k`` give two 16-bit uniforms each, ``u = (lo + 1/2) / 2^16`` and ``v = (hi + 1/2) / 2^16``, and
Box-Muller turns them into lanes ``2k`` (``r cos t``) and ``2k + 1`` (``r sin t``), ``r = sqrt(-2 ln u)``,
``t = 2 pi v - pi``. Lane-major blocks give every lane a run of 256 consecutive values, so a kernel
meets its rows with plain contiguous loads and stores; half-words and seven rounds (Philox-4x32-7
passes BigCrush, Salmon et al. 2011) cost a third of the ten-round, one-normal-per-word draw, and the
16-bit uniforms bound ``|z|`` by 4.8546 (the tails beyond, 1.2e-6 of a normal's mass, are cut).
Pair ``p`` owns the stream slice ``[p * L, (p + 1) * L)`` with ``L = pad(out * r) + pad(in * r)``
(``pad``: to whole blocks): ``A_p (out, r)`` first, then ``B_p (in, r)``, both row-major.
``counter_pair_factors`` is the plain-torch twin (any device); the kernels reproduce its Philox words
exactly and its normals to a few 1e-5 on CUDA, where Box-Muller uses the hardware approximations of
log2/sqrt/sin/cos (under the interpreter it uses the exact ones). ``kernels.fast.counter_linear`` draws
it inside its kernels (ranks that are not a power of two, or above 16, take the twin there: draw,
then the stored kernel). A factor shorter than a block still costs those kernels a block's 256
counters (the twin draws only the ones it uses): they are built for wide layers.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton

__all__ = ["BLOCK", "LANE", "ROUNDS", "counter_normals", "counter_pair_factors", "pair_stride"]

_M32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 7  # Philox rounds of the counter noise
LANE = 256  # counters of a block; each yields 8 lanes of normals
BLOCK = 8 * LANE  # stream values of a block


def _pad_block(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def pair_stride(out_dim: int, in_dim: int, rank: int) -> int:
    """Stream values owned by one pair: ``out * r`` and ``in * r``, each padded to whole blocks."""
    return _pad_block(out_dim * rank) + _pad_block(in_dim * rank)


def _philox4x32(counter: torch.Tensor, seed: int, rounds: int = ROUNDS) -> list[torch.Tensor]:
    """Philox-4x32 of ``(counter_lo, counter_hi, 0, 0)`` under key ``seed``; int64 lanes of 32 bits.

    A 32x32-bit product can wrap an int64: its bit pattern is still the unsigned product's, so the
    high word is ``(p >> 32) & 0xFFFFFFFF`` either way.
    """
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        p0, p2 = c0 * _PHILOX_ROUND[0], c2 * _PHILOX_ROUND[1]
        c0, c1, c2, c3 = ((p2 >> 32) & _M32) ^ c1 ^ k0, p2 & _M32, ((p0 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    return [c0, c1, c2, c3]


def _half_uniform(half: torch.Tensor) -> torch.Tensor:
    """A 16-bit value ``h`` as the uniform ``(h + 1/2) / 2^16`` in (0, 1), float32 (exact)."""
    return (half.to(torch.float32) + 0.5) * 2.0**-16


def _lanes(q: torch.Tensor, seed: int) -> torch.Tensor:
    """The eight normals of each int64 counter in ``q``: ``q.shape + (8,)``, float32 (lane ``2k``:
    ``r cos t`` of word ``k``, lane ``2k + 1``: ``r sin t``)."""
    lanes = []
    for word in _philox4x32(q, int(seed) & ((1 << 64) - 1)):
        u, v = _half_uniform(word & 0xFFFF), _half_uniform(word >> 16)
        r = torch.sqrt(-2.0 * torch.log(u))
        t = v * torch.tensor(6.283185307179586, dtype=torch.float32) - torch.tensor(3.141592653589793)
        lanes += [r * torch.cos(t), r * torch.sin(t)]
    return torch.stack(lanes, dim=-1)


def counter_normals(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stream values ``[start, start + count)`` of the counter noise under ``seed``: float32 ``(count,)``
    (draws the whole blocks they fall in)."""
    if count <= 0 or start < 0:
        raise ValueError(f"counter_normals: needs start >= 0 and count > 0, got start={start}, count={count}")
    first, last = start // BLOCK, (start + count - 1) // BLOCK
    q = torch.arange(first * LANE, (last + 1) * LANE, dtype=torch.int64, device=device)
    flat = _lanes(q, seed).view(last - first + 1, LANE, 8).transpose(1, 2).flatten()  # block, lane, counter
    offset = start - BLOCK * first
    return flat[offset: offset + count]


def _segments(seed: int, first_counter: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` values of the block-aligned segments starting at counters ``first_counter (P,)``:
    ``(P, n)``. Draws only the counters those values use (a segment shorter than a block uses
    ``min(n, 256)`` counters of its block), so small layers cost no more than their values."""
    full, rem = divmod(n, BLOCK)
    used = full * LANE + min(rem, LANE)
    q = first_counter[:, None] + torch.arange(used, dtype=torch.int64, device=first_counter.device)
    lanes = _lanes(q, seed)  # (P, used, 8)
    P = lanes.shape[0]
    parts = []
    if full:
        parts.append(lanes[:, : full * LANE].reshape(P, full, LANE, 8).transpose(2, 3).reshape(P, full * BLOCK))
    if rem > LANE:
        parts.append(lanes[:, full * LANE:].transpose(1, 2).reshape(P, BLOCK)[:, :rem])
    elif rem:
        parts.append(lanes[:, full * LANE:, 0])  # values 0 .. rem - 1 of the last block: lane 0
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def counter_pair_factors(
    seed: int, pair_start: int, pair_stop: int, out_dim: int, in_dim: int, rank: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled factors of pairs ``[pair_start, pair_stop)``: ``A (P, out, r)``, ``B (P, in, r)``."""
    if not 0 <= pair_start < pair_stop:
        raise ValueError(f"Invalid pair range [{pair_start}, {pair_stop})")
    L, a_len = pair_stride(out_dim, in_dim, rank), _pad_block(out_dim * rank)
    first = torch.arange(pair_start, pair_stop, dtype=torch.int64, device=device) * (L // 8)
    A = _segments(seed, first, out_dim * rank).reshape(-1, out_dim, rank)
    B = _segments(seed, first + a_len // 8, in_dim * rank).reshape(-1, in_dim, rank)
    return A, B


if triton is not None:
    _ROUNDS = tl.constexpr(ROUNDS)
    _LANE = tl.constexpr(LANE)
    _BLOCK = tl.constexpr(BLOCK)

    @triton.jit
    def _approx(op: tl.constexpr, v):
        return tl.inline_asm_elementwise(op, "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _half_uniforms(w):
        """The two 16-bit halves of the uint32 ``w`` as ``(h + 1/2) / 2^16``: the half in a float's
        mantissa under exponent 0 gives ``1 + h / 2^16``, minus ``1 - 2^-17`` (exact, no int-to-float)."""
        lo = (((w << 7) & 0x7FFF80) | 0x3F800000).to(tl.float32, bitcast=True) - 0.99999237060546875
        hi = (((w >> 9) & 0x7FFF80) | 0x3F800000).to(tl.float32, bitcast=True) - 0.99999237060546875
        return lo, hi

    @triton.jit
    def _box_muller(w, FAST: tl.constexpr):
        """Two normals from the word ``w``; ``FAST`` uses the MUFU approximations (lg2, sqrt, sin,
        cos: within a few 1e-5) instead of libdevice's exact routines, which would dominate the kernels."""
        u, v = _half_uniforms(w)
        t = 6.283185307179586 * v - 3.141592653589793  # in [-pi, pi): where sin/cos.approx are accurate
        if FAST:
            r = _approx("sqrt.approx.ftz.f32 $0, $1;", -1.3862943611198906 * _approx("lg2.approx.ftz.f32 $0, $1;", u))
            return r * _approx("cos.approx.ftz.f32 $0, $1;", t), r * _approx("sin.approx.ftz.f32 $0, $1;", t)
        r = tl.sqrt(-2.0 * tl.log(u))
        return r * tl.cos(t), r * tl.sin(t)

    @triton.jit
    def _block_words(seed, q0, R: tl.constexpr):
        """Philox words of a block's 256 counters from ``q0``: ``(256,)`` for rank 1, else ``(256 / R, R)``
        with counter ``q0 + i R + r`` at ``[i, r]`` (lane values ``i R + r``: factor row ``i``, column ``r``)."""
        if R == 1:
            q = q0 + tl.arange(0, _LANE).to(tl.int64)
        else:
            q = q0 + (tl.arange(0, _LANE // R)[:, None] * R + tl.arange(0, R)[None, :]).to(tl.int64)
        return tl.randint4x(seed, q, _ROUNDS)

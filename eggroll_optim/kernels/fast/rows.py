"""Perturbed linear with one input row per member (RL policies, the paper's microbenchmark).

``y_i = x_i Wᵀ + b + s_i (x_i B_i) A_iᵀ``: cuBLAS computes ``x Wᵀ + b`` at inference speed, then a
Triton kernel adds the low-rank term in place in one pass over ``x``, the factors and the output.

The factors are either stored (``A_scaled``, ``B`` per member) or regenerated inside the kernel
from a counter-based key ("counter noise", below): then no noise ever touches memory.

Counter noise is a pure function of ``(seed, index)`` (SPEC §6): the normal at stream index
``e`` is lane ``e % 4`` of Box-Muller applied to Philox-4x32-10 of the counter ``e // 4`` under
the 64-bit key ``seed`` (Triton's ``randn4x``). Pair ``p`` owns the stream slice
``[p * L, (p + 1) * L)`` with ``L = pad4(out * r) + pad4(in * r)``: ``A_p (out, r)`` first, then
``B_p (in, r)``, both row-major. ``counter_pair_factors`` is the plain-torch twin (any device);
the kernel reproduces its Philox words exactly and its normals to ~1e-6 on CUDA, where Box-Muller
uses the hardware approximations of log2/sqrt/sin/cos (under the interpreter it uses the exact
ones). Ranks that are not a power of two, or above 16, take the twin (draw, then the stored kernel).
"""
from __future__ import annotations

import math

import torch

from ._triton import interpreted as _interpreted
from ._triton import pow2 as _pow2
from ._triton import tl, triton

__all__ = [
    "counter_normals",
    "counter_pair_factors",
    "fused_rows_available",
    "perturbed_linear_counter",
    "rows_lowrank_delta",
]

_M32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)


def _pad4(n: int) -> int:
    return (n + 3) // 4 * 4


def pair_stride(out_dim: int, in_dim: int, rank: int) -> int:
    """Stream values owned by one pair: ``pad4(out * r) + pad4(in * r)``."""
    return _pad4(out_dim * rank) + _pad4(in_dim * rank)


def _philox4x32(counter: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Philox-4x32-10 of ``(counter_lo, counter_hi, 0, 0)`` under key ``seed``; int64 lanes of 32 bits.

    A 32x32-bit product can wrap an int64: its bit pattern is still the unsigned product's, so the
    high word is ``(p >> 32) & 0xFFFFFFFF`` either way.
    """
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        p0, p2 = c0 * _PHILOX_ROUND[0], c2 * _PHILOX_ROUND[1]
        c0, c1, c2, c3 = ((p2 >> 32) & _M32) ^ c1 ^ k0, p2 & _M32, ((p0 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    return [c0, c1, c2, c3]


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: the word as int32, folded to >= 0, times ~2^-31 (float32)."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def counter_normals(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stream values ``[start, start + count)`` of the counter noise under ``seed``: float32 ``(count,)``."""
    if count <= 0:
        raise ValueError(f"counter_normals: count must be positive, got {count}")
    first, last = start // 4, (start + count - 1) // 4
    q = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    w = _philox4x32(q, int(seed) & ((1 << 64) - 1))
    u = [_uniform(x) for x in w]
    normals = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        r = torch.sqrt(-2.0 * torch.log(torch.clamp(a, min=1.0e-7)))
        theta = b * torch.tensor(6.283185307179586, dtype=torch.float32)
        normals += [r * torch.cos(theta), r * torch.sin(theta)]
    flat = torch.stack(normals, dim=1).flatten()
    return flat[start - 4 * first: start - 4 * first + count]


def counter_pair_factors(
    seed: int, pair_start: int, pair_stop: int, out_dim: int, in_dim: int, rank: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled factors of pairs ``[pair_start, pair_stop)``: ``A (P, out, r)``, ``B (P, in, r)``."""
    if not 0 <= pair_start < pair_stop:
        raise ValueError(f"Invalid pair range [{pair_start}, {pair_stop})")
    L, a_len = pair_stride(out_dim, in_dim, rank), _pad4(out_dim * rank)
    P = pair_stop - pair_start
    stream = counter_normals(seed, pair_start * L, P * L, device).view(P, L)
    A = stream[:, : out_dim * rank].reshape(P, out_dim, rank)
    B = stream[:, a_len: a_len + in_dim * rank].reshape(P, in_dim, rank)
    return A, B


if triton is not None:

    @triton.jit
    def _approx(op: tl.constexpr, v):
        return tl.inline_asm_elementwise(op, "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _box_muller(u1, u2, FAST: tl.constexpr):
        """Triton's ``pair_uniform_to_normal``; ``FAST`` uses the MUFU approximations (lg2, sqrt, sin,
        cos: ~1e-6 relative) instead of libdevice's exact routines, which dominate the kernel."""
        u1 = tl.maximum(1.0e-7, u1)
        if FAST:
            r = _approx("sqrt.approx.f32 $0, $1;", -1.3862943611198906 * _approx("lg2.approx.f32 $0, $1;", u1))
            th = 6.283185307179586 * u2 - 3.141592653589793  # in [-pi, pi): where sin/cos.approx are accurate
            return -r * _approx("cos.approx.f32 $0, $1;", th), -r * _approx("sin.approx.f32 $0, $1;", th)
        th = 6.283185307179586 * u2
        r = tl.sqrt(-2.0 * tl.log(u1))
        return r * tl.cos(th), r * tl.sin(th)

    @triton.jit
    def _stream_tile(seed, start, NQ: tl.constexpr, FAST: tl.constexpr):
        """``4 * NQ`` consecutive stream values from the 4-aligned index ``start`` (int64)."""
        q = start // 4 + tl.arange(0, NQ).to(tl.int64)
        u1, u2, u3, u4 = tl.rand4x(seed, q)
        n1, n2 = _box_muller(u1, u2, FAST)
        n3, n4 = _box_muller(u3, u4, FAST)
        return tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), (4 * NQ,))  # n1 n2 n3 n4 per quad

    @triton.jit
    def _rows_counter_kernel(
        x_ptr, bias_ptr, out_ptr, seed, scale, D, O, stride_x, stride_out, pair_len, b_off,
        R: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
        FAST: tl.constexpr,
    ):
        """One program per antithetic pair: members ``2p`` (+A_p) and ``2p + 1`` (-A_p)."""
        p = tl.program_id(0).to(tl.int64)  # 64-bit offsets: N * D can pass 2^31
        m0, m1 = 2 * p, 2 * p + 1
        base = p * pair_len
        ks, os_ = tl.arange(0, BK), tl.arange(0, BO)
        s0 = tl.zeros((R,), dtype=tl.float32)
        s1 = tl.zeros((R,), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            k_ok = kk < D
            b = tl.reshape(_stream_tile(seed, base + b_off + k0 * R, BK * R // 4, FAST), (BK, R))
            b = tl.where(k_ok[:, None], b, 0.0)
            x0 = tl.load(x_ptr + m0 * stride_x + kk, mask=k_ok, other=0.0).to(tl.float32)
            x1 = tl.load(x_ptr + m1 * stride_x + kk, mask=k_ok, other=0.0).to(tl.float32)
            s0 += tl.sum(x0[:, None] * b, axis=0)
            s1 += tl.sum(x1[:, None] * b, axis=0)
        s0 = s0 * scale
        s1 = s1 * -scale
        for o0 in range(0, O, BO):
            oo = o0 + os_
            o_ok = oo < O
            a = tl.reshape(_stream_tile(seed, base + o0 * R, BO * R // 4, FAST), (BO, R))
            d0 = tl.sum(a * s0[None, :], axis=1)
            d1 = tl.sum(a * s1[None, :], axis=1)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + oo, mask=o_ok, other=0.0).to(tl.float32)
                d0 += bias
                d1 += bias
            p0 = out_ptr + m0 * stride_out + oo
            p1 = out_ptr + m1 * stride_out + oo
            if ACCUM:
                d0 += tl.load(p0, mask=o_ok, other=0.0).to(tl.float32)
                d1 += tl.load(p1, mask=o_ok, other=0.0).to(tl.float32)
            tl.store(p0, d0.to(out_ptr.dtype.element_ty), mask=o_ok)
            tl.store(p1, d1.to(out_ptr.dtype.element_ty), mask=o_ok)

    @triton.jit
    def _rows_stored_kernel(
        x_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, D, O, R, stride_x, stride_a, stride_b, stride_bk, stride_out,
        HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr,
    ):
        """One program per member: ``out_n = (x_n B_n) A_nᵀ (+ b) (+ out_n)`` with stored factors."""
        n = tl.program_id(0).to(tl.int64)  # 64-bit offsets: N * D * R can pass 2^31
        ks, os_, rs = tl.arange(0, BK), tl.arange(0, BO), tl.arange(0, BR)
        r_ok = rs < R
        s = tl.zeros((BR,), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            k_ok = kk < D
            b = tl.load(b_ptr + n * stride_b + kk[:, None] * stride_bk + rs[None, :],
                        mask=k_ok[:, None] & r_ok[None, :],
                        other=0.0).to(tl.float32)
            x = tl.load(x_ptr + n * stride_x + kk, mask=k_ok, other=0.0).to(tl.float32)
            s += tl.sum(x[:, None] * b, axis=0)
        for o0 in range(0, O, BO):
            oo = o0 + os_
            o_ok = oo < O
            a = tl.load(a_ptr + n * stride_a + oo[:, None] * R + rs[None, :], mask=o_ok[:, None] & r_ok[None, :],
                        other=0.0).to(tl.float32)
            d = tl.sum(a * s[None, :], axis=1)
            if HAS_BIAS:
                d += tl.load(bias_ptr + oo, mask=o_ok, other=0.0).to(tl.float32)
            ptr = out_ptr + n * stride_out + oo
            if ACCUM:
                d += tl.load(ptr, mask=o_ok, other=0.0).to(tl.float32)
            tl.store(ptr, d.to(out_ptr.dtype.element_ty), mask=o_ok)


def fused_rows_available(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Triton present, ``x`` on CUDA (or under Triton's interpreter) in float32/bfloat16/float16
    (the kernels accumulate in float32: float64 keeps the exact torch path), and no autograd
    through ``x`` or ``others`` (the kernels write in place, which autograd would not see)."""
    if triton is None or not (x.is_cuda or _interpreted()) or x.dtype not in _KERNEL_DTYPES:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)))


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tile(rank_block: int) -> int:
    return max(16, 2048 // rank_block)  # ~2K values a tile


def rows_lowrank_delta(
    x: torch.Tensor, A_scaled: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x_n B_n) A_scaled_nᵀ (+ bias)`` for rows ``x (N, in)``, ``A_scaled (N, out, r)``, ``B (N, in, r)``.

    With ``out`` given, the term is added to it in place (and ``out`` returned). Triton on CUDA,
    plain torch elsewhere; ``(N, out)`` in ``x``'s dtype.
    """
    N, D = x.shape
    O, R = A_scaled.shape[1], A_scaled.shape[2]
    if A_scaled.shape[0] != N or tuple(B.shape) != (N, D, R):
        raise ValueError(f"rows_lowrank_delta: x {tuple(x.shape)} needs A_scaled (N={N}, out, r) and B ({N}, {D}, r), "
                         f"got {tuple(A_scaled.shape)} and {tuple(B.shape)}")
    if out is not None and tuple(out.shape) != (N, O):
        raise ValueError(f"rows_lowrank_delta: out must have shape ({N}, {O}), got {tuple(out.shape)}")
    strided_out = out is not None and out.stride(1) != 1
    if strided_out or not fused_rows_available(x, A_scaled, B, bias, out):
        delta = torch.einsum("nr,nor->no", torch.einsum("nd,ndr->nr", x, B.to(x.dtype)), A_scaled.to(x.dtype))
        delta = delta if bias is None else delta + bias
        return delta if out is None else out.add_(delta)
    x, A_scaled = x.contiguous(), A_scaled.contiguous()
    B = B if B.stride(2) == 1 else B.contiguous()  # any member / input strides (antithetic's layout)
    bias = bias.contiguous() if bias is not None else None
    accum = out is not None
    out = torch.empty(N, O, device=x.device, dtype=x.dtype) if out is None else out
    BR = _pow2(R, 1)
    _rows_stored_kernel[(N,)](
        x, A_scaled, B, bias if bias is not None else x, out, D, O, R,
        x.stride(0), A_scaled.stride(0), B.stride(0), B.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, ACCUM=accum, BK=_tile(BR), BO=_tile(BR), BR=BR, num_warps=4,
    )
    return out


def perturbed_linear_counter(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seed: int, sigma: float, rank: int,
    *, accumulate: bool = True,
) -> torch.Tensor:
    """``x_i (W + E_i)ᵀ + b`` for rows ``x (N, in)`` with antithetic counter noise regenerated in-kernel.

    Member ``2p`` uses ``+sigma/sqrt(r) A_p B_pᵀ`` and ``2p + 1`` its negative, with ``(A_p, B_p)``
    from ``counter_pair_factors(seed, ...)``. ``accumulate=True`` (default): ``x Wᵀ`` first, the kernel
    adds the term in place; ``False``: the kernel writes the term and ``addmm`` accumulates ``x Wᵀ``
    onto it (cuBLAS reading C costs more than the kernel's read-modify-write: 0.197 vs 0.172 ms
    for the 1024 x 8192 x 8192 bf16 GEMM on an H200, ``benchmarks/sweep_kernels.py``).
    Returns ``(N, out)`` in ``x``'s dtype.
    """
    N, D = x.shape
    O = weight.shape[0]
    if N % 2:
        raise ValueError(f"perturbed_linear_counter: N must be even (antithetic pairs), got {N}")
    if weight.shape[1] != D:
        raise ValueError(f"perturbed_linear_counter: x has {D} features, weight expects {weight.shape[1]}")
    if rank < 1 or N == 0:
        raise ValueError(f"perturbed_linear_counter: needs rank >= 1 and N >= 2, got rank={rank}, N={N}")
    scale = sigma / math.sqrt(rank)
    if not fused_rows_available(x, weight, bias) or rank & (rank - 1) or rank > 16:  # the twin
        from ...noise import antithetic_pairs  # here: noise imports this package

        A_scaled, B = antithetic_pairs(*counter_pair_factors(seed, 0, N // 2, O, D, rank, x.device), sigma, rank)
        delta = rows_lowrank_delta(x, A_scaled.to(x.dtype), B.to(x.dtype), bias)
        return torch.addmm(delta, x, weight.t())
    x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.mm(x, weight.t()) if accumulate else torch.empty(N, O, device=x.device, dtype=x.dtype)
    launch_counter_rows(x, bias, out, seed, scale, rank, accumulate)
    return out if accumulate else torch.addmm(out, x, weight.t())


def launch_counter_rows(x, bias, out, seed, scale, rank, accumulate, tile=None, num_warps=4):
    """Launch the counter kernel on ``x (N, in)`` into ``out (N, out)``; ``tile`` (noise values a step,
    default ~2K) and ``num_warps`` are what ``benchmarks/sweep_kernels.py`` varies."""
    N, D = x.shape
    O = out.shape[1]
    BK = BO = tile // rank if tile else _tile(rank)
    _rows_counter_kernel[(N // 2,)](
        x, bias if bias is not None else x, out, int(seed), scale, D, O, x.stride(0), out.stride(0),
        pair_stride(O, D, rank), _pad4(O * rank),
        R=rank, HAS_BIAS=bias is not None, ACCUM=accumulate, BK=BK, BO=BO, FAST=not _interpreted(),
        num_warps=num_warps,
    )

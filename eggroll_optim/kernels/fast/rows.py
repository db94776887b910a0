"""Perturbed linear with one input row per member (RL policies, the paper's microbenchmark).

``y_i = x_i Wᵀ + b + (x_i B_i) A_scaled_iᵀ`` with stored factors: cuBLAS computes ``x Wᵀ + b`` at
inference speed, then a Triton kernel adds the low-rank term in place in one pass over ``x``, the
factors and the output. Factors regenerated inside the kernels instead: ``kernels.fast.counter_linear``.
"""
from __future__ import annotations

import torch

from ._triton import interpreted as _interpreted
from ._triton import pow2 as _pow2
from ._triton import tl, triton

__all__ = ["fused_rows_available", "rows_lowrank_delta"]

if triton is not None:

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

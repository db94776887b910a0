"""A 2-D convolution's low-rank term for per-member inputs, fused (Triton).

For member ``i`` with input ``x_i (Bt, C, H, W)`` and factors ``A_i (C_out, r)``, ``B_i (C k_h k_w, r)``
(the kernel ``(C_out, C, k_h, k_w)`` as the matrix ``(C_out, C k_h k_w)``, SPEC §3), one kernel writes
``out_i = base_i + conv(x_i, A_i B_iᵀ)``: per output pixel the ``r`` features
``z = Σ_{c, taps} x_i[c, tap] B_i[(c, tap), :]`` stay in registers and are mixed by ``A_i`` at once.

Under vmap the same term is a convolution of ``n`` groups (one per member, ``r`` filters each), which
cuDNN runs as one small kernel launch per member plus layout conversions, and then a batched GEMM
for the mix (``benchmarks/RESULTS.md``, section 5): here it is one launch that reads each input
once and writes the output once. ``kernels.conv.lowrank_conv_delta`` is the plain-torch twin.
"""
from __future__ import annotations

import torch

from ..checks import needs_autograd
from ._triton import interpreted as _interpreted
from ._triton import pow2 as _pow2
from ._triton import tl, triton

__all__ = ["lowrank_conv2d_members", "lowrank_conv2d_fits"]


def lowrank_conv2d_fits(x: torch.Tensor, weight: torch.Tensor, groups: int, padding, rank: int, *others) -> bool:
    """The kernel's case: Triton, a CUDA (or interpreted) float32/float64 per-member input
    ``(n, Bt, C, H, W)``, a 2-D kernel without groups, numeric padding, a rank of at most 16, and no
    autograd through ``x``, ``weight`` or ``others`` (the kernel's output is outside the graph)."""
    return (
        triton is not None
        and (x.is_cuda or _interpreted())
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 5
        and weight.dim() == 4
        and groups == 1
        and not isinstance(padding, str)
        and rank <= 16
        and not needs_autograd(x, weight, *others)
    )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def lowrank_conv2d_members(x, base, A, B, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """``base + conv(x_i, A_i B_iᵀ)`` for every member: ``x (n, Bt, C, H, W)``, ``base (n, Bt, C_out, Ho, Wo)``
    (any strides), ``A (n, C_out, r)``, ``B (n, C k_h k_w, r)``; returns a new contiguous tensor like ``base``."""
    n, Bt, C, H, W = x.shape
    _, _, C_out, Ho, Wo = base.shape
    R = A.shape[-1]
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    A, B = A.to(x.dtype).contiguous(), B.to(x.dtype).contiguous()
    out = torch.empty((n, Bt, C_out, Ho, Wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    P = Ho * Wo
    BLOCK_P, RP = (64 if P < 1024 else 128), _pow2(R, 1)
    BO = min(_pow2(C_out, 1), max(1, 8192 // (BLOCK_P * RP)))  # the mix's (BLOCK_P, BO, RP) product: <= 64 a thread
    blocks = triton.cdiv(P, BLOCK_P)
    _lowrank_conv2d_kernel[(n * Bt * blocks,)](  # one flat grid axis (2^31 programs; the others stop at 65535)
        x, base, A, B, out, Bt, C, H, W, Ho, Wo, C_out, blocks,
        *x.stride(), *base.stride(),
        R=R, RP=RP, KH=KH, KW=KW, SH=SH, SW=SW, PH=PH, PW=PW, DH=DH, DW=DW,
        BLOCK_P=BLOCK_P, BO=BO, num_warps=4,
    )
    return out


if triton is not None:

    @triton.jit
    def _lowrank_conv2d_kernel(
        x_ptr, base_ptr, a_ptr, b_ptr, out_ptr, Bt, C, H, W, Ho, Wo, C_out, blocks,
        sxn, sxb, sxc, sxh, sxw, sbn, sbb, sbc, sbh, sbw,
        R: tl.constexpr, RP: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
        SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        BLOCK_P: tl.constexpr, BO: tl.constexpr,
    ):
        """One program: ``BLOCK_P`` output pixels of one image of one member, every output channel."""
        pid = tl.program_id(0)
        nb = pid // blocks
        n = nb // Bt
        b = nb % Bt
        p = (pid % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < Ho * Wo
        oh = p // Wo
        ow = p % Wo
        rr = tl.arange(0, RP)
        r_ok = rr < R
        x_img = x_ptr + n.to(tl.int64) * sxn + b.to(tl.int64) * sxb
        f_mem = b_ptr + n.to(tl.int64) * (C * KH * KW * R)
        acc = tl.zeros((BLOCK_P, RP), dtype=x_ptr.dtype.element_ty)
        for c in range(C):
            for kh in tl.static_range(KH):
                ih = oh * SH - PH + kh * DH
                h_ok = p_ok & (ih >= 0) & (ih < H)
                for kw in tl.static_range(KW):
                    iw = ow * SW - PW + kw * DW
                    ok = h_ok & (iw >= 0) & (iw < W)
                    xv = tl.load(x_img + c * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0)
                    f = tl.load(f_mem + ((c * KH + kh) * KW + kw) * R + rr, mask=r_ok, other=0.0)
                    acc += xv[:, None] * f[None, :]
        a_mem = a_ptr + n.to(tl.int64) * (C_out * R)
        base_pix = base_ptr + n.to(tl.int64) * sbn + b.to(tl.int64) * sbb + oh * sbh + ow * sbw
        out_pix = out_ptr + nb.to(tl.int64) * C_out * Ho * Wo + p
        for o0 in range(0, C_out, BO):
            o = o0 + tl.arange(0, BO)
            o_ok = o < C_out
            a = tl.load(a_mem + o[:, None] * R + rr[None, :], mask=o_ok[:, None] & r_ok[None, :], other=0.0)
            delta = tl.sum(acc[:, None, :] * a[None, :, :], axis=2)  # (BLOCK_P, BO)
            ok = p_ok[:, None] & o_ok[None, :]
            base = tl.load(base_pix[:, None] + o[None, :] * sbc, mask=ok, other=0.0)
            tl.store(out_pix[:, None] + o[None, :] * (Ho * Wo), base + delta, mask=ok)

"""2-D convolutions of a population chunk in one Triton launch each, on per-member or shared inputs.

For member ``i`` the kernel ``(C_out, C, k_h, k_w)`` is the matrix ``(C_out, C k_h k_w)`` perturbed by
``A_i (C_out, r)``, ``B_i (C k_h k_w, r)`` (SPEC §3). Two kernels:

- ``conv2d_members`` (the main path): each member's own kernel ``W + A_i B_iᵀ``, built once a chunk
  (``member_kernels``, one ``baddbmm``: ``C_out C k_h k_w`` numbers a member), in one implicit GEMM over
  the chunk, TF32 where torch's conv flag allows it. On a per-member input it costs the base conv's
  products alone (the base conv is per member there anyway); an epilogue can apply ReLU and a 2×2 max-pool,
  so a ``Conv2d → ReLU → MaxPool2d(2)`` window (``layers.sequential``) writes a quarter of the conv's output.
- ``lowrank_conv2d_members`` (where a chunk's kernels would pass ``_DENSE_MAX_BYTES``): ``base_i +
  conv(x_i, A_i B_iᵀ)`` with the base conv given; per output pixel the ``r`` features
  ``z = Σ_{c, taps} x_i[c, tap] B_i[(c, tap), :]`` stay in registers and are mixed by ``A_i`` at once.
  ``kernels.conv.lowrank_conv_delta`` is its plain-torch twin.

Under vmap the low-rank term is a convolution of ``n`` groups (one per member), which cuDNN runs as one
launch per member plus layout conversions (``benchmarks/RESULTS.md``, sections 5 and 7).
"""
from __future__ import annotations

import torch

from ..checks import needs_autograd
from ._triton import autotune as _autotune
from ._triton import interpreted as _interpreted
from ._triton import pinned_choice as _pinned_choice
from ._triton import pow2 as _pow2
from ._triton import tl, triton

__all__ = ["conv2d_members", "conv2d_members_fits", "conv2d_members_size", "conv_tf32", "lowrank_conv2d_fits",
           "lowrank_conv2d_members", "member_kernels"]


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


_DENSE_MAX_BYTES = 1 << 28  # a chunk's per-member kernels beyond this: the low-rank paths instead


def conv_tf32() -> bool:
    """torch's TF32 setting for float32 convolutions (``torch.backends.cudnn.conv.fp32_precision``, or the
    legacy ``torch.backends.cudnn.allow_tf32``): the dense kernel's products follow it like cuDNN's."""
    precision = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the legacy getter refuses mixed new-API flags: IEEE is the safe reading
        return False


def conv2d_members_fits(x: torch.Tensor, per_member: bool, weight: torch.Tensor, groups: int, padding,
                        A: torch.Tensor, *others) -> bool:
    """The dense kernel's case: Triton, float32 on CUDA (float32/float64 interpreted), the weights' dtype,
    one image batch per member (``(n, Bt, C, H, W)``) or a shared ``(Bt, C, H, W)``, a 2-D kernel without
    groups, numeric padding, the chunk's per-member kernels within ``_DENSE_MAX_BYTES``, no autocast (its
    output dtypes are the modules' to choose), no autograd."""
    n = A.shape[0]
    return (
        triton is not None
        and ((x.is_cuda and x.dtype == torch.float32) or (_interpreted() and x.dtype in (torch.float32, torch.float64)))
        and x.dtype == weight.dtype
        and x.dim() == (5 if per_member else 4)
        and weight.dim() == 4
        and groups == 1
        and not isinstance(padding, str)
        and n * weight.numel() * x.element_size() <= _DENSE_MAX_BYTES
        and not torch.is_autocast_enabled(x.device.type)
        and not needs_autograd(x, weight, A, *others)
    )


def conv2d_members_size(H: int, W: int, weight: torch.Tensor, stride, padding, dilation, pool: bool) -> tuple[int, int]:
    """The output's ``(H', W')`` for an ``H × W`` input (pooled: halved, rounded down); either is below 1
    for an input too small, which torch's conv or pool rejects."""
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = weight.shape[2:], _pair(stride), _pair(padding), _pair(dilation)
    Ho, Wo = (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1, (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1
    return (Ho // 2, Wo // 2) if pool else (Ho, Wo)


def member_kernels(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Every member's kernel ``W + A_i B_iᵀ`` as ``(n, k_h k_w C, C_out)``: rows in (tap, channel) order, the
    layout ``_conv2d_members_kernel`` reads (``A (n, C_out, r)``, ``B (n, C k_h k_w, r)``), written by one
    ``baddbmm`` (no full-size intermediate)."""
    C_out, C, KH, KW = weight.shape
    n, _, r = B.shape
    w_rows = weight.permute(2, 3, 1, 0).reshape(1, KH * KW * C, C_out)  # (tap, channel) rows
    b_rows = B.to(weight.dtype).view(n, C, KH, KW, r).permute(0, 2, 3, 1, 4).reshape(n, KH * KW * C, r)
    return torch.baddbmm(w_rows, b_rows, A.to(weight.dtype).transpose(1, 2))


def conv2d_members(x, per_member: bool, weight, A, B, bias, stride, padding, dilation, relu=False,
                   pool=False) -> torch.Tensor:
    """``conv(x_i, W + A_i B_iᵀ) + b_i`` for every member, then ``relu`` and a 2×2 max-pool (stride 2) if
    asked: ``x (n, Bt, C, H, W)`` (``per_member``) or a shared ``(Bt, C, H, W)``; ``A (n, C_out, r)``,
    ``B (n, C k_h k_w, r)``; ``bias`` ``None``, shared ``(C_out,)`` or per member ``(n, C_out)``. Returns
    ``(n, Bt, C_out, H', W')``. One implicit GEMM per member in one launch: the member's kernel is dense
    (it is ``C_out C k_h k_w`` numbers, built once a chunk), so a per-member input costs the base conv's
    products alone, and the epilogue writes only the pooled map (a quarter of the conv's output). NaN
    passes through the ReLU and the pool as through torch's."""
    n = A.shape[0]
    xs = x if per_member else x.unsqueeze(0)
    _, Bt, C, H, W = xs.shape
    C_out, _, KH, KW = weight.shape
    (SH, SW), (PH, PW), (DH, DW) = _pair(stride), _pair(padding), _pair(dilation)
    Hq, Wq = conv2d_members_size(H, W, weight, stride, padding, dilation, pool)
    if Hq < 1 or Wq < 1:
        raise ValueError(f"conv2d_members: an input of {H}×{W} is too small for this conv{' and pool' * pool}")
    out = torch.empty((n, Bt, C_out, Hq, Wq), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    kernels = member_kernels(weight, A, B)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    BO = min(_pow2(C_out), 64)
    units = Bt * Hq * Wq  # output values per channel per member (pooled pixels when pool)

    def grid(meta):
        return (n * triton.cdiv(units, meta["BQ"]) * triton.cdiv(C_out, BO),)

    # a pinned choice (tests, benchmarks/sweep_kernels.py); interpreted: one small tile; on the GPU a short
    # list, timed once a shape (cached on disk)
    tile = _pinned_choice("conv") or (dict(BQ=16, BK=16) if _interpreted() else None)
    launch = _conv2d_members_tuned if tile is None else _conv2d_members_kernel
    launch[grid](
        xs, kernels, bias if bias is not None else kernels, out,
        Bt, C, H, W, Hq * Wq, Wq, C_out, units,
        0 if not per_member else xs.stride(0), *xs.stride()[1:], 0 if bias is None or bias.dim() == 1 else C_out,
        KH=KH, KW=KW, SH=SH, SW=SW, PH=PH, PW=PW, DH=DH, DW=DW, HAS_BIAS=bias is not None, RELU=relu,
        POOL=pool, PREC="tf32" if x.dtype == torch.float32 and conv_tf32() else "ieee", BO=BO, **(tile or {}),
    )
    return out


if triton is not None:

    @triton.jit
    def _max_nan(a, b):
        """The larger of ``a`` and ``b``, NaN if either is (``max_pool2d``'s rule; ``tl.max`` would drop it)."""
        return tl.where((a > b) | (a != a), a, b)

    @triton.jit
    def _conv2d_members_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, Bt, C, H, W, Q, Wq, C_out, units,
        sxn, sxb, sxc, sxh, sxw, sbias,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
        PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
        POOL: tl.constexpr, PREC: tl.constexpr, BO: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    ):
        """One program: ``BQ`` output values per channel (pooled pixels, each its 2×2 window as 4 rows, when
        ``POOL``) of one member, ``BO`` output channels. Rows run over the member's images and pixels; the
        reduction over (tap, channel) in blocks of ``BK``, the input gathered (zero padding by masks)."""
        WIN: tl.constexpr = 4 if POOL else 1
        BM: tl.constexpr = BQ * WIN
        pid = tl.program_id(0)
        o_blocks = tl.cdiv(C_out, BO)
        tiles = tl.cdiv(units, BQ)
        n = pid // (tiles * o_blocks)
        t = (pid // o_blocks) % tiles
        o = (pid % o_blocks) * BO + tl.arange(0, BO)
        o_ok = o < C_out
        m = tl.arange(0, BM)
        u = t * BQ + m // WIN  # (image, output pixel) unit of row m
        u_ok = u < units
        b = u // Q
        q = u % Q
        if POOL:
            oh = 2 * (q // Wq) + (m % WIN) // 2
            ow = 2 * (q % Wq) + (m % WIN) % 2
        else:
            oh = q // Wq
            ow = q % Wq
        ih0 = oh * SH - PH
        iw0 = ow * SW - PW
        rows = x_ptr + n.to(tl.int64) * sxn + b.to(tl.int64) * sxb + ih0 * sxh + iw0 * sxw  # (BM,)
        K = KH * KW * C
        w_mem = w_ptr + n.to(tl.int64) * K * C_out
        acc = tl.zeros((BM, BO), dtype=tl.float32 if PREC == "tf32" else x_ptr.dtype.element_ty)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            tap = k // C
            c = k % C
            dh = (tap // KW) * DH
            dw = (tap % KW) * DW
            ih = ih0[:, None] + dh[None, :]
            iw = iw0[:, None] + dw[None, :]
            ok = u_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(rows[:, None] + (c * sxc + dh * sxh + dw * sxw)[None, :], mask=ok, other=0.0)
            wv = tl.load(w_mem + k[:, None] * C_out + o[None, :], mask=k_ok[:, None] & o_ok[None, :], other=0.0)
            acc = tl.dot(xv, wv, acc=acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n * sbias + o, mask=o_ok, other=0.0)[None, :]
        if RELU:
            acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu
        if POOL:
            acc = tl.reduce(tl.reshape(acc, (BQ, WIN, BO)), 1, _max_nan)
        uq = t * BQ + tl.arange(0, BQ)
        bq = uq // Q
        dest = out_ptr + ((n.to(tl.int64) * Bt + bq) * C_out) * Q + uq % Q  # (BQ,)
        tl.store(dest[:, None] + (o * Q)[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(uq < units)[:, None] & o_ok[None, :])

    _conv2d_members_tuned = _autotune(
        [triton.Config({"BQ": bq, "BK": bk}, num_warps=w, num_stages=s)
         for bq, bk, w, s in ((32, 16, 4, 3), (64, 16, 4, 3), (32, 32, 4, 2), (16, 32, 4, 3))],
        key=["Bt", "C", "H", "W", "C_out", "KH", "KW", "POOL", "PREC"],
    )(_conv2d_members_kernel)

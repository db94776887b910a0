"""A population through ``Linear -> activation -> Linear``, fused.

Every member ``i`` computes
``h_i = act(x W1ᵀ + b1 + (x B1_i) A1_iᵀ)`` and ``y_i = h_i W2ᵀ + b2 + (h_i B2_i) A2_iᵀ``.
The Triton kernels keep ``h_i`` on chip: one program takes ``BM`` rows of one member, so the
``(N, M, hidden)`` activations never reach device memory. ``x B1`` for every member is one GEMM
beforehand and ``x W1ᵀ + b1`` is computed once. For a shared input under TF32 the register-resident
kernels of ``kernels.fast.resident`` run; given ``noise.Pairs`` factors they work per antithetic pair.
``kernels.mlp.perturbed_mlp_reference`` is the plain-torch twin and the test oracle.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...noise import PairedNoise, Pairs
from ..checks import needs_autograd
from ..cpu_mlp import perturbed_mlp_cpu, perturbed_mlp_cpu_members
from ..mlp import ACTIVATIONS, mlp_layer, perturbed_mlp_reference
from ._triton import activate as _activate
from ._triton import autotune as _autotune
from ._triton import interpreted as _interpreted
from ._triton import pinned_choice as _pinned_choice
from ._triton import pow2 as _pow2
from ._triton import tanh_f16x2 as _tanh_f16x2
from ._triton import tl, triton
from .resident import launch_resident, resident_fits

__all__ = [
    "fused_mlp_available", "mlp_block_activation", "mlp_fast_path", "perturbed_mlp", "perturbed_mlp_reference",
]

_ACT_CODE = {"identity": 0, "tanh": 1, "relu": 2}
_BLOCK_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu"}


def mlp_block_activation(module: nn.Module) -> str | None:
    """``"tanh"``/``"relu"`` when ``module`` is exactly ``nn.Sequential(Linear, Tanh|ReLU, Linear)``."""
    if not isinstance(module, nn.Sequential) or len(module) != 3:
        return None
    first, act, second = module
    if type(first) is nn.Linear and type(second) is nn.Linear:
        return _BLOCK_ACTIVATIONS.get(type(act))
    return None


if triton is not None:

    @triton.jit
    def _mlp_kernel(
        base_ptr, xb_ptr, a1_ptr, bn1_ptr, w2_ptr, b2_ptr, bb2_ptr, a2_ptr, bn2_ptr, out_ptr,
        M, H, O, R,
        stride_base_n, stride_xb_n, stride_xb_m, stride_a1_n, stride_a2_n, stride_bb2_n, stride_bb2_h,
        stride_out_n,
        ACT: tl.constexpr, HAS_BN1: tl.constexpr, HAS_BN2: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BH: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)  # 64-bit offsets: N * M * H can pass 2^31
        rows = tl.program_id(1) * BM + tl.arange(0, BM)
        hid = tl.arange(0, BH)
        outs = tl.arange(0, BO)
        rk = tl.arange(0, BR)
        row_ok, hid_ok, out_ok, r_ok = rows < M, hid < H, outs < O, rk < R
        # layer 1: h = act(base + (x B1_n) A1_nᵀ)          (BM, BH)
        h = tl.load(base_ptr + n * stride_base_n + rows[:, None] * H + hid[None, :],
                    mask=row_ok[:, None] & hid_ok[None, :], other=0.0)
        if HAS_BN1:
            h += tl.load(bn1_ptr + n * H + hid, mask=hid_ok, other=0.0)[None, :]
        xb = tl.load(xb_ptr + n * stride_xb_n + rows.to(tl.int64)[:, None] * stride_xb_m + rk[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # (BM, BR)
        a1t = tl.load(a1_ptr + n * stride_a1_n + hid[None, :] * R + rk[:, None],
                      mask=r_ok[:, None] & hid_ok[None, :], other=0.0)  # (BR, BH)
        h += tl.dot(xb, a1t, input_precision=PREC)
        h = tl.where(hid_ok[None, :], _activate(h, ACT, False), 0.0)
        # layer 2: y = h W2ᵀ + b2 + (h B2_n) A2_nᵀ           (BM, BO)
        w2t = tl.load(w2_ptr + outs[None, :] * H + hid[:, None], mask=hid_ok[:, None] & out_ok[None, :], other=0.0)
        y = tl.dot(h, w2t, input_precision=PREC)
        b2n = tl.load(bb2_ptr + n * stride_bb2_n + hid.to(tl.int64)[:, None] * stride_bb2_h + rk[None, :],
                      mask=hid_ok[:, None] & r_ok[None, :], other=0.0)  # (BH, BR)
        hb = tl.dot(h, b2n, input_precision=PREC)
        a2t = tl.load(a2_ptr + n * stride_a2_n + outs[None, :] * R + rk[:, None],
                      mask=r_ok[:, None] & out_ok[None, :], other=0.0)  # (BR, BO)
        y += tl.dot(hb, a2t, input_precision=PREC)
        y += tl.load(b2_ptr + outs, mask=out_ok, other=0.0)[None, :]
        if HAS_BN2:
            y += tl.load(bn2_ptr + n * O + outs, mask=out_ok, other=0.0)[None, :]
        tl.store(out_ptr + n * stride_out_n + rows[:, None] * O + outs[None, :], y,
                 mask=row_ok[:, None] & out_ok[None, :])


    @triton.jit
    def _mlp_shared_kernel(
        base_ptr, xb_ptr, a1_ptr, bn1_ptr, w2_ptr, b2_ptr, bb2_ptr, a2_ptr, bn2_ptr, out_ptr,
        N, M, H, O, R,
        stride_xb_n, stride_xb_m, stride_a1_n, stride_a2_n, stride_bb2_n, stride_bb2_h, stride_out_n,
        ACT: tl.constexpr, HAS_BN1: tl.constexpr, HAS_BN2: tl.constexpr, PREC: tl.constexpr,
        FAST_TANH: tl.constexpr, BM: tl.constexpr, HC: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
        MEMBERS: tl.constexpr, H16: tl.constexpr, EVEN_M: tl.constexpr, EVEN_H: tl.constexpr,
    ):
        """Shared input: a program takes ``BM`` rows and runs ``MEMBERS`` members through them, the hidden
        units ``HC`` at a time; the shared ``x W1ᵀ + b1`` rows are re-read per chunk (from L1/L2: they
        are ``M x H`` values for the whole population), so little stays live and many programs fit.

        ``w2_ptr`` is ``W2ᵀ`` padded with zero columns to ``(H, BC)``. ``EVEN_M``/``EVEN_H``: the tiles
        divide ``M``/``H``, so those masks fold away.
        Layer 2 is one GEMM against ``[W2ᵀ | B2_n]`` (``BC >= O + R`` columns): ``z = h [W2ᵀ | B2_n]``
        holds ``h W2ᵀ`` in columns ``< O`` and ``h B2_n`` in ``O..O+R-1``; then
        ``y = z + z S_n`` with ``S_n`` placing ``A2_nᵀ`` in rows ``O..O+R-1``, columns ``< O``.
        A non-finite ``h W2ᵀ`` entry spreads NaN over its row's outputs (``z S_n``): a member's fitness
        turns NaN either way.
        ``H16`` (tanh under TF32 only): the activation is ``tanh.approx.f16x2`` on float16 inputs and
        layer 2 multiplies float16 operands (accumulating in float32): the 10-bit mantissa of TF32, half
        the MUFU work. Below 6.1e-5 in magnitude float16 is subnormal (fewer bits; under 6e-8, zero),
        where TF32 keeps float32's exponent: such entries of ``W2`` or ``B2_n`` contribute at most
        ~1e-4 of an output of order one, below TF32's rounding of the sum. A pre-activation beyond
        ±65504 becomes ±inf, whose tanh is still ±1; a weight of ``W2`` beyond ±65504 would overflow
        (the member's outputs turn non-finite, not silently wrong).
        """
        # one flat grid axis (up to 2^31 - 1 programs), row tiles varying fastest: the programs that run
        # together share member groups (their factors) and cover every row tile of x W1ᵀ + b1
        row_tiles = tl.cdiv(M, BM)
        rows = (tl.program_id(0) % row_tiles) * BM + tl.arange(0, BM)
        rows64 = rows.to(tl.int64)  # row and hidden strides of x B1 and B2 are N * R: 64-bit products
        cols, rk = tl.arange(0, BC), tl.arange(0, BR)
        row_ok, r_ok = (rows < M) | EVEN_M, rk < R
        out_col, noise_col = cols < O, (cols >= O) & (cols < O + R)
        b2 = tl.load(b2_ptr + cols, mask=out_col, other=0.0)
        n_lo = (tl.program_id(0) // row_tiles) * MEMBERS
        for n32 in range(n_lo, tl.minimum(n_lo + MEMBERS, N)):
            n = tl.cast(n32, tl.int64)  # 64-bit offsets: N * M * O can pass 2^31
            xb = tl.load(xb_ptr + n * stride_xb_n + rows64[:, None] * stride_xb_m + rk[None, :],
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # (BM, BR)
            z = tl.zeros((BM, BC), dtype=tl.float32)
            for h0 in range(0, H, HC):
                # masked hidden units (>= H) get h = act(0) = 0 and zero rows of [W2ᵀ | B2_n]
                hid = h0 + tl.arange(0, HC)
                hid_ok = (hid < H) | EVEN_H
                h = tl.load(base_ptr + rows[:, None] * H + hid[None, :], mask=row_ok[:, None] & hid_ok[None, :],
                            other=0.0)
                a1t = tl.load(a1_ptr + n * stride_a1_n + hid[None, :] * R + rk[:, None],
                              mask=r_ok[:, None] & hid_ok[None, :], other=0.0)  # (BR, HC)
                h = tl.dot(xb, a1t, acc=h, input_precision=PREC)
                if HAS_BN1:
                    h += tl.load(bn1_ptr + n * H + hid, mask=hid_ok, other=0.0)[None, :]
                w = tl.load(w2_ptr + hid[:, None] * BC + cols[None, :], mask=hid_ok[:, None], other=0.0)
                w += tl.load(bb2_ptr + n * stride_bb2_n + hid.to(tl.int64)[:, None] * stride_bb2_h + (cols[None, :] - O),
                             mask=hid_ok[:, None] & noise_col[None, :], other=0.0)  # (HC, BC): [W2ᵀ | B2_n]
                if H16:
                    z = tl.dot(_tanh_f16x2(h.to(tl.float16)), w.to(tl.float16), acc=z)
                else:
                    z = tl.dot(_activate(h, ACT, FAST_TANH), w, acc=z, input_precision=PREC)
            s2 = tl.load(a2_ptr + n * stride_a2_n + cols[None, :] * R + (cols[:, None] - O),
                         mask=noise_col[:, None] & out_col[None, :], other=0.0)  # (BC, BC)
            y = tl.dot(z, s2, acc=z, input_precision=PREC) + b2[None, :]
            if HAS_BN2:
                y += tl.load(bn2_ptr + n * O + cols, mask=out_col, other=0.0)[None, :]
            tl.store(out_ptr + n * stride_out_n + rows[:, None] * O + cols[None, :], y,
                     mask=row_ok[:, None] & out_col[None, :])

    @triton.jit
    def _mlp_rows_kernel(
        x_ptr, base_ptr, bb1_ptr, a1_ptr, bn1_ptr, w2_ptr, b2_ptr, bb2_ptr, a2_ptr, bn2_ptr, out_ptr,
        N, D, H, O, R, stride_b1_n, stride_b1_d, stride_b2_n, stride_b2_h,
        ACT: tl.constexpr, HAS_BN1: tl.constexpr, HAS_BN2: tl.constexpr,
        BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr,
    ):
        """One input row per member: a program takes ``BN`` members; small tiles, no tensor cores."""
        mem = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        din, hid, outs, rk = tl.arange(0, BD), tl.arange(0, BH), tl.arange(0, BO), tl.arange(0, BR)
        m_ok, d_ok, h_ok, o_ok, r_ok = mem < N, din < D, hid < H, outs < O, rk < R
        m3, r3 = m_ok[:, None, None], r_ok[None, None, :]
        mh = m_ok[:, None] & h_ok[None, :]
        # layer 1: h = act(x W1ᵀ + b1 [precomputed] + Σ_r (x B1_n)_r A1_n[:, r] + bn1_n)
        h = tl.load(base_ptr + mem[:, None] * H + hid[None, :], mask=mh, other=0.0)
        x = tl.load(x_ptr + mem[:, None] * D + din[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        b1 = tl.load(bb1_ptr + mem[:, None, None] * stride_b1_n + din[None, :, None] * stride_b1_d + rk[None, None, :],
                     mask=m3 & d_ok[None, :, None] & r3, other=0.0)  # (BN, BD, BR)
        xb = tl.sum(x[:, :, None] * b1, axis=1)  # (BN, BR)
        a1 = tl.load(a1_ptr + mem[:, None, None] * (H * R) + hid[None, :, None] * R + rk[None, None, :],
                     mask=m3 & h_ok[None, :, None] & r3, other=0.0)  # (BN, BH, BR)
        h += tl.sum(xb[:, None, :] * a1, axis=2)
        if HAS_BN1:
            h += tl.load(bn1_ptr + mem[:, None] * H + hid[None, :], mask=mh, other=0.0)
        h = tl.where(mh, _activate(h, ACT, False), 0.0)
        # layer 2: y = h W2ᵀ + b2 + Σ_r (h B2_n)_r A2_n[:, r] + bn2_n
        w2 = tl.load(w2_ptr + outs[:, None] * H + hid[None, :], mask=o_ok[:, None] & h_ok[None, :], other=0.0)
        y = tl.sum(h[:, None, :] * w2[None, :, :], axis=2)  # (BN, BO)
        y += tl.load(b2_ptr + outs, mask=o_ok, other=0.0)[None, :]
        b2 = tl.load(bb2_ptr + mem[:, None, None] * stride_b2_n + hid[None, :, None] * stride_b2_h + rk[None, None, :],
                     mask=m3 & h_ok[None, :, None] & r3, other=0.0)  # (BN, BH, BR)
        hb = tl.sum(h[:, :, None] * b2, axis=1)  # (BN, BR)
        a2 = tl.load(a2_ptr + mem[:, None, None] * (O * R) + outs[None, :, None] * R + rk[None, None, :],
                     mask=m3 & o_ok[None, :, None] & r3, other=0.0)  # (BN, BO, BR)
        y += tl.sum(hb[:, None, :] * a2, axis=2)
        if HAS_BN2:
            y += tl.load(bn2_ptr + mem[:, None] * O + outs[None, :], mask=m_ok[:, None] & o_ok[None, :], other=0.0)
        tl.store(out_ptr + mem[:, None] * O + outs[None, :], y, mask=m_ok[:, None] & o_ok[None, :])


    def _fit_chunks(configs, named_args, **kwargs):
        """Hidden chunks no wider than the layer (and at least 16, ``tl.dot``'s smallest K); duplicates dropped."""
        cap = _pow2(named_args["H"])
        seen, kept = set(), []
        for c in configs:
            kw = dict(c.kwargs, HC=min(c.kwargs["HC"], cap))
            sig = (tuple(sorted(kw.items())), c.num_warps, c.num_stages, c.maxnreg)
            if sig not in seen:
                seen.add(sig)
                kept.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg))
        return kept

    # rows, members and hidden units per program, warps and a register cap, chosen per shape on the GPU:
    # the best few of benchmarks/sweep_kernels.py on the MNIST step (H200). The cap matters most: at
    # 112-128 registers four programs share an SM (the uncapped kernel takes 255 and runs two), which
    # hides the loads of one member behind another's math. BM=32 serves small batches.
    _mlp_shared_even = triton.heuristics({
        "EVEN_M": lambda a: a["M"] % a["BM"] == 0, "EVEN_H": lambda a: a["H"] % a["HC"] == 0,
    })(_mlp_shared_kernel)

    _mlp_shared_kernel_tuned = _autotune(
        [
            triton.Config({"BM": bm, "MEMBERS": mem, "HC": hc}, num_warps=w, num_stages=1, maxnreg=reg)
            for bm, mem, hc, w, reg in ((64, 8, 64, 4, 128), (64, 16, 64, 4, 112), (64, 32, 64, 4, 128),
                                        (64, 8, 32, 4, 80), (128, 16, 64, 8, 112), (32, 16, 32, 4, None))
        ],
        key=["N", "M", "H", "O", "R", "H16"],
        prune=_fit_chunks,
    )(_mlp_shared_even)

    # tile height and warps chosen per shape on the GPU (the interpreter runs one fixed config)
    _mlp_kernel_tuned = _autotune(
        [triton.Config({"BM": bm}, num_warps=w, num_stages=1) for bm, w in ((16, 4), (32, 4), (32, 8), (64, 8))],
        key=["M", "H", "O", "R"],
    )(_mlp_kernel)


def fused_mlp_available(x: torch.Tensor, hidden: int) -> bool:
    """Triton present, a CUDA (or interpreted) float32 input, and a hidden width that fits on chip."""
    return (
        triton is not None
        and (x.is_cuda or _interpreted())
        and x.dtype == torch.float32
        and hidden <= 1024
    )


def mlp_fast_path(x: torch.Tensor, hidden: int, shared: bool) -> bool:
    """``perturbed_mlp`` beats the per-layer path: the fused kernel applies, or a float32/float64 CPU
    input, shared ``(M, in)`` or per member ``(N, M, in)`` (``kernels.cpu_mlp``)."""
    return _cpu_shared(x, shared) or _cpu_members(x, shared) or fused_mlp_available(x, hidden)


def _cpu_input(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype in (torch.float32, torch.float64) and x.shape[-2] > 0


def _cpu_shared(x: torch.Tensor, shared: bool) -> bool:
    """A shared, non-empty float32/float64 CPU batch ``(M, in)``: ``kernels.cpu_mlp``'s first case."""
    return shared and x.dim() == 2 and _cpu_input(x)


def _cpu_members(x: torch.Tensor, shared: bool) -> bool:
    """Non-empty float32/float64 CPU rows per member ``(N, M, in)``: ``perturbed_mlp_cpu_members``."""
    return not shared and x.dim() == 3 and _cpu_input(x)


def _project(x, B, shared, B_pair=None):
    """``x_i B_i`` as an ``(N, M, R)`` view: one GEMM for a shared input, a bmm otherwise. ``B_pair``: the
    pairs' ``(D, N/2, R)`` (``Pairs.B_pair``), giving one ``x B`` per pair: ``(N/2, M, R)``."""
    N, D, R = B.shape
    if shared:
        mat = B.permute(1, 0, 2).reshape(D, N * R) if B_pair is None else B_pair.view(D, -1)
        return (x @ mat).view(x.shape[0], -1, R).transpose(0, 1)
    return torch.bmm(x, B)


def _check_bias_noise(bias_noise, layer1, layer2) -> None:
    """A ``PairedNoise`` must hold one row per pair of the layer's width (the pair kernel reads it unchecked)."""
    N = layer1[2][0].shape[0]
    for i, (noise, layer) in enumerate(zip(bias_noise, (layer1, layer2))):
        if isinstance(noise, PairedNoise) and tuple(noise.half.shape) != (N // 2, layer[0].shape[0]):
            raise ValueError(f"bias_noise[{i}]: expected a PairedNoise of one row per pair, half ({N // 2}, "
                             f"{layer[0].shape[0]}), got half {tuple(noise.half.shape)}")


def _member_noise(noise) -> torch.Tensor | None:
    """Bias noise per member ``(N, out)``, contiguous: a ``PairedNoise`` as its members."""
    if noise is None:
        return None
    return noise.members() if isinstance(noise, PairedNoise) else noise.contiguous()


def _fused(x, layer1, layer2, activation, shared, bias_noise):
    """The Triton kernels. Pinned choices (``kernels.fast._triton.pinned``, tests and sweeps): ``resident``
    (True/False instead of ``resident_fits``), ``config`` (launch options of the kernel that runs),
    ``h16`` (False: the streaming kernel's second layer in TF32)."""
    W1, b1, factors1 = mlp_layer(layer1)
    W2, b2, factors2 = mlp_layer(layer2)
    (A1, B1), (A2, B2) = factors1, factors2
    N, H, R = A1.shape
    M, O = x.shape[-2], W2.shape[0]
    base = F.linear(x, W1, b1).contiguous()  # (M, H) once when shared, else (N, M, H)
    b2 = torch.zeros(O, device=x.device, dtype=x.dtype) if b2 is None else b2.contiguous()
    paired1 = bias_noise[0] if isinstance(bias_noise[0], PairedNoise) else None
    bn2 = _member_noise(bias_noise[1])
    A1, A2 = A1.contiguous(), A2.contiguous()
    B2 = B2 if B2.stride(2) == 1 else B2.contiguous()  # any member / hidden strides (antithetic's layout)
    out = torch.empty(N, M, O, device=x.device, dtype=x.dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # as torch's own matmuls
    resident = _pinned_choice("resident")
    if resident is None:
        resident = shared and resident_fits(M, H, O, R, activation, tf32, bias_noise[0] is not None)
    if resident:  # base rows and W2ᵀ stay in registers; members stream through
        pairs1 = factors1 if isinstance(factors1, Pairs) else None  # one x B1 per pair: half the GEMM
        xb = _project(x, B1, True, None if pairs1 is None else pairs1.B_pair)
        # both layers in pairs, layer-1 bias noise none or in pairs: one layer-1 product and one B2 load a pair
        if pairs1 is not None and isinstance(factors2, Pairs) and (bias_noise[0] is None or paired1 is not None):
            half1 = None if paired1 is None else paired1.half.contiguous()
            return launch_resident(base, xb, A1, half1, W2, b2, B2, A2, bn2, out, True)
        return launch_resident(base, xb, A1, _member_noise(bias_noise[0]), W2, b2, B2, A2, bn2, out, False)
    bn1 = _member_noise(bias_noise[0])
    BH, BR = _pow2(H), _pow2(R)
    interpreted = _interpreted()
    flags = dict(ACT=_ACT_CODE[activation], HAS_BN1=bn1 is not None, HAS_BN2=bn2 is not None,
                 PREC="tf32" if tf32 else "ieee", BR=BR)
    xb = _project(x, B1, shared)  # (N, M, R) view
    strides = (xb.stride(0), xb.stride(1), A1.stride(0), A2.stride(0), B2.stride(0), B2.stride(1), out.stride(0))

    def pointers(w2):
        return (base, xb, A1, bn1 if bn1 is not None else A1, w2, b2, B2, A2, bn2 if bn2 is not None else A2, out)

    if shared and O + R <= 64:  # members stream through a program's rows; its outputs are one tile
        grid = lambda meta: (triton.cdiv(N, meta["MEMBERS"]) * triton.cdiv(M, meta["BM"]),)  # noqa: E731
        fixed = dict(BM=32, MEMBERS=4, num_warps=4, HC=min(32, BH)) if interpreted else _pinned_choice("config", {})
        fast_tanh = tf32 and activation == "tanh" and not interpreted
        h16 = fast_tanh and _pinned_choice("h16", True)
        BC = _pow2(O + R)
        w2t = F.pad(W2.t(), (0, BC - O))  # (H, BC): W2ᵀ, zero columns from O on
        (_mlp_shared_even if fixed else _mlp_shared_kernel_tuned)[grid](
            *pointers(w2t), N, M, H, O, R, *strides, FAST_TANH=fast_tanh, BC=BC, H16=h16,
            **flags, **fixed)
        return out
    grid = lambda meta: (N, triton.cdiv(M, meta["BM"]))  # noqa: E731
    fixed = dict(BM=32, num_warps=4) if interpreted else _pinned_choice("config", {})
    (_mlp_kernel if fixed else _mlp_kernel_tuned)[grid](  # one member's rows per program
        *pointers(W2.contiguous()), M, H, O, R, 0 if shared else base.stride(0), *strides, BH=BH, BO=_pow2(O),
        **flags, **fixed)
    return out


def _fused_rows(x, layer1, layer2, activation, bias_noise):
    """Per-member input with one row each: ``x (N, 1, D)``; members are the tile rows."""
    W1, b1, (A1, B1) = mlp_layer(layer1)
    W2, b2, (A2, B2) = mlp_layer(layer2)
    N, H, R = A1.shape
    D, O = x.shape[-1], W2.shape[0]
    x = x.reshape(N, D).contiguous()
    base = F.linear(x, W1, b1).contiguous()  # (N, H): one cuBLAS GEMM
    b2 = torch.zeros(O, device=x.device, dtype=x.dtype) if b2 is None else b2.contiguous()
    bn1, bn2 = (_member_noise(t) for t in bias_noise)
    A1, A2 = A1.contiguous(), A2.contiguous()
    B1, B2 = (B if B.stride(2) == 1 else B.contiguous() for B in (B1, B2))  # antithetic's (in, N, r) layout as is
    out = torch.empty(N, 1, O, device=x.device, dtype=x.dtype)
    BD, BH, BO, BR = _pow2(D, 1), _pow2(H, 1), _pow2(O, 1), _pow2(R, 1)
    BN = max(1, min(16, 2048 // (BH * BR)))  # keep each (BN, BH, BR) tile near 2K values
    _mlp_rows_kernel[(triton.cdiv(N, BN),)](
        x, base, B1, A1, bn1 if bn1 is not None else A1,
        W2.contiguous(), b2, B2, A2, bn2 if bn2 is not None else A2, out,
        N, D, H, O, R, B1.stride(0), B1.stride(1), B2.stride(0), B2.stride(1),
        ACT=_ACT_CODE[activation], HAS_BN1=bn1 is not None, HAS_BN2=bn2 is not None,
        BN=BN, BD=BD, BH=BH, BO=BO, BR=BR, num_warps=4,
    )
    return out


def perturbed_mlp(x, layer1, layer2, activation="tanh", shared=True, bias_noise=(None, None)) -> torch.Tensor:
    """``Linear -> activation -> Linear`` for every member: fused on CUDA, ``kernels.cpu_mlp`` on CPU
    (float32/float64, shared or per-member input).

    Args:
        x: shared input ``(M, in)`` (``shared=True``) or per member ``(N, M, in)``.
        layer1, layer2: ``(W, b, factors)`` with ``W (out, in)``, ``b (out,)`` or ``None`` and ``factors``
            a ``noise.Pairs`` or any ``(A_scaled (N, out, r), B (N, in, r))``; or flat ``(W, b, A_scaled, B)``.
            ``Pairs`` in both layers let the CUDA kernel run one layer-1 product per antithetic pair.
        activation: ``"tanh"``, ``"relu"`` or ``"identity"``.
        bias_noise: optional full-rank bias noise ``((N, hidden) or None, (N, out) or None)``; either may be a
            ``noise.PairedNoise`` (antithetic members): with ``Pairs`` in both layers, layer 1's lets the CUDA
            kernel keep one layer-1 product per pair.
    Returns:
        ``(N, M, out2)``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    layer1, layer2 = mlp_layer(layer1), mlp_layer(layer2)
    _check_bias_noise(bias_noise, layer1, layer2)
    fused = (x.dim() == (2 if shared else 3) and fused_mlp_available(x, layer1[0].shape[0])
             and not needs_autograd(x, *layer1[:2], *layer2[:2]))  # the kernels' outputs are outside autograd
    rows = fused and not shared and x.shape[1] == 1  # one row per member (RL): members become tile rows
    if fused and not rows:
        return _fused(x, layer1, layer2, activation, shared, bias_noise)
    bias_noise = tuple(_member_noise(t) for t in bias_noise)  # the other paths take noise per member
    if rows:
        hidden, rank = layer1[0].shape[0], layer1[2][0].shape[2]
        if x.shape[2] <= 64 and hidden <= 1024 and rank <= 16 and layer2[0].shape[0] <= 16:
            return _fused_rows(x, layer1, layer2, activation, bias_noise)
        return perturbed_mlp_reference(x, layer1, layer2, activation, shared, bias_noise)
    if _cpu_shared(x, shared):  # chunked through the CPU caches
        return perturbed_mlp_cpu(x, layer1, layer2, activation, shared, bias_noise)
    if _cpu_members(x, shared):  # per-member rows: per-population effective weights / factor layouts
        return perturbed_mlp_cpu_members(x, layer1, layer2, activation, bias_noise)
    return perturbed_mlp_reference(x, layer1, layer2, activation, shared, bias_noise)

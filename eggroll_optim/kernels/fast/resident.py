"""Register-resident MLP kernels: a shared input, tanh under TF32 (``kernels.fast.mlp._fused``'s main case).

A persistent program keeps its 64 rows of ``x W1ᵀ + b1`` (float16) and ``W2ᵀ`` in registers and streams
its share of the population through them, so per member only the factors are read.
``_mlp_resident_kernel`` takes one member at a time; ``_mlp_twin_kernel`` one antithetic pair (members
``2k``, ``2k + 1`` sharing ``B1_k``, ``B2_k`` and carrying ``±A1_k``, ``±bn1_k``), one layer-1 product for both.
Their plain-torch twin is ``kernels.mlp.perturbed_mlp_reference`` (the tests compare both against float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import activate as _activate
from ._triton import autotune as _autotune
from ._triton import interpreted as _interpreted
from ._triton import pinned_choice as _pinned_choice
from ._triton import pow2 as _pow2
from ._triton import tanh_f16x2 as _tanh_f16x2
from ._triton import tl, triton

__all__ = ["launch_resident", "resident_fits"]

if triton is not None:

    @triton.jit
    def _to_f16(v):
        """float32 -> float16, clamped to ±65504: a large ``x B1`` or base saturates (tanh is ±1 there
        anyway) instead of turning into inf, whose products and differences would give NaN."""
        return tl.minimum(tl.maximum(v, -65504.0), 65504.0).to(tl.float16)

    @triton.jit
    def _pad16(t, RP: tl.constexpr):
        """``(X, RP)`` -> ``(X, 16)`` with column ``k`` at ``k * 16 // RP`` and zeros between: ``tl.dot``'s
        smallest K, for both operands of a rank-``RP`` product alike (their padding columns meet zeros)."""
        if RP < 16:
            t = tl.reshape(tl.join(t, tl.zeros_like(t)), (t.shape[0], 2 * RP))
        if RP < 8:
            t = tl.reshape(tl.join(t, tl.zeros_like(t)), (t.shape[0], 4 * RP))
        if RP < 4:
            t = tl.reshape(tl.join(t, tl.zeros_like(t)), (t.shape[0], 8 * RP))
        if RP < 2:
            t = tl.reshape(tl.join(t, tl.zeros_like(t)), (t.shape[0], 16 * RP))
        return t

    @triton.jit
    def _program_tiles(M, N, O, b2_ptr, R: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr,
                       EVEN_M: tl.constexpr):
        """This program's row tile and its share ``[lo, hi)`` of ``N`` units (members or pairs), the
        output columns, ``b2``, and where ``_pad16`` put each rank in ``zb`` (``ka``, ``a2_ok``)."""
        row_tiles = tl.cdiv(M, BM)
        j = tl.program_id(0) // row_tiles
        P = tl.num_programs(0) // row_tiles
        lo = (j.to(tl.int64) * N // P).to(tl.int32)
        hi = ((j + 1).to(tl.int64) * N // P).to(tl.int32)
        rows = (tl.program_id(0) % row_tiles) * BM + tl.arange(0, BM)
        row_ok = (rows < M) | EVEN_M
        outs, k16 = tl.arange(0, BO), tl.arange(0, 16)
        out_ok = outs < O
        b2 = tl.load(b2_ptr + outs, mask=out_ok, other=0.0)
        ka = k16 // (16 // RP)  # zb's column k16 holds rank ka when k16 % (16 // RP) == 0 (_pad16)
        a2_ok = ((k16 % (16 // RP) == 0) & (ka < R))[:, None] & out_ok[None, :]
        return lo, hi, rows, row_ok, outs, out_ok, b2, ka, a2_ok

    @triton.jit
    def _resident_chunk(base_ptr, w2_ptr, rows, row_ok, h0, H, HC: tl.constexpr, BO: tl.constexpr,
                        EVEN_H: tl.constexpr):
        """Hidden units ``h0 .. h0 + HC`` (masked past ``H``): the base rows ``(BM, HC)`` and the padded
        ``W2ᵀ`` rows ``(HC, BO)``, float16."""
        hid = h0 + tl.arange(0, HC)
        hid_ok = (hid < H) | EVEN_H
        base = tl.load(base_ptr + rows[:, None] * H + hid[None, :], mask=row_ok[:, None] & hid_ok[None, :], other=0.0)
        w2 = tl.load(w2_ptr + hid[:, None] * BO + tl.arange(0, BO)[None, :], mask=hid_ok[:, None], other=0.0)
        return _to_f16(base), w2

    @triton.jit
    def _resident_chunks(base_ptr, w2_ptr, rows, row_ok, H, HC: tl.constexpr, NC: tl.constexpr, BO: tl.constexpr,
                         EVEN_H: tl.constexpr):
        """``_resident_chunk`` for each of the ``NC <= 4`` chunks: ``(base0, w20, ..., base3, w23)``; a chunk
        past ``NC`` repeats chunk 0 (never used, no load)."""
        base0, w20 = _resident_chunk(base_ptr, w2_ptr, rows, row_ok, 0, H, HC, BO, EVEN_H)
        base1, w21, base2, w22, base3, w23 = base0, w20, base0, w20, base0, w20
        if NC > 1:
            base1, w21 = _resident_chunk(base_ptr, w2_ptr, rows, row_ok, HC, H, HC, BO, EVEN_H)
        if NC > 2:
            base2, w22 = _resident_chunk(base_ptr, w2_ptr, rows, row_ok, 2 * HC, H, HC, BO, EVEN_H)
        if NC > 3:
            base3, w23 = _resident_chunk(base_ptr, w2_ptr, rows, row_ok, 3 * HC, H, HC, BO, EVEN_H)
        return base0, w20, base1, w21, base2, w22, base3, w23

    @triton.jit
    def _xb_operand(xb_ptr, u, rows, row_ok, stride_xb_m, R: tl.constexpr, RP: tl.constexpr,
                    HAS_BN1: tl.constexpr):
        """``x B1`` rows of unit ``u`` (a member, or a pair), float16 ``(BM, 16)``; column ``R`` is 1 when
        the bias noise rides in the padding (``_a1_operand``)."""
        rk = tl.arange(0, RP)
        xb = tl.load(xb_ptr + u + rows.to(tl.int64)[:, None] * stride_xb_m + rk[None, :],
                     mask=row_ok[:, None] & (rk < R)[None, :], other=0.0)  # (BM, RP)
        if HAS_BN1:
            xb = tl.where((rk == R)[None, :], 1.0, xb)
        return _to_f16(_pad16(xb, RP))

    @triton.jit
    def _a1_operand(a1_ptr, bn1_ptr, n, nb, h0, H, stride_a1_n, R: tl.constexpr, RP: tl.constexpr,
                    HAS_BN1: tl.constexpr, HC: tl.constexpr, EVEN_H: tl.constexpr):
        """``[A1_n | bn1_nb]ᵀ`` for one chunk, float16 ``(16, HC)``: the bias noise (row ``nb``) in column ``R``."""
        hid = h0 + tl.arange(0, HC)
        hid_ok = (hid < H) | EVEN_H
        rk = tl.arange(0, RP)
        a1 = tl.load(a1_ptr + n * stride_a1_n + hid[:, None] * R + rk[None, :], mask=hid_ok[:, None] & (rk < R)[None, :],
                     other=0.0)  # (HC, RP)
        if HAS_BN1:
            a1 += tl.load(bn1_ptr + nb * H + hid[:, None] + 0 * rk[None, :], mask=hid_ok[:, None] & (rk == R)[None, :],
                          other=0.0)
        # pad, then convert: the other order trips Triton 3.6's pipeliner on some shapes
        return tl.trans(_pad16(a1, RP).to(tl.float16))

    @triton.jit
    def _b2_operand(bb2_ptr, n, h0, H, stride_bb2_n, stride_bb2_h, R: tl.constexpr, RP: tl.constexpr,
                    HC: tl.constexpr, EVEN_H: tl.constexpr):
        """``B2_n`` rows of one chunk, float16 ``(HC, 16)``."""
        hid = h0 + tl.arange(0, HC)
        hid_ok = (hid < H) | EVEN_H
        rk = tl.arange(0, RP)
        b2 = tl.load(bb2_ptr + n * stride_bb2_n + hid.to(tl.int64)[:, None] * stride_bb2_h + rk[None, :],
                     mask=hid_ok[:, None] & (rk < R)[None, :], other=0.0)  # (HC, RP)
        return _pad16(b2, RP).to(tl.float16)

    @triton.jit
    def _tanh16(pre, FAST: tl.constexpr):
        if FAST:
            return _tanh_f16x2(pre)
        return _activate(pre.to(tl.float32), 1, False).to(tl.float16)  # the interpreter has no inline assembly

    @triton.jit
    def _resident_layer1(base_c, xb, n, h0, a1_ptr, bn1_ptr, H, stride_a1_n, R: tl.constexpr, RP: tl.constexpr,
                         HAS_BN1: tl.constexpr, HC: tl.constexpr, EVEN_H: tl.constexpr):
        """Pre-activations of one chunk for member ``n``, float16: ``base + [x B1_n | 1] [A1_n | bn1_n]ᵀ``."""
        a1 = _a1_operand(a1_ptr, bn1_ptr, n, n, h0, H, stride_a1_n, R, RP, HAS_BN1, HC, EVEN_H)
        return tl.dot(xb, a1, acc=base_c, out_dtype=tl.float16)

    @triton.jit
    def _resident_layer2(z, zb, pre, w2_c, n, h0, bb2_ptr, H, stride_bb2_n, stride_bb2_h, R: tl.constexpr,
                         RP: tl.constexpr, HC: tl.constexpr, EVEN_H: tl.constexpr, FAST: tl.constexpr):
        """``h = tanh(pre)`` (float16), then ``z += h W2ᵀ`` and ``zb += h B2_n`` (float32 accumulators)."""
        h = _tanh16(pre, FAST)
        b2 = _b2_operand(bb2_ptr, n, h0, H, stride_bb2_n, stride_bb2_h, R, RP, HC, EVEN_H)
        return tl.dot(h, w2_c, acc=z), tl.dot(h, b2, acc=zb)

    @triton.jit
    def _store_member(z, zb, n, b2, rows, row_ok, outs, out_ok, ka, a2_ok, a2_ptr, bn2_ptr, out_ptr, O, stride_a2_n,
                      stride_out_n, R: tl.constexpr, HAS_BN2: tl.constexpr):
        """``y = z + zb A2_nᵀ + b2 (+ bn2_n)`` stored as member ``n``'s outputs."""
        a2t = tl.load(a2_ptr + n * stride_a2_n + outs[None, :] * R + ka[:, None], mask=a2_ok, other=0.0)
        y = tl.dot(zb, a2t, acc=z, input_precision="tf32") + b2[None, :]
        if HAS_BN2:
            y += tl.load(bn2_ptr + n * O + outs, mask=out_ok, other=0.0)[None, :]
        tl.store(out_ptr + n * stride_out_n + rows[:, None] * O + outs[None, :], y, mask=row_ok[:, None] & out_ok[None, :])

    @triton.jit
    def _mlp_resident_kernel(
        base_ptr, xb_ptr, a1_ptr, bn1_ptr, w2_ptr, b2_ptr, bb2_ptr, a2_ptr, bn2_ptr, out_ptr,
        N, M, H, O, stride_xb_n, stride_xb_m, stride_a1_n, stride_a2_n, stride_bb2_n, stride_bb2_h, stride_out_n,
        R: tl.constexpr, RP: tl.constexpr, HAS_BN1: tl.constexpr, HAS_BN2: tl.constexpr, FAST: tl.constexpr,
        BM: tl.constexpr, HC: tl.constexpr, NC: tl.constexpr, BO: tl.constexpr, EVEN_M: tl.constexpr,
        EVEN_H: tl.constexpr, PER_SM: tl.constexpr, LOOKAHEAD: tl.constexpr, PAIR: tl.constexpr,
    ):
        """Shared input, tanh under TF32: a persistent program keeps ``BM`` rows of ``x W1ᵀ + b1`` (all
        ``NC * HC >= H`` hidden units, float16) and ``W2ᵀ`` in registers and streams its share of the
        members through them, so per member only the factors are read. ``grid = row tiles x P``;
        ``PER_SM`` only sizes the grid (programs per SM). ``PAIR`` = 2: ``x B1`` holds one row set per
        antithetic pair (members ``2k``, ``2k + 1`` share ``B1_k``), read for member ``n`` at ``n // 2``.

        Layer 1 is one float16 tensor-core product per chunk with the base as its float16
        accumulator: ``pre = base + [x B1_n | 1] [A1_n | bn1_n]ᵀ``, the rank padded to 16 by
        ``_pad16``; float16 keeps TF32's 10-bit mantissa (the low-rank term's entries are of order
        ``sigma |x B1|``; an ``A1`` entry below 6e-5 is subnormal, under 6e-8 zero, far below the
        rounding of ``pre``). ``tanh.approx.f16x2`` as in ``_mlp_shared_kernel``. Layer 2:
        ``y = h W2ᵀ + b2 + (h B2_n) A2_nᵀ (+ bn2_n)``, both products of ``h`` in float16 with float32
        accumulators, the last one TF32.
        """
        lo, hi, rows, row_ok, outs, out_ok, b2, ka, a2_ok = _program_tiles(M, N, O, b2_ptr, R, RP, BM, BO, EVEN_M)
        base0, w20, base1, w21, base2, w22, base3, w23 = _resident_chunks(base_ptr, w2_ptr, rows, row_ok, H, HC, NC,
                                                                          BO, EVEN_H)
        for n32 in range(lo, hi):
            n = tl.cast(n32, tl.int64)  # 64-bit offsets: N * M * O can pass 2^31
            xb = _xb_operand(xb_ptr, (n // PAIR) * stride_xb_n, rows, row_ok, stride_xb_m, R, RP, HAS_BN1)
            z = tl.zeros((BM, BO), dtype=tl.float32)
            zb = tl.zeros((BM, 16), dtype=tl.float32)
            # chunk c + 1's layer-1 product is issued before chunk c's tanh (LOOKAHEAD): the tensor cores
            # and the MUFU work of one warp overlap
            pre0 = _resident_layer1(base0, xb, n, 0, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC,
                                        EVEN_H)
            if NC > 1 and LOOKAHEAD:
                pre1 = _resident_layer1(base1, xb, n, HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC,
                                        EVEN_H)
            z, zb = _resident_layer2(z, zb, pre0, w20, n, 0, bb2_ptr, H, stride_bb2_n, stride_bb2_h, R, RP,
                                         HC, EVEN_H, FAST)
            if NC > 1 and not LOOKAHEAD:
                pre1 = _resident_layer1(base1, xb, n, HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC,
                                        EVEN_H)
            if NC > 2 and LOOKAHEAD:
                pre2 = _resident_layer1(base2, xb, n, 2 * HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC,
                                        EVEN_H)
            if NC > 1:
                z, zb = _resident_layer2(z, zb, pre1, w21, n, HC, bb2_ptr, H, stride_bb2_n, stride_bb2_h, R, RP,
                                         HC, EVEN_H, FAST)
            if NC > 2 and not LOOKAHEAD:
                pre2 = _resident_layer1(base2, xb, n, 2 * HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC,
                                        EVEN_H)
            if NC > 3:
                pre3 = _resident_layer1(base3, xb, n, 3 * HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC,
                                        EVEN_H)
            if NC > 2:
                z, zb = _resident_layer2(z, zb, pre2, w22, n, 2 * HC, bb2_ptr, H, stride_bb2_n, stride_bb2_h, R, RP,
                                         HC, EVEN_H, FAST)
            if NC > 3:
                z, zb = _resident_layer2(z, zb, pre3, w23, n, 3 * HC, bb2_ptr, H, stride_bb2_n, stride_bb2_h, R, RP,
                                         HC, EVEN_H, FAST)
            _store_member(z, zb, n, b2, rows, row_ok, outs, out_ok, ka, a2_ok, a2_ptr, bn2_ptr, out_ptr, O,
                          stride_a2_n, stride_out_n, R, HAS_BN2)

    @triton.jit
    def _twin_layer1(xb, n, k, h0, a1_ptr, bn1_ptr, H, stride_a1_n, R: tl.constexpr, RP: tl.constexpr,
                     HAS_BN1: tl.constexpr, HC: tl.constexpr, EVEN_H: tl.constexpr):
        """The + member's term ``x B1_k A1_nᵀ (+ bn1_k)`` of one chunk (``n = 2k``; float16): the bias noise
        added as one row after the product (not as a column of it, which would double the padded rank)."""
        a1 = _a1_operand(a1_ptr, bn1_ptr, n, k, h0, H, stride_a1_n, R, RP, False, HC, EVEN_H)
        low = tl.dot(xb, a1, out_dtype=tl.float16)
        if HAS_BN1:
            hid = h0 + tl.arange(0, HC)
            bn1 = tl.load(bn1_ptr + k * H + hid, mask=(hid < H) | EVEN_H, other=0.0)
            low += _to_f16(bn1)[None, :]
        return low

    @triton.jit
    def _twin_layer2(z0, zb0, z1, zb1, base_c, low, w2_c, n, h0, bb2_ptr, H, stride_bb2_n, stride_bb2_h,
                     R: tl.constexpr, RP: tl.constexpr, HC: tl.constexpr, EVEN_H: tl.constexpr, FAST: tl.constexpr):
        """Both members of a pair: ``h± = tanh(base ± low)``, then ``z± += h± W2ᵀ``, ``zb± += h± B2_n``."""
        hp = _tanh16(base_c + low, FAST)
        hm = _tanh16(base_c - low, FAST)
        b2 = _b2_operand(bb2_ptr, n, h0, H, stride_bb2_n, stride_bb2_h, R, RP, HC, EVEN_H)  # shared by the pair
        return (tl.dot(hp, w2_c, acc=z0), tl.dot(hp, b2, acc=zb0), tl.dot(hm, w2_c, acc=z1),
                tl.dot(hm, b2, acc=zb1))

    @triton.jit
    def _mlp_twin_kernel(
        base_ptr, xb_ptr, a1_ptr, bn1_ptr, w2_ptr, b2_ptr, bb2_ptr, a2_ptr, bn2_ptr, out_ptr,
        N, M, H, O, stride_xb_n, stride_xb_m, stride_a1_n, stride_a2_n, stride_bb2_n, stride_bb2_h, stride_out_n,
        R: tl.constexpr, RP: tl.constexpr, HAS_BN1: tl.constexpr, HAS_BN2: tl.constexpr, FAST: tl.constexpr,
        BM: tl.constexpr,
        HC: tl.constexpr, NC: tl.constexpr, BO: tl.constexpr, EVEN_M: tl.constexpr, EVEN_H: tl.constexpr,
        PER_SM: tl.constexpr, LOOKAHEAD: tl.constexpr,
    ):
        """``_mlp_resident_kernel`` for antithetic pairs: members ``2k`` and ``2k + 1`` share ``x B1_k`` and
        carry ``±A1_k`` (and ``±bn1_k``, one row per pair, added to the product), so
        one tensor-core product per chunk gives the term ``L`` of both, ``pre± = base ± L`` (float16
        adds), and the pair shares its ``B2_k`` loads. ``xb_ptr`` holds one ``x B1`` per pair; ``N``
        counts members."""
        lo, hi, rows, row_ok, outs, out_ok, b2, ka, a2_ok = _program_tiles(M, N // 2, O, b2_ptr, R, RP, BM, BO,
                                                                           EVEN_M)  # [lo, hi): pairs
        base0, w20, base1, w21, base2, w22, base3, w23 = _resident_chunks(base_ptr, w2_ptr, rows, row_ok, H, HC, NC,
                                                                          BO, EVEN_H)
        for k32 in range(lo, hi):
            k = tl.cast(k32, tl.int64)
            n = 2 * k  # the pair's + member; n + 1 is its - member
            xb = _xb_operand(xb_ptr, k * stride_xb_n, rows, row_ok, stride_xb_m, R, RP, False)
            z0 = tl.zeros((BM, BO), dtype=tl.float32)
            zb0 = tl.zeros((BM, 16), dtype=tl.float32)
            z1 = tl.zeros((BM, BO), dtype=tl.float32)
            zb1 = tl.zeros((BM, 16), dtype=tl.float32)
            low0 = _twin_layer1(xb, n, k, 0, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC, EVEN_H)
            if NC > 1 and LOOKAHEAD:
                low1 = _twin_layer1(xb, n, k, HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC, EVEN_H)
            z0, zb0, z1, zb1 = _twin_layer2(z0, zb0, z1, zb1, base0, low0, w20, n, 0, bb2_ptr, H,
                                                stride_bb2_n, stride_bb2_h, R, RP, HC, EVEN_H, FAST)
            if NC > 1 and not LOOKAHEAD:
                low1 = _twin_layer1(xb, n, k, HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC, EVEN_H)
            if NC > 2 and LOOKAHEAD:
                low2 = _twin_layer1(xb, n, k, 2 * HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC, EVEN_H)
            if NC > 1:
                z0, zb0, z1, zb1 = _twin_layer2(z0, zb0, z1, zb1, base1, low1, w21, n, HC, bb2_ptr, H,
                                                stride_bb2_n, stride_bb2_h, R, RP, HC, EVEN_H, FAST)
            if NC > 2 and not LOOKAHEAD:
                low2 = _twin_layer1(xb, n, k, 2 * HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC, EVEN_H)
            if NC > 3:
                low3 = _twin_layer1(xb, n, k, 3 * HC, a1_ptr, bn1_ptr, H, stride_a1_n, R, RP, HAS_BN1, HC, EVEN_H)
            if NC > 2:
                z0, zb0, z1, zb1 = _twin_layer2(z0, zb0, z1, zb1, base2, low2, w22, n, 2 * HC, bb2_ptr, H,
                                                stride_bb2_n, stride_bb2_h, R, RP, HC, EVEN_H, FAST)
            if NC > 3:
                z0, zb0, z1, zb1 = _twin_layer2(z0, zb0, z1, zb1, base3, low3, w23, n, 3 * HC, bb2_ptr, H,
                                                stride_bb2_n, stride_bb2_h, R, RP, HC, EVEN_H, FAST)
            _store_member(z0, zb0, n, b2, rows, row_ok, outs, out_ok, ka, a2_ok, a2_ptr, bn2_ptr, out_ptr, O,
                          stride_a2_n, stride_out_n, R, HAS_BN2)
            _store_member(z1, zb1, n + 1, b2, rows, row_ok, outs, out_ok, ka, a2_ok, a2_ptr, bn2_ptr, out_ptr, O,
                          stride_a2_n, stride_out_n, R, HAS_BN2)

    _even = triton.heuristics({  # whole row tiles and hidden chunks: no masks
        "EVEN_M": lambda a: a["M"] % a["BM"] == 0, "EVEN_H": lambda a: a["H"] % a["HC"] == 0,
    })
    _mlp_twin_even = _even(_mlp_twin_kernel)

    # the best four of a sweep on the MNIST step's shapes (benchmarks/RESULTS.md, run X): at 232 registers
    # nothing spills (two programs an SM); at 168 or 128 the spills cost about what the extra programs win
    _mlp_twin_tuned = _autotune(
        [
            triton.Config({"PER_SM": per_sm, "LOOKAHEAD": ahead}, num_warps=4, num_stages=stages, maxnreg=reg)
            for per_sm, stages, reg, ahead in ((2, 3, 232, True), (2, 3, 232, False), (3, 2, 168, False),
                                               (4, 3, 128, False))
        ],
        key=["N", "M", "H", "O", "R", "HAS_BN1", "HAS_BN2"],
    )(_mlp_twin_even)

    _mlp_resident_even = _even(_mlp_resident_kernel)

    # programs per SM, register cap, pipeline stages: the best three of a sweep on the MNIST step's shapes
    # (benchmarks/RESULTS.md, run U). Two or three stages load the next member's factors during this
    # one's math; 168 registers hold the resident rows (64 registers) and W2ᵀ with three programs per
    # SM; the lookahead overlaps one chunk's tensor-core product with the previous chunk's tanh
    _mlp_resident_tuned = _autotune(
        [
            triton.Config({"PER_SM": per_sm, "LOOKAHEAD": True}, num_warps=4, num_stages=stages, maxnreg=168)
            for per_sm, stages in ((3, 3), (3, 2), (6, 2))
        ],
        key=["N", "M", "H", "O", "R", "HAS_BN1", "HAS_BN2", "PAIR"],
    )(_mlp_resident_even)


_RESIDENT_BM = 64  # one warpgroup's tensor-core tile height


def resident_fits(M, H, O, R, activation, tf32, has_bn1) -> bool:
    """The register-resident kernel's case: tanh under TF32 (its float16 path), ``H <= 256`` (four chunks
    of at most 64 hidden units in registers), ``O <= 32``, the rank (plus a bias-noise column) ``<= 16``,
    and at least one full tile of rows."""
    return activation == "tanh" and tf32 and H <= 256 and O <= 32 and R + has_bn1 <= 16 and M >= _RESIDENT_BM


def launch_resident(base, xb, A1, bn1, W2, b2, B2, A2, bn2, out, twin=False):
    """Write ``out (N, M, O)`` for the shared ``base (M, H)`` and ``xb`` (``x B1``: ``(N, M, R)``, or
    ``(N/2, M, R)``, one per antithetic pair). ``twin``: the factors are antithetic pairs (``A1`` negated,
    ``B2`` repeated within a pair; ``xb`` one per pair) and ``bn1``, if any, is one row per pair
    ``(N/2, H)``: the + member's layer-1 bias noise (the - member's is its negative). A pinned
    ``config`` (``kernels.fast._triton.pinned``) replaces the autotuned launch options. Inputs beyond
    float16's range (``|x B1|`` or a base entry over 65504) saturate like the tanh they feed."""
    N, H, R = A1.shape
    M, O = base.shape[0], W2.shape[0]
    pair = N // xb.shape[0]  # 1, or 2: x B1 per antithetic pair
    BO = _pow2(O)
    HC = _pow2(triton.cdiv(H, 4))
    w2t = F.pad(W2.t(), (0, BO - O)).to(torch.float16).contiguous()  # (H, BO)
    row_tiles = triton.cdiv(M, _RESIDENT_BM)
    sms = torch.cuda.get_device_properties(base.device).multi_processor_count if base.is_cuda else 2

    def grid(meta):
        units = N // 2 if twin else N  # pairs or members
        return (row_tiles * max(1, min(units, sms * meta["PER_SM"] // row_tiles)),)

    interpreted = _interpreted()
    fixed = _pinned_choice("config") or ({"PER_SM": 2, "LOOKAHEAD": True, "num_warps": 4} if interpreted else {})
    sizes = (N, M, H, O, xb.stride(0), xb.stride(1), A1.stride(0), A2.stride(0), B2.stride(0), B2.stride(1),
             out.stride(0))
    flags = dict(HAS_BN2=bn2 is not None, FAST=not interpreted, BM=_RESIDENT_BM, HC=HC, NC=triton.cdiv(H, HC), BO=BO,
                 **fixed)
    bn2 = bn2 if bn2 is not None else A2  # a placeholder pointer when there is none
    if twin:  # antithetic pairs: one layer-1 product per pair
        (_mlp_twin_even if fixed else _mlp_twin_tuned)[grid](
            base, xb, A1, bn1 if bn1 is not None else A1, w2t, b2, B2, A2, bn2, out, *sizes, R=R,
            RP=_pow2(R, 1), HAS_BN1=bn1 is not None, **flags)
        return out
    (_mlp_resident_even if fixed else _mlp_resident_tuned)[grid](
        base, xb, A1, bn1 if bn1 is not None else A1, w2t, b2, B2, A2, bn2, out, *sizes, R=R,
        RP=_pow2(R + (bn1 is not None), 1), HAS_BN1=bn1 is not None, PAIR=pair, **flags)
    return out

"""Perturbed linear with one input row per member and counter noise regenerated inside the kernels.

An optional kernel with a noise of its own (``kernels.fast.counter``): ``EggrollOptimizer`` and the
seed's functional API never call it (``eggroll_optim.noise`` says why it is not the library's noise).

``y_i = x_i (W + E_i)ᵀ + b`` with antithetic ``E_2p = +sigma/sqrt(r) A_p B_pᵀ = -E_2p+1`` and ``(A_p, B_p)``
the counter noise of ``kernels.fast.counter``: cuBLAS computes ``x Wᵀ``, then one launch projects each
pair's rows of ``x`` on ``B_p`` and a second adds ``±(x B_p) A_pᵀ`` block by block, so no noise ever
touches memory. The paper's microbenchmark (Fig. 2a) runs this path.
"""
from __future__ import annotations

import functools
import math

import torch

from ...noise import antithetic_pairs
from ._triton import interpreted as _interpreted
from ._triton import tl, triton
from .counter import BLOCK, _pad_block, counter_pair_factors, pair_stride
from .rows import fused_rows_available, rows_lowrank_delta

__all__ = ["launch_counter_rows", "perturbed_linear_counter"]

if triton is not None:
    from .counter import _BLOCK, _LANE, _block_words, _box_muller

    @triton.jit
    def _lane_load(ptr, start, J: tl.constexpr, limit, R: tl.constexpr, BCAST: tl.constexpr, EVEN: tl.constexpr,
                   ENABLE: tl.constexpr = True):
        """Elements ``start + J * 256 / R + i`` of the row ``ptr`` (float32, 0 past ``limit`` unless ``EVEN``:
        the block is whole): ``(256 / R,)``, or with ``BCAST`` and ``R > 1`` ``(256 / R, R)`` broadcast over
        the rank columns; zeros unless ``ENABLE``."""
        NR: tl.constexpr = _LANE // R
        idx = start + J * NR + tl.arange(0, NR)
        if not (R == 1 or not BCAST):
            idx = idx[:, None] + tl.arange(0, R)[None, :] * 0
        if not ENABLE:
            v = tl.zeros(idx.shape, dtype=tl.float32)
        elif EVEN:
            v = tl.load(ptr + idx)
        else:
            v = tl.load(ptr + idx, mask=idx < limit, other=0.0)
        return v.to(tl.float32)

    @triton.jit
    def _project_word(w, xa0, xa1, xb0, xb1, s0, s1, FAST: tl.constexpr):
        """The two lanes of word ``w`` times ``x``: lane ``2k`` meets ``xa*``, lane ``2k + 1`` ``xb*``."""
        n_cos, n_sin = _box_muller(w, FAST)
        return s0 + xa0 * n_cos + xb0 * n_sin, s1 + xa1 * n_cos + xb1 * n_sin

    @triton.jit
    def _project_block(x_ptr, row0, row1, seed, q0, k0, D, s0, s1, R: tl.constexpr, EVEN: tl.constexpr,
                       FAST: tl.constexpr):
        """Add to the partial sums ``s0, s1`` (shaped as the block's words) rows ``row0, row1`` of ``x`` times
        the block of ``B`` whose first counter is ``q0``: lane ``j`` holds factor rows ``k0 + j * 256 / R + i``.
        Every load is issued before the draw, so their latency hides under Philox."""
        x00 = _lane_load(x_ptr + row0, k0, 0, D, R, True, EVEN)
        x10 = _lane_load(x_ptr + row1, k0, 0, D, R, True, EVEN)
        x01 = _lane_load(x_ptr + row0, k0, 1, D, R, True, EVEN)
        x11 = _lane_load(x_ptr + row1, k0, 1, D, R, True, EVEN)
        x02 = _lane_load(x_ptr + row0, k0, 2, D, R, True, EVEN)
        x12 = _lane_load(x_ptr + row1, k0, 2, D, R, True, EVEN)
        x03 = _lane_load(x_ptr + row0, k0, 3, D, R, True, EVEN)
        x13 = _lane_load(x_ptr + row1, k0, 3, D, R, True, EVEN)
        x04 = _lane_load(x_ptr + row0, k0, 4, D, R, True, EVEN)
        x14 = _lane_load(x_ptr + row1, k0, 4, D, R, True, EVEN)
        x05 = _lane_load(x_ptr + row0, k0, 5, D, R, True, EVEN)
        x15 = _lane_load(x_ptr + row1, k0, 5, D, R, True, EVEN)
        x06 = _lane_load(x_ptr + row0, k0, 6, D, R, True, EVEN)
        x16 = _lane_load(x_ptr + row1, k0, 6, D, R, True, EVEN)
        x07 = _lane_load(x_ptr + row0, k0, 7, D, R, True, EVEN)
        x17 = _lane_load(x_ptr + row1, k0, 7, D, R, True, EVEN)
        w0, w1, w2, w3 = _block_words(seed, q0, R)
        s0, s1 = _project_word(w0, x00, x10, x01, x11, s0, s1, FAST)
        s0, s1 = _project_word(w1, x02, x12, x03, x13, s0, s1, FAST)
        s0, s1 = _project_word(w2, x04, x14, x05, x15, s0, s1, FAST)
        s0, s1 = _project_word(w3, x06, x16, x07, x17, s0, s1, FAST)
        return s0, s1

    @triton.jit
    def _store_lane(out_ptr, row0, row1, bias_ptr, o0, J: tl.constexpr, O, n, s0, s1, c0, c1,
                    R: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr):
        """Lane ``J`` of an output block: ``out[row] = c + n s (+ bias)`` for both members."""
        oo = o0 + J * (_LANE // R) + tl.arange(0, _LANE // R)
        ok = oo < O
        if R == 1:
            d0 = c0 + n * s0
            d1 = c1 + n * s1
        else:
            d0 = c0 + tl.sum(n * s0[None, :], axis=1)
            d1 = c1 + tl.sum(n * s1[None, :], axis=1)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + oo, mask=ok, other=0.0).to(tl.float32)
            d0 += bias
            d1 += bias
        if EVEN:
            tl.store(out_ptr + row0 + oo, d0.to(out_ptr.dtype.element_ty))
            tl.store(out_ptr + row1 + oo, d1.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + row0 + oo, d0.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(out_ptr + row1 + oo, d1.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _griddep(op: tl.constexpr):
        """``griddepcontrol.<op>`` (programmatic dependent launch, sm_90+)."""
        tl.inline_asm_elementwise("griddepcontrol." + op + "; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _pair_s(s_ptr, p, n_parts, R: tl.constexpr):
        """``s`` of pair ``p`` summed over its ``n_parts`` partial projections: ``(R,)`` twice. Volatile
        loads: they must not be hoisted above the wait that precedes them."""
        rr = tl.arange(0, R)
        s0 = tl.zeros((R,), dtype=tl.float32)
        s1 = tl.zeros((R,), dtype=tl.float32)
        for g in range(n_parts):
            s0 += tl.load(s_ptr + (p * n_parts + g) * 2 * R + rr, volatile=True)
            s1 += tl.load(s_ptr + (p * n_parts + g) * 2 * R + R + rr, volatile=True)
        return s0, s1

    @triton.jit
    def _wait_through(n0, n1, n2, n3, n4, n5, n6, n7):
        """``griddepcontrol.wait`` with the block's eight lanes of normals passed through it: the draw
        cannot sink below the wait (a plain wait let LLVM move the Philox rounds after it)."""
        return tl.inline_asm_elementwise(
            "mov.b32 $0, $8; mov.b32 $1, $9; mov.b32 $2, $10; mov.b32 $3, $11; mov.b32 $4, $12; "
            "mov.b32 $5, $13; mov.b32 $6, $14; mov.b32 $7, $15; griddepcontrol.wait;",
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r", [n0, n1, n2, n3, n4, n5, n6, n7],
            dtype=(tl.float32,) * 8, is_pure=False, pack=1)

    @triton.jit
    def _add_block(out_ptr, row0, row1, bias_ptr, seed, q0, o0, O, s0, s1, s_ptr, p, n_parts,
                   R: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, EVEN: tl.constexpr,
                   LOAD_S: tl.constexpr, PDL: tl.constexpr, FAST: tl.constexpr):
        """``out[row0] += A_blk s0``, ``out[row1] += A_blk s1`` (+ bias) for the block of ``A`` whose
        first counter is ``q0``: lane ``j`` holds output rows ``o0 + j * 256 / R + i``. With ``ACCUM``,
        the block's current values are all loaded before the draw. ``LOAD_S``: ``s0, s1`` come from the
        projection launch's partial sums, read last: with ``PDL`` this launch may start while that one
        runs (never while the GEMM that wrote ``out`` runs: the projection is launched without PDL),
        loads its block and draws its noise, and waits only then."""
        c00 = _lane_load(out_ptr + row0, o0, 0, O, R, False, EVEN, ACCUM)
        c10 = _lane_load(out_ptr + row1, o0, 0, O, R, False, EVEN, ACCUM)
        c01 = _lane_load(out_ptr + row0, o0, 1, O, R, False, EVEN, ACCUM)
        c11 = _lane_load(out_ptr + row1, o0, 1, O, R, False, EVEN, ACCUM)
        c02 = _lane_load(out_ptr + row0, o0, 2, O, R, False, EVEN, ACCUM)
        c12 = _lane_load(out_ptr + row1, o0, 2, O, R, False, EVEN, ACCUM)
        c03 = _lane_load(out_ptr + row0, o0, 3, O, R, False, EVEN, ACCUM)
        c13 = _lane_load(out_ptr + row1, o0, 3, O, R, False, EVEN, ACCUM)
        c04 = _lane_load(out_ptr + row0, o0, 4, O, R, False, EVEN, ACCUM)
        c14 = _lane_load(out_ptr + row1, o0, 4, O, R, False, EVEN, ACCUM)
        c05 = _lane_load(out_ptr + row0, o0, 5, O, R, False, EVEN, ACCUM)
        c15 = _lane_load(out_ptr + row1, o0, 5, O, R, False, EVEN, ACCUM)
        c06 = _lane_load(out_ptr + row0, o0, 6, O, R, False, EVEN, ACCUM)
        c16 = _lane_load(out_ptr + row1, o0, 6, O, R, False, EVEN, ACCUM)
        c07 = _lane_load(out_ptr + row0, o0, 7, O, R, False, EVEN, ACCUM)
        c17 = _lane_load(out_ptr + row1, o0, 7, O, R, False, EVEN, ACCUM)
        w0, w1, w2, w3 = _block_words(seed, q0, R)
        n0, n1 = _box_muller(w0, FAST)
        n2, n3 = _box_muller(w1, FAST)
        n4, n5 = _box_muller(w2, FAST)
        n6, n7 = _box_muller(w3, FAST)
        if LOAD_S:
            if PDL:
                n0, n1, n2, n3, n4, n5, n6, n7 = _wait_through(n0, n1, n2, n3, n4, n5, n6, n7)
            s0, s1 = _pair_s(s_ptr, p, n_parts, R)
        _store_lane(out_ptr, row0, row1, bias_ptr, o0, 0, O, n0, s0, s1, c00, c10, R, HAS_BIAS, EVEN)
        _store_lane(out_ptr, row0, row1, bias_ptr, o0, 1, O, n1, s0, s1, c01, c11, R, HAS_BIAS, EVEN)
        _store_lane(out_ptr, row0, row1, bias_ptr, o0, 2, O, n2, s0, s1, c02, c12, R, HAS_BIAS, EVEN)
        _store_lane(out_ptr, row0, row1, bias_ptr, o0, 3, O, n3, s0, s1, c03, c13, R, HAS_BIAS, EVEN)
        _store_lane(out_ptr, row0, row1, bias_ptr, o0, 4, O, n4, s0, s1, c04, c14, R, HAS_BIAS, EVEN)
        _store_lane(out_ptr, row0, row1, bias_ptr, o0, 5, O, n5, s0, s1, c05, c15, R, HAS_BIAS, EVEN)
        _store_lane(out_ptr, row0, row1, bias_ptr, o0, 6, O, n6, s0, s1, c06, c16, R, HAS_BIAS, EVEN)
        _store_lane(out_ptr, row0, row1, bias_ptr, o0, 7, O, n7, s0, s1, c07, c17, R, HAS_BIAS, EVEN)

    @triton.jit
    def _rows_counter_kernel(
        x_ptr, bias_ptr, out_ptr, s_ptr, seed, scale, D, O, stride_x, stride_out, pair_len, b_off, k_chunk, n_parts,
        R: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, PHASE: tl.constexpr, EVEN_K: tl.constexpr,
        EVEN_O: tl.constexpr, PDL: tl.constexpr, FAST: tl.constexpr,
    ):
        """Antithetic pair ``p`` (members ``2p`` with +A_p, ``2p + 1`` with -A_p), in one of three modes:
        ``PHASE == 0``: one program per pair projects ``x`` on ``B_p``, then adds the term to every block
        of the output; ``PHASE == 1``: programs ``(p, g)`` project features ``[g k_chunk, (g + 1) k_chunk)`` of
        ``x`` into the partial sums ``s (P, n_parts, 2, R)`` (scaled and signed); ``PHASE == 2``:
        programs ``(p, block)`` add one output block, with ``s`` summed over its parts. ``PDL``
        (programmatic dependent launch): PHASE 2 may start once every PHASE 1 program has, loads its block and
        draws its noise before it waits for PHASE 1's partial sums."""
        p = tl.program_id(0).to(tl.int64)  # 64-bit offsets: N * D can pass 2^31
        base = p * pair_len // 8  # the pair's first counter (pair_len is whole blocks)
        rr = tl.arange(0, R)
        if PHASE == 2:
            s0 = tl.zeros((R,), dtype=tl.float32)  # loaded in _add_block
            s1 = s0
        else:
            if PHASE == 1 and PDL:
                _griddep("launch_dependents")
            if R == 1:
                part0 = tl.zeros((_LANE,), dtype=tl.float32)
            else:
                part0 = tl.zeros((_LANE // R, R), dtype=tl.float32)
            part1 = part0
            k_first = tl.program_id(1) * k_chunk
            for k0 in range(k_first, tl.minimum(D, k_first + k_chunk), _BLOCK // R):
                part0, part1 = _project_block(x_ptr, 2 * p * stride_x, (2 * p + 1) * stride_x, seed,
                                              base + (b_off + k0 * R) // 8, k0, D, part0, part1, R, EVEN_K, FAST)
            if R == 1:
                s0 = tl.full((1,), tl.sum(part0), tl.float32) * scale
                s1 = tl.full((1,), tl.sum(part1), tl.float32) * -scale
            else:
                s0 = tl.sum(part0, axis=0) * scale
                s1 = tl.sum(part1, axis=0) * -scale
        if PHASE == 1:
            g = tl.program_id(1)
            tl.store(s_ptr + (p * n_parts + g) * 2 * R + rr, s0)
            tl.store(s_ptr + (p * n_parts + g) * 2 * R + R + rr, s1)
        elif PHASE == 2:
            o0 = tl.program_id(1) * (_BLOCK // R)
            _add_block(out_ptr, 2 * p * stride_out, (2 * p + 1) * stride_out, bias_ptr, seed, base + o0 * R // 8,
                       o0, O, s0, s1, s_ptr, p, n_parts, R, HAS_BIAS, ACCUM, EVEN_O, True, PDL, FAST)
        else:
            for o0 in range(0, O, _BLOCK // R):
                _add_block(out_ptr, 2 * p * stride_out, (2 * p + 1) * stride_out, bias_ptr, seed,
                           base + o0 * R // 8, o0, O, s0, s1, s_ptr, p, n_parts, R, HAS_BIAS, ACCUM, EVEN_O, False,
                           False, FAST)


def perturbed_linear_counter(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seed: int, sigma: float, rank: int,
    *, accumulate: bool = True,
) -> torch.Tensor:
    """``x_i (W + E_i)ᵀ + b`` for rows ``x (N, in)`` with antithetic counter noise regenerated in-kernel.

    Member ``2p`` uses ``+sigma/sqrt(r) A_p B_pᵀ`` and ``2p + 1`` its negative, with ``(A_p, B_p)``
    from ``counter_pair_factors(seed, ...)``. ``accumulate=True`` (default): ``x Wᵀ`` first, the kernel
    adds the term in place; ``False``: the kernel writes the term and ``addmm`` accumulates ``x Wᵀ``
    onto it (on the microbenchmark's shapes cuBLAS reading C costs more than the kernel's
    read-modify-write: ``benchmarks/sweep_kernels.py rows``). Returns ``(N, out)`` in ``x``'s dtype.
    To estimate a gradient on this noise, rebuild it as
    ``noise.antithetic_pairs(*counter_pair_factors(seed, 0, N // 2, out, in, rank, device), sigma, rank)``
    for ``kernels.es_gradient`` (its values match the kernel's draws to a few 1e-5 on CUDA).
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
        A_scaled, B = antithetic_pairs(*counter_pair_factors(seed, 0, N // 2, O, D, rank, x.device), sigma, rank)
        delta = rows_lowrank_delta(x, A_scaled.to(x.dtype), B.to(x.dtype), bias)
        return torch.addmm(delta, x, weight.t())
    x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.mm(x, weight.t()) if accumulate else torch.empty(N, O, device=x.device, dtype=x.dtype)
    launch_counter_rows(x, bias, out, seed, scale, rank, accumulate)  # projecting before the GEMM: no faster
    return out if accumulate else torch.addmm(out, x, weight.t())


def launch_counter_rows(x, bias, out, seed, scale, rank, accumulate, split=True, num_warps=(4, 2), parts=None):
    """Launch the counter kernel on ``x (N, in)`` into ``out (N, out)`` (``+=`` with ``accumulate``).
    ``split`` (default): a first launch projects each pair's features of ``x`` on ``B_p`` into partial
    sums, one per chunk of ``B``'s blocks (``parts`` chunks asked, default two blocks a chunk, at most 8
    chunks; chunks are whole blocks, so fewer may come out), a second adds the term block by block, with
    a program per (pair, output block); otherwise one program per pair does both. ``num_warps`` of the
    two launches. The defaults won a sweep of parts and warps (``benchmarks/sweep_kernels.py rows``;
    ``benchmarks/RESULTS.md``, run AH). ``N`` even, ``rank`` a power of two <= 16, rows
    of ``x``, ``out`` and ``bias`` contiguous."""
    N, D = x.shape
    if N % 2 or rank < 1 or rank & (rank - 1) or rank > 16:
        raise ValueError(f"launch_counter_rows: needs an even N and a power-of-two rank <= 16, got N={N}, rank={rank}")
    if out.shape != (N, out.shape[1]) or any(t is not None and t.stride(-1) != 1 for t in (x, out, bias)):
        raise ValueError(f"launch_counter_rows: out must be ({N}, out) and x, out, bias contiguous in their last "
                         f"dimension, got out {tuple(out.shape)}")
    plan = _CounterPlan(x, bias, out.shape[1], seed, scale, rank, accumulate, parts)
    if not split:
        plan.launch(out, None, 0, num_warps[0])
        return
    s = plan.project(num_warps[0])
    plan.launch(out, s, 2, num_warps[1])


class _CounterPlan:
    """Sizes and arguments of one counter-kernel call: ``project`` (PHASE 1), then ``launch`` (PHASE 2
    with its ``s``, or PHASE 0 alone)."""

    def __init__(self, x, bias, O, seed, scale, rank, accumulate, parts=None):
        N, D = x.shape
        rows_per_block = BLOCK // rank
        k_blocks = triton.cdiv(D, rows_per_block)
        parts = min(triton.cdiv(k_blocks, 2), 8) if parts is None else max(1, min(parts, k_blocks))
        self.k_chunk = triton.cdiv(k_blocks, parts) * rows_per_block
        self.parts = triton.cdiv(D, self.k_chunk)
        self.x, self.bias, self.P, self.O, self.rank = x, bias if bias is not None else x, N // 2, O, rank
        self.tail = (int(seed) & (2**64 - 1), scale, D, O, x.stride(0))  # the twin's key: seed mod 2^64
        self.shape = (pair_stride(O, D, rank), _pad_block(O * rank), self.k_chunk, self.parts)
        self.pdl = _pdl_available(x.device)
        self.meta = dict(R=rank, HAS_BIAS=bias is not None, ACCUM=accumulate, EVEN_K=D % rows_per_block == 0,
                         EVEN_O=O % rows_per_block == 0, PDL=self.pdl, FAST=not _interpreted())

    def project(self, num_warps=4) -> torch.Tensor:
        s = torch.empty(self.P, self.parts, 2, self.rank, device=self.x.device, dtype=torch.float32)
        _rows_counter_kernel[(self.P, self.parts)](self.x, self.bias, s, s, *self.tail, 0, *self.shape, PHASE=1,
                                                   num_warps=num_warps, **self.meta)
        return s

    def launch(self, out, s, phase, num_warps=4) -> None:
        grid = (self.P, triton.cdiv(self.O * self.rank, BLOCK) if phase == 2 else 1)
        shape = self.shape if phase == 2 else self.shape[:2] + (self.x.shape[1], 1)
        launch = dict(launch_pdl=True) if self.pdl and phase == 2 else {}
        _rows_counter_kernel[grid](self.x, self.bias, out, s if s is not None else out, *self.tail, out.stride(0),
                                   *shape, PHASE=phase, num_warps=num_warps, **self.meta, **launch)


_PDL: dict = {}


@functools.cache
def _triton_launches_pdl() -> bool:
    """This Triton takes ``launch_pdl`` as a launch option (added in 2025; older ones reject it)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled kernels on sm_90 or newer, with a Triton that launches it."""
    if _interpreted() or device.type != "cuda" or not _triton_launches_pdl():
        return False
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _PDL:
        _PDL[key] = torch.cuda.get_device_capability(key)[0] >= 9
    return _PDL[key]

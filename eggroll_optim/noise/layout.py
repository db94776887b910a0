"""Antithetic layouts in one Triton pass each (CUDA, or Triton's interpreter); callers keep torch elsewhere:

- ``pair_rows``: pair factors ``B (P, n, r)`` -> population ``(n, P, 2, r)``, each pair's row written
  for both of its members, and in the same pass the ``(n, P, r)`` copy with one row per pair
  (``noise.antithetic_pairs``: ``Pairs.B`` and ``Pairs.B_pair``);
- ``signed_pairs``: ``A (P, m, r)`` -> ``(P, 2, m, r)`` = ``(scale A_p, -scale A_p)``
  (``noise.antithetic_pairs``), the values of torch's stack-then-scale bit for bit (not float64:
  Triton passes the scale as float32, where torch multiplies float64 by the double);
- ``scaled_transpose``: ``A (N, m, r)``, ``f (N,)`` -> ``(m, N, r)`` = ``f_n A_n``, and
  ``pair_scaled_transpose``: ``A (P, m, r)``, ``f (2P,)`` -> ``(m, P, r)`` = ``(f_2p - f_2p+1) A_p``: the
  left operand of the gradient's GEMM (``kernels.gradient``), over members or over pairs.

Every one is a transpose-copy: a tile is read along ``(i, r)`` and written along ``(p, r)``.
"""
from __future__ import annotations

import torch

from .._triton import interpreted as _interpreted
from .._triton import pow2 as _pow2
from .._triton import tl, triton

__all__ = [
    "layout_kernels_available", "pair_rows", "pair_scaled_transpose", "scaled_transpose", "signed_pairs",
]

_BP, _BI = 16, 16  # pairs x rows of a transpose tile (square: the reads and the writes coalesce alike)
_BLOCK = 4096  # values a program for signed_pairs

if triton is not None:

    @triton.jit
    def _transpose_rows_kernel(src_ptr, scale_ptr, dst_ptr, half_ptr, P, n, src_stride, R: tl.constexpr,
                               RP: tl.constexpr, C: tl.constexpr, HAS_SCALE: tl.constexpr, HALF: tl.constexpr,
                               PAIR_DIFF: tl.constexpr, BP: tl.constexpr, BI: tl.constexpr):
        """``dst[i, p, c, :] = src[p, i, :] (* scale[p])`` for ``c < C`` (1 or 2): a ``(BP, BI)`` tile, read
        along ``(i, r)``, written along ``(p, c, r)`` with the ``C`` copies of a row in one store; ``HALF``:
        also ``half[i, p, :] = src[p, i, :]``. ``src_stride``: elements between consecutive ``p``. ``PAIR_DIFF``:
        the scale of ``p`` is ``scale[2p] - scale[2p + 1]``."""
        tile = tl.program_id(0).to(tl.int64)  # one grid axis (up to 2^31 - 1 tiles): P and n can both be large
        tiles_i = tl.cdiv(n, BI)
        p = (tile // tiles_i) * BP + tl.arange(0, BP)
        i = (tile % tiles_i) * BI + tl.arange(0, BI)
        r = tl.arange(0, RP)
        ok = (p < P)[:, None, None] & (i < n)[None, :, None] & (r < R)[None, None, :]
        v = tl.load(src_ptr + p[:, None, None] * src_stride + i[None, :, None] * R + r[None, None, :], mask=ok)
        if HAS_SCALE:
            if PAIR_DIFF:  # scale[2p] - scale[2p + 1]: a pair's fitness difference
                sc = tl.load(scale_ptr + 2 * p, mask=p < P, other=0.0) - tl.load(scale_ptr + 2 * p + 1, mask=p < P,
                                                                                  other=0.0)
            else:
                sc = tl.load(scale_ptr + p, mask=p < P, other=0.0)
            v = (v * sc[:, None, None]).to(dst_ptr.dtype.element_ty)
        if HALF:
            ok1 = (i < n)[:, None, None] & (p < P)[None, :, None] & (r < R)[None, None, :]
            tl.store(half_ptr + (i[:, None, None] * P + p[None, :, None]) * R + r[None, None, :],
                     tl.permute(v, (1, 0, 2)), mask=ok1)
        if C == 2:
            v = tl.reshape(tl.permute(tl.join(v, v), (1, 0, 3, 2)), (BI, BP, 2 * RP))  # (i, p, [copy, r])
        else:
            v = tl.permute(v, (1, 0, 2))
        j = tl.arange(0, C * RP)
        jr = j % RP
        ok2 = (i < n)[:, None, None] & (p < P)[None, :, None] & (jr < R)[None, None, :]
        dst = dst_ptr + ((i[:, None, None] * P + p[None, :, None]) * C + (j // RP)[None, None, :]) * R + jr[None, None, :]
        tl.store(dst, v, mask=ok2)

    @triton.jit
    def _signed_pairs_kernel(src_ptr, dst_ptr, total, L, scale, BLOCK: tl.constexpr):
        """``dst[p, 0] = src[p] * scale``, ``dst[p, 1] = -src[p] * scale`` over rows of ``L`` values: one flat
        pass over the ``total = P * L`` source values (small rows, as a 10-output layer's, fill whole blocks)."""
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # one grid axis, 64-bit offsets
        ok = idx < total
        v = tl.load(src_ptr + idx, mask=ok)
        out = dst_ptr + (idx // L) * L + idx  # row p starts at 2 p L: p L + idx
        tl.store(out, (v * scale).to(dst_ptr.dtype.element_ty), mask=ok)
        tl.store(out + L, (-v * scale).to(dst_ptr.dtype.element_ty), mask=ok)


def layout_kernels_available(*tensors: torch.Tensor) -> bool:
    """Triton present, contiguous non-empty tensors on CUDA (or, float32/float64 only, under Triton's
    interpreter, which has no bfloat16 arithmetic), no autograd through them."""
    return triton is not None and all(
        (t.is_cuda or (_interpreted() and t.dtype in (torch.float32, torch.float64)))
        and t.is_contiguous() and t.numel() > 0
        and not (torch.is_grad_enabled() and t.requires_grad)
        for t in tensors
    )


def _transpose(src: torch.Tensor, copies: int, scale: torch.Tensor | None, out_dtype: torch.dtype,
               half: bool = False, pair_diff: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``src (P, n, R)`` with unit strides in ``(n, R)`` (any member stride) -> ``(n, P, copies, R)``
    (and the ``(n, P, R)`` copy when ``half``)."""
    P, n, R = src.shape
    out = torch.empty((n, P, copies, R), device=src.device, dtype=out_dtype)
    out_half = torch.empty((n, P, R), device=src.device, dtype=out_dtype) if half else None
    _transpose_rows_kernel[(triton.cdiv(P, _BP) * triton.cdiv(n, _BI),)](
        src, scale if scale is not None else src, out, out_half if half else out, P, n, src.stride(0), R=R,
        RP=_pow2(R, 1), C=copies, HAS_SCALE=scale is not None, HALF=half, PAIR_DIFF=pair_diff, BP=_BP, BI=_BI,
        num_warps=4)
    return (out, out_half) if half else out


def pair_rows(B: torch.Tensor, half: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``B (P, n, r)`` contiguous -> ``(n, P, 2, r)`` with ``[:, p, 0]`` and ``[:, p, 1]`` both ``B[p]ᵀ``;
    ``half=True`` also returns ``(n, P, r)``, one copy per pair, written in the same pass."""
    return _transpose(B, 2, None, B.dtype, half)


def scaled_transpose(A: torch.Tensor, f: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``A (N, m, r)`` (unit strides in ``(m, r)``), ``f (N,)`` -> ``(m, N, r)`` in ``out_dtype``: ``f_n A_n``
    (computed in the wider of the two dtypes, as torch's ``A.to(out_dtype) * f`` does)."""
    return _transpose(A, 1, f.to(out_dtype).contiguous(), out_dtype).view(A.shape[1], A.shape[0], A.shape[2])


def pair_scaled_transpose(A: torch.Tensor, f: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``A (P, m, r)`` (unit strides in ``(m, r)``), ``f (2P,)`` -> ``(m, P, r)``: ``(f_2p - f_2p+1) A_p``,
    the difference taken in ``out_dtype`` (as ``scaled_transpose(A, f[0::2] - f[1::2])`` after the cast)."""
    if f.shape != (2 * A.shape[0],):
        raise ValueError(f"pair_scaled_transpose: f must have shape ({2 * A.shape[0]},), got {tuple(f.shape)}")
    return _transpose(A, 1, f.to(out_dtype).contiguous(), out_dtype, pair_diff=True).view(
        A.shape[1], A.shape[0], A.shape[2])


def signed_pairs(A: torch.Tensor, scale: float) -> torch.Tensor:
    """``A (P, m, r)`` contiguous -> ``(2P, m, r)``: rows ``2p`` = ``scale A_p``, ``2p + 1`` = ``-scale A_p``."""
    P = A.shape[0]
    L = A[0].numel()
    if A.dtype == torch.float64:  # a Triton float argument is float32; torch keeps a double scale for float64
        raise ValueError("signed_pairs: float64 factors take torch's stack and scale")
    out = A.new_empty(P, 2, *A.shape[1:])
    _signed_pairs_kernel[(triton.cdiv(P * L, _BLOCK),)](A, out, P * L, L, float(scale), BLOCK=_BLOCK, num_warps=4)
    return out.flatten(0, 1)

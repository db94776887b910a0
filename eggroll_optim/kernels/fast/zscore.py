"""Z-score fitness shaping in one launch (Triton): ``shaping.zscore``'s dozen small torch kernels
(mean, amax, amin, where, square, mean, sqrt, divide) and, for ``nan_policy="skip"``, the finite check,
as one program. In a CUDA-graphed MNIST step each small kernel costs more in launch gaps than in work.
"""
from __future__ import annotations

import contextlib

import torch

from ._triton import interpreted as _interpreted
from ._triton import tl, triton

__all__ = ["fused_zscore", "fused_zscore_available"]

_BLOCK = 1024
_MAX_N = 1 << 22  # one program reads the fitness three times: fine up to a few million members

if triton is not None:

    @triton.jit
    def _zscore_kernel(f_ptr, out_ptr, N, eps, SKIP: tl.constexpr, BLOCK: tl.constexpr):
        """``out = (f - mean) / sqrt(mean((f - mean)^2) + eps)``; zeros when every ``f`` is equal. A NaN/inf
        ``f`` gives zeros everywhere with ``SKIP``, NaN everywhere without (as torch's formula does).
        Three passes over ``f`` in one program, float32 sums."""
        offs = tl.arange(0, BLOCK)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        hi = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        lo = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, N, BLOCK):
            idx = start + offs
            ok = idx < N
            v = tl.load(f_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            total += v
            hi = tl.maximum(hi, tl.where(ok, v, float("-inf")))
            lo = tl.minimum(lo, tl.where(ok, v, float("inf")))
            bad += (ok & ((v != v) | (tl.abs(v) == float("inf")))).to(tl.int32)
        mean = tl.sum(total, axis=0) / N
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            idx = start + offs
            ok = idx < N
            c = tl.where(ok, tl.load(f_ptr + idx, mask=ok, other=0.0).to(tl.float32) - mean, 0.0)
            squares += c * c
        scale = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / N + eps)
        flat = tl.max(hi, axis=0) == tl.min(lo, axis=0)  # all equal: exact zeros (max/min skip NaN)
        nonfinite = tl.sum(bad, axis=0) > 0
        for start in range(0, N, BLOCK):
            idx = start + offs
            ok = idx < N
            v = tl.load(f_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            z = tl.where(flat, 0.0, (v - mean) * scale)
            if SKIP:  # a NaN/inf member: no update at all
                z = tl.where(nonfinite, 0.0, z)
            else:
                z = tl.where(nonfinite, float("nan"), z)
            tl.store(out_ptr + idx, z.to(out_ptr.dtype.element_ty), mask=ok)


def fused_zscore_available(fitness: torch.Tensor) -> bool:
    """Triton present, a contiguous 1-D float32 fitness with storage (not a ``vmap``-batched one) on CUDA
    (or under the interpreter), at most ``2^22`` members, no autograd through it."""
    if not (
        triton is not None
        and (fitness.is_cuda or _interpreted())
        and fitness.dim() == 1 and fitness.dtype == torch.float32 and fitness.is_contiguous()
        and 0 < fitness.numel() <= _MAX_N
        and not (torch.is_grad_enabled() and fitness.requires_grad)
    ):
        return False
    try:
        fitness.data_ptr()  # functorch-wrapped tensors (vmap, grad) have none: torch's formula
    except RuntimeError:
        return False
    return True


def fused_zscore(fitness: torch.Tensor, eps: float = 1e-8, skip_nonfinite: bool = False) -> torch.Tensor:
    """``shaping.zscore`` in one launch; ``skip_nonfinite``: all zeros when any member is NaN/inf
    (``check_fitness``'s ``"skip"`` policy folded in)."""
    out = torch.empty_like(fitness)
    with torch.cuda.device(fitness.device) if fitness.is_cuda else contextlib.nullcontext():
        _zscore_kernel[(1,)](fitness, out, fitness.numel(), float(eps), SKIP=skip_nonfinite, BLOCK=_BLOCK,
                             num_warps=4)
    return out

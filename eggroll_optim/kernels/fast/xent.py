"""Mean cross-entropy per member in one pass over the logits (no log-softmax tensor).

``logits (N, B, C)`` with labels shared ``(B,)`` or per member ``(N, B)`` -> ``(N,)``: one program per
member walks its ``B`` rows in a fixed order (deterministic), so the ``(N, B, C)`` log-probabilities
of the plain-torch path are never written. Up to 64 classes, each thread owns whole rows and loops
over the classes (the strided loads hit L1; every reduction stays in registers): 21 µs against
72 µs for a row-tile kernel on the MNIST step's 4096 x 256 x 10 logits (H200; floor 10.5 µs). An
out-of-range label gives that member NaN (which the fitness check then reports) instead of a
silently wrong value.
"""
from __future__ import annotations

import torch

from ._triton import interpreted as _interpreted
from ._triton import pow2 as _pow2
from ._triton import tl, triton

__all__ = ["fused_cross_entropy_available", "member_cross_entropy"]


if triton is not None:

    @triton.jit
    def _add_rows(total, lse, picked, label, row_ok, C):
        """``total + (lse - picked)`` over the valid rows; a label outside ``[0, C)`` gives NaN."""
        nll = tl.where((label >= 0) & (label < C), lse - picked, float("nan"))
        return total + tl.where(row_ok, nll, 0.0)

    @triton.jit
    def _xent_rows_kernel(logits_ptr, labels_ptr, out_ptr, B, C, stride_ln, stride_yn, BB: tl.constexpr):
        """Few classes: one row per thread, two loops over the classes (max, then sum of exponentials)."""
        n = tl.program_id(0).to(tl.int64)
        total = tl.zeros((BB,), dtype=tl.float32)
        for b0 in range(0, B, BB):
            rows = b0 + tl.arange(0, BB)
            row_ok = rows < B
            row_ptr = logits_ptr + n * stride_ln + rows * C
            zmax = tl.full((BB,), -float("inf"), tl.float32)
            for c in range(0, C):
                zmax = tl.maximum(zmax, tl.load(row_ptr + c, mask=row_ok, other=0.0).to(tl.float32))
            label = tl.load(labels_ptr + n * stride_yn + rows, mask=row_ok, other=0)
            sumexp = tl.zeros((BB,), dtype=tl.float32)
            picked = tl.zeros((BB,), dtype=tl.float32)
            for c in range(0, C):
                z = tl.load(row_ptr + c, mask=row_ok, other=0.0).to(tl.float32)
                sumexp += tl.exp(z - zmax)
                picked += tl.where(label == c, z, 0.0)
            total = _add_rows(total, zmax + tl.log(sumexp), picked, label, row_ok, C)
        tl.store(out_ptr + n, tl.sum(total, axis=0) / B)

    @triton.jit
    def _xent_kernel(logits_ptr, labels_ptr, out_ptr, B, C, stride_ln, stride_yn,
                     BB: tl.constexpr, BC: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)  # 64-bit offsets: N * B * C can pass 2^31
        cols = tl.arange(0, BC)
        col_ok = cols < C
        total = tl.zeros((BB,), dtype=tl.float32)
        for b0 in range(0, B, BB):
            rows = b0 + tl.arange(0, BB)
            row_ok = rows < B
            z = tl.load(logits_ptr + n * stride_ln + rows[:, None] * C + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=-float("inf")).to(tl.float32)
            z = tl.where(row_ok[:, None], z, 0.0)  # rows past B: finite, and dropped below
            label = tl.load(labels_ptr + n * stride_yn + rows, mask=row_ok, other=0)
            zmax = tl.max(z, axis=1)
            lse = zmax + tl.log(tl.sum(tl.exp(z - zmax[:, None]), axis=1))
            picked = tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
            total = _add_rows(total, lse, picked, label, row_ok, C)
        tl.store(out_ptr + n, tl.sum(total, axis=0) / B)


_ROWS_MAX_CLASSES = 64  # beyond this, a row tile per step (the class loop would run long)


def fused_cross_entropy_available(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Triton, a CUDA (or interpreted) floating ``(N, B, C)`` input with ``C <= 1024``, and no autograd."""
    return (
        triton is not None
        and (logits.is_cuda or _interpreted())
        and logits.dim() == 3
        and logits.is_floating_point()
        and logits.shape[1] > 0
        and logits.shape[2] <= 1024
        and not (torch.is_grad_enabled() and logits.requires_grad)
        and labels.dtype in (torch.int64, torch.int32)
        and labels.shape in (logits.shape[1:2], logits.shape[:2])
    )


def member_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per member of ``logits (N, B, C)``, ``labels (B,)`` or ``(N, B)`` -> float32 ``(N,)``."""
    N, B, C = logits.shape
    logits = logits.contiguous()
    labels = labels.contiguous()
    out = torch.empty(N, device=logits.device, dtype=torch.float32)
    stride_y = labels.stride(0) if labels.dim() == 2 else 0
    if C <= _ROWS_MAX_CLASSES:
        _xent_rows_kernel[(N,)](logits, labels, out, B, C, logits.stride(0), stride_y, BB=128, num_warps=4)
        return out
    BC = _pow2(C, 2)
    BB = max(1, min(_pow2(B, 1), 4096 // BC))
    _xent_kernel[(N,)](logits, labels, out, B, C, logits.stride(0), stride_y, BB=BB, BC=BC, num_warps=4)
    return out

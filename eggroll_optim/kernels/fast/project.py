"""``x B_i`` for a shared input and every member at once, reading ``B`` where it lies.

``x (M, in)`` against ``B (N, in, r)`` is one GEMM ``x @ [B_0 | B_1 | ...]`` with ``N r`` columns,
but the column ``(i, j)`` of that matrix is strided over both ``i`` and ``j``, so cuBLAS needs
``B`` copied to ``(in, N r)`` first (a full pass over the largest noise tensor). The Triton kernel
gathers its ``(in, members * r)`` tiles straight from ``B`` as stored instead.
"""
from __future__ import annotations

import torch

from ._triton import interpreted as _interpreted
from ._triton import tl, triton

__all__ = ["shared_projection"]


if triton is not None:

    @triton.jit
    def _projection_kernel(
        x_ptr, b_ptr, out_ptr, M, D, N, stride_xm,
        R: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NB: tl.constexpr,
    ):
        """Program ``(i, j)``: rows ``[i BM, (i + 1) BM)`` of ``x`` against members ``[j NB, (j + 1) NB)``;
        ``out (M, N R)`` row-major, column ``n R + r``."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * (NB * R) + tl.arange(0, NB * R)  # column n R + r
        ks = tl.arange(0, BK)
        row_ok, col_ok = rows < M, cols < N * R
        col_off = (cols // R) * (D * R) + cols % R  # B[n, 0, r]: runs of R contiguous values per member
        acc = tl.zeros((BM, NB * R), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            k_ok = kk < D
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)  # (BM, BK)
            bt = tl.load(b_ptr + kk[:, None] * R + col_off[None, :], mask=k_ok[:, None] & col_ok[None, :],
                         other=0.0)  # (BK, NB R), gathered from B as stored
            acc = tl.dot(xt, bt, acc=acc, input_precision=PREC)
        tl.store(out_ptr + rows[:, None] * (N * R) + cols[None, :], acc,
                 mask=row_ok[:, None] & (cols < N * R)[None, :])

    _projection_kernel_tuned = triton.autotune(
        configs=[
            triton.Config({"BM": bm, "BK": bk, "NB": nb}, num_warps=w, num_stages=st)
            for bm, bk, nb, w, st in ((128, 32, 32, 8, 3), (64, 32, 32, 4, 3), (128, 32, 16, 4, 3),
                                      (64, 64, 16, 4, 2), (256, 32, 32, 8, 3))
        ],
        key=["M", "D", "N", "R"],
    )(_projection_kernel)


def _kernel_applies(x: torch.Tensor, B: torch.Tensor) -> bool:
    R = B.shape[2]
    return (
        triton is not None
        and (x.is_cuda or _interpreted())
        and x.dtype == B.dtype == torch.float32
        and x.dim() == 2
        and R & (R - 1) == 0
        and R <= 16
    )


def shared_projection(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x B_i`` for every member: ``x (M, in)``, ``B (N, in, r)`` -> ``(M, N r)`` (column ``i r + j``).

    Triton on CUDA for float32 and a power-of-two rank (TF32 when torch's matmuls use it); one
    copy of ``B`` and a cuBLAS GEMM otherwise.
    """
    N, D, R = B.shape
    if not _kernel_applies(x, B):
        return x @ B.permute(1, 0, 2).reshape(D, N * R)
    x, B = x.contiguous(), B.contiguous()
    M = x.shape[0]
    out = torch.empty(M, N * R, device=x.device, dtype=x.dtype)
    prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if _interpreted():
        _projection_kernel[(triton.cdiv(M, 32), triton.cdiv(N, 16))](
            x, B, out, M, D, N, x.stride(0), R=R, PREC=prec, BM=32, BK=16, NB=16)
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["NB"]))  # noqa: E731
    _projection_kernel_tuned[grid](x, B, out, M, D, N, x.stride(0), R=R, PREC=prec)
    return out

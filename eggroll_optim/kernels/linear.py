"""Perturbed linear layer, never materialising ``E_i`` (SPEC §3).

``y_i = x_i Wᵀ + b + (x_i B_i) A_scaled_iᵀ``; a shared input computes ``x Wᵀ + b`` once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_factors
from .fast.rows import fused_rows_available, rows_lowrank_delta
from .population import split_shared

__all__ = ["lowrank_linear_add", "lowrank_linear_delta", "perturbed_linear"]


def _check_features(name: str, x: torch.Tensor, in_dim: int) -> None:
    if x.dim() == 0 or x.shape[-1] != in_dim:
        raise ValueError(f"{name}: input must end in in_features={in_dim}, got shape {tuple(x.shape)}")


def _rows(x: torch.Tensor, N: int, shared: bool) -> tuple[torch.Tensor, torch.Size]:
    """Flatten the batch dims: shared ``(*batch, in) -> (M, in)``, per member ``-> (N, M, in)``."""
    if shared:
        return x.reshape(-1, x.shape[-1]), x.shape[:-1]
    return x.reshape(N, -1, x.shape[-1]), x.shape[1:-1]


def _project(x: torch.Tensor, B: torch.Tensor, shared: bool) -> torch.Tensor:
    """``x_i B_i``: shared ``x (M, in)`` or per-member ``(N, M, in)`` -> ``(N, M, r)``."""
    N, in_dim, r = B.shape
    if shared:
        # one GEMM against every member's B at once: (M, in) @ (in, N*r)
        xB = x @ B.permute(1, 0, 2).reshape(in_dim, N * r)  # (M, N*r)
        return xB.view(x.shape[0], N, r).transpose(0, 1)  # (N, M, r)
    if x.shape[1] == 1:  # one row per member: a product-sum is one pass, a batched GEMV is slow
        return (x.transpose(1, 2) * B).sum(1, keepdim=True)  # (N, 1, r)
    return torch.bmm(x, B)  # (N, M, r)


def lowrank_linear_add(
    base: torch.Tensor,
    x: torch.Tensor,
    B: torch.Tensor,
    A_scaled: torch.Tensor,
    shared: bool,
    bias_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + (x_i B_i) A_scaled_iᵀ (+ bias_noise_i)`` in one batched GEMM.

    Args:
        base: ``x Wᵀ + b``: ``(*batch, out)`` for a shared ``x``, ``(N, *batch, out)`` otherwise.
        x: the input, already classified: shared ``(*batch, in)`` or per member ``(N, *batch, in)``.
        B: ``(N, in, r)``; A_scaled: ``(N, out, r)``.
        bias_noise: optional full-rank bias noise ``(N, out)``, added as one more rank
            (a column of ones against the noise) instead of another pass over the output.
    Returns:
        ``(N, *batch, out)``.
    """
    N, out_dim, _ = A_scaled.shape
    x3, batch = _rows(x, N, shared)
    xB = _project(x3, B, shared)  # (N, M, r)
    At = A_scaled.transpose(1, 2)  # (N, r, out)
    if bias_noise is not None:
        xB = torch.cat([xB, xB.new_ones(N, xB.shape[1], 1)], dim=2)  # (N, M, r + 1)
        At = torch.cat([At, bias_noise.unsqueeze(1).to(At.dtype)], dim=1)  # (N, r + 1, out)
    base3 = base.reshape(-1, out_dim).expand(N, -1, out_dim) if shared else base.reshape(N, -1, out_dim)
    if shared:  # write the low-rank term once, then add the broadcast base in place
        return torch.bmm(xB, At).add_(base3).view(N, *batch, out_dim)
    return torch.baddbmm(base3, xB, At).view(N, *batch, out_dim)


def lowrank_linear_delta(
    x: torch.Tensor, B: torch.Tensor, A_scaled: torch.Tensor, shared: bool | None = None
) -> torch.Tensor:
    """The low-rank term ``(x_i B_i) A_scaled_iᵀ`` alone.

    Args:
        x: ``(N, *batch, in)`` per member, or a shared ``(*batch, in)`` / stride-0 expand.
        B: ``(N, in, r)``; A_scaled: ``(N, out, r)``.
    Returns:
        ``(N, *batch, out)``.
    """
    check_factors("lowrank_linear_delta", None, None, A_scaled, B, x)
    N, out_dim, _ = A_scaled.shape
    _check_features("lowrank_linear_delta", x, B.shape[1])
    x, shared = split_shared(x, N, 1, shared)
    A_scaled, B = A_scaled.to(x.dtype), B.to(x.dtype)
    x3, batch = _rows(x, N, shared)
    delta = torch.bmm(_project(x3, B, shared), A_scaled.transpose(1, 2))  # (N, M, out)
    return delta.view(N, *batch, out_dim)


def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_scaled: torch.Tensor,
    B: torch.Tensor,
    shared: bool | None = None,
) -> torch.Tensor:
    """``x_i Wᵀ + b + (x_i B_i) A_scaled_iᵀ`` for every member ``i``.

    Args:
        x: ``(N, *batch, in)`` per member, or a shared ``(*batch, in)`` (also a stride-0
            ``x.expand(N, ...)``): then ``x Wᵀ + b`` is computed once and broadcast.
        weight: ``(out, in)``; bias: ``(out,)`` or ``None``.
        A_scaled: ``(N, out, r)``, carries sign and ``sigma / sqrt(r)``; B: ``(N, in, r)``.
        shared: force the input's interpretation (see ``split_shared``); ``None`` infers it.
    Returns:
        ``(N, *batch, out)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"perturbed_linear: weight must be 2-D, got shape {tuple(weight.shape)}")
    check_factors("perturbed_linear", weight.shape[0], weight.shape[1], A_scaled, B, x, weight)
    N, out_dim, _ = A_scaled.shape
    _check_features("perturbed_linear", x, weight.shape[1])
    x, shared = split_shared(x, N, 1, shared)
    A_scaled, B = A_scaled.to(x.dtype), B.to(x.dtype)  # float32 noise may serve half-precision weights
    if shared:  # x Wᵀ + b once, broadcast under the low-rank term
        return lowrank_linear_add(F.linear(x, weight, bias), x, B, A_scaled, shared)
    # per member: the low-rank term (+ b) first, then the big GEMM accumulates onto it (beta = 1)
    x3, batch = _rows(x, N, False)
    in_dim = x3.shape[-1]
    M = x3.shape[1]
    At = A_scaled.transpose(1, 2)  # (N, r, out)
    if M == 1:
        if fused_rows_available(x3, weight, bias, A_scaled, B):  # x Wᵀ + b by cuBLAS, then the term in place
            x2 = x3.reshape(N, in_dim)
            return rows_lowrank_delta(x2, A_scaled, B, out=F.linear(x2, weight, bias)).view(N, *batch, out_dim)
        delta = (_project(x3, B, False).transpose(1, 2) * At).sum(1, keepdim=True)  # (N, 1, out)
        delta = delta if bias is None else delta + bias
    else:
        init = bias.expand(N, M, out_dim) if bias is not None else x3.new_zeros(()).expand(N, M, out_dim)
        delta = torch.baddbmm(init, _project(x3, B, False), At)  # (N, M, out)
    out = torch.addmm(delta.reshape(N * M, out_dim), x3.reshape(N * M, in_dim), weight.t())
    return out.view(N, *batch, out_dim)

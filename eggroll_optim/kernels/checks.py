"""Argument checks shared by the kernels: clear errors instead of a crash inside an einsum."""
from __future__ import annotations

import torch

__all__ = ["check_factors", "needs_autograd"]


def check_factors(
    name: str, out_dim: int | None, in_dim: int | None, A_scaled: torch.Tensor, B: torch.Tensor, *tensors
) -> None:
    """Check ``A_scaled (N, out_dim, r)`` and ``B (N, in_dim, r)`` against a weight and inputs
    (``None`` takes the dim from the factors themselves)."""
    if A_scaled.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"{name}: factors must be 3-D, got A_scaled {tuple(A_scaled.shape)}, B {tuple(B.shape)}"
        )
    N, m, r = A_scaled.shape
    out_dim = m if out_dim is None else out_dim
    in_dim = B.shape[1] if in_dim is None else in_dim
    if (m, r) != (out_dim, r) or tuple(B.shape) != (N, in_dim, r):
        raise ValueError(
            f"{name}: expected A_scaled (N, {out_dim}, r) and B (N, {in_dim}, r) with the same N "
            f"and r, got A_scaled {tuple(A_scaled.shape)} and B {tuple(B.shape)}"
        )
    devices = {t.device for t in (A_scaled, B, *tensors) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: tensors are on different devices {sorted(map(str, devices))}")


def needs_autograd(*tensors) -> bool:
    """Grad mode is on and a tensor requires grad (``None`` entries are skipped): a kernel writing its own
    output (which autograd does not see) would cut the graph, so the torch path runs instead."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

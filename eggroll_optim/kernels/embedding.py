"""Perturbed embedding lookup: rows of ``E_i = A_scaled_i B_iᵀ`` for the looked-up indices."""
from __future__ import annotations

import torch

__all__ = ["lowrank_embedding_delta"]


def lowrank_embedding_delta(
    indices: torch.Tensor, A_scaled: torch.Tensor, B: torch.Tensor, shared: bool
) -> torch.Tensor:
    """``E_i[idx] = A_scaled_i[idx] B_iᵀ`` without materialising ``E_i``.

    Args:
        indices: shared ``(*batch)`` or per member ``(N, *batch)`` row indices.
        A_scaled: ``(N, num_embeddings, r)``; B: ``(N, embedding_dim, r)``.
    Returns:
        ``(N, *batch, embedding_dim)``.
    """
    N, _, r = A_scaled.shape
    if shared:
        batch = indices.shape
        rows = A_scaled[:, indices.reshape(-1)]  # (N, M, r)
    else:
        batch = indices.shape[1:]
        rows = torch.gather(A_scaled, 1, indices.reshape(N, -1, 1).expand(-1, -1, r))  # (N, M, r)
    return torch.bmm(rows, B.transpose(1, 2)).view(N, *batch, B.shape[1])

"""Per-member losses and fitness: ``(N, *batch, ...)`` predictions -> ``(N,)``."""
from __future__ import annotations

import torch

from .kernels.fast.xent import fused_cross_entropy_available, member_cross_entropy

__all__ = ["compute_classification_fitness", "per_member_cross_entropy", "per_member_mse"]


def per_member_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per member: logits ``(N, *batch, C)``, labels ``(*batch,)`` shared or
    ``(N, *batch)`` -> ``(N,)``.

    On CUDA without autograd, one Triton pass over the logits (``kernels.fast.xent``); elsewhere
    log-softmax and gather."""
    if logits.dim() < 2 or tuple(labels.shape) not in (tuple(logits.shape[1:-1]), tuple(logits.shape[:-1])):
        raise ValueError(f"per_member_cross_entropy: logits {tuple(logits.shape)} (members, *batch, classes) take "
                         f"labels {tuple(logits.shape[1:-1])} shared by every member or {tuple(logits.shape[:-1])} "
                         f"per member, got labels {tuple(labels.shape)}")
    if logits.is_cuda and logits.dim() >= 2 and labels.dim() in (logits.dim() - 2, logits.dim() - 1):
        N, C = logits.shape[0], logits.shape[-1]
        flat = logits.reshape(N, -1, C)
        flat_labels = labels.reshape(-1) if labels.dim() == logits.dim() - 2 else labels.reshape(N, -1)
        if fused_cross_entropy_available(flat, flat_labels):
            return member_cross_entropy(flat, flat_labels).to(logits.dtype)
    log_probs = torch.log_softmax(logits, dim=-1)
    labels = labels.expand(logits.shape[:-1])
    nll = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (N, *batch)
    return nll.flatten(1).mean(dim=1)


def per_member_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per member: prediction ``(N, *batch, ...)``, target shared or per member."""
    return (prediction - target).square().flatten(1).mean(dim=1)


def compute_classification_fitness(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-cross_entropy`` per member (higher is better): ``(N, B, C)``, ``(B,)`` -> ``(N,)``."""
    return -per_member_cross_entropy(logits, labels)

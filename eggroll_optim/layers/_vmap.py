"""A rule's way out of vmap: a per-member tensor as its physical ``(n, ...)`` tensor, and back."""
from __future__ import annotations

import torch
from torch._C import _functorch

__all__ = ["logical", "physical"]


def physical(x: torch.Tensor, level: int) -> tuple[torch.Tensor, bool]:
    """``(tensor, per_member)``: ``(n, *logical shape)`` when ``x`` carries the member dim of vmap
    ``level``, else ``x`` itself (shared by every member)."""
    if _functorch.is_batchedtensor(x) and _functorch.maybe_get_level(x) == level:
        return _functorch.get_unwrapped(x).movedim(_functorch.maybe_get_bdim(x), 0), True
    return x, False


def logical(t: torch.Tensor, level: int) -> torch.Tensor:
    """A ``(n, ...)`` tensor as vmap ``level``'s per-member tensor."""
    return _functorch._add_batch_dim(t, 0, level)

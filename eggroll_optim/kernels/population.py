"""How an input relates to the population: one input per member, or one input shared by all."""
from __future__ import annotations

import torch

__all__ = ["split_shared"]


def split_shared(
    x: torch.Tensor, population_size: int, sample_dims: int, shared: bool | None = None
) -> tuple[torch.Tensor, bool]:
    """Classify ``x`` and return ``(x, shared)``.

    Per-member input: ``(N, *batch, *sample)``. Shared input: ``(*batch, *sample)``, or the
    stride-0 view ``x.expand(N, ...)``, which is returned as ``x[0]`` so the base product runs once.

    Args:
        x: the input.
        population_size: ``N``, the members in this call (a chunk's size inside a chunk).
        sample_dims: trailing dims that make one sample (1 for linear, 3 for conv2d).
        shared: ``None`` infers: a leading dim equal to ``N`` (with ``x.dim() > sample_dims``)
            means per-member, unless it is a stride-0 expand; anything else is shared.
            ``True``/``False`` forces the choice (``False`` then requires the leading dim ``N``).
    """
    if x.dim() < sample_dims:
        raise ValueError(
            f"Input of shape {tuple(x.shape)} has fewer than the {sample_dims} sample dims expected"
        )
    leading_is_population = x.dim() > sample_dims and x.shape[0] == population_size
    if shared is None:
        shared = not leading_is_population
    if shared:
        if leading_is_population and x.stride(0) == 0:
            x = x[0]
        return x, True
    if not leading_is_population:
        raise ValueError(
            f"Per-member input must have leading dim N={population_size}, got shape {tuple(x.shape)}"
        )
    if x.stride(0) == 0:
        return x[0], True
    return x, False

"""Perturbed convolution through the factorised low-rank path (SPEC §3).

A kernel ``(C_out, C_in/groups, *k)`` is the matrix ``(C_out, C_in/groups * prod(k))``, so
``conv(x, A_scaled_i B_iᵀ)`` is a conv with the ``r`` filters of ``B_i`` (reshaped to
``(r, C_in/groups, *k)``, applied to every group) followed by a 1×1 mix with ``A_scaled_i``.
Per output pixel that costs ``O(r (C_in k^d + C_out))`` instead of ``O(C_out C_in k^d)`` and no
per-member kernel is ever built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_factors
from .population import split_shared

__all__ = ["lowrank_conv_delta", "perturbed_conv"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _lowrank_features(x, B, weight_shape, shared, conv_args):
    """``z = conv(x_i, filters of B_i)`` per group: shared ``(Bt, g, N, r, *S)``, else ``(Bt, N, g, r, *S)``."""
    N, _, r = B.shape
    C_out, Cg, *k = weight_shape
    groups = conv_args["groups"]
    conv = _CONV[len(k)]
    filters = B.transpose(1, 2).reshape(N, 1, r, Cg, *k).expand(N, groups, r, Cg, *k)
    if shared:  # x: (Bt, C_in, *S); one conv with g * N * r filters, group-major
        weight = filters.transpose(0, 1).reshape(groups * N * r, Cg, *k)
        z = conv(x, weight, None, **conv_args)
        return z.view(x.shape[0], groups, N, r, *z.shape[2:])
    Bt = x.shape[1]  # x: (N, Bt, C_in, *S) -> (Bt, N * C_in, *S), one group per (member, group)
    xg = x.transpose(0, 1).reshape(Bt, N * x.shape[2], *x.shape[3:])
    args = dict(conv_args, groups=N * groups)
    z = conv(xg, filters.reshape(N * groups * r, Cg, *k), None, **args)
    return z.view(Bt, N, groups, r, *z.shape[2:])


def lowrank_conv_delta(x, weight_shape, A_scaled, B, conv_args: dict, shared: bool) -> torch.Tensor:
    """``conv(x_i, A_scaled_i B_iᵀ)`` alone -> ``(N, Bt, C_out, *S_out)``.

    ``x`` is shared ``(Bt, C_in, *S)`` or per member ``(N, Bt, C_in, *S)`` as ``shared`` says;
    ``conv_args`` holds ``stride, padding, dilation, groups``.
    """
    N, C_out, r = A_scaled.shape
    groups = conv_args["groups"]
    z = _lowrank_features(x, B, weight_shape, shared, conv_args)
    A = A_scaled.view(N, groups, C_out // groups, r)
    spec = "ngor,bgnr...->nbgo..." if shared else "ngor,bngr...->nbgo..."
    return torch.einsum(spec, A, z).flatten(2, 3)  # (N, Bt, C_out, *S_out)


def perturbed_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_scaled: torch.Tensor,
    B: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    shared: bool | None = None,
) -> torch.Tensor:
    """``conv(x_i, W + A_scaled_i B_iᵀ) + b`` for every member, for 1-D, 2-D and 3-D convs.

    Args:
        x: per member ``(N, Bt, C_in, *S)``, or shared ``(Bt, C_in, *S)`` (or its stride-0 expand).
        weight: ``(C_out, C_in/groups, *k)``; bias ``(C_out,)`` or ``None``.
        A_scaled: ``(N, C_out, r)``; B: ``(N, C_in/groups * prod(k), r)``.
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv{1,2,3}d``
            (string padding such as ``"same"`` works too).
    Returns:
        ``(N, Bt, C_out, *S_out)``.
    """
    d = weight.dim() - 2
    if d not in _CONV:
        raise ValueError(f"perturbed_conv: weight must be 3-D to 5-D, got {tuple(weight.shape)}")
    C_out, Cg, *k = weight.shape
    if groups < 1 or C_out % groups:
        raise ValueError(f"perturbed_conv: groups={groups} must divide C_out={C_out}")
    check_factors("perturbed_conv", C_out, Cg * weight[0, 0].numel(), A_scaled, B, x, weight)
    N = A_scaled.shape[0]
    x, shared = split_shared(x, N, d + 2, shared)  # a "sample" is a whole (Bt, C, *S) batch
    if x.dim() != d + (2 if shared else 3):
        raise ValueError(
            f"perturbed_conv: expected input (Bt, C, *S) or (N={N}, Bt, C, *S) with {d} spatial "
            f"dims, got {tuple(x.shape)}"
        )
    if x.shape[-d - 1] != Cg * groups:
        raise ValueError(
            f"perturbed_conv: input has {x.shape[-d - 1]} channels, weight {tuple(weight.shape)} with "
            f"groups={groups} expects {Cg * groups}; got input shape {tuple(x.shape)}"
        )
    conv_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    conv = _CONV[d]
    if shared:
        base = conv(x, weight, bias, **conv_args).unsqueeze(0)  # (1, Bt, C_out, *S)
    else:
        base = conv(x.flatten(0, 1), weight, bias, **conv_args)
        base = base.view(N, x.shape[1], *base.shape[1:])  # (N, Bt, C_out, *S)
    A_scaled, B = A_scaled.to(x.dtype), B.to(x.dtype)  # float32 noise may serve half-precision weights
    return base + lowrank_conv_delta(x, weight.shape, A_scaled, B, conv_args, shared)

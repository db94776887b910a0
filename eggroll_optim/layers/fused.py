"""The one dispatch point to the fused kernels, and the vmap escape they need.

A rule's forward sees one member (vmap's logical view). A fused kernel wants the whole chunk at
once: ``physical`` turns a logical tensor into ``(n, ...)`` (or reports it shared: no member dim)
and ``logical`` hands a ``(n, ...)`` result back to vmap. These use ``torch._C._functorch``, the
functions ``torch.func`` is built on; they are the only private torch API in the package.

Fused paths (``fused=`` of ``EggrollOptimizer``: ``None`` uses them where they apply, ``True``
insists and raises where they cannot run, ``False`` never uses them):

- ``nn.Sequential(Linear, Tanh|ReLU, Linear)`` blocks run through ``kernels.fast.perturbed_mlp``
  (one Triton kernel on CUDA with the hidden layer kept on chip; cache-sized member chunks for a
  shared CPU batch). Elsewhere the block runs layer by layer through the Linear rule: the same
  numbers up to rounding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch._C import _functorch

from ..kernels.fast import mlp_block_activation, mlp_fast_path, perturbed_mlp
from .linear import linear_forward

__all__ = ["logical", "mlp_block_forward", "mlp_block_names", "physical"]


def physical(x: torch.Tensor, level: int) -> tuple[torch.Tensor, bool]:
    """``(tensor, per_member)``: ``(n, *logical shape)`` when ``x`` carries the member dim of vmap
    ``level``, else ``x`` itself (shared by every member)."""
    if _functorch.is_batchedtensor(x) and _functorch.maybe_get_level(x) == level:
        return _functorch.get_unwrapped(x).movedim(_functorch.maybe_get_bdim(x), 0), True
    return x, False


def logical(t: torch.Tensor, level: int) -> torch.Tensor:
    """A ``(n, ...)`` tensor as vmap ``level``'s per-member tensor."""
    return _functorch._add_batch_dim(t, 0, level)


def mlp_block_names(block: nn.Sequential) -> tuple[str, ...]:
    return ("0.weight", "2.weight")


def _layer(call, linear: nn.Linear):
    """``(W, None, factors)`` and the bias ``(n, out)`` per member (or ``None``); ``factors`` is the chunk's
    ``noise.Pairs`` as it is, so the fused kernel can work per antithetic pair."""
    factors = call.chunk_factors(linear.weight)
    bias = linear.bias
    if bias is not None:
        bias, per_member = physical(bias, call.level)
        bias = bias if per_member else bias.expand(factors[0].shape[0], -1)
    return (linear.weight, None, factors), bias


def _fast_input(call, block, x):
    """``(x2, shared, unbatched)`` in ``perturbed_mlp``'s layout, or ``None`` where it cannot run."""
    if call.chunk_factors(block[0].weight) is None or call.chunk_factors(block[2].weight) is None:
        return None
    xp, per_member = physical(x, call.level)
    if xp.dtype != block[0].weight.dtype or _functorch.is_batchedtensor(xp):
        return None
    if per_member:
        x2 = xp.reshape(xp.shape[0], -1, xp.shape[-1])
    else:
        x2 = xp.reshape(-1, xp.shape[-1])
    if x2.shape[-2] == 0 or not mlp_fast_path(x2, block[0].out_features, not per_member):
        return None  # (mlp_fast_path holds the kernel's limits: dtype, device, hidden width)
    return x2, not per_member


def mlp_block_forward(call, block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    fast = _fast_input(call, block, x) if call.fused is not False else None
    if fast is None:
        if call.fused is True:
            raise RuntimeError(f"fused=True, but the fused MLP kernel cannot run this block on an input of "
                               f"{x.dtype} on {x.device} (it needs float32 on CUDA with Triton, or a shared CPU batch)")
        h = block[1](linear_forward(call, block[0], x))
        return linear_forward(call, block[2], h)
    x2, shared = fast
    call.fired.update((block[0], block[2]))
    layer1, b1 = _layer(call, block[0])
    layer2, b2 = _layer(call, block[2])
    out = perturbed_mlp(x2, layer1, layer2, mlp_block_activation(block), shared, (b1, b2))  # (n, M, out)
    n = out.shape[0]
    return logical(out.view(n, *x.shape[:-1], out.shape[-1]), call.level)

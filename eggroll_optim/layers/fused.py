"""The fused MLP block's dispatch to its kernels.

A rule's forward sees one member (vmap's logical view). A fused kernel wants the whole chunk at
once: ``_vmap.physical`` turns a logical tensor into ``(n, ...)`` (or reports it shared: no member
dim) and ``_vmap.logical`` hands a ``(n, ...)`` result back to vmap. These and this module's level
checks use ``torch._C._functorch``, the functions ``torch.func`` is built on (with the global module
hook tables that ``layers.sequential`` reads, the package's private torch API).

Fused paths (``fused=`` of ``EggrollOptimizer``: ``None`` uses them where they apply, ``True``
insists and raises where they cannot run, ``False`` never uses them):

- ``nn.Sequential(Linear, Tanh|ReLU, Linear)`` blocks run through ``kernels.fast.perturbed_mlp``
  (one Triton kernel on CUDA with the hidden layer kept on chip; ``kernels.cpu_mlp`` for a float32
  or float64 CPU input, shared or per member). Elsewhere the block runs layer by layer through the
  Linear rule: the same numbers up to rounding.
- A 2-D conv without groups on a per-member input runs through ``kernels.fast.conv`` with each member's
  own kernel (``layers.linear.conv_forward``), and a ``Sequential``'s ``Conv2d → ReLU → MaxPool2d(2)``
  windows on any input through the same kernel with the ReLU and pooling fused (``layers.sequential``);
  with ``fused=None`` or ``True``, both fall back to the modules under vmap where the kernel does not apply.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch._C import _functorch

from ..kernels.fast import mlp_block_activation, mlp_fast_path, perturbed_mlp
from ..noise import Pairs
from ._vmap import logical, physical
from .linear import linear_forward

__all__ = ["logical", "mlp_block_forward", "mlp_block_names", "mlp_block_whole", "physical"]


def mlp_block_names(block: nn.Sequential) -> tuple[str, ...]:
    return ("0.weight", "2.weight")


def _bias(call, linear: nn.Linear) -> torch.Tensor | None:
    """The layer's bias: per member ``(n, out)`` where it is evolved, else the shared ``(out,)``; or ``None``."""
    return None if linear.bias is None else physical(linear.bias, call.level)[0]


def _layers(first, second, factors, biases, paired1=None) -> tuple:
    """``perturbed_mlp``'s two layers and bias noise. ``biases``: each layer's per-member ``(n, out)`` (evolved),
    shared ``(out,)`` or ``None``. On CUDA a shared bias is the layer's; elsewhere (the CPU kernels keep their
    numbers) it is per-member noise over no bias, as an evolved one is. ``paired1``: ``(b1, PairedNoise)`` of
    layer 1's evolved bias, given where the pair kernel can take it (a root block, a shared input): with
    ``Pairs`` in both layers on CUDA it replaces layer 1's per-member bias, and the kernel keeps one layer-1
    product per antithetic pair."""
    cuda = first.weight.is_cuda
    n = factors[0][0].shape[0]
    layers, noise = [], []
    for linear, f, bias in zip((first, second), factors, biases):
        shared = bias is not None and bias.dim() == 1
        layers.append((linear.weight, bias if shared and cuda else None, f))
        noise.append(None if shared and cuda else bias.expand(n, -1) if shared else bias)
    if paired1 is not None and cuda and isinstance(factors[0], Pairs) and isinstance(factors[1], Pairs):
        layers[0], noise[0] = (first.weight, paired1[0], factors[0]), paired1[1]
    return layers, tuple(noise)


def _fast_input(first: nn.Linear, xp: torch.Tensor, per_member: bool):
    """``(x2, shared)`` in ``perturbed_mlp``'s layout for the physical input ``xp`` (``(n, ...)`` per member,
    else shared), or ``None`` where it cannot run."""
    if xp.dtype != first.weight.dtype or _functorch.is_batchedtensor(xp):
        return None
    if per_member:
        x2 = xp.reshape(xp.shape[0], -1, xp.shape[-1])
    else:
        x2 = xp.reshape(-1, xp.shape[-1])
    if x2.shape[-2] == 0 or not mlp_fast_path(x2, first.out_features, not per_member):
        return None  # (mlp_fast_path holds the kernel's limits: dtype, device, hidden width)
    return x2, not per_member


def _run_block(block, first, second, factors, x2, shared, biases, paired1, fired) -> torch.Tensor:
    """``perturbed_mlp`` on the block: ``(n, M, out)``; ``biases`` and ``paired1`` as ``_layers`` reads them."""
    fired.update((first, second))
    layers, bias_noise = _layers(first, second, factors, biases, paired1)
    return perturbed_mlp(x2, *layers, mlp_block_activation(block), shared, bias_noise)


def mlp_block_whole(chunk, block: nn.Sequential, x: torch.Tensor, per_member: bool, fused: bool | None):
    """The root block for the whole chunk without vmap (``hooks.run_members`` asks first): ``x`` is
    the chunk's rows ``(n, ...)`` of a per-member input, or a shared input. ``(n, *batch, out)``, or
    ``None`` where the fused path cannot run (then the block runs under vmap)."""
    first, _, second = block
    factors = chunk.factors.get(first.weight), chunk.factors.get(second.weight)
    if fused is False or None in factors:
        return None
    fast = _fast_input(first, x, per_member)
    if fast is None:
        return None
    n = factors[0][0].shape[0]
    biases = tuple(chunk.values.get(layer.bias, layer.bias) if layer.bias is not None else None
                   for layer in (first, second))
    # layer 1's evolved bias's noise in pairs, where the pair kernel can take it (a shared input)
    offsets = chunk.offsets.get(first.bias) if first.bias is not None and fast[1] else None
    paired1 = None if offsets is None else (first.bias, offsets)
    out = _run_block(block, first, second, factors, *fast, biases, paired1, chunk.fired)
    return out.view(n, *(x.shape[1:-1] if per_member else x.shape[:-1]), out.shape[-1])


@contextlib.contextmanager
def _outside(level: int):
    """Run the fused block below vmap ``level`` (when it is the innermost transform): it works on
    unwrapped tensors (``physical``), and every op would otherwise pass through vmap's dispatch (a few
    µs each, a sizeable part of the per-member CPU path at one row per member)."""
    if _functorch.current_level() != level:
        yield
        return
    saved = _functorch.pop_dynamic_layer_stack()
    try:
        yield
    finally:
        _functorch.push_dynamic_layer_stack(saved)


def _fused_forward(call, block: nn.Sequential, first: nn.Linear, second: nn.Linear, factors: tuple, x):
    """The block through ``perturbed_mlp`` inside vmap: ``(n, M, out)``, or ``None`` where it cannot run."""
    fast = _fast_input(first, *physical(x, call.level))
    if fast is None:
        return None
    biases = tuple(_bias(call, layer) for layer in (first, second))
    # no paired bias noise here: under vmap ``first.bias`` is the member's swapped-in value, not the
    # parameter the chunk keys its noise by (a root block runs without vmap: ``mlp_block_whole``)
    return _run_block(block, first, second, factors, *fast, biases, None, call.fired)


def mlp_block_forward(call, block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    first, _, second = block  # unpacked once (Sequential's indexing is slow next to a small kernel)
    factors = call.chunk_factors(first.weight), call.chunk_factors(second.weight)
    if call.fused is not False and None not in factors:
        with _outside(call.level):
            out = _fused_forward(call, block, first, second, factors, x)
        if out is not None:
            return logical(out.view(out.shape[0], *x.shape[:-1], out.shape[-1]), call.level)
    if call.fused is True:
        raise RuntimeError(f"fused=True, but the fused MLP kernel cannot run this block on an input of "
                           f"{x.dtype} on {x.device} (it needs float32 on CUDA with Triton, or float32/float64 on CPU, "
                           f"in the weights' dtype)")
    h = block[1](linear_forward(call, first, x))
    return linear_forward(call, second, h)

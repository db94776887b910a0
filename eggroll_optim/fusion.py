"""Fused hooks for ``nn.Sequential(Linear, Tanh | ReLU, Linear)`` blocks.

When a population is active on CUDA, the block's pre-hook runs the whole block for every member
in one fused kernel (``kernels.fast.perturbed_mlp``: the hidden activations never reach device
memory), hands the inner layers an empty batch so they do no work, and its forward hook returns
the fused result. Anywhere the kernel does not apply (CPU, other dtypes, wide layers), the block
runs layer by layer through the ordinary hooks, which compute the same numbers.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

from .hooks import IDLE, idle_error
from .kernels.fast import mlp_block_activation, mlp_fast_path, perturbed_mlp

__all__ = ["find_mlp_blocks", "install_mlp_hooks"]

def find_mlp_blocks(module: nn.Module, evolved: set) -> list[nn.Sequential]:
    """Every ``nn.Sequential(Linear, Tanh|ReLU, Linear)`` in ``module`` whose two weights are evolved."""
    return [
        sub for sub in module.modules()
        if mlp_block_activation(sub) is not None and sub[0].weight in evolved and sub[2].weight in evolved
    ]


def _layer(chunk, linear: nn.Linear):
    A_scaled, B = chunk.noise[linear.weight]
    bias_noise = chunk.noise.get(linear.bias) if linear.bias is not None else None
    return (linear.weight, linear.bias, A_scaled, B), bias_noise


def _pre_hook(switch, block, args):
    chunk = switch.chunk
    if chunk is None:
        return None
    if chunk is IDLE:
        raise idle_error()
    first, _, second = block
    x = args[0]
    shared = chunk.shared(x, 1)
    if shared and x.dim() > 1 and x.shape[0] == chunk.size and x.stride(0) == 0:
        x = x[0]
    lead = x.shape[:-1] if shared else x.shape[1:-1]
    x2 = x.reshape(-1, x.shape[-1]) if shared else x.reshape(chunk.size, -1, x.shape[-1])
    if x2.shape[-2] == 0 or not mlp_fast_path(x2, first.out_features, shared) or x2.dtype != first.weight.dtype:
        return None
    chunk.pending[block] = (x2, shared, lead)
    chunk.bypass.update((first, second))
    return (x2.new_empty(0, x2.shape[-1]), *args[1:])


def _post_hook(switch, block, args, output):
    chunk = switch.chunk
    if chunk is None or chunk is IDLE or block not in chunk.pending:
        return None
    first, _, second = block
    x2, shared, lead = chunk.pending.pop(block)
    chunk.bypass.difference_update((first, second))
    chunk.fired.update((first, second))
    layer1, noise1 = _layer(chunk, first)
    layer2, noise2 = _layer(chunk, second)
    out = perturbed_mlp(x2, layer1, layer2, mlp_block_activation(block), shared, (noise1, noise2))
    return out.view(chunk.size, *lead, out.shape[-1])


def install_mlp_hooks(blocks, switch) -> list:
    """Register the fused hooks on each block; returns the ``RemovableHandle``s."""
    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(partial(_pre_hook, switch)))
        handles.append(block.register_forward_hook(partial(_post_hook, switch)))
    return handles


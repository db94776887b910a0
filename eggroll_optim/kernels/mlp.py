"""A population through ``Linear -> activation -> Linear``, in plain torch: the reference.

Every member ``i`` computes ``h_i = act(x W1ᵀ + b1 + (x B1_i) A1_iᵀ)`` and
``y_i = h_i W2ᵀ + b2 + (h_i B2_i) A2_iᵀ``, as two perturbed linear kernels and the activation.
The faster paths (``kernels.cpu_mlp`` for a shared CPU batch, the Triton kernels of
``kernels.fast.mlp`` on CUDA) compute the same numbers up to rounding and are tested against it.
"""
from __future__ import annotations

import torch

from . import linear  # a module reference: linear imports kernels.fast, which imports this module

__all__ = ["ACTIVATIONS", "mlp_layer", "perturbed_mlp_reference"]

# in place: the reference applies them to a tensor it has just created (no fresh allocation)
ACTIVATIONS = {"tanh": torch.tanh_, "relu": torch.relu_, "identity": lambda h: h}


def mlp_layer(layer: tuple) -> tuple:
    """``(W, b, factors)`` of a layer given as ``(W, b, factors)`` or flat as ``(W, b, A_scaled, B)``.

    ``W (out, in)``, ``b (out,)`` or ``None``; ``factors`` a ``noise.Pairs`` (the kernels then work per
    antithetic pair where they can) or any ``(A_scaled (N, out, r), B (N, in, r))``; the flat form is
    the latter."""
    if len(layer) == 4:
        W, b, A_scaled, B = layer
        return W, b, (A_scaled, B)
    if len(layer) == 3:
        return tuple(layer)
    raise ValueError(f"An MLP layer is (W, b, factors) or (W, b, A_scaled, B), got {len(layer)} items")


def _with_noise(out: torch.Tensor, bias_noise) -> torch.Tensor:
    if bias_noise is None:
        return out
    if not isinstance(bias_noise, torch.Tensor):  # a noise.PairedNoise
        bias_noise = bias_noise.members()
    return out + bias_noise.view(bias_noise.shape[0], 1, -1)


def perturbed_mlp_reference(x, layer1, layer2, activation="tanh", shared=True, bias_noise=(None, None)):
    """Plain torch: layers as ``mlp_layer`` reads them; ``x`` shared ``(M, in)`` or per member
    ``(N, M, in)`` -> ``(N, M, out)``; ``bias_noise`` optional ``(N, hidden)``, ``(N, out)`` (or ``PairedNoise``)."""
    W1, b1, (A1, B1) = mlp_layer(layer1)
    W2, b2, (A2, B2) = mlp_layer(layer2)
    h = _with_noise(linear.perturbed_linear(x, W1, b1, A1, B1, shared=shared), bias_noise[0])
    h = ACTIVATIONS[activation](h)
    return _with_noise(linear.perturbed_linear(h, W2, b2, A2, B2, shared=False), bias_noise[1])

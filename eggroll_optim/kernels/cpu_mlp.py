"""A population through ``Linear -> activation -> Linear`` with a shared input, on CPU.

Same numbers as ``perturbed_mlp_reference`` (up to float rounding), several times faster for a
shared input. Every member ``i`` computes
``h_i = act(x W1ᵀ + b1 + (x B1_i) A1_iᵀ + bn1_i)`` and ``y_i = h_i W2ᵀ + b2 + (h_i B2_i) A2_iᵀ + bn2_i``.

* ``x W1ᵀ + b1`` is computed once; ``x B1_i`` for every member is a few large GEMMs.
* Members go through in chunks whose ``(chunk, M, hidden)`` activations stay in cache: one batched
  GEMM writes the pre-activations into a reused buffer, the activation runs in place, and one
  batched GEMM against ``W2 + A2_i B2_iᵀ`` (built per chunk, ``(out, hidden)`` per member) reads
  them back into a transposed ``(N, out, M)`` result. The full ``(N, M, hidden)`` tensor never exists.
* ``tanh(z) = 2 (sigmoid(2z) - 1/2)``: torch's CPU ``sigmoid`` is several times faster than its
  ``tanh``. Both factors 2 are exact: the inner one is the first GEMM's ``alpha``/``beta``, the
  outer one scales the second layer's weights. ``sigmoid(2z) - 1/2`` is exact where sigmoid >= 1/4
  (Sterbenz) and adds at most half an ulp of 1/2 elsewhere, so the extra error is an absolute ~6e-8
  on ``h`` in float32 (not relative: tiny ``|z|`` lose relative precision); saturation gives
  exactly ``±1``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .mlp import ACTIVATIONS, mlp_layer, perturbed_mlp_reference

__all__ = ["perturbed_mlp_cpu"]

# bytes of one chunk's working block (hidden activations, or copied B1): about the L2 of two cores
_CHUNK_BYTES = 2 << 20


def _half_tanh_(g: torch.Tensor) -> torch.Tensor:
    """In place ``g <- sigmoid(g) - 1/2``; with ``g = 2z`` this is ``tanh(z) / 2``."""
    return torch.sigmoid_(g).sub_(0.5)


# activation -> (scale, fn, gain): act(z) = gain * fn(scale * z), fn in place (None: identity)
_ACT_FORMS: dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor] | None, float]] = {
    "tanh": (2.0, _half_tanh_, 2.0),
    "relu": (1.0, torch.relu_, 1.0),
    "identity": (1.0, None, 1.0),
}


def _chunk(n: int, bytes_per_member: int) -> int:
    """Members per chunk so one chunk's block is about ``_CHUNK_BYTES`` (at least 1, at most ``n``)."""
    return max(1, min(n, _CHUNK_BYTES // max(1, bytes_per_member)))


def _project_t(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(x B_i)ᵀ`` for every member: ``x (M, in)``, ``B (N, in, r)`` -> ``(N, r, M)`` contiguous.

    One GEMM per chunk of members, against that chunk of ``B`` copied to ``(chunk * r, in)``.
    """
    N, D, r = B.shape
    M = x.shape[0]
    out = x.new_empty(N, r, M)
    step = _chunk(N, D * r * x.element_size())
    for n0 in range(0, N, step):
        Bc = B[n0:n0 + step].transpose(1, 2).reshape(-1, D)
        torch.mm(Bc, x.t(), out=out[n0:n0 + step].view(-1, M))
    return out


def _layer1_factors(x, B1, A1, bn1) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of layer 1: ``(x B1_i)ᵀ (N, r', M)`` and ``A1 (N, hidden, r')``.

    ``bn1 (N, hidden)`` rides along as one more rank (a row of ones against the noise), so the
    per-chunk GEMM adds it for free; ``r' = r`` without it, ``r + 1`` with it.
    """
    xBt = _project_t(x, B1)
    if bn1 is None:
        return xBt, A1
    ones = xBt.new_ones(xBt.shape[0], 1, xBt.shape[2])
    return torch.cat([xBt, ones], 1), torch.cat([A1, bn1.unsqueeze(2).to(A1.dtype)], 2)


def _layer2_offset(b2, bn2, N: int, W2: torch.Tensor) -> torch.Tensor:
    """``b2 + bn2_i`` as ``(N, out, 1)`` (zeros where both are ``None``)."""
    offset = W2.new_zeros(N, W2.shape[0])
    if b2 is not None:
        offset += b2
    if bn2 is not None:
        offset += bn2
    return offset.unsqueeze(2)


def _needs_autograd(x, layer1, layer2, bias_noise) -> bool:
    tensors = (x, *layer1[:2], *layer1[2], *layer2[:2], *layer2[2], *bias_noise)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def perturbed_mlp_cpu(x, layer1, layer2, activation="tanh", shared=True, bias_noise=(None, None)) -> torch.Tensor:
    """``Linear -> activation -> Linear`` for every member, chunked for the CPU's caches.

    Args:
        x: shared input ``(*batch, in)`` (``shared=True``) or per member ``(N, *batch, in)``.
        layer1, layer2: ``(W, b, factors)`` or ``(W, b, A_scaled, B)`` (``kernels.mlp.mlp_layer``), with
            ``W (out, in)``, ``b (out,)`` or ``None``, ``A_scaled (N, out, r)``, ``B (N, in, r)``.
        activation: ``"tanh"``, ``"relu"`` or ``"identity"``.
        bias_noise: optional full-rank bias noise ``((N, hidden) or None, (N, out) or None)``.
    Returns:
        ``(N, *batch, out2)``, contiguous. A per-member input, or any tensor requiring grad while
        grad is enabled (the chunked path writes into buffers), goes to ``perturbed_mlp_reference``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    layer1, layer2 = mlp_layer(layer1), mlp_layer(layer2)
    if not shared or _needs_autograd(x, layer1, layer2, bias_noise):
        return perturbed_mlp_reference(x, layer1, layer2, activation, shared, bias_noise)
    W1, b1, (A1, B1) = layer1
    W2, b2, (A2, B2) = layer2
    dtype, (N, H, _), O = x.dtype, A1.shape, W2.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    scale, act, gain = _ACT_FORMS[activation]
    base = F.linear(x2, W1, b1)  # (M, H)
    xBt, A1 = _layer1_factors(x2, B1.to(dtype), A1.to(dtype), bias_noise[0])  # (N, r', M), (N, H, r')
    A1t, A2, B2t = A1.transpose(1, 2), A2.to(dtype), B2.to(dtype).transpose(1, 2)  # (N, r', H), _, (N, r, H)
    offset = _layer2_offset(b2, bias_noise[1], N, W2)  # (N, O, 1)
    out_t = x2.new_empty(N, O, M)
    step = _chunk(N, M * H * x2.element_size())
    g_buf, w_buf = x2.new_empty(step, M, H), x2.new_empty(step, O, H)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        g, w = g_buf[:n1 - n0], w_buf[:n1 - n0]
        # g = fn(scale (x W1ᵀ + b1 + (x B1_i) A1_iᵀ + bn1_i)), so h_i = gain g
        torch.baddbmm(base.expand_as(g), xBt[n0:n1].transpose(1, 2), A1t[n0:n1], beta=scale, alpha=scale, out=g)
        if act is not None:
            act(g)
        # y_iᵀ = gain (W2 + A2_i B2_iᵀ) gᵀ + b2 + bn2_i
        torch.baddbmm(W2.expand_as(w), A2[n0:n1], B2t[n0:n1], beta=gain, alpha=gain, out=w)
        torch.baddbmm(offset[n0:n1].expand(-1, O, M), w, g.transpose(1, 2), out=out_t[n0:n1])
    return out_t.transpose(1, 2).contiguous().view(N, *x.shape[:-1], O)

"""Rules for layers whose weight is one matrix: Linear, Conv, ConvTranspose, Embedding.

Each ``*_forward(call, module, ...)`` computes one member's output: the layer's own op with its
own (shared) weight, plus the low-rank term of ``E_i = A_i B_iᵀ`` computed through the factors,
never through ``E_i``:

- Linear: ``x Wᵀ + b + (x B_i) A_iᵀ``: ``O(r (in + out))`` a row.
- Conv (``W (C_out, C_in/g, *k)`` as the matrix ``(C_out, C_in/g · prod k)``): a conv with the ``r``
  filters of ``B_i`` (the same filters in every group) then a 1×1 grouped conv with ``A_i``:
  ``O(r (C_in/g · prod k + C_out))`` a pixel instead of ``O(C_out · C_in/g · prod k)``.
- ConvTranspose (``W (C_in, C_out/g, *k)`` as ``(C_in, C_out/g · prod k)``): a 1×1 grouped mix with
  ``A_iᵀ`` down to ``r`` channels a group, then a transposed conv with the filters of ``B_i``.
- Embedding: ``W[idx] + A_i[idx] B_iᵀ``.

Under vmap an input without the member dim (a shared batch) gives one base product for all members.
A bias with per-member noise arrives as a per-member tensor and is added after the shared product,
so the product itself stays shared.

The one place a member's ``W + E_i`` is formed: a 2-D conv on a per-member input with Triton
(``dense_conv2d``), where the base conv is per member anyway and the member's kernel is small
(``C_out · C_in · prod k`` numbers, built once a chunk); the conv then costs its base products alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch._C import _functorch

from ..kernels.fast.conv import (conv2d_members, conv2d_members_fits, conv2d_members_size, lowrank_conv2d_fits,
                                 lowrank_conv2d_members)
from ._vmap import logical, physical

__all__ = [
    "check_conv", "check_embedding", "conv_forward", "conv_transpose_forward", "dense_conv2d", "embedding_forward",
    "linear_forward", "lowrank_linear_term",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def lowrank_linear_term(x: torch.Tensor, factors) -> torch.Tensor | None:
    """``(x B_i) A_iᵀ``: ``x (*, in)`` -> ``(*, out)``; ``None`` without factors."""
    if factors is None:
        return None
    A, B = factors  # (out, r), (in, r)
    return (x @ B.to(x.dtype)) @ A.to(x.dtype).T


def _plus(out: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
    return out if term is None else out + term


def linear_forward(call, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = _plus(F.linear(x, module.weight), module.bias)
    return _plus(out, lowrank_linear_term(x, call.factors(module.weight)))


def _channel_bias(bias: torch.Tensor | None, spatial: int) -> torch.Tensor | None:
    return None if bias is None else bias.view(-1, *([1] * spatial))  # (C, 1, ..., 1)


def _padded(module, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Apply a non-zero ``padding_mode`` as the layer does; returns ``(x, padding for the conv)``."""
    if module.padding_mode == "zeros":
        return x, module.padding
    return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), 0


def conv_forward(call, module, x: torch.Tensor) -> torch.Tensor:
    spatial = module.weight.dim() - 2
    conv = _CONV[spatial]
    xp, padding = _padded(module, x)
    factors = call.factors(module.weight)
    if factors is not None:  # a per-member input: its own kernel per member, no base conv (kernels.fast.conv)
        dense = dense_conv2d(call, module, xp, padding, shared=False)
        if dense is not None:
            return dense
    args = dict(stride=module.stride, padding=padding, dilation=module.dilation)
    out = conv(xp, module.weight, None, groups=module.groups, **args)
    out = _plus(out, _channel_bias(module.bias, spatial))
    if factors is None:
        return out
    fast = _lowrank_conv2d(call, module, xp, out, padding)
    if fast is not None:
        return fast
    A, B = factors  # (C_out, r), (C_in/g * prod k, r)
    z = conv(xp, _group_filters(B.to(x.dtype), module), None, groups=module.groups, **args)  # (Bt, g r, *S_out)
    return out + _channel_mix(z, A.to(x.dtype), module.groups, spatial)  # output o of group j: z[j r : j r + r]


def dense_conv2d(call, module: nn.Conv2d, x: torch.Tensor, padding=None, relu: bool = False, pool: bool = False,
                 shared: bool = True) -> torch.Tensor | None:
    """The chunk's ``conv(x_i, W + A_i B_iᵀ) + b_i``, then ``relu`` and a 2×2 max-pool if asked, by
    ``kernels.fast.conv.conv2d_members`` outside vmap (``padding``: the conv's, after ``_padded``). ``None``
    where it does not apply: ``fused=False``, a layer without factors, an input that is not a batch of
    images, one shared by the members where ``shared`` is false, or outside the kernel's case."""
    if call.fused is False or module.weight.dim() != 4 or x.dim() != 4:
        return None
    factors = call.chunk_factors(module.weight)
    xs, per_member = physical(x, call.level)
    bias = None if module.bias is None else physical(module.bias, call.level)[0]
    if factors is None or not (per_member or shared) or any(
            t is not None and _functorch.is_batchedtensor(t) for t in (xs, bias)):
        return None  # (still batched: the member dim of an outer vmap)
    A, B = factors
    padding = module.padding if padding is None else padding
    if not conv2d_members_fits(xs, per_member, module.weight, module.groups, padding, A, B, bias):
        return None
    if min(conv2d_members_size(*x.shape[-2:], module.weight, module.stride, padding, module.dilation, pool)) < 1:
        return None  # too small: the modules raise torch's own error
    out = conv2d_members(xs, per_member, module.weight, A, B, bias, module.stride, padding, module.dilation,
                         relu, pool)
    return logical(out, call.level)


def _lowrank_conv2d(call, module, x: torch.Tensor, out: torch.Tensor, padding) -> torch.Tensor | None:
    """``out + conv(x_i, A_i B_iᵀ)`` by ``kernels.fast.conv.lowrank_conv2d_members`` on the whole chunk, outside
    vmap, where ``dense_conv2d`` did not apply but this does (a per-member input of a 2-D conv without groups,
    ``fused`` not ``False``: chunks whose dense kernels are too large); else ``None``."""
    if call.fused is False or module.weight.dim() != 4:
        return None
    xs, per_member = physical(x, call.level)
    A, B = call.chunk_factors(module.weight)  # (n, C_out, r), (n, C_in k_h k_w, r)
    base, _ = physical(out, call.level)  # per member where the input is
    if not per_member or not lowrank_conv2d_fits(xs, module.weight, module.groups, padding, A.shape[-1], base, A, B):
        return None
    summed = lowrank_conv2d_members(xs, base, A, B, module.kernel_size, module.stride, padding, module.dilation)
    return logical(summed, call.level)


def conv_transpose_forward(call, module, x: torch.Tensor, output_size=None) -> torch.Tensor:
    spatial = module.weight.dim() - 2
    conv_t = _CONV_T[spatial]
    output_padding = module._output_padding(
        x, output_size, module.stride, module.padding, module.kernel_size, spatial, module.dilation
    )
    args = dict(stride=module.stride, padding=module.padding, output_padding=output_padding,
                dilation=module.dilation)
    out = conv_t(x, module.weight, None, groups=module.groups, **args)
    out = _plus(out, _channel_bias(module.bias, spatial))
    factors = call.factors(module.weight)
    if factors is None:
        return out
    A, B = factors  # (C_in, r), (C_out/g * prod k, r)
    u = _group_mix(x, A.to(x.dtype), module.groups, spatial)  # (Bt, g r, *S): group j's channels mixed by A
    return out + conv_t(u, _group_filters(B.to(x.dtype), module), None, groups=module.groups, **args)


def _group_filters(B: torch.Tensor, module) -> torch.Tensor:
    """The ``r`` filters of ``B ((weight.shape[1] · prod k), r)`` shaped like the layer's kernel and repeated
    for each of its ``g`` groups: ``(g r, weight.shape[1], *k)``."""
    _, c, *k = module.weight.shape
    r = B.shape[1]
    return B.T.reshape(r, c, *k).repeat(module.groups, *([1] * (len(k) + 1)))


def _grouped_1x1(z: torch.Tensor, W: torch.Tensor, spatial: int) -> torch.Tensor:
    """A 1×1 grouped conv as one GEMM per group: ``z (*, g k, *S)``, ``W (g, c, k)`` -> ``(*, g c, *S)``.

    The batch and pixels become the GEMM's columns (under vmap, one ``bmm`` over members); a 1×1 conv
    with per-member weights would be a conv of ``n·g`` tiny groups, and a per-pixel product a GEMV."""
    g, c, k = W.shape
    unbatched = z.dim() == spatial + 1
    z = z.unsqueeze(0) if unbatched else z  # (Bt, g k, *S)
    Bt, S = z.shape[0], z.shape[2:]
    cols = z.reshape(Bt, g, k, -1).permute(1, 2, 0, 3).reshape(g, k, -1)  # (g, k, Bt P)
    out = (W @ cols).view(g * c, Bt, *S).movedim(0, 1)  # (Bt, g c, *S)
    return out.squeeze(0) if unbatched else out


def _channel_mix(z: torch.Tensor, A: torch.Tensor, groups: int, spatial: int) -> torch.Tensor:
    """``out[j c + o] = Σ_s A[j c + o, s] z[j r + s]`` per group ``j``: ``(*, g r, *S) -> (*, C, *S)``."""
    C, r = A.shape
    return _grouped_1x1(z, A.view(groups, C // groups, r), spatial)


def _group_mix(x: torch.Tensor, A: torch.Tensor, groups: int, spatial: int) -> torch.Tensor:
    """``u[j r + s] = Σ_{c in group j} A[c, s] x[c]``: ``(*, C_in, *S) -> (*, g r, *S)``."""
    C_in, r = A.shape
    return _grouped_1x1(x, A.view(groups, C_in // groups, r).transpose(1, 2), spatial)


def embedding_forward(call, module: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    out = F.embedding(idx, module.weight, module.padding_idx, None, module.norm_type,
                      module.scale_grad_by_freq, module.sparse)
    factors = call.factors(module.weight)
    if factors is None:
        return out
    A, B = factors  # (num_embeddings, r) with the padding row zero, (dim, r)
    return out + F.embedding(idx, A.to(out.dtype)) @ B.to(out.dtype).T


def check_conv(module) -> None:
    if getattr(module, "padding_mode", "zeros") != "zeros" and isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise TypeError(f"{module}: padding_mode={module.padding_mode!r} (only 'zeros' for transposed convs)")


def check_embedding(module: nn.Embedding) -> None:
    if module.max_norm is not None or module.sparse:
        raise TypeError(f"{module}: max_norm and sparse embeddings are not supported (max_norm renormalises "
                        "the weight in place during the forward)")

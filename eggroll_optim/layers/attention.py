"""Rule for ``nn.MultiheadAttention``: low-rank noise on its input and output projections.

The layer's own forward hands its weights to ``F.multi_head_attention_forward`` (or a fused
kernel), so the rule computes one member's attention itself, with the same semantics:
``q, k, v = x W_{q,k,v}ᵀ + b + (x B_i) A_i[rows]ᵀ`` (the stacked ``in_proj_weight (3E, E)`` is one
matrix with one pair of factors; separate ``q/k/v_proj_weight`` get one each), scaled dot-product
attention with the layer's masks, dropout and optional ``bias_k``/``bias_v``/``add_zero_attn``, then
``out_proj`` with its own factors. Without masks (or with the causal one) the attention itself is
one ``F.scaled_dot_product_attention`` over the whole chunk (members folded into its batch);
with other masks, or when the weights are returned, it is matmul/softmax under vmap (one batched
product each, never a per-member loop).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._vmap import logical, physical
from .linear import lowrank_linear_term

__all__ = ["lowrank_names", "mha_forward"]


def lowrank_names(module: nn.MultiheadAttention) -> tuple[str, ...]:
    if module._qkv_same_embed_dim:
        return ("in_proj_weight", "out_proj.weight")
    return ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")


def _project(x, weight, bias, factors_rows):
    """``x Wᵀ + b + (x B) A[rows]ᵀ`` for one of q/k/v (``factors_rows``: ``(factors, rows)``)."""
    out = F.linear(x, weight)
    out = out if bias is None else out + bias
    factors, rows = factors_rows
    if factors is None:
        return out
    A, B = factors
    return out + lowrank_linear_term(x, (A[rows], B))


def _projections(call, m: nn.MultiheadAttention, query, key, value):
    E = m.embed_dim
    b = m.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
    if m._qkv_same_embed_dim:
        W, factors = m.in_proj_weight, call.factors(m.in_proj_weight)
        if query is key and key is value:  # self-attention: one product for q, k, v
            qkv = _project(query, W, b, (factors, slice(None)))
            return qkv.chunk(3, dim=-1)
        weights = (W[:E], W[E:2 * E], W[2 * E:])
        rows = (slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E))
        fr = [(factors, r) for r in rows]
    else:
        weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        fr = [(call.factors(w), slice(None)) for w in weights]
    return tuple(_project(x, w, bias, f) for x, w, bias, f in zip((query, key, value), weights, (bq, bk, bv), fr))


def _float_mask(mask, dtype):
    """Bool (True = masked) or additive float mask -> additive float mask, or ``None``."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _extend(m, k, v, attn_mask, key_padding_mask, batch):
    """``bias_k``/``bias_v`` and ``add_zero_attn``: extra keys, with the masks padded to match."""
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.expand(1, batch, -1)])
        v = torch.cat([v, m.bias_v.expand(1, batch, -1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(1, *k.shape[1:])])
        v = torch.cat([v, v.new_zeros(1, *v.shape[1:])])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    return k, v, attn_mask, key_padding_mask


def _mask(attn_mask, key_padding_mask, batch, heads, L, S, is_causal, dtype, device):
    """One additive mask broadcastable to ``(batch, heads, L, S)``, or ``None``."""
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
    mask = _float_mask(attn_mask, dtype)
    if mask is not None and mask.dim() == 3:  # (batch * heads, L, S)
        mask = mask.view(batch, heads, L, S)
    kpm = _float_mask(key_padding_mask, dtype)
    if kpm is not None:
        kpm = kpm.view(batch, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


def _sdpa(call, q, k, v, dropout: float, causal: bool) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on the whole chunk at once, outside vmap: ``(n·B, H, L, d)``.

    vmap's batching rule for it has no CPU kernel (a per-member loop) and fails for some CUDA
    backends (flash/efficient return no tensor where the rule expects one), so the members are
    folded into SDPA's own batch dim instead."""
    parts = [physical(t, call.level) for t in (q, k, v)]
    n = next((t.shape[0] for t, per_member in parts if per_member), None)
    if n is None:  # nothing perturbed before the attention: one call for every member
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
    q, k, v = (t if per_member else t.expand(n, *t.shape) for t, per_member in parts)  # (n, B, H, len, d)
    out = F.scaled_dot_product_attention(*(t.reshape(-1, *t.shape[-3:]) for t in (q, k, v)),
                                         dropout_p=dropout, is_causal=causal)
    return logical(out.view(*q.shape[:-1], v.shape[-1]), call.level)


def _attend(call, q, k, v, mask, dropout: float, need_weights: bool, causal: bool):
    """``softmax(q kᵀ / sqrt(d) + mask) v`` on ``(batch, heads, L, d)``; returns ``(out, weights)``.

    ``causal``: the mask is the causal one (the layer's ``is_causal`` hint, as torch's MHA reads it):
    SDPA then applies it itself. Other masks, and returning the weights, use the matmul path."""
    if not need_weights and (mask is None or causal):
        return _sdpa(call, q, k, v, dropout, causal), None
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    out = F.dropout(weights, dropout) if dropout > 0 else weights
    return out @ v, weights


def mha_forward(call, m: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
    unbatched = query.dim() == 2
    if unbatched:  # (L, E): a batch of one, sequence first
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif m.batch_first:  # (B, L, E) -> (L, B, E), keeping q is k is v for self-attention
        same_kv = key is value
        query, key = query.transpose(0, 1), (query.transpose(0, 1) if key is query else key.transpose(0, 1))
        value = key if same_kv else value.transpose(0, 1)
    q, k, v = _projections(call, m, query, key, value)  # (L, B, E), (S, B, E), (S, B, E)
    L, batch, E = q.shape
    heads, d = m.num_heads, m.head_dim
    k, v, attn_mask, key_padding_mask = _extend(m, k, v, attn_mask, key_padding_mask, batch)
    S = k.shape[0]
    causal = is_causal and key_padding_mask is None and L == S and m.bias_k is None and not m.add_zero_attn
    mask = _mask(attn_mask, key_padding_mask, batch, heads, L, S, is_causal, q.dtype, q.device)
    split = lambda t: t.reshape(t.shape[0], batch, heads, d).permute(1, 2, 0, 3)  # (B, H, len, d)
    dropout = m.dropout if m.training else 0.0
    out, weights = _attend(call, split(q), split(k), split(v), mask, dropout, need_weights, causal)
    merged = out.permute(2, 0, 1, 3).reshape(L, batch, E)  # (L, B, E)
    out = _project(merged, m.out_proj.weight, m.out_proj.bias, (call.factors(m.out_proj.weight), slice(None)))
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)  # (B, L, S)
    if unbatched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    elif m.batch_first:
        out = out.transpose(0, 1)
    return out, (weights if need_weights else None)

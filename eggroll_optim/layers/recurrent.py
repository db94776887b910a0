"""Rule for ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``: low-rank noise on every input, hidden and
projection matrix (every layer and direction), full-rank noise on the biases.

torch's fused recurrences take their weights as one flat list, so the rule runs one member's
recurrence itself with torch's gate equations (``torch.nn`` docs): the input products of a whole
layer are one GEMM over all time steps, ``x Wᵢₕᵀ + b + (x Bᵢₕ) Aᵢₕᵀ``; each step then adds
``h Wₕₕᵀ + b + (h Bₕₕ) Aₕₕᵀ``. Under vmap every step runs for all members at once: the loop is
over time, as in torch's own kernels, never over members.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import lowrank_linear_term

__all__ = ["lowrank_names", "rnn_forward"]


def lowrank_names(module: nn.RNNBase) -> tuple[str, ...]:
    return tuple(name for name in module._flat_weights_names if name.startswith("weight_"))


def _affine(call, x, weight, bias):
    out = F.linear(x, weight)
    out = out if bias is None else out + bias
    term = lowrank_linear_term(x, call.factors(weight))
    return out if term is None else out + term


def _cell(mode: str, gx, gh, state, nonlinearity):
    """One step of torch's gate equations; ``state`` is ``h`` or ``(h, c)``."""
    if mode == "LSTM":
        h, c = state
        i, f, g, o = (gx + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        rx, zx, nx = gx.chunk(3, dim=-1)
        rh, zh, nh = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(rx + rh), torch.sigmoid(zx + zh)
        n = torch.tanh(nx + r * nh)
        return (1 - z) * n + z * state
    return nonlinearity(gx + gh)


def _direction(call, m, mode, x, layer: int, reverse: bool, h0, c0):
    """Run one layer in one direction over ``x (L, B, in)``; returns ``(out (L, B, H), h_n, c_n)``."""
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    w = lambda name: getattr(m, name + sfx, None)
    gates_x = _affine(call, x, w("weight_ih"), w("bias_ih"))  # (L, B, G H): all steps in one GEMM
    nonlinearity = torch.relu if mode == "RNN_RELU" else torch.tanh
    state = (h0, c0) if mode == "LSTM" else h0
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outs = [None] * x.shape[0]
    for t in steps:
        h = state[0] if mode == "LSTM" else state
        gh = _affine(call, h, w("weight_hh"), w("bias_hh"))
        new = _cell("RNN" if mode.startswith("RNN") else mode, gates_x[t], gh, state, nonlinearity)
        if mode == "LSTM":
            h, c = new
            h = h if w("weight_hr") is None else _affine(call, h, w("weight_hr"), None)
            state = (h, c)
        else:
            h, state = new, new
        outs[t] = h
    h_n, c_n = (state if mode == "LSTM" else (state, None))
    return torch.stack(outs), h_n, c_n


def _initial(m, hx, batch, x):
    D = 2 if m.bidirectional else 1
    H_out = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
    if m.mode == "LSTM":
        if hx is None:
            return x.new_zeros(m.num_layers * D, batch, H_out), x.new_zeros(m.num_layers * D, batch, m.hidden_size)
        return hx
    return (x.new_zeros(m.num_layers * D, batch, H_out) if hx is None else hx), None


def rnn_forward(call, m: nn.RNNBase, input, hx=None):
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise TypeError(f"{type(m).__name__}: PackedSequence inputs are not supported inside a population; "
                        "pad the batch (and mask the outputs) instead")
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if m.batch_first else input)  # (L, B, in)
    if unbatched and hx is not None:
        hx = tuple(h.unsqueeze(1) for h in hx) if m.mode == "LSTM" else hx.unsqueeze(1)
    h0, c0 = _initial(m, hx, x.shape[1], x)
    D = 2 if m.bidirectional else 1
    h_n, c_n = [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            i = layer * D + d
            out, h, c = _direction(call, m, m.mode, x, layer, d == 1, h0[i], None if c0 is None else c0[i])
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        if m.dropout and m.training and layer < m.num_layers - 1:
            x = F.dropout(x, m.dropout)
    out = x.squeeze(1) if unbatched else (x.transpose(0, 1) if m.batch_first else x)
    h_n = torch.stack(h_n)
    hidden = (h_n, torch.stack(c_n)) if m.mode == "LSTM" else h_n
    if unbatched:
        hidden = tuple(h.squeeze(1) for h in hidden) if m.mode == "LSTM" else hidden.squeeze(1)
    return out, hidden

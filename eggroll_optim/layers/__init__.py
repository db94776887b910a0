"""One rule per layer type: which parameters get low-rank noise and the layer's perturbed forward.

A population runs the model under ``torch.func.vmap`` over its members (see ``hooks``): every
rule's ``forward`` is written for **one member**, with the member's factors ``A_i (m, r)`` (sign and
``sigma / sqrt(r)`` included) and ``B_i (k, r)`` read from ``call.factors(param)``; vmap batches it.
A parameter that no rule claims (a bias, a norm's affine, a positional table used directly) is
handed to the model as its per-member value ``p + e_i`` (full-rank noise), so the layer's own code
runs on it unchanged.

Adding a layer type is one ``Rule`` in ``RULES``: its types, the names of the matrices it perturbs
(``"out_proj.weight"`` reaches into a submodule that the layer uses without calling it), its
forward, and a check for options it cannot honour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from . import attention, fused, linear, recurrent, sequential
from ..kernels.fast import mlp_block_activation

__all__ = ["RULES", "Rule", "rule_for"]


@dataclass(frozen=True)
class Rule:
    """How one layer type is perturbed.

    ``lowrank(module)``: names of the matrix parameters that get low-rank noise (dotted names
    reach submodules the layer uses without calling them). ``forward(call, module, *args, **kw)``:
    one member's output. ``check(module)``: raise ``TypeError`` for options the rule cannot honour.
    ``zero_row(module, name)``: a row of ``A`` that stays zero (an embedding's ``padding_idx``).
    """

    types: tuple[type, ...]
    lowrank: Callable[[nn.Module], tuple[str, ...]]
    forward: Callable
    check: Callable[[nn.Module], None] = lambda module: None
    zero_row: Callable[[nn.Module, str], int | None] = lambda module, name: None
    matches: Callable[[nn.Module], bool] = lambda module: True  # beyond the type check
    fused: bool = False  # a fused fast path: only with fused=None/True
    # the module as the root, the whole chunk at once without vmap: whole(chunk, module, x, per_member,
    # fused) -> (n, *out), or None to run under vmap (one tensor argument, no running statistics)
    whole: Callable | None = None


def _weight(module: nn.Module) -> tuple[str, ...]:
    return ("weight",)


RULES: tuple[Rule, ...] = (
    Rule((nn.Sequential,), fused.mlp_block_names, fused.mlp_block_forward,
         matches=lambda module: mlp_block_activation(module) is not None, fused=True, whole=fused.mlp_block_whole),
    Rule((nn.Sequential,), lambda module: (), sequential.sequential_forward, matches=sequential.has_window,
         fused=True),
    Rule((nn.Linear,), _weight, linear.linear_forward),
    Rule((nn.Conv1d, nn.Conv2d, nn.Conv3d), _weight, linear.conv_forward, linear.check_conv),
    Rule((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _weight,
         linear.conv_transpose_forward, linear.check_conv),
    Rule((nn.Embedding,), _weight, linear.embedding_forward, linear.check_embedding,
         lambda module, name: module.padding_idx),
    Rule((nn.MultiheadAttention,), attention.lowrank_names, attention.mha_forward),
    Rule((nn.RNN, nn.GRU, nn.LSTM), recurrent.lowrank_names, recurrent.rnn_forward),
)


def rule_for(module: nn.Module, fused: bool | None = None) -> Rule | None:
    """The rule of ``module``'s type, for a stock layer or a subclass that keeps its ``forward``
    (``fused=False``: not the fused fast paths)."""
    for rule in RULES:
        if rule.fused and fused is False:
            continue
        for base in rule.types:
            if isinstance(module, base) and type(module).forward is base.forward and rule.matches(module):
                return rule
    return None

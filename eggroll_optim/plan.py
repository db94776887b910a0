"""Which parameter gets which noise, and which module's forward shows that it was used.

Walking the model once (parents before children):

- a layer with a rule (``layers.RULES``) claims the matrices its rule names: **low-rank** noise;
  a submodule it reaches into without calling it (``MultiheadAttention.out_proj``) is absorbed:
  it gets no rule of its own, and its parameters count as used when the parent runs;
- every other trainable parameter (a bias, a norm's affine, a positional table, a class token,
  a parameter of a custom layer) is **free**: the model sees its per-member value ``p + e_i``
  (full-rank noise), so any code using it runs unchanged;
- a free matrix larger than ``fullrank_max_numel`` is unsupported: its full-rank noise would cost
  ``N`` copies of it. ``unsupported="raise"`` names it and the ways out; ``"freeze"`` leaves it out.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch.nn as nn

from .layers import Rule, rule_for

__all__ = ["FULLRANK_MAX_NUMEL", "Plan", "make_plan"]

FULLRANK_MAX_NUMEL = 1 << 18  # a free matrix up to this size gets full-rank noise (N copies)


@dataclass
class Plan:
    """The model's parameters sorted by noise, and where each is used.

    ``lowrank``/``free``: ``{param: [(module, name), ...]}``, every place holding it (tied weights);
    ``rules``: ``[(module, rule)]``; ``users``: ``{param: [modules]}`` whose forward running means
    the parameter took part; ``names``: ``{param: qualified name}``.
    """

    root: nn.Module | None = None
    fused: bool | None = None
    lowrank: dict = field(default_factory=dict)
    free: dict = field(default_factory=dict)
    rules: list = field(default_factory=list)
    users: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)
    zero_rows: dict = field(default_factory=dict)
    norms: list = field(default_factory=list)  # BatchNorm/InstanceNorm layers: running statistics
    root_rule: object = None  # the root module's rule (``layers.Rule``), or None
    _users: set | None = None

    def updating_norms(self) -> list:
        """The norms that update running statistics on a call now (train mode, tracking)."""
        return [m for m in self.norms if m.training and m.track_running_stats]

    def is_lowrank(self, p) -> bool:
        return p in self.lowrank

    @property
    def user_set(self) -> set:
        """Every module whose forward shows that a free parameter was used."""
        if self._users is None:
            self._users = {m for ms in self.users.values() for m in ms}
        return self._users


def _resolve(module: nn.Module, dotted: str):
    """``(owner, name, param)`` for a dotted name such as ``"out_proj.weight"``."""
    *path, name = dotted.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, name, owner._parameters.get(name)


def _claim(plan: Plan, module: nn.Module, rule: Rule, absorbed: dict) -> set:
    claimed = set()
    for dotted in rule.lowrank(module):
        owner, name, p = _resolve(module, dotted)
        if owner is not module:
            absorbed[owner] = module
        if p is None or not p.requires_grad:
            continue
        plan.lowrank.setdefault(p, []).append((owner, name))
        plan.users.setdefault(p, []).append(module)
        plan.zero_rows.setdefault(p, rule.zero_row(module, name))
        claimed.add((owner, name))
    return claimed


def make_plan(root: nn.Module, unsupported: str = "raise", fullrank_max_numel: int = FULLRANK_MAX_NUMEL,
              fused: bool | None = None) -> Plan:
    plan, absorbed, claimed = Plan(root, fused), {}, set()
    modules = list(root.named_modules())  # each module once, parents first
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    plan.norms = [sub for _, sub in modules if isinstance(sub, norm_types)]
    for path, sub in modules:
        rule = None if sub in absorbed else rule_for(sub, fused)
        if rule is not None:
            plan.rules.append((sub, rule))
            if sub is root:
                plan.root_rule = rule
            claimed |= _claim(plan, sub, rule, absorbed)
    bad = []
    for path, sub in modules:
        for name, p in sub.named_parameters(recurse=False):
            plan.names.setdefault(p, f"{path}.{name}" if path else name)
            if not p.requires_grad or (sub, name) in claimed:
                continue
            if p in plan.lowrank:  # tied to a low-rank matrix but also held where no rule reads it
                bad.append(f"{plan.names[p]} (tied into {type(sub).__name__}, which has no rule)")
                continue
            if p.dim() >= 2 and p.numel() > fullrank_max_numel:
                bad.append(f"{plan.names[p]} ({type(sub).__name__}, {tuple(p.shape)})")
                continue
            plan.free.setdefault(p, []).append((sub, name))
            plan.users.setdefault(p, []).append(absorbed.get(sub, sub))
    _report(bad, unsupported, fullrank_max_numel)
    if not plan.lowrank and not plan.free:
        raise ValueError(f"{type(root).__name__} has no trainable parameter that EGGROLL can perturb")
    return plan


def _report(bad: list, unsupported: str, limit: int) -> None:
    if not bad:
        return
    if unsupported == "raise":
        raise TypeError(
            f"EggrollOptimizer cannot perturb these trainable parameters: {bad}. Matrices used directly "
            f"(not through a supported layer) get full-rank noise up to {limit} elements (fullrank_max_numel=); "
            "larger ones need a supported layer (nn.Linear, nn.Conv*, nn.Embedding, ...). Or freeze them "
            "(requires_grad_(False)), leave them out with params=, or pass unsupported='freeze'."
        )
    warnings.warn(f"EggrollOptimizer leaves these parameters untouched: {bad}", stacklevel=4)

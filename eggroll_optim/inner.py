"""The inner ``torch.optim`` optimizer that takes ``EggrollOptimizer``'s step.

- ``build_inner``: from a class, a factory ``param_groups -> Optimizer``, or an instance built on
  the model's parameters (adopted as it is, once checked to hold exactly the evolved parameters);
- ``Mirror``: the inner groups' ``lr``, ``momentum`` and ``betas`` mirrored in ours, so that every
  ``torch.optim.lr_scheduler`` (``OneCycleLR``/``CyclicLR`` cycle ``momentum`` or ``betas[0]``) drives
  the ``EggrollOptimizer``; a value changed on either side since the last step reaches the other;
- ``inner_step``: the inner step with the inner optimizer's own step hooks but not the global ones
  (``torch.optim.optimizer.register_optimizer_step_pre_hook``): those see the ``EggrollOptimizer``,
  once per update.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["MIRRORED", "Mirror", "adopted_groups", "build_inner", "global_step_hooks", "inner_step", "run_step_hooks"]

MIRRORED = ("lr", "momentum", "betas")  # the hyperparameters schedulers drive


def build_inner(optimizer, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The inner optimizer over ``groups`` (``[{"params", "lr"}]``, ours): ``SGD(lr)`` by default."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer  # adopted (``adopted_groups`` checked it)
    if optimizer is None:
        return torch.optim.SGD(groups, lr=lr)
    if not callable(optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer class, a factory param_groups -> Optimizer or an "
            f"Optimizer instance built on the model's parameters, got {type(optimizer).__name__}"
        )
    inner = optimizer(groups)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must build a torch.optim.Optimizer, got {type(inner).__name__}")
    return inner


def adopted_groups(inner: torch.optim.Optimizer, params, evolved: list, names: dict) -> list[dict]:
    """Our param groups for an adopted instance: its groups (``lr`` included), or ``params`` if given
    (then group for group the same parameters). ``evolved``: the parameters we would evolve by default."""
    held = [p for g in inner.param_groups for p in g["params"]]
    wanted = evolved if params is None else [p for g in _as_groups(params) for p in g["params"]]
    extra = [names.get(p, tuple(p.shape)) for p in held if p not in set(wanted)]
    missing = [names.get(p, tuple(p.shape)) for p in wanted if p not in set(held)]
    if extra or missing or len(set(held)) != len(held):
        raise ValueError(
            f"optimizer={type(inner).__name__}(...) must hold exactly the parameters EggrollOptimizer evolves; "
            f"it also holds {extra[:8]} and lacks {missing[:8]}. Build it on those parameters, or pass the class "
            "(optimizer=torch.optim.Adam) and let EggrollOptimizer build it"
        )
    if params is None:
        return [{"params": list(g["params"]), "lr": g["lr"]} for g in inner.param_groups]
    groups = _as_groups(params)
    if [set(g["params"]) for g in groups] != [set(g["params"]) for g in inner.param_groups]:
        raise ValueError(
            f"params= has {len(groups)} group(s), optimizer={type(inner).__name__}(...) has "
            f"{len(inner.param_groups)} holding other parameters: give them the same groups, or leave params out"
        )
    return [{**g, "lr": inner_group["lr"]} for g, inner_group in zip(groups, inner.param_groups)]


def _as_groups(params) -> list[dict]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return [dict(g, params=list(g["params"])) for g in params]
    return [{"params": params}]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b))
    return a == b


class Mirror:
    """Keeps ``MIRRORED`` keys equal in ``owner``'s groups and the inner optimizer's, group for group."""

    def __init__(self, owner: torch.optim.Optimizer, inner: torch.optim.Optimizer):
        self.owner, self.inner = owner, inner
        for group, inner_group in zip(self.ours, inner.param_groups):
            for key in MIRRORED:
                if key in inner_group:
                    group[key] = inner_group[key]
        self.reset()

    @property
    def ours(self) -> list[dict]:
        return self.owner.param_groups  # read each time: torch's load_state_dict puts in a new list

    def reset(self) -> None:
        """Take our groups as they are now as the truth (after construction, ``add_param_group``, a load)."""
        for group, inner_group in zip(self.ours, self.inner.param_groups):
            for key in MIRRORED:
                if key in inner_group:
                    inner_group[key] = group[key]
        self.seen = [{k: g[k] for k in MIRRORED if k in ig} for g, ig in zip(self.ours, self.inner.param_groups)]

    def add(self) -> None:
        """A group was appended on both sides: take the inner optimizer's filled-in defaults into ours."""
        group, inner_group = self.ours[-1], self.inner.param_groups[-1]
        self.seen.append({})
        for key in MIRRORED:
            if key in inner_group:
                group[key] = self.seen[-1][key] = inner_group[key]

    def sync(self) -> None:
        """Carry each value changed since the last sync to the other side; both changed: an error."""
        for i, (group, inner_group, seen) in enumerate(zip(self.ours, self.inner.param_groups, self.seen)):
            for key in seen:
                mine, theirs, before = group[key], inner_group[key], seen[key]
                if _same(mine, before) or _same(mine, theirs):
                    value = theirs
                elif _same(theirs, before):
                    value = mine
                else:
                    raise RuntimeError(
                        f"param_groups[{i}][{key!r}] was set to {mine} on the EggrollOptimizer and to {theirs} on "
                        "its inner optimizer since the last step: drive it from one of them (attach schedulers to "
                        "the EggrollOptimizer)"
                    )
                group[key] = inner_group[key] = seen[key] = value


def run_step_hooks(hooks, optimizer, args: tuple, kwargs: dict, pre: bool) -> None:
    """Call step hooks ``hook(optimizer, args, kwargs)``; a pre-hook may not replace the arguments
    (the update is already decided when they run)."""
    for hook in list(hooks):
        result = hook(optimizer, args, kwargs)
        if pre and result is not None:
            raise RuntimeError(
                f"A step pre-hook of {type(optimizer).__name__} returned {type(result).__name__}: EggrollOptimizer's "
                "pre-hooks run inside tell() once the gradient is set; they may edit p.grad in place but cannot "
                "replace the step's arguments"
            )


def global_step_hooks(pre: bool) -> list:
    """torch's global step hooks (``register_optimizer_step_pre_hook``/``_post_hook``), in order."""
    from torch.optim import optimizer as torch_optimizer

    hooks = torch_optimizer._global_optimizer_pre_hooks if pre else torch_optimizer._global_optimizer_post_hooks
    return list(hooks.values())


def inner_step(inner: torch.optim.Optimizer) -> None:
    """``inner.step()`` with its own step hooks and without the global ones (torch wraps every
    optimizer class's ``step`` with both; the unwrapped step is the wrapper's ``__wrapped__``)."""
    step: Callable = type(inner).step
    bare = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if bare is None:  # not torch's hooked wrapper: call it as it is
        inner.step()
    else:
        run_step_hooks(inner._optimizer_step_pre_hooks.values(), inner, (), {}, pre=True)
        bare(inner)
        inner._optimizer_step_code()
        run_step_hooks(inner._optimizer_step_post_hooks.values(), inner, (), {}, pre=False)
    inner._opt_called = True  # what a scheduler attached to the inner optimizer checks

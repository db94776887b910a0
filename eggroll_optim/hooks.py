"""How a population runs through a model written for ordinary batches.

While a population chunk is active, calling the root module runs its forward under
``torch.func.vmap`` over the chunk's members:

- every tensor inside the model is one member's: ``x.view(x.size(0), -1)``, ``flatten(1)``,
  attention, RNNs and batch-less tensors (``pos(arange(T))``) behave exactly as in a plain call,
  and batch statistics (BatchNorm in train mode) are per member by construction;
- a plain tensor argument is shared by all members: it enters vmap unbatched, so the first layer's
  base product ``x Wᵀ`` runs once for the whole population; an argument wrapped by
  ``population.per_member(x)`` (leading dim ``N``) gives member ``i`` its row ``x[i]``;
- each layer with a rule (``layers.RULES``) runs the rule's forward with the member's low-rank
  factors; every free parameter (``plan``) is swapped for its per-member value ``p + e_i``;
- the root returns ``(n, *output)``: the members' outputs stacked.

The root's and the rule layers' ``forward`` are overridden per instance (the only way to run a
module's call under vmap or instead of its own forward); like hooks, the overrides are installed
once, are inert while no population is active, and ``remove()`` restores the module exactly.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn as nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .plan import Plan

__all__ = ["Call", "IDLE", "PerMember", "Switch", "idle_error", "install", "run_members"]


class Switch:
    """What the overrides read: the active population (``None``: inert; ``IDLE`` between chunks)
    and, inside the vmapped root call, the ``Call``. A deep copy of a hooked module gets a new,
    inert switch: the copy is the plain model."""

    __slots__ = ("population", "call")

    def __init__(self):
        self.population, self.call = None, None

    def __deepcopy__(self, memo) -> "Switch":
        return Switch()


IDLE = object()  # a chunked population between chunks: running the module then is a mistake


def idle_error() -> RuntimeError:
    return RuntimeError("This population is chunked: run the module inside `for members in population.chunks():`")


class PerMember:
    """An input with one row per member (``population.per_member(x)``); only the root reads it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __repr__(self) -> str:
        return f"PerMember({tuple(self.tensor.shape)})"


class Call:
    """One member's view of the noise inside the vmapped root call.

    ``level``: the vmap level of the member dim; ``fused``: the optimizer's ``fused`` switch."""

    __slots__ = ("_factors", "_chunk", "fired", "level", "fused")

    def __init__(self, factors: dict, chunk, level: int, fused: bool | None):
        self._factors, self._chunk, self.fired = factors, chunk, chunk.fired
        self.level, self.fused = level, fused

    def factors(self, param) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A_i (m, r), B_i (k, r))`` of a low-rank parameter (sign and scale in ``A_i``), or ``None``."""
        return self._factors.get(param)

    def chunk_factors(self, param) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole chunk's ``(A (n, m, r), B (n, k, r))``, for a fused kernel (``layers.fused``)."""
        return self._chunk.factors.get(param)


def _outside_error(module: nn.Module) -> RuntimeError:
    return RuntimeError(
        f"{type(module).__name__} was called directly while a population is active: call the module "
        "given to EggrollOptimizer (the root), which runs every member; submodules run inside it"
    )


def _plain(base, args, kwargs):
    if not kwargs and all(type(a) is torch.Tensor for a in args):  # the common call: nothing to search
        return base(*args)
    if any(isinstance(a, PerMember) for a in tree_flatten((args, kwargs))[0]):
        raise RuntimeError("population.per_member(x) inputs are only read while that population is active")
    return base(*args, **kwargs)


def _rule_forward(switch: Switch, rule, module: nn.Module, base, *args, **kwargs):
    call = switch.call
    if call is None:
        if switch.population is not None:
            raise _outside_error(module)
        return _plain(base, args, kwargs)
    call.fired.add(module)
    return rule.forward(call, module, *args, **kwargs)


def _root_forward(switch: Switch, rule, module: nn.Module, base, *args, **kwargs):
    population = switch.population
    if switch.call is not None or population is None:  # inside (a recursive call) or inert
        if rule is not None:
            return _rule_forward(switch, rule, module, base, *args, **kwargs)
        return _plain(base, args, kwargs) if switch.call is None else base(*args, **kwargs)
    if population is IDLE:
        raise idle_error()
    inner = partial(_rule_forward, switch, rule, module, base) if rule is not None else base
    return population.run(inner, module, args, kwargs)


class _Override:
    """A per-instance ``forward`` built on the one underneath (``base``: the class's, or another
    optimizer's override, which passes through while its population is inactive); ``remove()``
    puts the one underneath back."""

    def __init__(self, module: nn.Module, make):
        self.module, self.previous = module, module.__dict__.get("forward")
        base = self.previous if self.previous is not None else partial(type(module).forward, module)
        self.fn = make(base)
        module.__dict__["forward"] = self.fn

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.fn:
            return  # another override sits on top: ours stays below it, inert (its switch is off)
        if self.previous is None:
            del self.module.__dict__["forward"]
        else:
            self.module.__dict__["forward"] = self.previous


def install(root: nn.Module, plan: Plan, switch: Switch) -> list:
    """Override the root's and every rule layer's forward; returns handles whose ``remove()`` undoes
    each change. (Which users of free parameters ran is recorded during the population's calls
    only, by a global pre-hook: no hook stays on the modules, so torch's fused paths still apply
    outside a population.)"""
    rules = dict((id(m), rule) for m, rule in plan.rules)
    handles = [_Override(root, lambda base: partial(_root_forward, switch, rules.get(id(root)), root, base))]
    for module, rule in plan.rules:
        if module is not root:
            handles.append(_Override(module, lambda base, r=rule, m=module: partial(_rule_forward, switch, r, m, base)))
    return handles


@contextlib.contextmanager
def _swapped(places: list, store: str):
    """Put ``value`` in ``module._parameters``/``_buffers[name]`` for each ``(module, name, value)``."""
    saved = [(module, name, getattr(module, store)[name]) for module, name, _ in places]
    try:
        for module, name, value in places:
            getattr(module, store)[name] = value
        yield
    finally:
        for module, name, value in saved:
            getattr(module, store)[name] = value


def _running_stats(plan: Plan) -> list:
    """``(module, name, buffer)`` of every running statistic updated now (the float ones:
    ``num_batches_tracked`` is the same for every member and stays shared)."""
    return [
        (m, name, buf) for m in plan.updating_norms()
        for name, buf in m.named_buffers(recurse=False) if buf is not None and buf.is_floating_point()
    ]


@contextlib.contextmanager
def _recording_users(users: set, fired: set):
    """Record which of ``users`` run (a global pre-hook, only for the population's call)."""
    def mark(module, args):
        if module in users:
            fired.add(module)
    mark.eggroll_record = True  # ours: layers.sequential fuses windows under it (a user's global hook stops it)
    handle = nn.modules.module.register_module_forward_pre_hook(mark)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _no_mha_fastpath():
    """``nn.TransformerEncoderLayer``'s fused path skips its submodules' forwards: off inside."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def run_members(switch: Switch, plan: Plan, root: nn.Module, chunk, inner, args, kwargs):
    """``inner(*args, **kwargs)`` for each member of ``chunk`` under vmap -> outputs ``(n, ...)``.

    ``chunk`` provides ``size``, ``factors`` ``{param: (A (n, m, r), B (n, k, r))}``, ``values``
    ``{param: p + e (n, *shape)}``, ``fired`` and ``rows(x)`` (a per-member input's active rows).
    Running statistics are updated once a call, by the mean over members of each member's update.
    """
    whole = _whole(plan, root, chunk, args, kwargs)
    if whole is not None:
        return whole
    flat, spec = tree_flatten((args, kwargs))
    member_at = [i for i, leaf in enumerate(flat) if isinstance(leaf, PerMember)]
    inputs = [chunk.rows(flat[i].tensor) for i in member_at]
    lowrank, free = list(chunk.factors), list(chunk.values)
    places = [(m, name) for p in free for m, name in plan.free[p]]
    owners = [len(plan.free[p]) for p in free]
    stats = _running_stats(plan)
    copies = [buf.unsqueeze(0).repeat(chunk.size, *([1] * buf.dim())) for _, _, buf in stats]
    result = {}

    def one_member(factors, values, stat_copies, member_inputs):
        leaves = list(flat)
        for i, x in zip(member_at, member_inputs):
            leaves[i] = x
        a, kw = tree_unflatten(leaves, spec)
        per_place = [v for v, k in zip(values, owners) for _ in range(k)]
        switch.call = Call(dict(zip(lowrank, factors)), chunk, torch._C._functorch.current_level(), plan.fused)
        try:
            with _swapped([(m, n, v) for (m, n), v in zip(places, per_place)], "_parameters"), \
                    _swapped([(m, n, c) for (m, n, _), c in zip(stats, stat_copies)], "_buffers"):
                out = inner(*a, **kw)
        finally:
            switch.call = None
        out_leaves, result["spec"] = tree_flatten(out)
        result["constants"] = {i: v for i, v in enumerate(out_leaves) if not isinstance(v, torch.Tensor)}
        return [v for v in out_leaves if isinstance(v, torch.Tensor)]

    chunk.fired.add(root)
    with _no_mha_fastpath(), _recording_users(plan.user_set, chunk.fired):
        tensors = vmap(one_member, randomness="different")(
            [chunk.factors[p] for p in lowrank], [chunk.values[p] for p in free], copies, inputs
        )
    with torch.no_grad():
        for (_, _, buf), c in zip(stats, copies):
            buf.copy_(c.mean(0))
    return _rebuild(tensors, result)


def _whole(plan: Plan, root: nn.Module, chunk, args: tuple, kwargs: dict):
    """The root's rule run on the whole chunk without vmap (``Rule.whole``: a fused MLP block), for one
    tensor argument and no running statistics; ``None`` where it does not apply."""
    rule = plan.root_rule
    if rule is None or rule.whole is None or kwargs or len(args) != 1 or plan.updating_norms():
        return None
    x, per_member = args[0], isinstance(args[0], PerMember)
    if per_member:
        x = chunk.rows(x.tensor)
    elif not isinstance(x, torch.Tensor):
        return None
    out = rule.whole(chunk, root, x, per_member, plan.fused)
    if out is not None:
        chunk.fired.add(root)
    return out


def _rebuild(tensors: list, result: dict):
    it = iter(tensors)
    n = len(tensors) + len(result["constants"])
    leaves = [result["constants"][i] if i in result["constants"] else next(it) for i in range(n)]
    return tree_unflatten(leaves, result["spec"])

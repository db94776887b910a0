"""``make_perturbed_forward_fn``: run a ``torch.fx`` trace of a module over a params dict.

Every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` whose ``weight`` has factors in ``perts`` runs its
perturbed kernel. Values that carry the population dim are tracked through the graph, so other
modules (activations, pooling, ``nn.Flatten``, norms) see ``(N * Bt, ...)`` folded inputs and a
shared input reaches the first perturbed layer unexpanded.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .kernels import perturbed_conv, perturbed_linear, split_shared
from .kernels.fast import mlp_block_activation, mlp_fast_path, perturbed_mlp

__all__ = ["make_perturbed_forward_fn"]

_FOLDED_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}
_FLATTENS = {torch.flatten, "flatten"}


def _fold(fn: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Apply ``fn`` to ``(N, Bt, ...)`` as ``(N * Bt, ...)`` and unfold the result.

    A per-member ``(N, features)`` value has no batch dim: the population dim is the batch."""
    if x.dim() < 3:
        return fn(x, *args, **kwargs)
    out = fn(x.flatten(0, 1), *args, **kwargs)
    return out.view(*x.shape[:2], *out.shape[1:])


def _shift_flatten(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``flatten(x, start, end)`` written for ``(Bt, ...)``, moved past the population dim."""
    x, *rest = args
    start = rest[0] if rest else kwargs.pop("start_dim", 0)
    end = rest[1] if len(rest) > 1 else kwargs.pop("end_dim", -1)
    return (x, start + 1 if start >= 0 else start, end + 1 if end >= 0 else end), kwargs


class _PopulationInterpreter(fx.Interpreter):
    def __init__(self, graph_module: fx.GraphModule, params: dict, perts: dict):
        super().__init__(graph_module)
        self.params, self.perts = params, perts
        self.population_size = next(iter(perts.values()))[0].shape[0] if perts else None
        self.population_nodes: set[fx.Node] = set()

    def run_node(self, n: fx.Node):
        self.in_population = any(a in self.population_nodes for a in n.all_input_nodes)
        self.made_population = False
        result = super().run_node(n)
        if (self.in_population or self.made_population) and isinstance(result, torch.Tensor):
            self.population_nodes.add(n)
        return result

    def placeholder(self, target, args, kwargs):
        x = super().placeholder(target, args, kwargs)
        N = self.population_size
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == N:
            if x.stride(0) == 0:
                return x[0]  # a shared input passed as x.expand(N, ...)
            self.made_population = True
        return x

    def get_attr(self, target, args, kwargs):
        return self.params[target] if target in self.params else super().get_attr(target, args, kwargs)

    def _local_params(self, target: str) -> dict:
        prefix = f"{target}."
        return {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        local = self._local_params(target)
        factors = self.perts.get(f"{target}.weight")
        if factors is not None and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            self.made_population = True
            return self._perturbed(module, local, factors, args[0])
        call = lambda *a, **k: torch.func.functional_call(module, local, a, k)  # noqa: E731
        if self.in_population and isinstance(args[0], torch.Tensor):
            return _fold(call, *args, **kwargs)
        return call(*args, **kwargs)

    def _perturbed(self, module, local, factors, x):
        A_scaled, B = factors
        shared = not self.in_population
        weight, bias = local["weight"], local.get("bias")
        if isinstance(module, nn.Linear):
            return perturbed_linear(x, weight, bias, A_scaled, B, shared=shared)
        if module.padding_mode != "zeros" or isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise TypeError(f"{type(module).__name__} {module} is not supported by the perturbed forward")
        return perturbed_conv(
            x, weight, bias, A_scaled, B, module.stride, module.padding, module.dilation, module.groups, shared
        )

    def call_function(self, target, args, kwargs):
        if self.in_population and target in _FOLDED_FUNCTIONS:
            return _fold(target, *args, **kwargs)
        if self.in_population and target in _FLATTENS:
            args, kwargs = _shift_flatten(args, dict(kwargs))
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if self.in_population and target in _FLATTENS:
            args, kwargs = _shift_flatten(args, dict(kwargs))
        return super().call_method(target, args, kwargs)


def _mlp_pattern(module: nn.Module):
    """``(name1, activation, name2)`` for ``nn.Sequential(Linear, Tanh|ReLU, Linear)``, else None."""
    activation = mlp_block_activation(module)
    if activation is None:
        return None
    names = list(module._modules)
    return names[0], activation, names[2]


def _fused_mlp(pattern, x, params, perts):
    """The fused shared-input MLP path when it applies (``mlp_fast_path``), else None."""
    name1, activation, name2 = pattern
    if f"{name1}.weight" not in perts or f"{name2}.weight" not in perts:
        return None
    N = perts[f"{name1}.weight"][0].shape[0]
    x, shared = split_shared(x, N, 1)
    W1 = params[f"{name1}.weight"]
    if not shared or x.dim() != 2 or x.shape[0] == 0 or not mlp_fast_path(x, W1.shape[0], shared):
        return None
    layer1 = (W1, params.get(f"{name1}.bias"), perts[f"{name1}.weight"])  # the factors as given: Pairs or a tuple
    layer2 = (params[f"{name2}.weight"], params.get(f"{name2}.bias"), perts[f"{name2}.weight"])
    return perturbed_mlp(x, layer1, layer2, activation)


def make_perturbed_forward_fn(module: nn.Module) -> tuple[Callable, Callable]:
    """Trace ``module`` with ``torch.fx`` and return ``(forward, forward_eval)``.

    - ``forward(x, params, perts)``: ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers whose weight is
      in ``perts`` run perturbed; ``x`` is per member ``(N, ...)`` or shared (no population dim, or
      ``x.expand(N, ...)``). Returns ``(N, ...)``.
    - ``forward_eval(x, params)``: the unperturbed module over ``params``.

    Limitations: the module must be traceable by ``torch.fx`` (no data-dependent control flow);
    reshapes written with explicit batch sizes (``x.view(x.size(0), -1)``) do not know about the
    population dim: use ``torch.flatten(x, 1)`` or ``nn.Flatten``, which are handled.
    """
    try:
        traced = fx.symbolic_trace(module)
    except Exception as err:  # fx raises many types; re-raise one that says what to do
        raise RuntimeError(
            f"torch.fx could not trace {type(module).__name__}: {err}. "
            "Write the forward by hand with perturbed_forward / perturbed_conv2d."
        ) from err

    fused = _mlp_pattern(module)

    def forward(x: torch.Tensor, params: dict, perts: dict) -> torch.Tensor:
        if fused is not None:
            out = _fused_mlp(fused, x, params, perts)
            if out is not None:
                return out
        return _PopulationInterpreter(traced, params, perts).run(x)

    def forward_eval(x: torch.Tensor, params: dict) -> torch.Tensor:
        return torch.func.functional_call(module, params, (x,))

    return forward, forward_eval

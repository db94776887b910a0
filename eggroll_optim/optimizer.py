"""``EggrollOptimizer``: EGGROLL as a ``torch.optim.Optimizer`` over an ``nn.Module``."""
from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.nn as nn

from .core import validate_hyperparameters
from .hooks import Switch, install
from .plan import FULLRANK_MAX_NUMEL, make_plan
from .population import Population, PopulationNoise
from .shaping import SHAPINGS, resolve_shaping, shape_fitness, validate_fitness

__all__ = ["EggrollOptimizer"]

MAX_BLOCK_PAIRS = 4096


class EggrollOptimizer(torch.optim.Optimizer):
    r"""Evolution strategies with low-rank perturbations (EGGROLL), as a PyTorch optimizer.

    .. math::
       \begin{aligned}
       &\textbf{for } t = 0, 1, \dots: \text{ pairs } k < N/2 \text{ draw } A_k \in \mathbb{R}^{m\times r},
         B_k \in \mathbb{R}^{n\times r}, \varepsilon_k \sim \mathcal{N}(0, I)
         \text{ from the key } (\text{seed}, t, p, k) \\
       &\quad E_i = s_i \tfrac{\sigma}{\sqrt r} A_{\lfloor i/2 \rfloor} B_{\lfloor i/2 \rfloor}^\top
         \text{ (matrices)}, \quad e_i = s_i \sigma \varepsilon_{\lfloor i/2 \rfloor}
         \text{ (biases, norms)}, \quad s_i = (-1)^i \\
       &\quad f_i = \text{fitness}(\theta + \text{noise}_i), \quad f' = \text{shape}(f) \\
       &\quad g = \tfrac{1}{\sqrt N} \textstyle\sum_i f'_i \,\text{noise}_i, \qquad
         p.\text{grad} \leftarrow -g, \qquad \text{inner optimizer step}, \qquad
         \sigma \leftarrow \sigma \cdot \text{sigma\_decay}
       \end{aligned}

    Forward hooks on every ``nn.Linear``, ``nn.Conv1d/2d``, ``nn.Embedding``, ``nn.LayerNorm``,
    ``nn.GroupNorm`` and ``nn.RMSNorm`` inject the noise while a population is active
    (``ask()``); otherwise the module is the plain mean model.

    Args:
        module: the model; its trainable parameters are optimised unless ``params`` is given.
        params: optional iterable of parameters or param-group dicts (keys ``lr``, ``sigma``,
            ``rank``), all owned by supported layers of ``module``.
        lr: learning rate of the inner optimizer. sigma: noise scale. rank: ``r``.
        population_size: ``N`` (even). chunk_size: evaluate ``N`` members in chunks of this many.
        seed: noise seed. optimizer: inner ``torch.optim`` class or factory ``params -> Optimizer``
            (default ``SGD(lr)``: exactly the seed's ``W <- W + lr g``).
        fitness_shaping: ``"zscore"``, ``"centered_rank"``, ``"none"`` or a callable.
        sigma_decay: ``sigma <- sigma * sigma_decay`` after every step.
        evolve_biases: also evolve biases and norm affine parameters (full-rank noise).
        nan_policy: ``"raise"`` or ``"worst"`` for NaN/inf fitness.
        unsupported: ``"raise"`` or ``"freeze"`` (warn and leave out) for trainable parameters
            of layers the hooks cannot perturb.
        reuse_noise: use the step-0 noise at every step (off by default).
        noise_block: pairs drawn from one keyed generator (default ``min(N/2, 4096)``); part of
            the noise definition, so keep it when resuming.

    .. note:: Like the seed, the update direction is ``g / sqrt(N)``-scaled rather than the
       paper's ``1 / (N sigma)``; use ``lr`` accordingly.
    """

    def __init__(
        self,
        module: nn.Module,
        params=None,
        lr: float = 0.1,
        sigma: float = 0.1,
        rank: int = 4,
        population_size: int = 256,
        *,
        seed: int = 0,
        optimizer: Callable | None = None,
        fitness_shaping: str | Callable = "zscore",
        sigma_decay: float = 1.0,
        evolve_biases: bool = True,
        chunk_size: int | None = None,
        nan_policy: str = "raise",
        unsupported: str = "raise",
        reuse_noise: bool = False,
        noise_block: int | None = None,
        fullrank_max_numel: int = FULLRANK_MAX_NUMEL,
        fused: bool | None = None,
    ):
        validate_hyperparameters(population_size, rank, sigma, lr)
        if not sigma_decay > 0:
            raise ValueError(f"Invalid sigma_decay: {sigma_decay} (expected > 0)")
        if chunk_size is not None and (chunk_size < 2 or chunk_size % 2):
            raise ValueError(f"Invalid chunk_size: {chunk_size} (expected an even integer >= 2)")
        if nan_policy not in ("raise", "worst"):
            raise ValueError(f"Invalid nan_policy: {nan_policy!r} (expected 'raise' or 'worst')")
        if unsupported not in ("raise", "freeze"):
            raise ValueError(f"Invalid unsupported: {unsupported!r} (expected 'raise' or 'freeze')")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.module = module
        self.population_size = population_size
        self.chunk_size = min(chunk_size or population_size, population_size)
        self.seed, self.sigma_decay, self.reuse_noise = int(seed), sigma_decay, reuse_noise
        if noise_block is not None and noise_block < 1:
            raise ValueError(f"Invalid noise_block: {noise_block} (expected >= 1 pairs)")
        # pairs drawn per generator: fewer launches for big populations, no waste for small ones
        self.noise_block = noise_block or min(population_size // 2, MAX_BLOCK_PAIRS)
        self.nan_policy = nan_policy
        self.shaping = resolve_shaping(fitness_shaping)
        self._plan = make_plan(module, unsupported, fullrank_max_numel, fused)
        self._param_index = {p: i for i, p in enumerate(module.parameters())}
        if params is None:
            params = [*self._plan.lowrank, *(self._plan.free if evolve_biases else ())]
        super().__init__(params, dict(lr=lr, sigma=sigma, rank=rank))
        self.inner = self._make_inner(optimizer)
        self._step_count = 0
        self._population: Population | None = None
        self._switch = Switch()  # the hooks read the active chunk from here (None: inert)
        self._handles = []
        self._install()

    # ----- construction -------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)  # generators: read once
        if not params:
            raise ValueError("A param group of EggrollOptimizer needs at least one parameter")
        param_group = dict(param_group, params=params)
        for p in params:
            plan = getattr(self, "_plan", None)
            if plan is None or (p not in plan.lowrank and p not in plan.free):
                raise ValueError(
                    f"Parameter of shape {tuple(p.shape)} is not a trainable parameter of the module given to "
                    "EggrollOptimizer (or one it cannot perturb)"
                )
        for key, check in (("sigma", lambda v: v > 0), ("rank", lambda v: isinstance(v, int) and v >= 1)):
            if key in param_group and not check(param_group[key]):
                raise ValueError(f"Invalid {key}: {param_group[key]}")
        super().add_param_group(param_group)
        if hasattr(self, "inner"):
            self.inner.add_param_group({"params": self.param_groups[-1]["params"], "lr": self.param_groups[-1]["lr"]})
            self._install()

    def _make_inner(self, optimizer) -> torch.optim.Optimizer:
        groups = [{"params": g["params"], "lr": g["lr"]} for g in self.param_groups]
        if optimizer is None:
            return torch.optim.SGD(groups, lr=self.defaults["lr"])
        inner = optimizer(groups)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"optimizer must build a torch.optim.Optimizer, got {type(inner).__name__}")
        return inner

    def _install(self) -> None:
        self.remove_hooks()
        evolved = {p for g in self.param_groups for p in g["params"]}
        for module, rule in self._plan.rules:
            if any(p in evolved for p in module.parameters()):
                rule.check(module)  # options the perturbation cannot honour (max_norm, ...)
        self._handles = install(self.module, self._plan, self._switch)
        self._finalizer = weakref.finalize(self, _remove, self._handles)

    def remove_hooks(self) -> None:
        """Remove every hook; the module is left exactly as it was before construction."""
        _remove(getattr(self, "_handles", []))
        self._handles = []
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()  # nothing left for garbage collection to remove

    # ----- ask / tell ---------------------------------------------------------------------
    def ask(self) -> Population:
        """Start a step: returns the population handle, active until ``tell`` (or ``with`` exit).

        With ``chunk_size < population_size``, iterate ``population.chunks()``.
        """
        if self._population is not None:
            raise RuntimeError("ask() called twice: call tell(fitness) for the pending population first")
        self._population = Population(
            self._noise(), self.population_size, self.chunk_size, self._discard, self._switch, self._plan
        )
        return self._population

    def discard(self) -> None:
        """Drop the pending population without an update (nothing changes; ``ask()`` works again)."""
        if self._population is not None:
            self._population.close()
        self._population = None

    def _discard(self, population: Population) -> None:
        if self._population is population:
            self.discard()

    def _noise(self) -> PopulationNoise:
        step = 0 if self.reuse_noise else self._step_count
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                key = (self.seed, step, self._param_index[p])
                lowrank = self._plan.is_lowrank(p)
                zero_row = self._plan.zero_rows.get(p) if lowrank else None  # e.g. padding_idx: stays put
                entries.append((p, key, group["sigma"], group["rank"], lowrank, zero_row))
        return PopulationNoise(entries, self.noise_block)

    @torch.no_grad()
    def tell(self, fitness: torch.Tensor) -> None:
        """Finish the step with fitness ``(N,)`` (higher is better): shape, estimate, update."""
        population = self._population
        if population is None:
            raise RuntimeError("tell() called before ask()")
        device = next(iter(population.noise.entries))[0].device
        validate_fitness(fitness, self.population_size, device, self.nan_policy)
        shaped = self._shape(fitness)  # the NaN policy, then the shaping
        missing = [p for p in population.noise.params if not any(m in population.fired for m in self._plan.users[p])]
        if missing:
            names = self._plan.names
            self.discard()  # its evaluation is spent: discard it so that ask() works again
            raise RuntimeError(
                f"No forward ran through the layers of {[names[p] for p in missing]} during this ask(): "
                "their update would be pure noise. Nothing was updated; the population is discarded."
            )
        grads = population.gradients(shaped)
        for p, g in grads.items():
            p.grad = (-g / math.sqrt(self.population_size)).to(p.dtype)
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            inner_group["lr"] = group["lr"]
        self.inner.step()
        for group in self.param_groups:
            group["sigma"] *= self.sigma_decay
        self._step_count += 1
        self.discard()
        self._opt_called = True  # lr_scheduler's check that the optimizer stepped

    def _shape(self, fitness: torch.Tensor) -> torch.Tensor:
        shaped = shape_fitness(fitness, self.nan_policy, self.shaping)
        if self.shaping in SHAPINGS.values():  # the built-in ones are finite for finite input
            return shaped
        if not isinstance(shaped, torch.Tensor) or shaped.shape != fitness.shape:
            got = tuple(shaped.shape) if isinstance(shaped, torch.Tensor) else type(shaped).__name__
            raise ValueError(f"fitness_shaping must return a tensor of shape {tuple(fitness.shape)}, got {got}")
        if not bool(torch.isfinite(shaped).all()):
            raise ValueError("fitness_shaping returned NaN/inf (constant fitness divided by its std?); nothing was updated")
        return shaped

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Drop-in step: ``closure()`` returns per-member losses ``(n,)`` (lower is better).

        It runs under ``torch.no_grad()`` once per chunk with the perturbations active; returns
        the mean loss over the population (a tensor, no host sync).
        """
        if closure is None:
            raise RuntimeError("EggrollOptimizer.step needs a closure returning per-member losses of shape (N,)")
        population = self.ask()
        losses = []
        try:
            for members in population.chunks():
                with torch.no_grad():
                    loss = closure()
                expected = members.stop - members.start
                if not isinstance(loss, torch.Tensor) or loss.shape != (expected,):
                    got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"closure must return per-member losses of shape ({expected},), got {got}")
                losses.append(loss)
            loss = torch.cat(losses)
            self.tell(-loss)
        except BaseException:  # a bad closure or loss must not leave a population pending
            self.discard()
            raise
        return loss.mean()

    # ----- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["eggroll"] = {
            "step": self._step_count, "seed": self.seed, "noise_block": self.noise_block,
            "population_size": self.population_size, "inner": self.inner.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("eggroll", None)
        if extra is None:
            raise ValueError("Not an EggrollOptimizer state_dict: the 'eggroll' entry is missing")
        for key in ("population_size", "noise_block"):
            if key in extra and extra[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict was saved with {key}={extra[key]}, this optimizer has {getattr(self, key)}: "
                    "the noise would differ, so the run could not continue identically"
                )
        super().load_state_dict(state_dict)
        self._step_count, self.seed = int(extra["step"]), int(extra["seed"])
        self.inner.load_state_dict(extra["inner"])

    @property
    def population(self) -> Population | None:
        """The pending population (between ``ask()`` and ``tell()``), else ``None``: a closure given to
        ``step`` reaches it here, e.g. ``opt.population.per_member(x)``."""
        return self._population

    @property
    def step_count(self) -> int:
        return self._step_count


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()

"""``EggrollOptimizer``: EGGROLL as a ``torch.optim.Optimizer`` over an ``nn.Module``."""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn as nn

from .hooks import Switch, install
from .inner import MIRRORED, Mirror, adopted_groups, build_inner, global_step_hooks, inner_step, run_step_hooks
from .memory import Planner
from .options import validate_arguments
from .plan import FULLRANK_MAX_NUMEL, make_plan
from .noise import GeneratorPool
from .population import Population, PopulationNoise
from .shaping import resolve_shaping, shape_checked, shape_in_graph, validate_fitness
from .state import FORMAT, check_loadable, param_table

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

    Inside ``ask()`` (and ``step``), calling ``module`` runs every member (``torch.func.vmap`` over
    them, ``hooks.py``): a plain tensor is a batch shared by all, ``population.per_member(x)`` gives
    member ``i`` the row ``x[i]``, and the output is ``(N, *output)``. Otherwise ``module`` is the plain
    mean model.

    Args:
        module: the model; its trainable parameters are optimised unless ``params`` is given.
        params: optional iterable of parameters or param-group dicts (keys ``lr``, ``sigma``,
            ``rank``), all trainable parameters of ``module``.
        lr: learning rate of the inner optimizer. sigma: noise scale. rank: ``r``.
        population_size: ``N`` (even). seed: noise seed.
        optimizer: the inner ``torch.optim`` optimizer that takes the step: a class, a factory
            ``param_groups -> Optimizer``, or an instance built on exactly the evolved parameters
            (adopted with its groups and ``lr``). Default ``SGD(lr)``: the seed's ``W <- W + lr g``.
        fitness_shaping: ``"zscore"``, ``"centered_rank"``, ``"none"`` or a callable (float16/bfloat16
            fitness is shaped in float32).
        sigma_decay: ``sigma <- sigma * sigma_decay`` after every step.
        evolve_biases: also evolve biases and norm affine parameters (full-rank noise).
        chunk_size: ``"auto"`` (default; ``None`` says the same): the population is one chunk, and each
            call of the model runs its members in pieces that fit ``max_memory`` (``memory.py``); or an
            even integer: iterate ``population.chunks()``, one call of the model per chunk.
        max_memory: the budget of ``"auto"``: bytes (> 1) or a fraction of the free memory (default
            0.5). The split never changes a member's output.
        nan_policy: ``"raise"`` or ``"worst"`` for NaN/inf fitness.
        unsupported: ``"raise"`` or ``"freeze"`` (warn and leave out) for large trainable matrices
            that no layer rule reads.
        reuse_noise: use the step-0 noise at every step (off by default).
        noise_block: pairs drawn from one keyed generator (default ``min(N/2, 4096)``); part of
            the noise definition, so keep it when resuming.
        fullrank_max_numel, fused: ``plan.py``, ``layers``. process_group, distributed_strategy,
            check_ranks: one population over the ranks of a process group (``distributed.py``).

    .. note:: Direction: ``tell(fitness)`` maximises, higher fitness is better; ``step(closure)``
       minimises what the closure returns (a loss per member), as every ``torch.optim`` optimizer;
       ``step(closure, maximize=True)`` maximises it.

    .. note:: ``tell`` is the update (``step`` calls it): the step pre-hooks (``register_step_pre_hook``
       and torch's global ones) run there once, after ``p.grad`` holds ``-g`` and before the inner
       step, so ``opt.register_step_pre_hook(lambda *_: clip_grad_norm_(model.parameters(), 1.0))``
       clips the estimate; the post-hooks run once after the step. ``lr``, ``momentum`` and ``betas``
       of the inner optimizer are mirrored in ``param_groups`` (``inner.py``): every ``lr_scheduler``,
       ``OneCycleLR`` and ``CyclicLR`` included, drives this optimizer; one on ``opt.inner`` works too.

    .. note:: Like the seed, the update direction is ``g / sqrt(N)``-scaled rather than the
       paper's ``1 / (N sigma)``; use ``lr`` accordingly.

    Raises:
        ValueError: a bad hyperparameter or option (``options.py``), a fitness of the wrong shape or
            device, NaN/inf fitness (``nan_policy="raise"``), a closure's result of the wrong shape, a
            ``state_dict`` of another model or format (``state.py``), an adopted optimizer holding
            other parameters. Nothing changes: the pending population can still be told.
        TypeError: ``module`` or ``optimizer`` of the wrong kind, a non-tensor or integer fitness, a
            large trainable matrix no rule reads (``unsupported="raise"``).
        RuntimeError: ``tell`` before ``ask``, ``ask`` while a population is pending (``discard()``
            drops it), a layer whose forward never ran in the population.
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
        chunk_size: int | str | None = "auto",
        max_memory: int | float | None = None,
        nan_policy: str = "raise",
        unsupported: str = "raise",
        reuse_noise: bool = False,
        noise_block: int | None = None,
        fullrank_max_numel: int = FULLRANK_MAX_NUMEL,
        fused: bool | None = None,
        process_group=None,
        distributed_strategy: str = "auto",
        check_ranks: bool = False,
    ):
        auto = validate_arguments(
            module, population_size=population_size, rank=rank, sigma=sigma, lr=lr, sigma_decay=sigma_decay,
            chunk_size=chunk_size, max_memory=max_memory, nan_policy=nan_policy, unsupported=unsupported,
            fused=fused, noise_block=noise_block,
        )
        self.module = module
        self.population_size = population_size
        self.chunk_size = population_size if auto else min(chunk_size, population_size)
        self._planner = Planner(max_memory) if auto else None  # members per call, from measurements
        self.seed, self.sigma_decay, self.reuse_noise = int(seed), sigma_decay, reuse_noise
        # pairs drawn per generator: fewer launches for big populations, no waste for small ones
        self.noise_block = noise_block or min(population_size // 2, MAX_BLOCK_PAIRS)
        self.nan_policy = nan_policy
        self.shaping = resolve_shaping(fitness_shaping)
        self._plan = make_plan(module, unsupported, fullrank_max_numel, fused)
        self._param_index = {p: i for i, p in enumerate(module.parameters())}
        evolved = [*self._plan.lowrank, *(self._plan.free if evolve_biases else ())]
        if isinstance(optimizer, torch.optim.Optimizer):  # an instance: adopted with its groups and lr
            params = adopted_groups(optimizer, params, evolved, self._plan.names)
        super().__init__(evolved if params is None else params, dict(lr=lr, sigma=sigma, rank=rank))
        self.inner = build_inner(optimizer, [{"params": g["params"], "lr": g["lr"]} for g in self.param_groups], lr)
        self._mirror = Mirror(self, self.inner)  # lr, momentum, betas: for every scheduler
        self.defaults.update({k: v for k, v in self.inner.defaults.items() if k in ("momentum", "betas")})
        self._group = self._make_group(process_group, distributed_strategy, check_ranks)
        self._step_count = 0
        self._generators: dict = {}  # {param: noise.GeneratorPool}: the keyed draws' generators, kept
        self._graph = None  # a compile_step's device scalars while it runs a step (capture.py), else None
        self._graph_version = 0  # bumped where a captured step must be captured again (a load, a new group)
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
            group = self.param_groups[-1]
            self.inner.add_param_group({k: v for k, v in group.items() if k in ("params", *MIRRORED)})
            self._mirror.add()
            self._install()
            self._graph_version += 1

    def _make_group(self, process_group, strategy: str, check: bool):
        """This rank's share of the population over ``process_group`` (``distributed``), or None."""
        if process_group is None:
            return None
        from .distributed import PopulationGroup

        group = PopulationGroup(process_group, self.population_size, strategy, check)
        evolved = [(p, g["rank"]) for g in self.param_groups for p in g["params"]]
        group.resolve([(p.shape[0], p[0].numel(), r) for p, r in evolved if self._plan.is_lowrank(p)],
                      sum(p.numel() for p, _ in evolved if not self._plan.is_lowrank(p)), evolved[0][0].device)
        return group

    @property
    def local_members(self) -> slice:
        """The members this process evaluates: all of them, or its rank's share under ``process_group``."""
        start, stop = self._group.members if self._group is not None else (0, self.population_size)
        return slice(start, stop)

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
            raise RuntimeError(
                "ask() called twice: a population is still pending (an ask() without tell(), e.g. after an "
                "exception in the evaluation): call opt.tell(fitness) to finish it or opt.discard() to drop it"
            )
        self._mirror.sync()  # a value set on the inner optimizer shows in ours from here
        members = self.local_members
        everyone = self._group is None or self._group.strategy == "fitness"  # whose noise the gradient sums
        noise = self._noise()
        if self._planner is not None:
            self._planner.fixed_bytes = noise.block_bytes()
        self._population = Population(
            noise, self.population_size, self.chunk_size, self._discard, self._switch, self._plan,
            members=(members.start, members.stop), gradient_members=(0, self.population_size) if everyone else None,
            planner=self._planner,
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
        for i, group in enumerate(self.param_groups):
            sigma = group["sigma"] if self._graph is None else self._graph.sigma[i]  # a device scalar there
            for p in group["params"]:
                key = (self.seed, step, self._param_index[p])
                lowrank = self._plan.is_lowrank(p)
                zero_row = self._plan.zero_rows.get(p) if lowrank else None  # e.g. padding_idx: stays put
                entries.append((p, key, sigma, group["rank"], lowrank, zero_row))
                if p not in self._generators or self._generators[p].device != p.device:  # (a model moved)
                    self._generators[p] = GeneratorPool(p.device)
        return PopulationNoise(entries, self.noise_block, self._generators, distinct=self._graph is not None)

    @torch.no_grad()
    def tell(self, fitness: torch.Tensor) -> None:
        """Finish the step with fitness ``(N,)``, **higher is better** (``step``'s closure returns losses,
        lower is better): shape, estimate ``p.grad = -g``, then the update (``_update``)."""
        population = self._population
        if population is None:
            raise RuntimeError("tell() called before ask()")
        device = next(iter(population.noise.entries))[0].device
        members = self.local_members
        validate_fitness(fitness, members.stop - members.start, device, self.nan_policy)
        if self._group is not None:  # every rank gets the whole population's fitness
            fitness = self._group.gather_fitness(fitness)
        if self._graph is None:
            shaped = shape_checked(fitness, self.nan_policy, self.shaping)  # the NaN policy, then the shaping
        else:  # a captured step: no host sync (capture.py)
            shaped = shape_in_graph(fitness, self.nan_policy, self.shaping, self._graph.flagged)
        missing = [p for p in population.noise.params if not any(m in population.fired for m in self._plan.users[p])]
        if missing:
            names = self._plan.names
            self.discard()  # its evaluation is spent: discard it so that ask() works again
            raise RuntimeError(
                f"No forward ran through the layers of {[names[p] for p in missing]} during this ask(): "
                "their update would be pure noise. Nothing was updated; the population is discarded."
            )
        grads = population.gradients(shaped)
        if self._group is not None and self._group.strategy == "gradient":
            grads = self._group.sum_gradients(grads)
        # -g of every parameter in one call (negation is exact: the same bits as one -g per parameter)
        for p, g in zip(grads, torch._foreach_neg(list(grads.values()))):
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
        self._update(fitness)

    def _update(self, fitness: torch.Tensor) -> None:
        """The update proper, once ``p.grad`` holds the estimate: the step pre-hooks (torch's global ones,
        then this optimizer's: they see ``p.grad``, e.g. to clip it), the inner step, sigma decay, the
        post-hooks. Both ``step(closure)`` and ``ask``/``tell`` pass here once per update."""
        args = (fitness,)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            run_step_hooks([*global_step_hooks(pre=True), *self._optimizer_step_pre_hooks.values()], self, args, {},
                           pre=True)
            self._mirror.sync()  # lr/momentum/betas set by a scheduler on either side, or by a hook
            if self._graph is None:
                inner_step(self.inner)
            else:
                self._graph.inner_step(self.inner)  # lr as device scalars (capture.py)
            if self._group is not None and self._group.check:
                self._group.check_same([p for g in self.param_groups for p in g["params"]])
            self._advance()
            run_step_hooks([*self._optimizer_step_post_hooks.values(), *global_step_hooks(pre=False)], self, args, {},
                           pre=False)

    def _advance(self) -> None:
        """The host's part of an update (a captured step's replay runs it too): sigma decay, the step
        count, the end of the population."""
        for group in self.param_groups:
            group["sigma"] *= self.sigma_decay
        self._step_count += 1
        self.discard()
        self._opt_called = True  # lr_scheduler's check that the optimizer stepped
        self._optimizer_step_code()

    def compile_step(self, closure: Callable[..., torch.Tensor], *, maximize: bool = False, warmup: int = 1):
        """``step(closure)`` as one CUDA graph: returns ``compiled``, and ``compiled(*tensors)`` is
        ``self.step(lambda: closure(*tensors), maximize)`` replayed with no host sync and no Python in the
        step (``capture.py``)::

            compiled = opt.compile_step(lambda x, y: per_member_cross_entropy(model(x), y))
            for x, y in loader:
                loss = compiled(x, y)  # a tensor that the next call overwrites

        The first ``warmup`` calls are eager steps (autotuning, the inner optimizer's state), the next
        one captures the graph; later calls copy their tensors into the captured ones and replay it. Noise,
        sigma decay and lr schedulers act as in eager steps (the same parameters to float rounding); the
        closure and step hooks run once, at capture (their kernels replay). NaN/inf fitness cannot
        raise inside a graph: that step's update is zero (``nan_policy="worst"``: ranked last, as eager),
        and ``compiled.check()`` raises afterwards. On a CPU the calls are eager ``step``s."""
        from .capture import CompiledStep

        return CompiledStep(self, closure, maximize=maximize, warmup=warmup)

    def step(self, closure: Callable[[], torch.Tensor], maximize: bool = False) -> torch.Tensor:
        """Drop-in step: ``closure()`` returns per-member losses ``(n,)``, **lower is better** (``tell``
        takes fitness, higher is better: ``step`` tells ``-loss``). With ``maximize=True`` the closure
        returns scores to maximise instead, as ``tell`` does.

        It runs under ``torch.no_grad()`` once per chunk with the perturbations active (a closure
        reaches the population as ``opt.population``); returns the mean of what the closure returned
        over the population (a tensor, no host sync). The step hooks fire once, inside ``tell``.
        """
        if closure is None:
            raise RuntimeError("EggrollOptimizer.step needs a closure returning per-member losses of shape (N,)")
        if maximize not in (True, False):
            raise TypeError(f"maximize must be a bool, got {maximize!r}")
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
            self.tell(loss if maximize else -loss)
        except BaseException:  # a bad closure or loss must not leave a population pending
            self.discard()
            raise
        return loss.mean()

    step.hooked = True  # torch.optim wraps a step not so marked with the step hooks: ours fire in tell()

    # ----- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's state plus ``"eggroll"``: the format version, the step, seed and noise layout, the inner
        optimizer's state, and the ``[name, shape]`` of every evolved parameter (``state.py``)."""
        state = super().state_dict()
        state["eggroll"] = {
            "format": FORMAT, "step": self._step_count, "seed": self.seed, "noise_block": self.noise_block,
            "population_size": self.population_size, "inner_type": type(self.inner).__name__,
            "inner": self.inner.state_dict(), "params": param_table(self.param_groups, self._plan.names),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume bitwise from ``state_dict()``. Everything is checked before anything changes: another
        model's parameters (names, shapes), a newer format, a truncated or foreign dict, another
        population size, noise block or inner optimizer class are each a ``ValueError`` naming both sides."""
        if self._population is not None:
            raise RuntimeError("load_state_dict() while a population is pending: tell() or discard() it first")
        expected = {"population_size": self.population_size, "noise_block": self.noise_block,
                    "inner_type": type(self.inner).__name__}
        extra = check_loadable(state_dict, expected, param_table(self.param_groups, self._plan.names))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "eggroll"})
        self._step_count, self.seed = int(extra["step"]), int(extra["seed"])
        self.inner.load_state_dict(extra["inner"])
        self._mirror.reset()
        self._graph_version += 1  # the inner optimizer's state tensors are new: a captured step recaptures

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

"""``EggrollOptimizer.compile_step``: a whole ES step (ask, the population forward, tell, the inner
update) replayed from one CUDA graph, the ``torch.optim`` way: state on the device, no host sync.

- The first ``warmup`` calls are eager steps on a side stream: Triton's autotuning, the memory
  planner's probe and the inner optimizer's state happen there. The next call captures one step and
  replays it; each later call copies its tensor arguments into the captured ones and replays.
- Noise: the optimizer's keyed generators (``noise.GeneratorPool``, one per draw of a block in a
  step) are registered with the graph and re-seeded before each replay with that step's keys, so a
  replay draws exactly what the eager step would.
- ``sigma`` and ``lr`` of each group are 0-dim device tensors that the graph reads, filled from
  ``param_groups`` before each call: ``sigma_decay``, lr schedulers and hand edits act as in eager steps.
  ``momentum``/``betas`` are baked in at capture: changing them later is an error.
- The inner optimizer takes its sync-free form: ``SGD`` fused (``torch._fused_sgd_`` reads a tensor
  lr), optimizers with a ``capturable`` option (Adam, AdamW, ...) ``capturable=True``.
- NaN/inf fitness cannot raise inside a graph: such a step's gradient estimate is zero
  (``nan_policy="worst"`` ranks them last as the eager step does) and the step is counted; ``check()``
  raises for it. A zero estimate leaves the parameters of plain SGD as they were; momentum, Adam and
  weight decay still move them, as a zero gradient does, and the step count and sigma decay advance. The closure's
  Python and the step hooks run once, at capture; their kernels replay.
- On a CPU (no CUDA graphs) each call is an eager ``step``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .inner import inner_step as _inner_step

__all__ = ["CompiledStep"]

BAKED = ("momentum", "betas", "dampening", "nesterov", "weight_decay")  # read as numbers at capture


class GraphScalars:
    """What ``EggrollOptimizer`` reads while a compiled step runs (its ``_graph``): the groups' sigma
    and lr as device scalars, and the count of steps with non-finite fitness."""

    def __init__(self, opt, device: torch.device):
        def scalar(group, key):
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in group["params"]) else torch.float32
            return torch.full((), float(group[key]), device=device, dtype=dtype)

        self.sigma = [scalar(g, "sigma") for g in opt.param_groups]
        self.lr = [scalar(g, "lr") for g in opt.param_groups]
        self.flagged = torch.zeros((), device=device, dtype=torch.int64)

    def fill(self, opt) -> None:
        for group, sigma, lr in zip(opt.param_groups, self.sigma, self.lr):
            sigma.fill_(group["sigma"])
            lr.fill_(group["lr"])

    def inner_step(self, inner: torch.optim.Optimizer) -> None:
        """The inner step with each group's lr as its device scalar (the floats are put back after)."""
        floats = [g["lr"] for g in inner.param_groups]
        try:
            for group, lr in zip(inner.param_groups, self.lr):
                group["lr"] = lr
            _inner_step(inner)
        finally:
            for group, lr in zip(inner.param_groups, floats):
                group["lr"] = lr


def _make_capturable(inner: torch.optim.Optimizer, device: torch.device) -> None:
    """Switch the inner optimizer to its form without host syncs, or raise naming why it has none."""
    for group in inner.param_groups:
        if isinstance(inner, torch.optim.SGD):
            group["fused"], group["foreach"] = True, False
        elif "capturable" in group:
            group["capturable"] = True
        else:
            raise TypeError(
                f"compile_step needs an inner optimizer that runs without host syncs: SGD, or one with a "
                f"capturable option (Adam, AdamW, ...); {type(inner).__name__} has none"
            )
    for state in inner.state.values():  # a capturable optimizer keeps its step count on the device
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device != device:
            state["step"] = step.to(device)


def _recover_generators(opt, default: torch.Generator, state: tuple[int, int]) -> None:
    """After a failed capture: torch leaves every generator registered with the graph marked as capturing
    (its ``CUDAGraph.capture_end`` raises before it releases them), and each later draw from them fails.
    The optimizer's own generators are dropped (new ones are made on the next draw, with the same
    seeds); the device's default generator gets a fresh state at the seed and offset it had before."""
    for pool in opt._generators.values():
        pool.generators.clear()
    default.graphsafe_set_state(torch.Generator(device=default.device).graphsafe_get_state())
    default.manual_seed(state[0])
    default.set_offset(state[1])


class CompiledStep:
    """``opt.compile_step(closure)``'s callable (see ``EggrollOptimizer.compile_step``)."""

    def __init__(self, opt, closure: Callable[..., torch.Tensor], maximize: bool = False, warmup: int = 1):
        if not callable(closure):
            raise TypeError(f"compile_step needs a callable closure, got {type(closure).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"Invalid warmup: {warmup!r} (expected an int >= 1: eager steps before the capture)")
        self.opt, self.closure, self.maximize, self.warmup = opt, closure, maximize, warmup
        self.device = opt.param_groups[0]["params"][0].device
        self.graphed = self.device.type == "cuda"
        self.calls, self.graph, self.out = 0, None, None
        if not self.graphed:
            return
        if opt._group is not None:
            raise NotImplementedError("compile_step runs one process's population; with a process_group use step()")
        _make_capturable(opt.inner, self.device)
        self.scalars = GraphScalars(opt, self.device)

    def __call__(self, *args) -> torch.Tensor:
        opt = self.opt
        if not self.graphed:
            return opt.step(lambda: self.closure(*args), maximize=self.maximize)
        if opt._population is not None:
            raise RuntimeError("A compiled step was called while a population is pending: tell() or discard() it first")
        if len(opt.param_groups) != len(self.scalars.sigma):
            raise RuntimeError("A param group was added after compile_step: call opt.compile_step(...) again")
        opt._mirror.sync()
        _make_capturable(opt.inner, self.device)  # (a load_state_dict puts the saved groups' flags back)
        self.scalars.fill(opt)
        if self.graph is not None and self.version != opt._graph_version:
            self.graph, self.calls = None, 0  # new inner state tensors (a load): warm up and capture again
        if self.calls < self.warmup:
            self.calls += 1
            return self._eager(args)
        if self.graph is None:
            self._capture(args)
        return self._replay(args)

    def _run(self, args) -> torch.Tensor:
        """One ``step`` with the optimizer reading the device scalars."""
        self.opt._graph = self.scalars
        try:
            return self.opt.step(lambda: self.closure(*args), maximize=self.maximize)
        finally:
            self.opt._graph = None

    def _eager(self, args) -> torch.Tensor:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self._run(args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, args) -> None:
        opt = self.opt
        self._keep_arguments(args)
        self.baked = [{k: g[k] for k in BAKED if k in g} for g in opt.inner.param_groups]
        opt._noise().reseed()  # the seeds the capture's draws set: inside a capture seeding only confirms
        generators = [g for pool in opt._generators.values() for g in pool.generators.values()]
        host = (opt._step_count, [g["sigma"] for g in opt.param_groups])
        default = torch.cuda.default_generators[self.device.index if self.device.index is not None
                                                else torch.cuda.current_device()]
        default_state = (default.initial_seed(), default.get_offset())
        self.graph = torch.cuda.CUDAGraph()
        for gen in generators:
            self.graph.register_generator_state(gen)
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(self.graph):
                self.out = self._run(self.static)
        except RuntimeError as error:
            self.graph, self.calls = None, 0  # a next call warms up again (new generators) before capturing
            _recover_generators(opt, default, default_state)
            if "captur" not in str(error).lower():
                raise
            raise RuntimeError(
                "compile_step could not capture the step in a CUDA graph: the closure or the model synchronises "
                "with the host (.item(), bool() or print of a tensor, data-dependent shapes such as nonzero or "
                f"boolean indexing). Remove the sync, or use opt.step(closure). CUDA said: {error}"
            ) from error
        except BaseException:
            self.graph, self.calls = None, 0
            _recover_generators(opt, default, default_state)
            raise
        finally:  # the capture ran no kernel: the host's state goes back to before it
            opt._step_count = host[0]
            for group, sigma in zip(opt.param_groups, host[1]):
                group["sigma"] = sigma
        self.version = opt._graph_version

    def _keep_arguments(self, args) -> None:
        """Copies of the capture's arguments (the graph reads these), and their flat form, once."""
        self.static = tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a, list(args))
        self.static_leaves, self.static_spec = tree_flatten(self.static)

    def _replay(self, args) -> torch.Tensor:
        opt = self.opt
        leaves, spec = tree_flatten(list(args))
        if spec != self.static_spec:
            raise TypeError(f"The compiled step was captured with arguments shaped {self.static_spec}, got {spec}")
        for i, (static, a) in enumerate(zip(self.static_leaves, leaves)):  # tensors inside lists and dicts too
            if isinstance(static, torch.Tensor):
                if not isinstance(a, torch.Tensor) or a.shape != static.shape or a.dtype != static.dtype:
                    got = f"{tuple(a.shape)} {a.dtype}" if isinstance(a, torch.Tensor) else type(a).__name__
                    raise ValueError(f"Argument {i} of the compiled step: captured as {tuple(static.shape)} "
                                     f"{static.dtype}, got {got} (capture another compile_step for other shapes)")
                if a is not static:
                    static.copy_(a, non_blocking=True)
            elif a is not static and a != static:
                raise ValueError(f"Argument {i} of the compiled step is not a tensor and changed since the capture "
                                 f"({static!r} -> {a!r}): only tensors can change between replays")
        for i, (group, baked) in enumerate(zip(opt.inner.param_groups, self.baked)):
            changed = [k for k, v in baked.items() if group[k] != v]
            if changed:
                raise RuntimeError(f"param_groups[{i}] {changed} changed after compile_step captured the step (only lr "
                                   "and sigma are read at each replay): call opt.compile_step(...) again")
        opt._noise().reseed()
        self.graph.replay()
        opt._advance()
        return self.out

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose fitness had a NaN/inf member since the start (a host sync)."""
        return int(self.scalars.flagged) if self.graphed else 0

    def check(self) -> None:
        """Raise ``ValueError`` if a step had NaN/inf fitness (or a shaping gave NaN/inf) and the optimizer's
        ``nan_policy`` is ``"raise"``: that step's gradient estimate was zero (see the module's notes). A
        host sync: call it where you sync anyway (logging)."""
        if self.graphed and self.opt.nan_policy == "raise" and self.nonfinite_steps:
            raise ValueError(f"{self.nonfinite_steps} compiled step(s) had NaN/inf fitness: their gradient estimates "
                             "were zero; pass nan_policy='worst' to rank such members last")

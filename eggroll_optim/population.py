"""A population being evaluated: its keyed noise, its chunks, and the gradient over all of them.

Nothing from ``ask`` is kept but the keys: the noise of any chunk is regenerated on demand
(SPEC §6); only the most recently used piece stays cached, so a population evaluated in one
piece never draws its noise twice. A call of the model runs the active members in pieces that fit
in memory (``memory.py``, ``chunk_size="auto"``); a CUDA out-of-memory error halves the piece once.
"""
from __future__ import annotations

import functools
import math
import sys
import warnings

import torch

from .hooks import IDLE, PerMember, Switch, run_members
from .memory import PROBE_MEMBERS, RunningStats, call_key, concat, even_pieces, measured, tensor_bytes
from .kernels.gradient import es_gradients
from .noise import PairedNoise, antithetic_pairs, keyed_pair_normals, noise_dtype, noise_key, signed_members

__all__ = ["Chunk", "Population", "PopulationNoise"]


def _untraced(fn):
    """``torch._dynamo.disable(fn)``, made at the first call that finds ``torch._dynamo`` loaded: a process
    that never compiles never imports it (seconds of start-up on a small CPU), and nothing traces
    ``fn`` before ``torch.compile`` has loaded it."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        disabled = call.__dict__.get("disabled")
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled = call.disabled = torch._dynamo.disable(fn)
        return disabled(*args, **kwargs)

    return call


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _warm_before_measuring(device: torch.device) -> bool:
    """The probe runs once unmeasured first: on CUDA, whose measurement (the allocator's peak) would count a
    first call's compile and autotune scratch; not inside a capture. (CPU counts the probe's tensors.)"""
    return device.type == "cuda" and not _capturing()


class PopulationNoise:
    """Keys and scales of every evolved parameter for one step.

    ``entries``: ``(param, (seed, step, param_index), sigma, rank, lowrank, zero_row)`` tuples;
    ``zero_row`` (or None) is a row of ``A`` kept at zero, such as an embedding's ``padding_idx``;
    ``sigma`` a float, or a 0-dim tensor on the parameter's device (a captured step, ``capture.py``).
    ``generators``: ``{param: noise.GeneratorPool}`` kept by the optimizer across steps (or None).
    """

    def __init__(self, entries: list, block_pairs: int, generators: dict | None = None, distinct: bool = False):
        self.entries, self.block_pairs = entries, block_pairs
        # what each parameter draws, fixed for the step: the shapes per pair, the key, the dtype
        self._draws = [
            ([(p.shape[0], rank), (math.prod(p.shape[1:]), rank)] if lowrank else [tuple(p.shape)],
             noise_key(*key), noise_dtype(p.dtype))
            for p, key, _, rank, lowrank, _ in entries
        ]
        self._blocks: dict = {}  # the latest drawn block per parameter, shared by consecutive chunks
        self.generators = generators
        for pool in (generators or {}).values():
            pool.begin(distinct)

    @property
    def params(self) -> list:
        return [entry[0] for entry in self.entries]

    def block_bytes(self) -> int:
        """Bytes of one block of draws of every parameter (what chunked draws keep cached)."""
        total = 0
        for shapes, _, dtype in self._draws:
            total += sum(map(math.prod, shapes)) * self.block_pairs * torch.finfo(dtype).bits // 8
        return total

    def reseed(self) -> None:
        """Seed every kept generator as this step's draws seed it (before a captured step's replay)."""
        for (p, *_), (_, key, _) in zip(self.entries, self._draws):
            self.generators[p].reseed(key)

    def chunk_noise(self, start: int, stop: int, reuse_blocks: bool = False) -> dict:
        """``{param: Pairs}`` (unpacking as ``(A_scaled (n, m, r), B (n, k, r))``) or ``{param: noise (n, *shape)}``.

        ``reuse_blocks``: keep the latest drawn block per parameter, for chunks that share one.
        """
        noise = {}
        for (p, _, sigma, rank, lowrank, zero_row), (shapes, key, dtype) in zip(self.entries, self._draws):
            draws = keyed_pair_normals(
                key, shapes, start // 2, stop // 2, device=p.device, dtype=dtype, block_pairs=self.block_pairs,
                cache=self._blocks if reuse_blocks else None,
                generators=self.generators.get(p) if self.generators is not None else None,
            )
            if lowrank:
                A, B = draws
                if zero_row is not None:  # e.g. an embedding's padding_idx: never perturbed, never updated
                    A = A.clone()  # a copy: the draw is (or views) the cached block
                    A[:, zero_row] = 0
                noise[p] = antithetic_pairs(A, B, sigma, rank)
            else:
                noise[p] = signed_members(draws[0], sigma)  # (n, *shape)
        return noise


class Chunk:
    """Members ``[start, stop)`` running in one call: their factors and per-member parameter values.
    ``outer``: the active members they are a piece of (default: themselves)."""

    def __init__(self, population: "Population", start: int, stop: int, noise: dict, plan, outer=None):
        self.population, self.start, self.stop = population, start, stop
        self.outer = (start, stop) if outer is None else outer
        self.fired = population.fired
        self.factors = {p: v for p, v in noise.items() if plan.is_lowrank(p)}
        self.values = {  # p + e_i (n, *shape), in p's dtype
            p: p.detach() + v if v.dtype == p.dtype else (p.detach().to(v.dtype) + v).to(p.dtype)
            for p, v in noise.items() if not plan.is_lowrank(p)
        }
        # the noise of a 1-D full-rank parameter (a bias) on CUDA in pairs, for the kernel that runs one
        # product per pair (layers.fused); its members are [+e_k, -e_k] (PopulationNoise.chunk_noise)
        self.offsets = {
            p: PairedNoise(v[0::2]) for p, v in noise.items()
            if p.is_cuda and p.dim() == 1 and not plan.is_lowrank(p) and start % 2 == 0 and v.shape[0] == stop - start
        }

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def nbytes(self) -> int:
        return tensor_bytes((self.factors, self.values))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """These members' rows of a per-member input: ``(N, ...)``, this process's share (under a process
        group) or ``(n, ...)`` for the active chunk."""
        population, lead = self.population, (x.shape[0] if x.dim() >= 1 else None)
        for lo, hi in ((0, population.size), population.local, self.outer):
            if lead == hi - lo:
                return x[self.start - lo:self.stop - lo]
        size = self.outer[1] - self.outer[0]
        expected = f"{population.size}" + (f" (or {size}, this chunk)" if population.chunked else "")
        raise ValueError(f"per_member input must have leading dim {expected}, got shape {tuple(x.shape)}")


class Population:
    """Handle returned by ``EggrollOptimizer.ask()``; a context manager.

    Unchunked, all ``N`` members are active from ``ask()`` until ``tell()`` or ``with`` exit.
    Chunked, ``for members in population.chunks():`` activates ``members`` (a ``slice``) in turn.
    While members are active, calling the optimizer's module runs all of them: a plain tensor
    argument is one batch shared by every member, ``population.per_member(x)`` gives member ``i``
    the row ``x[i]``; the output is ``(n, *output)`` for the ``n`` active members.
    """

    def __init__(self, noise: PopulationNoise, population_size: int, chunk_size: int, on_abort=None,
                 switch: Switch | None = None, plan=None, members: tuple[int, int] | None = None,
                 gradient_members: tuple[int, int] | None = None, planner=None):
        self.noise, self.size, self.chunk_size = noise, population_size, chunk_size
        self.planner = planner  # memory.Planner: pieces per call (chunk_size="auto"); None: the whole chunk
        self.local = members or (0, population_size)  # the members this process evaluates
        self.gradient_members = gradient_members or self.local  # whose noise ``gradients`` sums
        self.switch = Switch() if switch is None else switch  # what the hooks read
        self.plan = plan
        self._on_abort = on_abort  # called when a ``with`` block exits with an exception
        self.fired: set = set()
        self._cache: tuple[int, int, dict] | None = None
        self._chunk: tuple | None = None  # the last Chunk built, reused while nothing it was built from changed
        self._active: tuple[int, int] | None = None  # the active members [start, stop)
        self._closed = False
        self._set_active(None)
        if not self.chunked:
            self._activate(*self.local)

    @property
    def local_size(self) -> int:
        return self.local[1] - self.local[0]

    @property
    def device(self) -> torch.device:
        """Where the members run (the first evolved parameter's device)."""
        return self.noise.entries[0][0].device

    @property
    def chunked(self) -> bool:
        return self.chunk_size < self.local_size

    def ranges(self, members: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """``[start, stop)`` parts of ``members`` (default: this process's) whose noise ``gradients`` draws
        at once: the chunks, or with a planner (``chunk_size="auto"``) the noise blocks, so that its
        memory is one block's, whatever the population."""
        lo, hi = members or self.local
        step = self.chunk_size if self.planner is None else 2 * self.noise.block_pairs
        return [(a, min(a + step, hi)) for a in range(lo, hi, step)]

    def _noise_for(self, start: int, stop: int) -> dict:
        if self._cache is not None and self._cache[:2] == (start, stop):
            return self._cache[2]
        noise = self.noise.chunk_noise(start, stop, reuse_blocks=stop - start < self.local_size)
        self._cache = (start, stop, noise)
        return noise

    def _set_active(self, members: tuple[int, int] | None) -> None:
        self._active = members
        idle = members is None and self.chunked and not self._closed
        self.switch.population = IDLE if idle else (self if members is not None else None)

    def _activate(self, start: int, stop: int) -> None:
        self._set_active((start, stop))

    def chunks(self):
        """Yield ``slice(start, stop)`` for each chunk, with its perturbations active."""
        lo, hi = self.local
        for start in range(lo, hi, self.chunk_size):
            stop = min(start + self.chunk_size, hi)
            self._activate(start, stop)
            yield slice(start, stop)
        if self.chunked:
            self._set_active(None)

    @property
    def members(self) -> slice:
        """The active members."""
        if self._active is None:
            raise RuntimeError("No members are active")
        return slice(*self._active)

    def per_member(self, x: torch.Tensor) -> PerMember:
        """Mark ``x (N, ...)`` as one input per member: member ``i`` sees ``x[i]`` (inside a chunk,
        the chunk's rows are taken; a tensor of the chunk's size is taken as it is)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"per_member expects a tensor with a leading member dim, got {x!r}"[:200])
        if x.shape[0] not in (self.size, self.local_size) and not self.chunked:
            raise ValueError(f"per_member input must have leading dim {self.size} (the population), "
                             f"got shape {tuple(x.shape)}")
        return PerMember(x)

    def slice(self, x: torch.Tensor) -> torch.Tensor:
        """The active members' rows of a per-member tensor ``(N, ...)``."""
        if x.shape[0] != self.size:
            raise ValueError(f"Expected a leading dim of {self.size} (the population), got {tuple(x.shape)}")
        return x[self.members]

    @_untraced
    def run(self, inner, root, args, kwargs):
        """Run ``inner`` (the root's forward) for every active member; called by the root's override.

        The members run in pieces (``memory.py``); a CUDA out-of-memory error in a piece halves it, once
        a call. Running statistics end as one call over all members would leave them.

        ``torch.compile`` does not trace in here: the members run eagerly under vmap (their noise is
        drawn, their pieces planned and measured here; traced, each chunk's bounds would be guarded
        constants, a recompilation per chunk). Outside a population a compiled model is compiled."""
        if self._active is None:
            raise RuntimeError("No members are active")
        start, stop = self._active
        key = call_key(args, kwargs) if self.planner is not None else None
        # unmeasured inputs: measure a first piece, then plan the rest (nothing to plan if it is all)
        probe = key is not None and not self.planner.knows(key) and stop - start > PROBE_MEMBERS
        todo = [(start, start + PROBE_MEMBERS)] if probe else self._pieces(start, stop, key)
        outputs, stats, halved = [], RunningStats(self.plan.updating_norms()), False
        if probe and _warm_before_measuring(self.device):
            self._unmeasured(todo[0], inner, root, args, kwargs)
            stats.discard()
        while todo:
            piece, failed, measure = todo.pop(0), False, probe and not outputs
            try:
                outputs.append(self._run_piece(*piece, inner, root, args, kwargs, key if measure else None))
            except torch.OutOfMemoryError:
                if halved or piece[1] - piece[0] < 4 or _capturing():
                    raise  # (inside a CUDA graph's capture the failed piece's kernels are recorded already)
                failed = halved = True  # retried below, once the failed piece's tensors are freed
            if failed:
                todo = self._halved(piece, stop, key)
                continue
            stats.done(piece[1] - piece[0])
            if probe and not todo:
                todo = self._pieces(piece[1], stop, key)
        stats.finish()
        return outputs[0] if len(outputs) == 1 else concat(outputs)

    def _unmeasured(self, piece: tuple[int, int], inner, root, args, kwargs) -> None:
        """The probe's first run, on CUDA: it compiles and autotunes what the probe runs, outside the
        measurement (``memory.py``). The random state is put back (dropout draws as in one run); an
        out-of-memory error is left to the measured run, which halves the piece."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            try:
                self._run_piece(*piece, inner, root, args, kwargs, None)
            except torch.OutOfMemoryError:
                pass

    def _halved(self, piece: tuple[int, int], stop: int, key) -> list[tuple[int, int]]:
        size = (piece[1] - piece[0]) // 4 * 2
        warnings.warn(f"Out of memory running members [{piece[0]}, {piece[1]}) at once: retrying in pieces of "
                      f"{size} (pass max_memory= or a smaller chunk_size to avoid it)", stacklevel=4)
        if key is not None:
            self.planner.halve(key, piece[1] - piece[0])
        return even_pieces(piece[0], stop, size)

    def _pieces(self, start: int, stop: int, key) -> list[tuple[int, int]]:
        if start >= stop:
            return []
        if key is None or not self.planner.knows(key):
            return [(start, stop)]
        return even_pieces(start, stop, self.planner.fit(key))

    def _chunk_for(self, start: int, stop: int) -> Chunk:
        """Members ``[start, stop)`` as a ``Chunk``; the previous one again when the same members run with the
        same noise and unchanged parameters (an RL rollout calls the model hundreds of times a step). A
        parameter edited in place or replaced is seen (its version, its storage); an in-place edit through
        ``p.data`` is not: edit parameters under ``torch.no_grad()`` instead."""
        noise = self._noise_for(start, stop)
        key = (start, stop, self._active, id(noise), tuple((p._version, p.data_ptr()) for p in noise))
        if self._chunk is None or self._chunk[0] != key:
            self._chunk = (key, Chunk(self, start, stop, noise, self.plan, outer=self._active))
        return self._chunk[1]

    def _run_piece(self, start: int, stop: int, inner, root, args, kwargs, probe_key):
        chunk = self._chunk_for(start, stop)
        if probe_key is None:
            return run_members(self.switch, self.plan, root, chunk, inner, args, kwargs)
        with measured(self.device) as m:
            out = run_members(self.switch, self.plan, root, chunk, inner, args, kwargs)
        total = self._active[1] - self._active[0]
        self.planner.record(probe_key, self.device, chunk.size, m.bytes, chunk.nbytes, tensor_bytes(out), total)
        return out

    def member_state_dict(self, i: int, module=None) -> dict:
        """Member ``i``'s dense parameters ``{name: tensor}``: every evolved parameter perturbed
        (``W + A_scaled_i B_iᵀ`` reshaped to ``W``, ``p + e_i`` full-rank), the others as they are.

        ``torch.func.functional_call(module, population.member_state_dict(i), x)`` is member ``i``'s
        output on ``x`` (the reference the tests hold the population to)."""
        if not 0 <= i < self.size:
            raise IndexError(f"member {i} is outside the population of {self.size}")
        module = self.plan.root if module is None else module
        pair = self.noise.chunk_noise(i - i % 2, i - i % 2 + 2)
        out = {}
        for name, p in module.named_parameters():  # a tied parameter once: functional_call ties the rest
            value = pair.get(p)
            if value is None:
                out[name] = p.detach().clone()
            elif isinstance(value, tuple):
                A, B = value[0][i % 2], value[1][i % 2]
                out[name] = (p.detach() + (A @ B.T).view(p.shape).to(p.dtype))
            else:
                out[name] = (p.detach().to(value.dtype) + value[i % 2]).to(p.dtype)
        return out

    def gradients(self, shaped: torch.Tensor) -> dict:
        """``{param: g}``: the estimate ``(1/sqrt(N)) Σ_i f_i noise_i`` summed over every chunk of the
        gradient's members (``kernels.es_gradients``, every parameter of a chunk at once: over pairs for
        the low-rank ``Pairs``)."""
        grads = {}
        for start, stop in self.ranges(self.gradient_members):
            noise = self._noise_for(start, stop)
            fitness = shaped if (start, stop) == (0, shaped.shape[0]) else shaped[start:stop]
            for p, g in zip(noise, es_gradients(fitness, list(noise.values()), self.size)):
                g = g if g.shape == p.shape else g.view(p.shape)  # (m, k) -> a conv's kernel
                grads[p] = g if p not in grads else grads[p] + g
        return grads

    def close(self) -> None:
        """Make the hooks inert (the noise keys stay for ``tell``)."""
        self._closed = True
        self._set_active(None)

    def __enter__(self) -> "Population":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is not None and self._on_abort is not None:
            self._on_abort(self)  # an evaluation that failed is discarded: ask() works again

    def __repr__(self) -> str:
        return f"Population(size={self.size}, chunk_size={self.chunk_size})"


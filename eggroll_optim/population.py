"""A population being evaluated: its keyed noise, its chunks, and the gradient over all of them.

Nothing from ``ask`` is kept but the keys: the noise of any chunk is regenerated on demand
(SPEC §6); only the most recently active chunk stays cached, so a population evaluated in one
chunk never draws its noise twice.
"""
from __future__ import annotations

import torch

from .hooks import IDLE, PerMember, Switch, run_members
from .kernels import fullrank_gradient_sum, lowrank_gradient_sum
from .noise import antithetic_pairs, keyed_pair_normals, noise_dtype, noise_key

__all__ = ["Chunk", "Population", "PopulationNoise"]


class PopulationNoise:
    """Keys and scales of every evolved parameter for one step.

    ``entries``: ``(param, (seed, step, param_index), sigma, rank, lowrank, zero_row)`` tuples;
    ``zero_row`` (or None) is a row of ``A`` kept at zero, such as an embedding's ``padding_idx``.
    """

    def __init__(self, entries: list, block_pairs: int):
        self.entries, self.block_pairs = entries, block_pairs
        self._blocks: dict = {}  # the latest drawn block per parameter, shared by consecutive chunks

    @property
    def params(self) -> list:
        return [entry[0] for entry in self.entries]

    def chunk_noise(self, start: int, stop: int, reuse_blocks: bool = False) -> dict:
        """``{param: (A_scaled (n, m, r), B (n, k, r))}`` or ``{param: noise (n, *shape)}``.

        ``reuse_blocks``: keep the latest drawn block per parameter, for chunks that share one.
        """
        noise = {}
        for p, key, sigma, rank, lowrank, zero_row in self.entries:
            shapes = [(p.shape[0], rank), (p[0].numel(), rank)] if lowrank else [tuple(p.shape)]
            draws = keyed_pair_normals(
                noise_key(*key), shapes, start // 2, stop // 2,
                device=p.device, dtype=noise_dtype(p.dtype), block_pairs=self.block_pairs,
                cache=self._blocks if reuse_blocks else None,
            )
            if lowrank:
                A_scaled, B = antithetic_pairs(draws[0], draws[1], sigma, rank)
                if zero_row is not None:  # e.g. an embedding's padding_idx: never perturbed, never updated
                    A_scaled[:, zero_row] = 0
                noise[p] = (A_scaled, B)
            else:
                eps = draws[0]
                noise[p] = torch.stack((eps, -eps), dim=1).flatten(0, 1) * sigma  # (n, *shape)
        return noise


class Chunk:
    """The active members ``[start, stop)``: their factors and per-member parameter values."""

    def __init__(self, population: "Population", start: int, stop: int, noise: dict, plan):
        self.population, self.start, self.stop = population, start, stop
        self.fired = population.fired
        self.factors = {p: v for p, v in noise.items() if plan.is_lowrank(p)}
        self.values = {  # p + e_i (n, *shape), in p's dtype
            p: (p.detach().to(v.dtype) + v).to(p.dtype) for p, v in noise.items() if not plan.is_lowrank(p)
        }

    @property
    def size(self) -> int:
        return self.stop - self.start

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The active members' rows of a per-member input: ``(N, ...)``, or ``(n, ...)`` for this chunk."""
        population, lead = self.population, (x.shape[0] if x.dim() >= 1 else None)
        lo, hi = population.local
        if lead == population.size:
            return x[self.start:self.stop]
        if lead == hi - lo:  # this process's share (under a process group)
            return x[self.start - lo:self.stop - lo]
        if lead == self.size:
            return x
        expected = f"{population.size}" + (f" (or {self.size}, this chunk)" if population.chunked else "")
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
                 gradient_members: tuple[int, int] | None = None):
        self.noise, self.size, self.chunk_size = noise, population_size, chunk_size
        self.local = members or (0, population_size)  # the members this process evaluates
        self.gradient_members = gradient_members or self.local  # whose noise ``gradients`` sums
        self.switch = Switch() if switch is None else switch  # what the hooks read
        self.plan = plan
        self._on_abort = on_abort  # called when a ``with`` block exits with an exception
        self.fired: set = set()
        self._cache: tuple[int, int, dict] | None = None
        self._active: Chunk | None = None
        self._closed = False
        self._set_active(None)
        if not self.chunked:
            self._activate(*self.local)

    @property
    def local_size(self) -> int:
        return self.local[1] - self.local[0]

    @property
    def chunked(self) -> bool:
        return self.chunk_size < self.local_size

    def ranges(self, members: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """The chunks ``[start, stop)`` of ``members`` (default: this process's members)."""
        lo, hi = members or self.local
        return [(a, min(a + self.chunk_size, hi)) for a in range(lo, hi, self.chunk_size)]

    def _noise_for(self, start: int, stop: int) -> dict:
        if self._cache is not None and self._cache[:2] == (start, stop):
            return self._cache[2]
        noise = self.noise.chunk_noise(start, stop, reuse_blocks=self.chunked)
        self._cache = (start, stop, noise)
        return noise

    def _set_active(self, chunk: Chunk | None) -> None:
        self._active = chunk
        idle = chunk is None and self.chunked and not self._closed
        self.switch.population = IDLE if idle else (self if chunk is not None else None)

    def _activate(self, start: int, stop: int) -> None:
        self._set_active(Chunk(self, start, stop, self._noise_for(start, stop), self.plan))

    def chunks(self):
        """Yield ``slice(start, stop)`` for each chunk, with its perturbations active."""
        for start, stop in self.ranges():
            self._activate(start, stop)
            yield slice(start, stop)
        if self.chunked:
            self._set_active(None)

    @property
    def members(self) -> slice:
        """The active members."""
        if self._active is None:
            raise RuntimeError("No members are active")
        return slice(self._active.start, self._active.stop)

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

    def run(self, inner, root, args, kwargs):
        """Run ``inner`` (the root's forward) for every active member; called by the root's override."""
        if self._active is None:
            raise RuntimeError("No members are active")
        return run_members(self.switch, self.plan, root, self._active, inner, args, kwargs)

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
        """``{param: Σ_i f_i noise_i}`` over every chunk (divide by ``sqrt(N)`` for the estimate)."""
        grads = {}
        for start, stop in self.ranges(self.gradient_members):
            # members 2k, 2k+1 carry +noise, -noise: sum over pairs with f_2k - f_2k+1 (half the work)
            f = shaped[start:stop:2] - shaped[start + 1:stop:2]
            for p, value in self._noise_for(start, stop).items():
                if isinstance(value, tuple):
                    g = lowrank_gradient_sum(f, value[0][::2], value[1][::2]).view(p.shape)
                else:
                    g = fullrank_gradient_sum(f, value[::2])
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


"""One population split across the ranks of a ``torch.distributed`` process group.

Each rank evaluates a contiguous share of the members (whole antithetic pairs); its noise is
regenerated from the shared keys (``noise``), so nothing but the update's inputs crosses the
network. Two ways to combine the ranks' work into the same update on every rank:

- ``"fitness"``: ``all_gather`` of the members' fitness (``4 N`` bytes in all). Every rank then
  shapes the whole population's fitness and rebuilds the whole gradient from the keys. The
  network carries almost nothing; every rank repeats the gradient GEMMs of the whole population
  (``2 r N Σ m n`` FLOPs) and redraws its noise.
- ``"gradient"``: every rank still gathers the fitness (the shaping needs the whole population),
  then sums the gradient of its own members only and ``all_reduce``-s it (a ring moves about
  ``2 · 4 Σ |θ|`` bytes through each rank).

``"auto"`` picks the one whose cost (``FLOPS`` for the repeated GEMMs, ``BANDWIDTH`` for the
reduce) is smaller for this model and population: small models and all but huge populations take
``"fitness"``; large models at large populations take ``"gradient"``. Both give every rank bitwise
the same parameters (the same fitness and keys on every rank, or one reduced buffer broadcast).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["BANDWIDTH", "FLOPS", "LINK_LATENCY", "PopulationGroup", "choose_strategy", "member_shares"]

FLOPS = 50e12  # a GPU's sustained GEMM rate, for the strategy's cost model
CPU_FLOPS = 50e9  # a CPU process's
BANDWIDTH = 12.5e9  # bytes/s through one rank's link between nodes (100 Gbit/s)
LINK_LATENCY = 5e-6  # seconds per ring step between nodes


def member_shares(population_size: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` member ranges, whole pairs each, as even as possible."""
    pairs = population_size // 2
    base, extra = divmod(pairs, world_size)
    shares, start = [], 0
    for rank in range(world_size):
        stop = start + 2 * (base + (rank < extra))
        shares.append((start, stop))
        start = stop
    return shares


def choose_strategy(lowrank_shapes: list[tuple[int, int, int]], fullrank_numel: int, population_size: int,
                    world_size: int, flops: float = FLOPS) -> dict:
    """The cheaper strategy for matrices ``(m, n, r)`` and ``fullrank_numel`` other elements.

    Returns ``{"strategy", "fitness_bytes", "gradient_bytes", "repeated_flops", "fitness_s",
    "gradient_s"}``: bytes through each rank per step, the FLOPs a rank repeats under
    ``"fitness"``, and each strategy's cost on paper (``flops``: ``FLOPS`` on a GPU, ``CPU_FLOPS`` on a
    CPU; ``BANDWIDTH``, ``LINK_LATENCY``)."""
    params = sum(m * n for m, n, _ in lowrank_shapes) + fullrank_numel
    share = (world_size - 1) / world_size
    repeated = share * (sum(2 * r * population_size * m * n for m, n, r in lowrank_shapes)
                        + 2 * population_size * fullrank_numel)
    gather_s = ring_allgather_s(world_size, 4 * population_size)
    fitness_s = gather_s + repeated / flops
    gradient_s = gather_s + ring_allreduce_s(world_size, 4 * params)
    return {"strategy": "fitness" if fitness_s <= gradient_s else "gradient",
            "fitness_bytes": 4 * population_size * share, "gradient_bytes": (4 * population_size + 8 * params) * share,
            "repeated_flops": repeated, "fitness_s": fitness_s, "gradient_s": gradient_s}


def ring_allgather_s(world_size: int, nbytes: float) -> float:
    """A ring all-gather of ``nbytes`` in all: ``W - 1`` steps, each rank receiving the others' parts."""
    return (world_size - 1) * LINK_LATENCY + nbytes * (world_size - 1) / world_size / BANDWIDTH


def ring_allreduce_s(world_size: int, nbytes: float) -> float:
    """A ring all-reduce of ``nbytes``: ``2 (W - 1)`` steps moving ``2 nbytes (W - 1) / W`` through each rank."""
    return 2 * (world_size - 1) * LINK_LATENCY + 2 * nbytes * (world_size - 1) / world_size / BANDWIDTH


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14


@dataclass
class PopulationGroup:
    """This rank's share of a population over ``group`` (``None``: the default group)."""

    group: object
    population_size: int
    strategy: str = "auto"
    check: bool = False  # compare a parameter checksum across ranks after every step

    def __post_init__(self):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group needs torch.distributed initialised (torchrun + init_process_group)")
        if self.strategy not in ("auto", "fitness", "gradient"):
            raise ValueError(f"Invalid strategy: {self.strategy!r} (expected 'auto', 'fitness' or 'gradient')")
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.population_size // 2 < self.world_size:
            raise ValueError(f"population_size={self.population_size} has fewer pairs than the "
                             f"{self.world_size} ranks of the group")
        self.shares = member_shares(self.population_size, self.world_size)
        self.members = self.shares[self.rank]

    @property
    def local_size(self) -> int:
        return self.members[1] - self.members[0]

    def resolve(self, lowrank_shapes, fullrank_numel, device: torch.device) -> dict:
        """Fix ``"auto"`` for this model on ``device``; returns the cost model's figures."""
        flops = FLOPS if torch.device(device).type == "cuda" else CPU_FLOPS
        figures = choose_strategy(lowrank_shapes, fullrank_numel, self.population_size, self.world_size, flops)
        if self.strategy == "auto":
            self.strategy = figures["strategy"]
        return figures

    def gather_fitness(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's ``(local_size,)`` fitness -> the whole population's ``(N,)``, on every rank."""
        width = max(stop - start for start, stop in self.shares)
        padded = local.new_zeros(width)
        padded[:local.shape[0]] = local
        everyone = local.new_empty(self.world_size * width)
        _all_gather(everyone, padded, group=self.group)
        rows = everyone.view(self.world_size, width)
        return torch.cat([rows[i, :stop - start] for i, (start, stop) in enumerate(self.shares)])

    def sum_gradients(self, grads: dict) -> dict:
        """All-reduce ``{param: local gradient sum}`` (one flat buffer per dtype)."""
        by_dtype: dict = {}
        for p, g in grads.items():
            by_dtype.setdefault(g.dtype, []).append(p)
        out = {}
        for params in by_dtype.values():
            flat = torch.cat([grads[p].reshape(-1) for p in params])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for p in params:
                n = grads[p].numel()
                out[p] = flat[offset:offset + n].view_as(grads[p])
                offset += n
        return out

    def check_same(self, params) -> None:
        """Raise unless every rank holds bitwise the same parameters (a float64 checksum of their bits)."""
        bits = torch.stack([
            p.detach().reshape(-1).view(torch.uint8).double().mul(
                torch.arange(1, p.numel() * p.element_size() + 1, device=p.device, dtype=torch.float64)
            ).sum() for p in params
        ])
        lo, hi = bits.clone(), bits.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(lo, hi):
            bad = int((lo != hi).nonzero()[0])
            raise RuntimeError(f"rank {self.rank}: parameter {bad} differs across ranks after the step "
                               "(a non-deterministic kernel, or ranks given different data or seeds)")


"""Antithetic pairs as a value (SPEC §2): the ``Pairs`` type and the layouts that build it.

Members ``2k`` and ``2k + 1`` share one draw ``(A_k, B_k)``; member ``2k`` carries ``+scale A_k``,
member ``2k + 1`` carries ``-scale A_k``, with ``scale = sigma / sqrt(rank)``. A kernel that knows
this does half the work (one ``x B_k`` per pair, one gradient term per pair); it knows it from the
type of the factors it is given, ``Pairs``, and from nothing else.
"""
from __future__ import annotations

import math

import torch
from torch.utils import _pytree as pytree

from .layout import layout_kernels_available, pair_rows, signed_pairs

__all__ = ["PairedNoise", "Pairs", "antithetic", "antithetic_pairs", "signed_members"]


class Pairs(tuple):
    """The low-rank noise of ``N = 2P`` antithetic members for one ``(m, n)`` weight.

    It is the seed's ``(A_scaled, B)`` pair: ``A_scaled, B = pairs`` (or ``pairs[0]``, ``pairs[1]``)
    gives the members' factors,

    - ``A_scaled (N, m, r)``: member ``2k`` ``+scale A_k``, member ``2k + 1`` ``-scale A_k``;
    - ``B (N, n, r)``: ``B_k`` for both members of pair ``k``, stored ``(n, N, r)``;

    and it carries the pair structure that the kernels read:

    - ``A_pair (P, m, r)``: ``scale A_k``, the ``+`` members' rows of ``A_scaled`` (a view);
    - ``B_pair (n, P, r)``: ``B_k`` once per pair, contiguous (the layout of ``x B`` and of the
      gradient's GEMM);
    - ``scale``: ``sigma / sqrt(rank)``.

    The kernels take their pair paths for a ``Pairs`` and only for one: any other ``(A_scaled, B)``
    (a plain tuple, factors built by hand) takes the generic path over members. A ``Pairs`` is a
    value, like ``torch.nn.utils.rnn.PackedSequence``: the kernels read ``A_pair``/``B_pair`` where
    pairs save work and the member tensors elsewhere, so do not edit its tensors in place; to try
    other factors, build a new one with ``antithetic_pairs`` or pass a plain tuple of your own.

    As a pytree (``torch.func.vmap``, ``torch.utils._pytree``) it is its two member tensors: mapping
    over members hands each member a plain ``(A_i, B_i)`` tuple.
    """

    def __new__(cls, A_scaled: torch.Tensor, B: torch.Tensor, B_pair: torch.Tensor, scale: float) -> Pairs:
        if A_scaled.dim() != 3 or B.dim() != 3 or A_scaled.shape[0] % 2 or B.shape[0] != A_scaled.shape[0] \
                or B.shape[2] != A_scaled.shape[2]:
            raise ValueError(f"Pairs: expected A_scaled (N, m, r) and B (N, n, r) with an even N, got "
                             f"A_scaled {tuple(A_scaled.shape)} and B {tuple(B.shape)}")
        N, _, r = A_scaled.shape
        if tuple(B_pair.shape) != (B.shape[1], N // 2, r) or not B_pair.is_contiguous():
            raise ValueError(f"Pairs: expected a contiguous B_pair ({B.shape[1]}, {N // 2}, {r}), "
                             f"got {tuple(B_pair.shape)}")
        self = super().__new__(cls, (A_scaled, B))
        self.A_pair, self.B_pair = A_scaled[0::2], B_pair
        self.scale = scale if isinstance(scale, torch.Tensor) else float(scale)  # a device scalar: no sync
        return self

    @property
    def A_scaled(self) -> torch.Tensor:
        return self[0]

    @property
    def B(self) -> torch.Tensor:
        return self[1]

    @property
    def num_pairs(self) -> int:
        return self.B_pair.shape[1]

    def __reduce__(self):
        return Pairs, (self[0], self[1], self.B_pair, self.scale)

    def __repr__(self) -> str:
        N, m, r = self[0].shape
        scale = "<tensor>" if isinstance(self.scale, torch.Tensor) else f"{self.scale:g}"
        return f"Pairs(N={N}, m={m}, n={self[1].shape[1]}, rank={r}, scale={scale}, dtype={self[0].dtype})"


class PairedNoise:
    """The full-rank noise of ``N = 2P`` antithetic members (a bias, a norm's scale): member ``2k`` carries
    ``+half_k``, member ``2k + 1`` ``-half_k`` (``sigma`` included).

    ``half (P, *shape)``: one row per pair; ``members()``: the ``(N, *shape)`` tensor of every member.
    Where a kernel takes per-member noise, this type tells it the members are pairs (``perturbed_mlp``'s
    layer-1 bias noise: one product per pair); it knows that from the type alone, as with ``Pairs``.
    """

    __slots__ = ("half",)

    def __init__(self, half: torch.Tensor):
        if half.dim() < 1:
            raise ValueError("PairedNoise: expected half (P, *shape), got a 0-dim tensor")
        self.half = half

    @property
    def shape(self) -> torch.Size:
        return torch.Size((2 * self.half.shape[0], *self.half.shape[1:]))

    def members(self) -> torch.Tensor:
        """``(N, *shape)``: ``+half_k`` then ``-half_k`` for each pair."""
        return signed_members(self.half, 1.0)

    def __repr__(self) -> str:
        return f"PairedNoise(N={self.shape[0]}, shape={tuple(self.half.shape[1:])}, dtype={self.half.dtype})"


pytree.register_pytree_node(
    Pairs,
    lambda pairs: (list(pairs), None),
    lambda members, _: tuple(members),
    serialized_type_name="eggroll_optim.noise.Pairs",
)


def signed_members(eps: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Pair draws ``eps (P, *shape)`` -> the members' ``(2P, *shape)``: rows ``2k``, ``2k + 1`` carry
    ``+scale eps_k``, ``-scale eps_k``: ``antithetic_pairs``' ``A_scaled``, a full-rank parameter's member
    noise. Torch's stack-then-scale (three kernels), or where the layout kernels run (CUDA) the same bits in
    one Triton pass (``signed_pairs``); a device ``scale`` (a captured step's sigma) scales first, one more
    pass; float64 stays with torch, whose double scale Triton lacks."""
    if eps.dtype != torch.float64 and layout_kernels_available(eps):
        flat = eps.reshape(eps.shape[0], -1, 1)  # (P, numel, 1)
        if isinstance(scale, torch.Tensor):
            return signed_pairs(flat * scale.to(eps.dtype), 1.0).view(-1, *eps.shape[1:])
        return signed_pairs(flat, scale).view(-1, *eps.shape[1:])
    scale = scale.to(eps.dtype) if isinstance(scale, torch.Tensor) else scale
    return torch.stack((eps, -eps), dim=1).flatten(0, 1).mul_(scale)


def antithetic_pairs(A: torch.Tensor, B: torch.Tensor, sigma: float | torch.Tensor, rank: int) -> Pairs:
    """The population of pair draws ``A (P, m, r)``, ``B (P, n, r)`` as ``Pairs`` of ``N = 2P`` members.

    ``A_scaled`` = ``s_i * sigma / sqrt(r) * A`` with ``s = (+1, -1, +1, -1, ...)``; ``B`` a view of an
    ``(n, N, r)`` buffer, so ``B.permute(1, 0, 2).reshape(n, N * r)`` (``x B`` for a shared input, the
    gradient's GEMM over members) is free. On CUDA each layout is one Triton pass (``noise.layout``;
    ``B`` and ``B_pair`` in the same pass), with the values of the torch path bit for bit.

    ``sigma`` may be a 0-dim tensor on ``A``'s device (a captured step reads it there, no host sync):
    then ``A`` is scaled by one more elementwise pass.
    """
    scale = sigma / math.sqrt(rank)
    A_scaled = signed_members(A, scale)  # (2P, m, r)
    P, n, r = B.shape
    if layout_kernels_available(B):
        B_pop, B_pair = pair_rows(B, half=True)  # (n, P, 2, r), (n, P, r)
    else:
        B_pair = B.permute(1, 0, 2).contiguous()  # (n, P, r)
        B_pop = B_pair.unsqueeze(2).expand(n, P, 2, r).contiguous()
    return Pairs(A_scaled, B_pop.view(n, 2 * P, r).permute(1, 0, 2), B_pair, scale)


def antithetic(
    A: torch.Tensor, B: torch.Tensor, sigma: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A_scaled, A_signed, B)`` of ``antithetic_pairs(A, B, sigma, rank)``, the seed's
    ``generate_lowrank_perturbations`` triple: ``A_signed (2P, m, r)`` = ``s_i * A`` (sign, no scale)."""
    pairs = antithetic_pairs(A, B, sigma, rank)
    return pairs.A_scaled, signed_members(A, 1.0), pairs.B

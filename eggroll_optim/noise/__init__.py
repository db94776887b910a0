"""The noise of the library: low-rank antithetic factors, drawn or regenerated, and their pair layout.

Two sources, one layout:

- ``draw_pair_factors``: from the user's ``torch.Generator`` (the seed's functional API, which keeps
  the seed's draws bit for bit: ``generate_perturbations`` draws ``A`` then ``B`` of every weight in
  order).
- ``keyed_pair_factors`` / ``keyed_pair_normals``: a pure function of ``(seed, step, param, pair)``
  (``EggrollOptimizer``): any slice of the population is rebuilt alone, in ``tell`` or on another
  rank, in the parameter's dtype (``keyed``).
- ``antithetic_pairs`` turns ``P`` draws into the ``N = 2P`` members as ``Pairs`` (``pairs``), the
  value the kernels take: the seed's ``(A_scaled, B)`` tuple that also says which members are pairs.
"""
from .keyed import (
    DEFAULT_BLOCK_PAIRS,
    draw_pair_factors,
    keyed_pair_factors,
    keyed_pair_normals,
    noise_dtype,
    noise_key,
)
from .pairs import Pairs, antithetic, antithetic_pairs

__all__ = [
    "DEFAULT_BLOCK_PAIRS",
    "Pairs",
    "antithetic",
    "antithetic_pairs",
    "draw_pair_factors",
    "keyed_pair_factors",
    "keyed_pair_normals",
    "noise_dtype",
    "noise_key",
]

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

.. note:: The counter noise of ``kernels.fast.counter`` (Philox-4x32-7, drawn inside the rows kernel
   of ``kernels.fast.counter_linear``, which the paper's microbenchmark runs) is not a third source
   here and did not become the one keyed noise; it stays an optional kernel with a stream of its
   own. (1) The functional API must draw from the user's generator, as the seed does. (2) Every
   layer rule of the optimizer, and its gradient in ``tell``, read materialised factors: drawing
   inside one kernel saves nothing there, and replacing the keyed noise would change every
   trajectory for that. (3) Its CUDA kernels match its torch twin to a few 1e-5, not bit for bit
   (hardware log/sin/cos), and it is float32 with 16-bit uniforms, where the keyed noise follows the
   parameter's dtype (the float64 tests hold the optimizer to 1e-12). (4) Its torch twin draws over
   15 times slower than ``torch.randn`` on a CPU. Its factors as ``Pairs``, for ``kernels.es_gradient``:
   ``antithetic_pairs(*counter_pair_factors(seed, 0, N // 2, m, n, rank, device), sigma, rank)``.
"""
from .keyed import (
    DEFAULT_BLOCK_PAIRS,
    GeneratorPool,
    draw_pair_factors,
    keyed_pair_factors,
    keyed_pair_normals,
    noise_dtype,
    noise_key,
)
from .pairs import PairedNoise, Pairs, antithetic, antithetic_pairs, signed_members

__all__ = [
    "DEFAULT_BLOCK_PAIRS",
    "GeneratorPool",
    "PairedNoise",
    "Pairs",
    "antithetic",
    "antithetic_pairs",
    "draw_pair_factors",
    "keyed_pair_factors",
    "keyed_pair_normals",
    "noise_dtype",
    "noise_key",
    "signed_members",
]

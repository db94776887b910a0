"""The seed's functional EGGROLL API (``hyperscalees.torch.core``), thin names over the kernels.

Conventions are those of SPEC.md: interleaved antithetic pairs, ``A_scaled`` carrying
``sign * sigma / sqrt(r)``, z-score shaping with the population variance, the gradient
``einsum('nir,njr->ij', f * A_scaled, B) / sqrt(N)`` and plain ascent ``W <- W + lr * g``.

.. note:: The functional API perturbs only the ``*weight`` matrices that ``get_weight_shapes``
   returns (2-D linear weights and 3-D/4-D conv kernels, flattened to ``(out, in * prod(k))``);
   biases and other parameters are left untouched, as in the seed. ``EggrollOptimizer`` can
   evolve them too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .convert import make_perturbed_forward_fn
from .kernels import es_gradient, lowrank_linear_delta, perturbed_conv, perturbed_linear
from .noise import Pairs, antithetic, antithetic_pairs, draw_pair_factors
from .shaping import shape_fitness, validate_fitness, zscore

__all__ = [
    "EggrollConfig",
    "apply_lowrank_perturbation",
    "compute_es_gradient",
    "compute_gradients",
    "compute_weight_perturbation",
    "default_device",
    "eggroll_step",
    "generate_lowrank_perturbations",
    "generate_perturbations",
    "get_params_dict",
    "get_weight_shapes",
    "make_perturbed_forward_fn",
    "normalize_fitnesses",
    "perturbed_conv2d",
    "perturbed_forward",
    "perturbed_linear",
    "update_params",
]

Perturbations = dict[str, Pairs | tuple[torch.Tensor, torch.Tensor]]  # name -> (A_scaled, B)


def validate_hyperparameters(population_size: int, rank: int, sigma: float, lr: float) -> None:
    """SPEC §8: ``N`` even and >= 2, ``rank >= 1``, ``sigma > 0``, ``lr >= 0``."""
    if not isinstance(population_size, int) or population_size < 2 or population_size % 2:
        raise ValueError(f"Invalid population_size: {population_size} (expected an even integer >= 2)")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank} (expected an integer >= 1)")
    if not sigma > 0:
        raise ValueError(f"Invalid sigma: {sigma} (expected > 0)")
    if not lr >= 0:
        raise ValueError(f"Invalid lr: {lr} (expected >= 0)")


@dataclass
class EggrollConfig:
    """Hyperparameters of the seed's recipes; validated on construction."""

    population_size: int = 2048
    rank: int = 4
    sigma: float = 0.1
    lr: float = 0.1
    lr_decay: float = 1.0
    sigma_decay: float = 0.999
    max_epochs: int = 100
    batch_size: int = 256
    seed: int = 42
    dtype: torch.dtype = field(default=torch.float32)

    def __post_init__(self) -> None:
        validate_hyperparameters(self.population_size, self.rank, self.sigma, self.lr)
        for name in ("lr_decay", "sigma_decay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (expected > 0)")


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_params_dict(
    module: torch.nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Copy a module's parameters into ``{name: tensor}`` (detached clones; default device
    ``default_device()``; ``dtype`` casts floating tensors)."""
    device = default_device() if device is None else device
    return {
        name: p.detach().to(device=device, dtype=dtype if p.is_floating_point() else None, copy=True)
        for name, p in module.named_parameters()
    }


def get_weight_shapes(params: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` for every ``*weight`` with 2-D (linear) or 3-D/4-D (conv) shape;
    conv kernels ``(C_out, C_in/groups, *k)`` give ``(C_out, C_in/groups * prod(k))``."""
    return {
        name: (t.shape[0], t[0].numel())
        for name, t in params.items()
        if name.endswith("weight") and t.dim() in (2, 3, 4)
    }


def generate_lowrank_perturbations(
    population_size: int,
    out_dim: int,
    in_dim: int,
    rank: int,
    sigma: float,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Antithetic factors for one ``(out_dim, in_dim)`` weight on the generator's device.

    Returns ``A_scaled (N, out, r)`` (sign and ``sigma/sqrt(r)``), ``A (N, out, r)`` (sign only)
    and ``B (N, in, r)``; members ``2k`` and ``2k+1`` share ``(A, B)`` with opposite signs.
    """
    validate_hyperparameters(population_size, rank, sigma, 0.0)
    A, B = draw_pair_factors(population_size // 2, out_dim, in_dim, rank, generator, dtype)
    return antithetic(A, B, sigma, rank)


def generate_perturbations(
    shapes: dict[str, tuple[int, int]],
    population_size: int,
    rank: int,
    sigma: float,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
) -> Perturbations:
    """``{name: (A_scaled, B)}`` for every shape, drawn in order from ``generator`` (the same numbers
    as ``generate_lowrank_perturbations`` shape by shape).

    Each value is a ``noise.Pairs``: it unpacks as ``A_scaled (N, out, r), B (N, in, r)`` like the
    seed's tuple and also tells the kernels that members ``2k`` and ``2k + 1`` are a pair, so the
    gradient (and the fused MLP kernel on CUDA) work per pair. A plain ``(A_scaled, B)`` tuple of
    your own works everywhere a ``Pairs`` does, through the generic per-member paths."""
    validate_hyperparameters(population_size, rank, sigma, 0.0)
    perts = {}
    for name, (out_dim, in_dim) in shapes.items():
        A, B = draw_pair_factors(population_size // 2, out_dim, in_dim, rank, generator, dtype)
        perts[name] = antithetic_pairs(A, B, sigma, rank)
    return perts


def apply_lowrank_perturbation(x: torch.Tensor, B: torch.Tensor, A_scaled: torch.Tensor) -> torch.Tensor:
    """``x_i B_i A_scaled_iᵀ``: ``(N, *batch, in)`` or shared ``(*batch, in)`` -> ``(N, *batch, out)``."""
    return lowrank_linear_delta(x, B, A_scaled)


def compute_weight_perturbation(A_scaled: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Materialise ``E_i = A_scaled_i B_iᵀ`` -> ``(N, out, in)``. A reference: O(N m n) memory."""
    return torch.einsum("nir,njr->nij", A_scaled, B)


def normalize_fitnesses(fitnesses: torch.Tensor) -> torch.Tensor:
    """Z-score with the population variance: ``(f - mean) / sqrt(var + 1e-8)``."""
    return zscore(fitnesses)


def compute_es_gradient(
    fitnesses: torch.Tensor, A_scaled: torch.Tensor, B: torch.Tensor, population_size: int
) -> torch.Tensor:
    """``einsum('nir,njr->ij', f * A_scaled, B) / sqrt(population_size)`` -> ``(out, in)`` (``kernels.es_gradient``
    over members: two tensors carry no pair structure)."""
    return es_gradient(fitnesses, (A_scaled, B), population_size)


def compute_gradients(fitnesses: torch.Tensor, perts: Perturbations, population_size: int) -> dict[str, torch.Tensor]:
    """``{name: (out, in) gradient}`` for every perturbed weight: ``kernels.es_gradient`` of each value
    (over pairs for ``generate_perturbations``' ``Pairs``, over members for a plain tuple)."""
    return {name: es_gradient(fitnesses, factors, population_size) for name, factors in perts.items()}


def update_params(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """Ascent in place: ``params[k] += lr * grads[k]`` (gradients reshaped to conv kernels)."""
    for name, grad in grads.items():
        if name not in params:
            raise KeyError(f"update_params: gradient for {name!r} but no such parameter")
        param = params[name]
        if grad.numel() != param.numel():
            raise ValueError(
                f"update_params: gradient for {name!r} has shape {tuple(grad.shape)}, "
                f"parameter has {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.add_(grad.reshape(param.shape).to(param.dtype), alpha=lr)
    return params


def eggroll_step(
    params: dict[str, torch.Tensor],
    fitnesses: torch.Tensor,
    perts: Perturbations,
    lr: float,
    sigma: float,
    config: EggrollConfig | None = None,
    *,
    nan_policy: str = "raise",
) -> tuple[float, float]:
    """Normalise -> gradient -> update in place -> decay; returns ``(lr * lr_decay, sigma * sigma_decay)``.

    NaN/inf fitness, by ``nan_policy``: ``"raise"`` (default) raises ``ValueError`` and leaves the
    weights untouched (one host sync); ``"worst"`` ranks those members below every finite one;
    ``"skip"`` never syncs, so the step can be captured in a CUDA graph: a step with any NaN/inf
    fitness updates nothing (check the fitness you hold when you next sync).
    """
    if not perts:
        raise ValueError("eggroll_step: perts is empty; nothing to update")
    population_size = next(iter(perts.values()))[0].shape[0]
    device = next(iter(perts.values()))[0].device
    validate_fitness(fitnesses, population_size, device, nan_policy)
    update_params(params, compute_gradients(shape_fitness(fitnesses, nan_policy), perts, population_size), lr)
    lr_decay = config.lr_decay if config is not None else 1.0
    sigma_decay = config.sigma_decay if config is not None else 1.0
    return lr * lr_decay, sigma * sigma_decay


def perturbed_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, perts: Perturbations, weight_name: str
) -> torch.Tensor:
    """Perturbed linear for ``perts[weight_name]``: ``(N, *batch, in)`` or shared -> ``(N, *batch, out)``.

    A weight absent from ``perts`` gives the plain ``x Wᵀ + b``.
    """
    if weight_name not in perts:
        return torch.nn.functional.linear(x, weight, bias)
    A_scaled, B = perts[weight_name]
    return perturbed_linear(x, weight, bias, A_scaled, B)


def perturbed_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    perts: Perturbations,
    weight_name: str,
    padding=1,
    stride=1,
    dilation=1,
    groups: int = 1,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Perturbed conv2d through the factorised low-rank path (no per-member kernels).

    ``x``: shared ``(Bt, C, H, W)`` or per member ``(N, Bt, C, H, W)`` -> ``(N, Bt, C_out, H', W')``.
    ``padding`` defaults to 1 as in the seed. A weight absent from ``perts`` gives a plain conv.
    """
    if weight_name not in perts:
        lead = x.shape[:-3]
        out = torch.nn.functional.conv2d(x.reshape(-1, *x.shape[-3:]), weight, bias, stride, padding, dilation, groups)
        return out.view(*lead, *out.shape[1:])
    A_scaled, B = perts[weight_name]
    return perturbed_conv(x, weight, bias, A_scaled, B, stride, padding, dilation, groups)

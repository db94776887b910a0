"""eggroll_optim: evolution strategies with low-rank perturbations (EGGROLL) for PyTorch."""
from . import core, kernels, noise, shaping
from .core import (
    EggrollConfig,
    apply_lowrank_perturbation,
    compute_es_gradient,
    compute_gradients,
    compute_weight_perturbation,
    eggroll_step,
    generate_lowrank_perturbations,
    generate_perturbations,
    get_params_dict,
    get_weight_shapes,
    make_perturbed_forward_fn,
    normalize_fitnesses,
    perturbed_conv2d,
    perturbed_forward,
    perturbed_linear,
    update_params,
)
from .optimizer import EggrollOptimizer
from .population import Population
from .losses import compute_classification_fitness, per_member_cross_entropy, per_member_mse

__version__ = "0.1.0"

__all__ = [
    "EggrollConfig",
    "EggrollOptimizer",
    "Population",
    "apply_lowrank_perturbation",
    "compute_classification_fitness",
    "compute_es_gradient",
    "compute_gradients",
    "compute_weight_perturbation",
    "core",
    "eggroll_step",
    "generate_lowrank_perturbations",
    "generate_perturbations",
    "get_params_dict",
    "get_weight_shapes",
    "kernels",
    "make_perturbed_forward_fn",
    "noise",
    "normalize_fitnesses",
    "per_member_cross_entropy",
    "per_member_mse",
    "perturbed_conv2d",
    "perturbed_forward",
    "perturbed_linear",
    "shaping",
    "update_params",
]

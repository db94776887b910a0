"""Recipes and the seed's helpers (``hyperscalees.torch.recipes``)."""
from ..core import perturbed_conv2d
from ..losses import compute_classification_fitness
from .data import load_mnist_2d, load_mnist_flat
from .gpu import get_gpu_stats, print_gpu_stats, reset_gpu_stats

__all__ = [
    "compute_classification_fitness",
    "get_gpu_stats",
    "load_mnist_2d",
    "load_mnist_flat",
    "perturbed_conv2d",
    "print_gpu_stats",
    "reset_gpu_stats",
]

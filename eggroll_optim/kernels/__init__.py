"""Pure-torch EGGROLL math shared by the functional API and the optimizer class."""
from .conv import lowrank_conv_delta, perturbed_conv
from .embedding import lowrank_embedding_delta
from .gradient import es_gradient, fullrank_gradient_sum, lowrank_gradient_sum
from .linear import lowrank_linear_add, lowrank_linear_delta, perturbed_linear
from .population import split_shared

__all__ = [
    "es_gradient",
    "fullrank_gradient_sum",
    "lowrank_conv_delta",
    "lowrank_embedding_delta",
    "lowrank_gradient_sum",
    "lowrank_linear_add",
    "lowrank_linear_delta",
    "perturbed_conv",
    "perturbed_linear",
    "split_shared",
]

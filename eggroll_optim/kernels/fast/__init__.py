"""Optional fused CUDA paths (Triton). Each has a plain-PyTorch twin computing the same numbers."""
from .mlp import fused_mlp_available, mlp_block_activation, mlp_fast_path, perturbed_mlp, perturbed_mlp_reference

__all__ = ["fused_mlp_available", "mlp_block_activation", "mlp_fast_path", "perturbed_mlp", "perturbed_mlp_reference"]

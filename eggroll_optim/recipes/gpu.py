"""GPU memory statistics (the seed's helpers); harmless without CUDA."""
from __future__ import annotations

import torch

__all__ = ["get_gpu_stats", "print_gpu_stats", "reset_gpu_stats"]


def get_gpu_stats() -> dict:
    """Allocated, reserved, peak and total memory in GB, or ``{"available": False}``."""
    if not torch.cuda.is_available():
        return {"available": False}
    gb = 1e9
    total = torch.cuda.get_device_properties(0).total_memory / gb
    allocated = torch.cuda.memory_allocated() / gb
    return {
        "available": True,
        "allocated_gb": allocated,
        "reserved_gb": torch.cuda.memory_reserved() / gb,
        "max_allocated_gb": torch.cuda.max_memory_allocated() / gb,
        "total_gb": total,
        "utilization_pct": 100 * allocated / total,
    }


def print_gpu_stats(prefix: str = "") -> None:
    stats = get_gpu_stats()
    if not stats["available"]:
        print(f"{prefix}GPU: not available")
        return
    print(
        f"{prefix}GPU: {stats['allocated_gb']:.2f}/{stats['total_gb']:.1f} GB allocated, "
        f"peak {stats['max_allocated_gb']:.2f} GB"
    )


def reset_gpu_stats() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()

"""Triton, optional: the import and two launch helpers shared by every layer that has Triton kernels
(``noise.layout`` and ``kernels.fast``). It imports nothing from the package."""
from __future__ import annotations

import os

try:  # Triton is optional: CPU installs and old GPUs use the plain-torch twins
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

__all__ = ["interpreted", "pow2", "tl", "triton"]


def interpreted() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): the kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pow2(v: int, lo: int = 16) -> int:
    """The next power of two ``>= v``, at least ``lo`` (a tile size)."""
    return max(lo, 1 << (int(v) - 1).bit_length())

"""What the Triton kernels share: the optional import, two launch helpers and two activation helpers."""
from __future__ import annotations

import os

try:  # Triton is optional: CPU installs and old GPUs use the plain-torch twins
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

__all__ = ["activate", "interpreted", "pow2", "tanh_f16x2", "tl", "triton"]


def interpreted() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): the kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pow2(v: int, lo: int = 16) -> int:
    """The next power of two ``>= v``, at least ``lo`` (a tile size)."""
    return max(lo, 1 << (int(v) - 1).bit_length())


if triton is not None:

    @triton.jit
    def activate(h, ACT: tl.constexpr, FAST_TANH: tl.constexpr):
        """``ACT``: 0 identity, 1 tanh (``FAST_TANH``: one MUFU op), 2 relu."""
        if ACT == 1:
            if FAST_TANH:  # one MUFU op, max rel. error ~2^-11: only under TF32 (same precision)
                h = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [h], dtype=tl.float32,
                                              is_pure=True, pack=1)
            else:
                h = 1.0 - 2.0 / (tl.exp(2.0 * h) + 1.0)
        elif ACT == 2:
            h = tl.maximum(h, 0.0)
        return h

    @triton.jit
    def tanh_f16x2(h):
        """tanh of a float16 tensor (``tanh.approx.f16x2``; sm_90 runs it as two ``MUFU.TANH.F16``)."""
        return tl.inline_asm_elementwise("tanh.approx.f16x2 $0, $1;", "=r,r", [h], dtype=tl.float16, is_pure=True,
                                         pack=2)


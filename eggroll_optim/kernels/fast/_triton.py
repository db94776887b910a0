"""What the fused kernels share: Triton (``eggroll_optim._triton``), the autotuner as the tests and
sweeps can narrow or pin it, and two activation helpers.

Launch choices are never arguments of the production functions; tests and sweeps set them here,
and the launchers read them through ``pinned_choice`` alone:

- ``EGGROLL_AUTOTUNE=first`` (environment, read when a kernel is tuned for a new shape): every
  autotuned kernel keeps only the first config of its list, so a test compiles each kernel once per
  shape instead of compiling and timing the whole list (the lists are built for the GPU's speed).
- The autotuner's choices persist in Triton's cache directory (``TRITON_CACHE_DIR``, default
  ``~/.triton/cache``, where Triton keeps its compiled kernels too): a second process on the same GPU,
  Triton and kernel source reuses them instead of timing every config again (its cold start is the
  compile cache's load). Not under the interpreter or ``EGGROLL_AUTOTUNE=first``.
- ``with pinned(config=..., resident=..., h16=..., conv=...):`` the launchers inside the block use these
  choices instead of their own (``kernels.fast.mlp`` says which it reads; ``conv``: the dense conv
  kernel's ``BQ``, ``BK``, ``num_warps``, ``num_stages``).
"""
from __future__ import annotations

import contextlib
import inspect
import os

from ..._triton import interpreted, pow2, tl, triton

__all__ = ["activate", "autotune", "interpreted", "pinned", "pinned_choice", "pow2", "tanh_f16x2", "tl", "triton"]

_PINNED: dict = {}


@contextlib.contextmanager
def pinned(**choices):
    """Launch choices for the launches inside the block (tests, ``benchmarks/sweep_kernels.py``)."""
    previous = dict(_PINNED)
    _PINNED.update(choices)
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(previous)


def pinned_choice(name: str, default=None):
    """The pinned launch choice ``name``, or ``default`` where none is pinned (or it is pinned to ``None``)."""
    value = _PINNED.get(name)
    return default if value is None else value


def first_config_only() -> bool:
    """``EGGROLL_AUTOTUNE=first``: autotuned kernels keep the first config of their list."""
    return os.environ.get("EGGROLL_AUTOTUNE") == "first"


def autotune(configs, key, prune=None):
    """``triton.autotune`` over ``configs`` keyed by ``key``; ``prune(configs, named_args, **kwargs)`` is the
    kernel's own early prune. Under ``EGGROLL_AUTOTUNE=first`` only the first surviving config is kept."""

    def early(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune is not None else configs
        return kept[:1] if first_config_only() else kept

    options = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:  # Triton >= 3.2
        options["cache_results"] = not interpreted() and not first_config_only()
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early}, **options)


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

"""``nn.Sequential`` with conv windows: ``Conv2d → ReLU → MaxPool2d(2)`` (or the conv and either one) in one kernel.

The rule runs the children in order as ``Sequential.forward`` does. Where a window starts (a stock
``Conv2d`` without groups or a padding mode, then ``ReLU``, then a 2×2 ``MaxPool2d`` of stride 2; no
hooks on any of them, no global module hooks) and the conv's weight has factors, the window runs as
one launch of ``kernels.fast.conv.conv2d_members``: each member's kernel ``W + A_i B_iᵀ`` with the ReLU
and the pooling in its epilogue, so the conv's full-size output is never written (a quarter of it is).
Elsewhere, and wherever the kernel does not apply (``fused=False``, CPU, autocast, autograd, an input
too small), each child runs on its own: the same numbers up to rounding, NaN included.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .linear import dense_conv2d

__all__ = ["has_window", "sequential_forward"]


def _stock(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` running ``cls.forward`` with no hooks of its own (fusing would skip them)."""
    return (isinstance(module, cls) and type(module).forward is cls.forward
            and not module._forward_hooks and not module._forward_pre_hooks)


def _global_hooks() -> bool:
    """A forward hook registered for every module (``register_module_forward_hook``, ``FlopCounterMode``, ...)
    other than the population's own record of which modules ran: the windows' modules must run then."""
    registered = nn.modules.module  # torch keeps these tables private; their absence means no hooks
    hooks = [*getattr(registered, "_global_forward_pre_hooks", {}).values(),
             *getattr(registered, "_global_forward_hooks", {}).values()]
    return any(not getattr(hook, "eggroll_record", False) for hook in hooks)


def _pool2(module: nn.Module) -> bool:
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return (_stock(module, nn.MaxPool2d) and pair(module.kernel_size) == (2, 2) and pair(module.stride) == (2, 2)
            and pair(module.padding) == (0, 0) and pair(module.dilation) == (1, 1) and not module.ceil_mode
            and not module.return_indices)


def _window(children: list, i: int) -> tuple[int, bool, bool] | None:
    """``(length, relu, pool)`` of the window starting at child ``i``, or ``None``."""
    conv = children[i]
    if not (_stock(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)):
        return None
    j = i + 1
    relu = j < len(children) and _stock(children[j], nn.ReLU)
    j += relu
    pool = j < len(children) and _pool2(children[j])
    j += pool
    return (j - i, relu, pool) if relu or pool else None


def has_window(seq: nn.Sequential) -> bool:
    children = list(seq)
    return any(_window(children, i) is not None for i in range(len(children)))


def sequential_forward(call, seq: nn.Sequential, x: torch.Tensor):
    children = list(seq)
    fuse = call.fused is not False and not _global_hooks()
    i = 0
    while i < len(children):
        window = _window(children, i) if fuse and isinstance(x, torch.Tensor) else None
        if window is not None:
            length, relu, pool = window
            out = dense_conv2d(call, children[i], x, relu=relu, pool=pool)
            if out is not None:
                call.fired.add(children[i])  # the conv's weight took part (its forward did not run)
                x, i = out, i + length
                continue
        x = children[i](x)
        i += 1
    return x

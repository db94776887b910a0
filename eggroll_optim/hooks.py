"""Per-layer perturbation hooks: installed once, inert unless a population chunk is active.

Each supported layer gets a forward pre-hook (folds a per-member input so the layer's own
forward computes the unperturbed base once per sample) and a forward hook (adds the low-rank
term of its weight and the full-rank noise of its bias or affine parameters). A chunk holds,
for every evolved parameter, either low-rank factors ``(A_scaled (n, m, r), B (n, k, r))`` or
full-rank noise ``(n, *shape)`` that already carries ``sigma * s_i``.

Input rule (SPEC §3/§7): a leading dim equal to the chunk's member count ``n`` is a per-member
input; a stride-0 ``expand`` of it, or any other leading dim, is shared by every member. A
leading dim equal to the whole population while a smaller chunk is active is an error.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import lowrank_conv_delta, lowrank_embedding_delta, lowrank_linear_add

__all__ = [
    "Chunk", "FOLD_LAYERS", "IDLE", "LOWRANK_LAYERS", "NORM_LAYERS", "SUPPORTED_LAYERS", "Switch", "check_layer",
    "find_owners", "idle_error", "install_hooks", "is_lowrank", "stock_layer",
]

_CONVS = (nn.Conv1d, nn.Conv2d)
LOWRANK_LAYERS = (nn.Linear, nn.Embedding, *_CONVS)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
SUPPORTED_LAYERS = LOWRANK_LAYERS + NORM_LAYERS
# parameter-free layers written for (Bt, ...) inputs: run on (n * Bt, ...) when given (n, Bt, ...)
FOLD_LAYERS = (
    nn.Flatten, nn.Unflatten, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,  # frozen ones (unsupported="freeze")
)


def is_lowrank(module: nn.Module, name: str) -> bool:
    """Weights of linear, conv and embedding layers get low-rank noise; the rest full-rank."""
    return name == "weight" and isinstance(module, LOWRANK_LAYERS)


class Switch:
    """What every hook reads first: the active ``Chunk``, ``None`` (inert) or ``IDLE``."""

    __slots__ = ("chunk",)

    def __init__(self):
        self.chunk = None


IDLE = object()  # a chunked population between chunks: running the module then is a mistake


def idle_error() -> RuntimeError:
    return RuntimeError("This population is chunked: run the module inside `for members in population.chunks():`")


@dataclass
class Chunk:
    """The active members ``[start, stop)`` of a population of ``population_size``."""

    population_size: int
    start: int
    stop: int
    noise: dict = field(default_factory=dict)  # param -> (A_scaled, B) or full-rank noise
    fired: set = field(default_factory=set)  # modules whose hook ran
    pending: dict = field(default_factory=dict)  # module -> what its pre-hook saw
    bypass: set = field(default_factory=set)  # layers a fused block is computing instead

    @property
    def size(self) -> int:
        return self.stop - self.start

    def shared(self, x: torch.Tensor, sample_dims: int) -> bool:
        """True when ``x`` (with ``sample_dims`` trailing dims per sample) is shared by all members."""
        if x.dim() <= sample_dims:
            return True
        lead = x.shape[0]
        if lead == self.size:
            return x.stride(0) == 0
        if lead == self.population_size:
            raise ValueError(
                f"Input has leading dim {lead} (the whole population) but only members "
                f"[{self.start}, {self.stop}) are active; pass population.slice(x)"
            )
        return True


def _bias_noise(chunk: Chunk, module: nn.Module, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Add full-rank bias noise ``(n, C)`` along ``channel_dim`` of ``out (n, ...)``."""
    noise = chunk.noise.get(module.bias) if module.bias is not None else None
    if noise is None:
        return out
    shape = [noise.shape[0]] + [1] * (out.dim() - 1)
    shape[channel_dim] = noise.shape[1]
    return out + noise.view(shape).to(out.dtype)


def _pre(chunk: Chunk, module: nn.Module, x: torch.Tensor):
    """Classify the input, remember it for the post-hook, and hand the layer what it can run."""
    if isinstance(module, _CONVS):
        spatial = module.weight.dim() - 2
        unbatched = x.dim() == spatial + 1
        x = x.unsqueeze(0) if unbatched else x
        shared = x.dim() == spatial + 2 or chunk.shared(x, spatial + 2)
        if x.dim() == spatial + 3 and x.shape[0] != chunk.size:  # never silently take x[0]
            raise ValueError(f"{module}: per-member input must have leading dim {chunk.size}, got {tuple(x.shape)}")
        x = x[0] if x.dim() == spatial + 3 and shared else x
        chunk.pending[module] = (x, shared, unbatched)
        return x if shared else x.flatten(0, 1)
    if isinstance(module, nn.Embedding):
        shared = x.dim() < 2 or chunk.shared(x, 0)
    elif isinstance(module, nn.GroupNorm):
        shared = x.dim() < 3 or chunk.shared(x, x.dim() - 1)
    elif isinstance(module, nn.Linear):
        shared = chunk.shared(x, 1)
    else:  # LayerNorm / RMSNorm
        shared = chunk.shared(x, len(module.normalized_shape))
    x = x[0] if shared and x.dim() > 0 and x.shape[0] == chunk.size and x.stride(0) == 0 else x
    chunk.pending[module] = (x, shared, False)
    return x.flatten(0, 1) if isinstance(module, nn.GroupNorm) and not shared else x


def _linear(chunk: Chunk, module: nn.Linear, x, shared: bool, base: torch.Tensor) -> torch.Tensor:
    factors = chunk.noise.get(module.weight)
    if factors is None:
        out = base.expand(chunk.size, *base.shape) if shared else base
        return _bias_noise(chunk, module, out, out.dim() - 1)
    A_scaled, B = factors
    bias_noise = chunk.noise.get(module.bias) if module.bias is not None else None
    return lowrank_linear_add(base, x, B.to(x.dtype), A_scaled.to(x.dtype), shared, bias_noise)


def _embedding(chunk: Chunk, module: nn.Embedding, idx, shared: bool, base: torch.Tensor) -> torch.Tensor:
    out = base.expand(chunk.size, *base.shape) if shared else base
    A_scaled, B = chunk.noise[module.weight]
    return out + lowrank_embedding_delta(idx, A_scaled.to(out.dtype), B.to(out.dtype), shared)


def _conv(chunk: Chunk, module: nn.Module, x, shared: bool, base: torch.Tensor) -> torch.Tensor:
    n = chunk.size
    out = base.expand(n, *base.shape) if shared else base.view(n, x.shape[1], *base.shape[1:])
    factors = chunk.noise.get(module.weight)
    if factors is not None:
        A_scaled, B = factors
        conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        out = out + lowrank_conv_delta(x, module.weight.shape, A_scaled.to(x.dtype), B.to(x.dtype), conv_args, shared)
    return _bias_noise(chunk, module, out, 2)


def _affine(chunk: Chunk, module: nn.Module, xhat: torch.Tensor, shared: bool, first_dim: int) -> torch.Tensor:
    """``xhat * (w + dw_i) + (b + db_i)`` -> ``(n, ...)``; parameters sit at ``first_dim`` of the output."""
    xhat = xhat.unsqueeze(0) if shared else xhat  # (1 or n, ...)

    def value(p):
        if p is None:
            return None
        shape = [1] * xhat.dim()
        shape[first_dim:first_dim + p.dim()] = p.shape
        v = p.view(shape)
        noise = chunk.noise.get(p)
        return v if noise is None else v + noise.view(chunk.size, *shape[1:]).to(p.dtype)

    weight, bias = value(getattr(module, "weight", None)), value(getattr(module, "bias", None))
    out = xhat if weight is None else xhat * weight
    out = out if bias is None else out + bias
    return out.expand(chunk.size, *out.shape[1:])


def _norm(chunk: Chunk, module: nn.Module, x, shared: bool) -> torch.Tensor:
    if isinstance(module, nn.GroupNorm):  # (Bt, C, *S) shared or (n, Bt, C, *S)
        flat = x if shared else x.flatten(0, 1)
        xhat = F.group_norm(flat, module.num_groups, None, None, module.eps).view(x.shape)
        return _affine(chunk, module, xhat, shared, 2)
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(x, shape, None, None, module.eps)
    else:
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        xhat = F.rms_norm(x, shape, None, eps)
    return _affine(chunk, module, xhat, shared, xhat.dim() + shared - len(shape))


def _pre_hook(switch, module, args):
    chunk = switch.chunk
    if chunk is None:
        return None
    if chunk is IDLE:
        raise idle_error()
    if module in chunk.bypass:
        return None
    x = args[0]
    if isinstance(module, FOLD_LAYERS):
        fold = x.dim() >= 3 and x.shape[0] == chunk.size and x.stride(0) != 0
        chunk.pending[module] = x.shape[:2] if fold else None
        return (x.flatten(0, 1), *args[1:]) if fold else None
    return (_pre(chunk, module, x), *args[1:])


def _post_hook(switch, module, args, output):
    chunk = switch.chunk
    if chunk is None or chunk is IDLE or module in chunk.bypass:
        return None
    if isinstance(module, FOLD_LAYERS):
        lead = chunk.pending.pop(module)
        return None if lead is None else output.view(*lead, *output.shape[1:])
    chunk.fired.add(module)
    x, shared, unbatched = chunk.pending.pop(module)
    if isinstance(module, _CONVS):
        out = _conv(chunk, module, x, shared, output)
        return out.squeeze(1) if unbatched else out
    if isinstance(module, nn.Linear):
        return _linear(chunk, module, x, shared, output)
    if isinstance(module, nn.Embedding):
        return _embedding(chunk, module, x, shared, output)
    return _norm(chunk, module, x, shared)


def stock_layer(module: nn.Module) -> bool:
    """A supported layer (or a subclass) whose ``forward`` is the one the hooks know."""
    return any(isinstance(module, base) and type(module).forward is base.forward for base in SUPPORTED_LAYERS)


def find_owners(module: nn.Module, unsupported: str) -> tuple[dict, dict]:
    """``{param: (first layer, name)}`` and ``{param: [every layer holding it]}`` (tied weights).

    Only the ``weight``/``bias`` of a supported layer whose ``forward`` is the stock one counts:
    anything else (weight_norm's ``weight_g``, an extra parameter of a subclass) would be
    updated without ever being perturbed.
    """
    owners, holders, bad = {}, {}, []
    for path, sub in module.named_modules():
        for name, p in sub.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name in ("weight", "bias") and stock_layer(sub):
                owners.setdefault(p, (sub, name))
                holders.setdefault(p, []).append(sub)
            else:
                bad.append(f"{path or '<root>'}.{name} ({type(sub).__name__})")
    if bad and unsupported == "raise":
        raise TypeError(
            f"EggrollOptimizer cannot perturb trainable parameters of unsupported layers: {bad}. "
            "Freeze them (requires_grad_(False)) or pass unsupported='freeze'."
        )
    if bad:
        warnings.warn(f"EggrollOptimizer leaves these parameters untouched: {bad}", stacklevel=3)
    if not owners:
        raise ValueError(f"{type(module).__name__} has no trainable parameter that EGGROLL can perturb")
    return owners, holders


def check_layer(module: nn.Module) -> None:
    """Raise for layer options the hooks cannot perturb faithfully."""
    if isinstance(module, _CONVS) and module.padding_mode != "zeros":
        raise TypeError(f"{module}: padding_mode={module.padding_mode!r} is not supported (only 'zeros')")
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        raise TypeError(f"{module}: max_norm and sparse embeddings are not supported")


def install_hooks(modules, switch: Switch) -> list:
    """Register the pre- and post-hooks on every module; returns their ``RemovableHandle``s.

    ``switch.chunk`` is the active ``Chunk``, or ``None`` (hooks inert: one attribute read each).
    """
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(partial(_pre_hook, switch)))
        handles.append(module.register_forward_hook(partial(_post_hook, switch)))
    return handles

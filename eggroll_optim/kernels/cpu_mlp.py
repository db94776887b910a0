"""A population through ``Linear -> activation -> Linear`` on CPU, shared or per-member input.

Same numbers as ``perturbed_mlp_reference`` (up to float rounding), several times faster. Every
member ``i`` computes
``h_i = act(x W1ᵀ + b1 + (x B1_i) A1_iᵀ + bn1_i)`` and ``y_i = h_i W2ᵀ + b2 + (h_i B2_i) A2_iᵀ + bn2_i``.

Shared input ``x (M, in)`` (``perturbed_mlp_cpu``):

* ``x W1ᵀ + b1`` is computed once; ``x B1_i`` for every member is a few large GEMMs.
* Members go through in chunks whose ``(chunk, M, hidden)`` activations stay in cache: one batched
  GEMM writes the pre-activations into a reused buffer, the activation runs in place, and one
  batched GEMM against ``W2 + A2_i B2_iᵀ`` (built per chunk, ``(out, hidden)`` per member) reads
  them back into a transposed ``(N, out, M)`` result. The full ``(N, M, hidden)`` tensor never exists.
* ``tanh(z) = 2 (sigmoid(2z) - 1/2)``: torch's CPU ``sigmoid`` is several times faster than its
  ``tanh``. Both factors 2 are exact: the inner one is the first GEMM's ``alpha``/``beta``, the
  outer one scales the second layer's weights. ``sigmoid(2z) - 1/2`` is exact where sigmoid >= 1/4
  (Sterbenz) and adds at most half an ulp of 1/2 elsewhere, so the extra error is an absolute ~6e-8
  on ``h`` in float32 (not relative: tiny ``|z|`` lose relative precision); saturation gives
  exactly ``±1``.

Per-member input ``x (N, M, in)``, each member its own rows (``perturbed_mlp_cpu_members``; an RL
step has ``M = 1``): every product is per member, and torch's batched products over hundreds of tiny
matrices are fast only in some layouts. Each layer's per-member operands are built once per
population (``_Derived``: a population calls the block with the same factor tensors on every step)
in the layout its product wants:

* a layer whose dense per-member weight ``W + A_i B_iᵀ`` takes at most twice the memory of its
  factors (input or output width up to about ``2 r``: CartPole's 4 observations and 2 actions) is
  one batched product against that effective weight, the bias added by the same call;
* otherwise ``x Wᵀ`` is one GEMM over every member's rows and the low-rank term is added into it in
  place (``baddbmm_``), against ``A_iᵀ`` and ``B_i`` kept contiguous.

The cached operands take about the memory of the block's factors while the population lives.
Members go through in cache-sized chunks as above, with the same activation forms; the hidden
buffer is reused between calls (``_hidden_buffer``).
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .checks import needs_autograd
from .mlp import ACTIVATIONS, mlp_layer, perturbed_mlp_reference

__all__ = ["perturbed_mlp_cpu", "perturbed_mlp_cpu_members"]

# bytes of one chunk's working block (hidden activations, or copied B1): about the L2 of two cores
_CHUNK_BYTES = 2 << 20


def _half_tanh_(g: torch.Tensor) -> torch.Tensor:
    """In place ``g <- sigmoid(g) - 1/2``; with ``g = 2z`` this is ``tanh(z) / 2``."""
    return torch.sigmoid_(g).sub_(0.5)


# activation -> (scale, fn, gain): act(z) = gain * fn(scale * z), fn in place (None: identity)
_ACT_FORMS: dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor] | None, float]] = {
    "tanh": (2.0, _half_tanh_, 2.0),
    "relu": (1.0, torch.relu_, 1.0),
    "identity": (1.0, None, 1.0),
}


def _chunk(n: int, bytes_per_member: int) -> int:
    """Members per chunk so one chunk's block is about ``_CHUNK_BYTES`` (at least 1, at most ``n``)."""
    return max(1, min(n, _CHUNK_BYTES // max(1, bytes_per_member)))


def _project_t(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(x B_i)ᵀ`` for every member: ``x (M, in)``, ``B (N, in, r)`` -> ``(N, r, M)`` contiguous.

    One GEMM per chunk of members, against that chunk of ``B`` copied to ``(chunk * r, in)``.
    """
    N, D, r = B.shape
    M = x.shape[0]
    out = x.new_empty(N, r, M)
    step = _chunk(N, D * r * x.element_size())
    for n0 in range(0, N, step):
        Bc = B[n0:n0 + step].transpose(1, 2).reshape(-1, D)
        torch.mm(Bc, x.t(), out=out[n0:n0 + step].view(-1, M))
    return out


def _layer1_factors(x, B1, A1, bn1) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of layer 1: ``(x B1_i)ᵀ (N, r', M)`` and ``A1 (N, hidden, r')``.

    ``bn1 (N, hidden)`` rides along as one more rank (a row of ones against the noise), so the
    per-chunk GEMM adds it for free; ``r' = r`` without it, ``r + 1`` with it.
    """
    xBt = _project_t(x, B1)
    if bn1 is None:
        return xBt, A1
    ones = xBt.new_ones(xBt.shape[0], 1, xBt.shape[2])
    return torch.cat([xBt, ones], 1), torch.cat([A1, bn1.unsqueeze(2).to(A1.dtype)], 2)


def _layer2_offset(b2, bn2, N: int, W2: torch.Tensor) -> torch.Tensor:
    """``b2 + bn2_i`` as ``(N, out, 1)`` (zeros where both are ``None``)."""
    offset = W2.new_zeros(N, W2.shape[0])
    if b2 is not None:
        offset += b2
    if bn2 is not None:
        offset += bn2
    return offset.unsqueeze(2)


def _needs_autograd(x, layer1, layer2, bias_noise) -> bool:
    return needs_autograd(x, *layer1[:2], *layer1[2], *layer2[:2], *layer2[2], *bias_noise)


def perturbed_mlp_cpu(x, layer1, layer2, activation="tanh", shared=True, bias_noise=(None, None)) -> torch.Tensor:
    """``Linear -> activation -> Linear`` for every member, chunked for the CPU's caches.

    Args:
        x: shared input ``(*batch, in)`` (``shared=True``) or per member ``(N, *batch, in)``.
        layer1, layer2: ``(W, b, factors)`` or ``(W, b, A_scaled, B)`` (``kernels.mlp.mlp_layer``), with
            ``W (out, in)``, ``b (out,)`` or ``None``, ``A_scaled (N, out, r)``, ``B (N, in, r)``.
        activation: ``"tanh"``, ``"relu"`` or ``"identity"``.
        bias_noise: optional full-rank bias noise ``((N, hidden) or None, (N, out) or None)``.
    Returns:
        ``(N, *batch, out2)``, contiguous. A per-member input goes to ``perturbed_mlp_cpu_members``;
        any tensor requiring grad while grad is enabled (the chunked paths write into buffers) to
        ``perturbed_mlp_reference``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    layer1, layer2 = mlp_layer(layer1), mlp_layer(layer2)
    if not shared:
        return perturbed_mlp_cpu_members(x, layer1, layer2, activation, bias_noise)
    if _needs_autograd(x, layer1, layer2, bias_noise):
        return perturbed_mlp_reference(x, layer1, layer2, activation, shared, bias_noise)
    W1, b1, (A1, B1) = layer1
    W2, b2, (A2, B2) = layer2
    dtype, (N, H, _), O = x.dtype, A1.shape, W2.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    scale, act, gain = _ACT_FORMS[activation]
    base = F.linear(x2, W1, b1)  # (M, H)
    xBt, A1 = _layer1_factors(x2, B1.to(dtype), A1.to(dtype), bias_noise[0])  # (N, r', M), (N, H, r')
    A1t, A2, B2t = A1.transpose(1, 2), A2.to(dtype), B2.to(dtype).transpose(1, 2)  # (N, r', H), _, (N, r, H)
    offset = _layer2_offset(b2, bias_noise[1], N, W2)  # (N, O, 1)
    out_t = x2.new_empty(N, O, M)
    step = _chunk(N, M * H * x2.element_size())
    g_buf, w_buf = x2.new_empty(step, M, H), x2.new_empty(step, O, H)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        g, w = g_buf[:n1 - n0], w_buf[:n1 - n0]
        # g = fn(scale (x W1ᵀ + b1 + (x B1_i) A1_iᵀ + bn1_i)), so h_i = gain g
        torch.baddbmm(base.expand_as(g), xBt[n0:n1].transpose(1, 2), A1t[n0:n1], beta=scale, alpha=scale, out=g)
        if act is not None:
            act(g)
        # y_iᵀ = gain (W2 + A2_i B2_iᵀ) gᵀ + b2 + bn2_i
        torch.baddbmm(W2.expand_as(w), A2[n0:n1], B2t[n0:n1], beta=gain, alpha=gain, out=w)
        torch.baddbmm(offset[n0:n1].expand(-1, O, M), w, g.transpose(1, 2), out=out_t[n0:n1])
    return out_t.transpose(1, 2).contiguous().view(N, *x.shape[:-1], O)


# ---------------------------------------------------------------------------------------------------
# per-member input


class _Derived:
    """Tensors derived from a population's factors (and a layer's weight), kept between calls.

    A population runs every call of one ``ask()`` (an RL episode: hundreds of steps) with the same
    factor tensors, so their relayouts and the members' effective weights are built once. An entry
    is used only while its source tensors are the same live objects at the same ``_version`` (an
    in-place edit moves it) and, for an effective weight, while the layer's weight equals the copy
    taken with it, compared by value on every call (an optimizer step, also one through ``.data``,
    which leaves ``_version`` alone). Entries go with their sources (weakref callbacks) or, beyond
    ``size``, least recently used first.
    """

    def __init__(self, size: int = 8):
        self.size, self._entries = size, {}

    def get(self, tag: tuple, sources: tuple, weight: torch.Tensor | None, build: Callable[[], tuple]) -> tuple:
        key = (tag, *(id(t) for t in sources))
        entry = self._entries.pop(key, None)
        if entry is not None and self._valid(entry, sources, weight):
            self._entries[key] = entry  # most recent last
            return entry[3]
        value = build()
        if any(t.is_inference() for t in sources):  # no version counter: in-place edits go unseen
            return value
        drop = lambda _ref, key=key: self._entries.pop(key, None)  # noqa: E731
        refs = tuple(weakref.ref(t, drop) for t in sources)
        snapshot = None if weight is None else weight.detach().clone()
        self._entries[key] = (refs, tuple(t._version for t in sources), snapshot, value)
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))
        return value

    @staticmethod
    def _valid(entry, sources, weight) -> bool:
        refs, versions, snapshot, _ = entry
        if any(r() is not t or t._version != v for r, t, v in zip(refs, sources, versions)):
            return False
        return weight is None or (snapshot.dtype == weight.dtype and torch.equal(snapshot, weight))

    def clear(self) -> None:
        self._entries.clear()


_DERIVED = _Derived()


def _dense_fits(fan_in: int, fan_out: int, r: int) -> bool:
    """The effective weight ``(out, in)`` per member takes at most twice the memory of its factors."""
    return fan_in * fan_out <= 2 * r * (fan_in + fan_out)


def _first_layer(W1, A1, B1, dtype) -> tuple:
    """``(W1_effᵀ (N, in, H),)`` (dense) or ``(B1 (N, in, r), A1ᵀ (N, r, H))`` (low rank), in ``dtype``."""
    (N, H, r), D = A1.shape, W1.shape[1]
    if _dense_fits(D, H, r):
        def build():  # W1ᵀ + B1_i A1_iᵀ
            W1t = W1.detach().t().to(dtype).expand(N, D, H)
            return (torch.baddbmm(W1t, B1.to(dtype), A1.to(dtype).transpose(1, 2)),)
        return _DERIVED.get(("dense1", dtype), (A1, B1), W1, build)
    return _DERIVED.get(("lowrank1", dtype), (A1, B1), None,
                        lambda: (B1.to(dtype).contiguous(), A1.to(dtype).transpose(1, 2).contiguous()))


def _second_layer(W2, A2, B2, dtype) -> tuple:
    """``(W2_effᵀ (N, H, O),)`` (dense) or ``(B2 (N, H, r), A2ᵀ (N, r, O))`` (low rank), in ``dtype``;
    the ``(N, H, *)`` operands are transposed views of contiguous ``(N, *, H)`` (the faster product)."""
    (N, O, r), H = A2.shape, W2.shape[1]
    if _dense_fits(H, O, r):
        def build():  # W2 + A2_i B2_iᵀ
            W2n = W2.detach().to(dtype).expand(N, O, H)
            return (torch.baddbmm(W2n, A2.to(dtype), B2.to(dtype).transpose(1, 2)).mT,)
        return _DERIVED.get(("dense2", dtype), (A2, B2), W2, build)
    return _DERIVED.get(("lowrank2", dtype), (A2, B2), None, lambda: (
        B2.to(dtype).transpose(1, 2).contiguous().mT, A2.to(dtype).transpose(1, 2).contiguous()))


_SCRATCH = threading.local()


def _hidden_buffer(n: int, M: int, H: int, dtype) -> torch.Tensor:
    """An ``(n, M, H)`` work buffer, reused across calls by this thread up to ``2 * _CHUNK_BYTES``.

    A fresh block of this size is typically fresh pages from the OS, and between the steps of an RL
    loop the allocator hands them back: the first write into it (page faults) then costs more than
    the layer's product (measured in the CartPole recipe: 170 µs for the 256 KB of one call)."""
    size = n * M * H
    if size * dtype.itemsize > 2 * _CHUNK_BYTES:
        return torch.empty(n, M, H, dtype=dtype)
    buffers = _SCRATCH.__dict__.setdefault("hidden", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < size:
        buf = buffers[dtype] = torch.empty(size, dtype=dtype)
    return buf[:size].view(n, M, H)


def _member_bias(b, bn, N: int, dtype) -> torch.Tensor | None:
    """``b + bn_i`` as ``(N, 1, out)``, or ``None`` where both are ``None``."""
    if bn is None:
        return None if b is None else b.to(dtype).expand(N, -1).unsqueeze(1)
    bn = bn.to(dtype)
    return (bn if b is None else bn + b.to(dtype)).unsqueeze(1)


def perturbed_mlp_cpu_members(x, layer1, layer2, activation="tanh", bias_noise=(None, None)) -> torch.Tensor:
    """``Linear -> activation -> Linear`` for every member on its own rows: ``x (N, *batch, in)``.

    Args as ``perturbed_mlp_cpu``. Each layer runs against the members' effective weights
    ``W + A_i Bᵢᵀ`` where those are small (``_dense_fits``), else as ``x Wᵀ`` (one GEMM over all rows)
    plus the low-rank term; both built once per population (``_Derived``). Returns ``(N, *batch, out2)``,
    contiguous; a tensor requiring grad while grad is enabled goes to ``perturbed_mlp_reference``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    layer1, layer2 = mlp_layer(layer1), mlp_layer(layer2)
    if _needs_autograd(x, layer1, layer2, bias_noise):
        return perturbed_mlp_reference(x, layer1, layer2, activation, False, bias_noise)
    W1, b1, (A1, B1) = layer1
    W2, b2, (A2, B2) = layer2
    dtype, (N, H, _), (O, D) = x.dtype, A1.shape, (W2.shape[0], W1.shape[1])
    # rows contiguous: batched products over a transposed x are ~10x slower (gymnasium's vector envs
    # hand back column-major observations); the copy is N * M * in values, next to N * M * hidden
    x3 = x.reshape(N, -1, D).contiguous()
    M = x3.shape[1]
    out = x3.new_empty(N, M, O)
    if M == 0:
        return out.view(N, *x.shape[1:-1], O)
    first, second = _first_layer(W1, A1, B1, dtype), _second_layer(W2, A2, B2, dtype)
    bias1, bias2 = _member_bias(b1, bias_noise[0], N, dtype), _member_bias(b2, bias_noise[1], N, dtype)
    W1, W2 = W1.detach().to(dtype), W2.detach().to(dtype)
    step = _chunk(N, M * H * x3.element_size())
    g = _hidden_buffer(min(step, N), M, H, dtype)
    if step >= N:  # one chunk (RL's one row per member): no slicing
        _members_chunk(x3, g, out, W1, first, bias1, W2, second, bias2, activation)
        return out.view(N, *x.shape[1:-1], O)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        cut = lambda t: t if t is None else t[n0:n1]  # noqa: E731
        _members_chunk(x3[n0:n1], g[:n1 - n0], out[n0:n1], W1, tuple(map(cut, first)), cut(bias1), W2,
                       tuple(map(cut, second)), cut(bias2), activation)
    return out.view(N, *x.shape[1:-1], O)


def _members_chunk(x, g, y, W1, first, bias1, W2, second, bias2, activation) -> None:
    """One chunk of members: ``x (n, M, D)`` -> ``y (n, M, O)`` through the hidden buffer ``g (n, M, H)``."""
    scale, act, gain = _ACT_FORMS[activation]
    # g = scale (x W1_iᵀ + b1 + bn1_i), W1_i = W1 + A1_i B1_iᵀ
    if len(first) == 1:
        b, beta = (g, 0) if bias1 is None else (bias1.expand_as(g), scale)  # beta 0: input ignored
        torch.baddbmm(b, x, first[0], beta=beta, alpha=scale, out=g)
    else:
        torch.mm(x.reshape(-1, x.shape[-1]), W1.t(), out=g.view(-1, g.shape[-1]))
        if bias1 is not None:
            g += bias1
        g.baddbmm_(torch.bmm(x, first[0]), first[1], beta=scale, alpha=scale)
    if act is not None:
        act(g)
    # y = gain g W2_iᵀ + b2 + bn2_i
    if len(second) == 1:
        b, beta = (y, 0) if bias2 is None else (bias2.expand_as(y), 1)
        torch.baddbmm(b, g, second[0], beta=beta, alpha=gain, out=y)
    else:
        torch.mm(g.view(-1, g.shape[-1]), W2.t(), out=y.view(-1, y.shape[-1]))
        y.baddbmm_(torch.bmm(g, second[0]), second[1], beta=gain, alpha=gain)
        if bias2 is not None:
            y += bias2

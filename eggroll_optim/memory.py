"""``chunk_size="auto"``: how many members one call of the model runs at once.

The population stays one chunk for the user (``ask()``, ``model(x)``, ``tell()``); each call of the
root module runs its members in pieces that fit a memory budget:

- the budget is ``max_memory`` bytes, or that fraction of the memory free when it is first needed
  (default ``DEFAULT_FRACTION``): on CUDA the free device memory plus what torch's caching allocator
  holds unused; on CPU the available RAM (``psutil`` if installed, else ``os.sysconf``'s free pages);
- the first call with a new input signature (shapes, dtypes, grad mode) runs a probe of
  ``PROBE_MEMBERS`` members and measures it. On CUDA: the peak of ``torch.cuda.max_memory_allocated``
  over the probe (the device's peak statistics are reset for it), run a second time: the first run
  compiles and autotunes the probe's kernels, whose scratch memory (Triton's benchmark buffers, a
  library's first workspace) is not the members'; counted, it made a cold process plan smaller pieces
  than a warm one, whose shapes the autotuner then timed again. Elsewhere, an estimate: the bytes
  of every tensor the probe's operators create (a ``TorchDispatchMode`` counts each output that does
  not alias an input), as if nothing were freed before the probe ends: an upper bound of its peak;
- a member then costs ``measured / probe`` plus its noise; the rest of the population runs in
  pieces of at most ``(budget - noise blocks - 2 · outputs of all members) / per member`` members,
  of one size wherever a divisor of the pair count allows (one shape: one compiled graph).

Members never see each other and the noise is keyed per pair, so the split does not change any
member's output. A CUDA out-of-memory error inside a piece is caught once per call: the piece is
halved, the call goes on, with a warning; the measurement is halved for later calls.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .hooks import PerMember

__all__ = [
    "DEFAULT_FRACTION", "PROBE_MEMBERS", "Planner", "RunningStats", "call_key", "concat", "even_pieces", "free_memory",
    "measured", "tensor_bytes",
]

DEFAULT_FRACTION = 0.5  # of the free memory, when max_memory is not given
PROBE_MEMBERS = 16  # members in the measured first piece of a call signature


def free_memory(device: torch.device) -> int:
    """Bytes that could still be allocated on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(tree) -> int:
    """Bytes of the tensors in a pytree (views counted at their own size)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def call_key(args, kwargs) -> tuple:
    """What a call's memory per member depends on: its inputs' shapes and dtypes, and the grad mode."""
    def leaf(x):
        if isinstance(x, PerMember):
            return ("per member", tuple(x.tensor.shape[1:]), x.tensor.dtype)
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.dtype)
        return type(x).__name__

    return (torch.is_grad_enabled(), *map(leaf, tree_leaves((args, kwargs))))


def even_pieces(start: int, stop: int, fit: int) -> list[tuple[int, int]]:
    """``[start, stop)`` (whole pairs) in pieces of at most ``fit`` members (at least one pair), all of
    one size when a piece count up to twice the least one divides the pairs."""
    pairs, fit_pairs = (stop - start) // 2, max(1, fit // 2)
    count = -(-pairs // fit_pairs)
    divisors = [p for p in range(count, min(2 * count, pairs) + 1) if pairs % p == 0]
    size = 2 * (pairs // divisors[0] if divisors else -(-pairs // count))
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


class _Allocations(TorchDispatchMode):
    """Counts the bytes of every operator output that does not alias one of its inputs."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


class _Measurement:
    bytes = 0


@contextlib.contextmanager
def measured(device: torch.device):
    """``with measured(device) as m: ...`` sets ``m.bytes`` to what the block needed (module docstring)."""
    m = _Measurement()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield m
        m.bytes = torch.cuda.max_memory_allocated(device) - base
    else:
        counter = _Allocations()
        with counter:
            yield m
        m.bytes = counter.bytes


class Planner:
    """Members per piece for ``chunk_size="auto"``, one per optimizer (measurements outlive a step).

    ``max_memory``: bytes (> 1), a fraction of the free memory (in (0, 1]) or None (``DEFAULT_FRACTION``);
    ``fixed_bytes``: memory held whatever the piece size (the noise blocks being sliced)."""

    def __init__(self, max_memory: int | float | None, fixed_bytes: int = 0):
        self.max_memory, self.fixed_bytes = max_memory, fixed_bytes
        self.fits: dict = {}  # call key -> members per piece

    def budget(self, device: torch.device) -> int:
        if self.max_memory is not None and self.max_memory > 1:
            return int(self.max_memory)
        fraction = DEFAULT_FRACTION if self.max_memory is None else self.max_memory
        return int(fraction * free_memory(device))

    def knows(self, key) -> bool:
        return key in self.fits

    def fit(self, key) -> int:
        return self.fits[key]

    def record(self, key, device: torch.device, members: int, measured_bytes: int, noise_bytes: int,
               output_bytes: int, total: int) -> None:
        """A probe of ``members`` needed ``measured_bytes`` (+ ``noise_bytes`` drawn before it) and
        returned ``output_bytes``; ``total``: the members each call runs."""
        per_member = (measured_bytes + noise_bytes) / members
        room = self.budget(device) - self.fixed_bytes - 2 * output_bytes / members * total
        self.fits[key] = max(2, int(room // max(per_member, 1)) // 2 * 2)

    def halve(self, key, size: int) -> None:
        """A piece of ``size`` members ran out of memory: later calls run at most half as many."""
        if key in self.fits:
            self.fits[key] = max(2, min(self.fits[key], size // 4 * 2))


class RunningStats:
    """BatchNorm/InstanceNorm running statistics over the pieces of one call: each piece starts from the
    buffers as they were; the float ones end as the size-weighted mean of the pieces' results, the
    counters (``num_batches_tracked``) as after one piece: what one call over all members leaves."""

    def __init__(self, norms: list):
        self.buffers = [(buf, buf.clone()) for mod in norms for buf in mod.buffers(recurse=False)]
        self.results = [torch.zeros_like(buf, dtype=torch.float64) if buf.is_floating_point() else buf.clone()
                        for buf, _ in self.buffers]
        self.members = 0

    def discard(self) -> None:
        """A piece whose results are not kept (the probe's unmeasured first run): the buffers as they were."""
        for buf, start in self.buffers:
            buf.copy_(start)

    def done(self, members: int) -> None:
        for (buf, start), result in zip(self.buffers, self.results):
            if buf.is_floating_point():
                result.add_(buf, alpha=members)
            else:
                result.copy_(buf)
            buf.copy_(start)
        self.members += members

    def finish(self) -> None:
        if not self.members:
            return
        for (buf, _), result in zip(self.buffers, self.results):
            buf.copy_(result / self.members if buf.is_floating_point() else result)


def concat(outputs: list):
    """The pieces' outputs joined along the member dim (non-tensor leaves: the first piece's)."""
    flat = [tree_flatten(out) for out in outputs]
    leaves = [torch.cat([f[0][i] for f in flat]) if isinstance(leaf, torch.Tensor) else leaf
              for i, leaf in enumerate(flat[0][0])]
    return tree_unflatten(leaves, flat[0][1])

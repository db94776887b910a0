"""Recipes under ``torchrun``: one population split across the launched processes.

``torchrun --nproc-per-node K -m eggroll_optim.recipes --experiment NAME ...`` starts K copies of
the CLI; :func:`setup` joins them into the default process group (NCCL on GPUs, one device per
local rank; gloo on CPU) and every recipe's ``EggrollOptimizer`` takes ``process_group`` from
:func:`group`. Rank 0 alone writes the run's files (metrics, checkpoints, summary, plot); the
other ranks keep theirs in a private temporary folder. Under torchrun's elastic restarts
(``--max-restarts``), a restarted worker group finds the folder's checkpoint and resumes from it
(``TORCHELASTIC_RESTART_COUNT > 0`` implies ``--resume``), so a killed worker costs at most the
steps since that checkpoint. ``$EGGROLL_DIST_TIMEOUT`` (seconds, default 300) bounds every
collective: a rank that dies or hangs makes the others fail, never hang.
"""
from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist

__all__ = ["group", "is_main", "mean_over_ranks", "private_out", "restarted", "setup", "world_size"]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str | None) -> str | None:
    """Join torchrun's process group when launched by it; returns the device this rank uses."""
    if world_size() <= 1 or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    timeout = datetime.timedelta(seconds=float(os.environ.get("EGGROLL_DIST_TIMEOUT", "300")))
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    # keys of this attempt only: after an elastic restart the store still holds the dead group's addresses
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"eggroll/attempt{attempt}", store),
                            rank=rank, world_size=size, timeout=timeout)
    return device


def group():
    """The process group a recipe's optimizer spreads its population over, or ``None``."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def is_main() -> bool:
    return group() is None or dist.get_rank() == 0


def restarted() -> bool:
    """A worker group restarted by torchrun after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def private_out(name: str):
    """Where a rank other than 0 writes its (unread) copy of the run's files."""
    return tempfile.mkdtemp(prefix=f"eggroll-{name}-rank{dist.get_rank()}-")


def mean_over_ranks(local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
    """The mean of values spread over the ranks, from each rank's sum and count (no host sync)."""
    if group() is None:
        return local_sum / local_count
    both = torch.stack([local_sum.float(), torch.tensor(float(local_count), device=local_sum.device)])
    dist.all_reduce(both)
    return both[0] / both[1]

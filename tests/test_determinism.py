"""Same seed, same inputs, same device: bitwise the same trajectory (SPEC §6).

On CPU every kernel here is deterministic: two runs agree bit for bit, whatever the chunking. On
CUDA the noise (keyed generators), the low-rank kernels and the gradient GEMMs are run-to-run
deterministic on one GPU and one software stack (no atomics, no split-K reductions in our kernels;
cuBLAS picks the same algorithm for the same shapes), so the CUDA test asserts bit equality too;
across GPUs or library versions only a tolerance holds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer, per_member_cross_entropy


def _trajectory(device, seed=0, steps=4, **kwargs):
    """Parameters and losses of a small classifier trained with both paths (step and ask/tell)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 5)).to(device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 20, generator=g).to(device), torch.randint(0, 5, (16,), generator=g).to(device)
    opt = EggrollOptimizer(model, lr=0.05, sigma=0.1, rank=2, population_size=64, seed=seed,
                           optimizer=torch.optim.Adam, sigma_decay=0.95, **kwargs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=2 * steps)
    losses = []
    for _ in range(steps):
        losses.append(opt.step(lambda: per_member_cross_entropy(model(x), y)))
        scheduler.step()
        population = opt.ask()
        scores = torch.cat([-per_member_cross_entropy(model(x), y) for _ in population.chunks()])
        opt.tell(scores)
        scheduler.step()
    return [p.detach().cpu() for p in model.parameters()], torch.stack(losses).cpu()


def _assert_bitwise(a, b):
    params_a, losses_a = a
    params_b, losses_b = b
    assert torch.equal(losses_a, losses_b)
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b))


@pytest.mark.parametrize("chunking", [dict(), dict(chunk_size=16), dict(max_memory=400_000)])
def test_same_seed_gives_bitwise_the_same_trajectory_on_cpu(chunking):
    _assert_bitwise(_trajectory("cpu", **chunking), _trajectory("cpu", **chunking))


def test_the_seed_matters():
    a, b = _trajectory("cpu", seed=0, steps=1), _trajectory("cpu", seed=1, steps=1)
    assert not torch.equal(a[0][0], b[0][0])


@pytest.mark.cuda
@pytest.mark.parametrize("chunking", [dict(), dict(chunk_size=16)])
def test_same_seed_gives_bitwise_the_same_trajectory_on_cuda(chunking):
    # (no comparison with the CPU trajectory: noise is drawn on the parameters' device, SPEC §6, and
    # torch's CUDA generator is not its CPU one)
    _assert_bitwise(_trajectory("cuda", **chunking), _trajectory("cuda", **chunking))

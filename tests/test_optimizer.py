"""``EggrollOptimizer``: parity with the functional core, training loops, resume, chunks,
schedulers, param groups and every error it promises."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer, eggroll_step, get_params_dict, make_perturbed_forward_fn, per_member_mse
from eggroll_optim.noise import keyed_pair_normals, noise_key

from optim_helpers import N
from optim_helpers import assert_same_params as _assert_same_params
from optim_helpers import data as _data
from optim_helpers import mlp as _mlp
from optim_helpers import params as _params


# ---------------------------------------------------------------- parity with the functional core


def test_one_tell_equals_functional_eggroll_step():
    model, (x, y) = _mlp(), _data()
    forward, _ = make_perturbed_forward_fn(model)
    opt = EggrollOptimizer(model, lr=0.3, sigma=0.2, rank=2, population_size=N, seed=5, evolve_biases=False)
    with opt.ask() as population:
        out = model(x)  # (N, 7, 3)
        noise = population.noise.chunk_noise(0, N)
    names = {p: n for n, p in model.named_parameters()}
    assert sorted(names[p] for p in noise) == ["0.weight", "2.weight"]
    perts = {names[p]: factors for p, factors in noise.items()}
    params = get_params_dict(model, device="cpu")
    torch.testing.assert_close(out, forward(x, params, perts), rtol=0, atol=1e-12)
    fitness = -per_member_mse(out, y)
    assert eggroll_step(params, fitness, perts, lr=0.3, sigma=0.2) == (0.3, 0.2)
    opt.tell(fitness)
    for name, p in model.named_parameters():  # the pair-summed contraction may differ in the last ulp
        torch.testing.assert_close(p.detach(), params[name], rtol=0, atol=1e-12, msg=name)
    assert torch.equal(model[0].bias, _mlp()[0].bias)  # evolve_biases=False: biases untouched
    assert not torch.equal(params["0.weight"], _mlp().state_dict()["0.weight"])  # it did move


def test_grad_is_minus_the_ascent_direction_and_zero_grad_clears_it():
    model, (x, y) = _mlp(), _data()
    before = _params(model)
    opt = EggrollOptimizer(model, lr=0.5, sigma=0.2, rank=2, population_size=N)
    opt.step(lambda: per_member_mse(model(x), y))
    for p, p0 in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, -(p.detach() - p0) / 0.5, rtol=1e-9, atol=1e-12)
        assert p.grad.abs().amax() > 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- training loops


@pytest.mark.parametrize("inner, lr", [(None, 0.2), (torch.optim.Adam, 0.05)])
def test_drop_in_regression_loop_reduces_loss_tenfold(inner, lr):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = EggrollOptimizer(model, lr=lr, sigma=0.05, rank=4, population_size=32, seed=0, optimizer=inner)
    with torch.no_grad():
        start = nn.functional.mse_loss(model(x), y).item()
    for _ in range(30):  # the user's loop, optimizer swapped, loss per member
        opt.zero_grad()
        loss = opt.step(lambda: per_member_mse(model(x), y))
    with torch.no_grad():
        end = nn.functional.mse_loss(model(x), y).item()
    assert loss.shape == () and end < start / 10, (start, end)


def test_ask_tell_maximises_a_non_differentiable_accuracy():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = torch.arange(3).repeat_interleave(40)
    x = centers[labels] + 0.6 * torch.randn(120, 2, generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = EggrollOptimizer(model, lr=0.1, sigma=0.2, rank=2, population_size=32, seed=0)

    def accuracy():
        with torch.no_grad():
            return (model(x).argmax(-1) == labels).float().mean().item()

    start = accuracy()
    for _ in range(20):
        with opt.ask():
            correct = (model(x).argmax(-1) == labels).sum(-1)  # (N,), piecewise constant
        opt.tell(correct.float())
    assert start < 0.4 and accuracy() > 0.9, (start, accuracy())


# ---------------------------------------------------------------- resume


def _resume_setup(seed):
    """Model, optimizer (Adam inner, sigma decay) and a function running ``k`` steps."""
    model, (x, y) = _mlp(seed), _data()
    opt = EggrollOptimizer(model, lr=0.05, sigma=0.3, rank=3, population_size=N, seed=11,
                           optimizer=torch.optim.Adam, sigma_decay=0.9)
    return model, opt, lambda k: [opt.step(lambda: per_member_mse(model(x), y)) for _ in range(k)]


def test_state_dict_resume_is_bitwise():
    model, opt, steps = _resume_setup(0)
    steps(10)
    model_a, opt_a, steps_a = _resume_setup(0)
    steps_a(5)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b, opt_b, steps_b = _resume_setup(1)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.step_count == 5 and opt_b.param_groups[0]["sigma"] == pytest.approx(0.3 * 0.9**5)
    steps_b(5)
    _assert_same_params(model, model_b, atol=0)  # bitwise
    assert opt_b.param_groups[0]["sigma"] == opt.param_groups[0]["sigma"]
    with pytest.raises(ValueError, match="eggroll"):
        opt_b.load_state_dict(torch.optim.SGD(model_b.parameters()).state_dict())


# ---------------------------------------------------------------- chunks


@pytest.mark.parametrize("chunk_size", [2, 4])
def test_chunked_equals_unchunked(chunk_size):
    x, y = _data()
    xs = x + 0.1 * torch.randn(N, *x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    models = [_mlp(), _mlp()]
    opts = [EggrollOptimizer(m, lr=0.2, sigma=0.2, rank=2, population_size=N, seed=2, chunk_size=c)
            for m, c in zip(models, (None, chunk_size))]
    for _ in range(3):
        with opts[0].ask() as population:
            full = models[0](population.per_member(xs))
        population = opts[1].ask()
        parts, seen = [], []
        for members in population.chunks():
            seen.append((members.start, members.stop))
            parts.append(models[1](population.per_member(xs)))  # the chunk's rows
        assert seen == [(a, min(a + chunk_size, N)) for a in range(0, N, chunk_size)]
        torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=1e-12)
        opts[0].tell(-per_member_mse(full, y))
        opts[1].tell(-per_member_mse(torch.cat(parts), y))
        _assert_same_params(*models)
    # step(closure) runs the closure once per chunk on a shared input
    losses = [opt.step(lambda m=m: per_member_mse(m(x), y)) for m, opt in zip(models, opts)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    _assert_same_params(*models)


# ---------------------------------------------------------------- schedulers, sigma decay, groups


def _fixed_fitness_deltas(opt, model, x, steps, via_step, scheduler=None):
    """Per-step parameter deltas with a fitness that does not depend on the parameters."""
    fitness = torch.linspace(-1.0, 2.0, N, dtype=torch.float64) ** 2
    deltas = []
    for _ in range(steps):
        before = _params(model)
        if via_step:
            opt.step(lambda: (model(x), -fitness)[1])
        else:
            with opt.ask():
                model(x)
            opt.tell(fitness)
        if scheduler is not None:
            scheduler.step()
        deltas.append([p.detach() - p0 for p, p0 in zip(model.parameters(), before)])
    return deltas


@pytest.mark.parametrize("via_step", [True, False])
def test_lr_scheduler_drives_the_update_without_warnings(via_step):
    x, _ = _data()
    ref_model, model = _mlp(), _mlp()
    ref = EggrollOptimizer(ref_model, lr=1.0, sigma=0.2, rank=2, population_size=N, seed=4)
    ref_deltas = _fixed_fitness_deltas(ref, ref_model, x, 5, via_step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = EggrollOptimizer(model, lr=0.5, sigma=0.2, rank=2, population_size=N, seed=4)
        if via_step:
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
            lrs = [0.5, 0.5, 0.05, 0.05, 0.005]
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
            lrs = [0.5 / (1 + t) for t in range(5)]
        deltas = _fixed_fitness_deltas(opt, model, x, 5, via_step, scheduler)
    for lr, step_deltas, step_ref in zip(lrs, deltas, ref_deltas):
        for d, d_ref in zip(step_deltas, step_ref):
            assert d_ref.abs().amax() > 1e-3
            torch.testing.assert_close(d, lr * d_ref, rtol=1e-9, atol=1e-13)


def test_sigma_decays_in_param_groups_and_scales_the_noise():
    lin = nn.Linear(3, 2).double()
    opt = EggrollOptimizer(lin, lr=0.1, sigma=0.4, rank=1, population_size=4, seed=9, sigma_decay=0.5)
    x = torch.randn(5, 3, dtype=torch.float64)
    for t in range(3):
        assert opt.param_groups[0]["sigma"] == pytest.approx(0.4 * 0.5**t)
        with opt.ask() as population:
            lin(x)
            bias_noise = population.noise.chunk_noise(0, 4)[lin.bias]
        (eps,) = keyed_pair_normals(noise_key(9, t, 1), [(2,)], 0, 2, device="cpu", dtype=torch.float64,
                                    block_pairs=opt.noise_block)
        expected = torch.stack((eps, -eps), 1).flatten(0, 1) * 0.4 * 0.5**t
        torch.testing.assert_close(bias_noise, expected, rtol=1e-14, atol=0)
        opt.tell(torch.randn(4, dtype=torch.float64))


def _reference_weight_noise(sigma, rank):
    """Factors of both weights of a fresh ``_mlp()`` at one sigma/rank (same keys)."""
    model = _mlp()
    noise = EggrollOptimizer(model, sigma=sigma, rank=rank, population_size=N).ask().noise.chunk_noise(0, N)
    return noise[model[0].weight], noise[model[2].weight]


def test_add_param_group_with_its_own_sigma_and_rank():
    model, (x, _) = _mlp(), _data()
    first, last = model[0], model[2]
    opt = EggrollOptimizer(model, [first.weight], lr=0.1, sigma=0.1, rank=2, population_size=N)
    opt.add_param_group({"params": [last.weight], "sigma": 0.4, "rank": 3})
    assert [(g["sigma"], g["rank"]) for g in opt.param_groups] == [(0.1, 2), (0.4, 3)]
    assert len(opt.inner.param_groups) == 2
    with opt.ask() as population:
        out = model(x)
        noise = population.noise.chunk_noise(0, N)
    assert noise[last.weight][0].shape == (N, 3, 3) and noise[first.weight][0].shape == (N, 8, 2)
    assert all(map(torch.equal, noise[first.weight], _reference_weight_noise(0.1, 2)[0]))
    assert all(map(torch.equal, noise[last.weight], _reference_weight_noise(0.4, 3)[1]))
    # A_scaled carries sigma / sqrt(rank): the same draw at sigma 0.4 vs 0.1 (rank 3) is 4x
    ratio = noise[last.weight][0] / _reference_weight_noise(0.1, 3)[1][0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 4.0), rtol=1e-14, atol=0)
    perts = {"0.weight": noise[first.weight], "2.weight": noise[last.weight]}  # hooks on both groups
    forward, _ = make_perturbed_forward_fn(model)
    torch.testing.assert_close(out, forward(x, get_params_dict(model, device="cpu"), perts), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="not a trainable parameter"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="Invalid sigma: -1"):
        EggrollOptimizer(model, [first.weight], population_size=N).add_param_group({"params": [last.weight], "sigma": -1})


# ---------------------------------------------------------------- errors

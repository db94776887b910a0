"""EggrollOptimizer errors (SPEC §8): each names the offending value; none leaves it stuck."""
from __future__ import annotations


import pytest
import torch

from eggroll_optim import EggrollOptimizer, per_member_mse

from optim_helpers import N
from optim_helpers import assert_same_params as _assert_same_params
from optim_helpers import data as _data
from optim_helpers import mlp as _mlp
from optim_helpers import params as _params


@pytest.mark.parametrize("kwargs, message", [
    (dict(population_size=5), "Invalid population_size: 5"), (dict(population_size=0), "Invalid population_size: 0"),
    (dict(lr=-0.1), "Invalid lr: -0.1"), (dict(sigma=0.0), "Invalid sigma: 0.0"), (dict(rank=0), "Invalid rank: 0"),
    (dict(sigma_decay=0.0), "Invalid sigma_decay: 0.0"), (dict(chunk_size=3), "Invalid chunk_size: 3"),
    (dict(unsupported="skip"), "Invalid unsupported: 'skip'"),
    (dict(fitness_shaping="rank"), "Unknown fitness_shaping 'rank'"),
])
def test_bad_hyperparameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EggrollOptimizer(_mlp(), **{"population_size": N, **kwargs})


def test_tell_before_ask_and_ask_twice_raise():
    opt = EggrollOptimizer(_mlp(), population_size=N)
    with pytest.raises(RuntimeError, match="before ask"):
        opt.tell(torch.zeros(N, dtype=torch.float64))
    opt.ask()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.ask()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(None)


def test_bad_fitness_raises_and_the_population_stays_pending():
    model, (x, _) = _mlp(), _data()
    before = _params(model)
    opt = EggrollOptimizer(model, population_size=N)
    with opt.ask():
        model(x)
    for bad, error, message in [
        (torch.zeros(N + 2), ValueError, rf"shape \({N},\), got \({N + 2},\)"),
        (torch.zeros(N, 1), ValueError, rf"shape \({N},\), got \({N}, 1\)"),
        (torch.arange(N), TypeError, "floating-point tensor, got torch.int64"),
        (torch.tensor([0.0, float("nan"), 1.0, float("inf"), 2.0, 3.0]), ValueError, r"2 NaN/inf .* indices \[1, 3\]"),
    ]:
        with pytest.raises(error, match=message):
            opt.tell(bad)
        assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), before))  # never NaN weights
    opt.tell(torch.arange(N, dtype=torch.float64))  # the same population can still be told
    assert opt.step_count == 1 and not torch.equal(model[0].weight, before[0])


def test_nan_policy_worst_ranks_nonfinite_members_last():
    x = _data()[0]
    fitness = torch.tensor([0.3, float("nan"), 1.0, -0.2, float("-inf"), 0.5], dtype=torch.float64)
    replaced = torch.where(torch.isfinite(fitness), fitness, torch.tensor(-100.0, dtype=torch.float64))
    models = [_mlp(), _mlp()]
    for model, f in zip(models, (fitness, replaced)):
        opt = EggrollOptimizer(model, population_size=N, nan_policy="worst", fitness_shaping="centered_rank")
        with opt.ask():
            model(x)
        opt.tell(f)
    _assert_same_params(*models, atol=0)
    assert all(torch.isfinite(p).all() for p in models[0].parameters())
    assert not torch.equal(models[0][0].weight, _mlp()[0].weight)


def test_closure_errors_leave_the_optimizer_usable():
    model, (x, y) = _mlp(), _data()
    opt = EggrollOptimizer(model, population_size=N)
    with pytest.raises(ValueError, match=rf"shape \({N},\), got \(\)"):
        opt.step(lambda: per_member_mse(model(x), y).mean())
    with pytest.raises(ValueError, match="indices \\[2\\]"):
        opt.step(lambda: per_member_mse(model(x), y) * torch.tensor([1, 1, float("nan"), 1, 1, 1]))
    assert opt.step_count == 0
    opt.step(lambda: per_member_mse(model(x), y))
    assert opt.step_count == 1


"""Fitness shaping against hand-computed numbers, the registry's common properties, NaN policy."""
from __future__ import annotations

import math

import pytest
import torch

from eggroll_optim.shaping import (
    SHAPINGS, centered_rank, check_fitness, identity, resolve_shaping, shape_fitness, zscore,
)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- hand-computed values


def test_zscore_hand_computed():
    # mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25 (ddof 0, not 5/3)
    expected = t(-1.5, -0.5, 0.5, 1.5) / math.sqrt(1.25 + 1e-8)
    torch.testing.assert_close(zscore(t(1, 2, 3, 4)), expected, rtol=1e-14, atol=0)
    # [0, 10]: mean 5, variance 25
    torch.testing.assert_close(zscore(t(10, 0)), t(5, -5) / math.sqrt(25 + 1e-8), rtol=1e-14, atol=0)
    # eps matters for tiny spreads: [0, 2e-4] has variance 1e-8
    torch.testing.assert_close(zscore(t(0, 2e-4)), t(-1e-4, 1e-4) / math.sqrt(2e-8), rtol=1e-12, atol=0)
    torch.testing.assert_close(zscore(t(0, 2e-4), eps=0.0), t(-1, 1), rtol=1e-12, atol=0)


def test_zscore_all_equal_is_zero_not_nan():
    for dtype in (torch.float32, torch.float64):
        out = zscore(torch.full((6,), 3.7, dtype=dtype))
        assert torch.equal(out, torch.zeros(6, dtype=dtype))


@pytest.mark.parametrize(
    "fitness, ranks",
    [
        ((1, 3, 3, 7), (0, 1.5, 1.5, 3)),
        ((7, 3, 1, 3), (3, 1.5, 0, 1.5)),
        ((5, 1, 5, 5, 2), (3, 0, 3, 3, 1)),
        ((2, 2, 2, 2), (1.5, 1.5, 1.5, 1.5)),
        ((-1, 4), (0, 1)),
        ((0.5, -2, 9, 0.1, 3, -7), (3, 1, 5, 2, 4, 0)),
    ],
)
def test_centered_rank_hand_computed(fitness, ranks):
    n = len(fitness)
    expected = t(*ranks) / (n - 1) - 0.5
    torch.testing.assert_close(centered_rank(t(*fitness)), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(centered_rank(t(*fitness, dtype=torch.float32)), expected.float(), rtol=0, atol=1e-7)


def test_none_is_identity():
    f = t(3, -1, 2)
    assert SHAPINGS["none"] is identity
    assert torch.equal(SHAPINGS["none"](f), f)


# ---------------------------------------------------------------- registry properties


@pytest.mark.parametrize("name", sorted(SHAPINGS))
@pytest.mark.parametrize("seed", range(4))
def test_registry_common_properties(name, seed):
    shape = SHAPINGS[name]
    g = torch.Generator().manual_seed(seed)
    N = 2 * int(torch.randint(1, 40, (), generator=g))
    f = torch.randn(N, generator=g, dtype=torch.float64) * 10 ** float(torch.randint(-3, 4, (), generator=g))
    out = shape(f)
    assert out.shape == (N,) and out.dtype == f.dtype and torch.isfinite(out).all()
    # strictly order-preserving on distinct values
    order = f.argsort()
    assert (out[order].diff() > 0).all()
    # monotone (non-decreasing) with ties, and ties get equal values
    tied = torch.round(f * 2 / f.abs().max()).clone()
    out_tied = shape(tied)
    ordered = out_tied[tied.argsort(stable=True)]
    assert (ordered.diff() >= 0).all()
    for v in tied.unique():
        assert torch.unique(out_tied[tied == v]).numel() == 1


def test_resolve_shaping():
    assert resolve_shaping("zscore") is zscore and resolve_shaping("centered_rank") is centered_rank
    fn = lambda f: f * 2  # noqa: E731
    assert resolve_shaping(fn) is fn
    with pytest.raises(ValueError, match="'bogus'.*centered_rank"):
        resolve_shaping("bogus")


# ---------------------------------------------------------------- check_fitness


def test_check_fitness_passes_finite_through_unchanged():
    f = t(1, 2, 3, 4)
    assert check_fitness(f, 4) is f
    assert check_fitness(f, 4, torch.device("cpu")) is f


@pytest.mark.parametrize(
    "bad_idx, bad_value", [([1], float("nan")), ([0, 3], float("inf")), ([2, 5], -float("inf")), ([1, 2, 5], float("nan"))]
)
def test_check_fitness_nonfinite_raises_with_count_and_indices(bad_idx, bad_value):
    f = torch.arange(6, dtype=torch.float32)
    f[bad_idx] = bad_value
    with pytest.raises(ValueError, match=rf"{len(bad_idx)} NaN/inf member\(s\) of 6.*{bad_idx}".replace("[", r"\[").replace("]", r"\]")):
        check_fitness(f, 6)


def test_check_fitness_lists_first_few_indices_only():
    f = torch.full((20,), float("nan"))
    f[0] = 1.0
    with pytest.raises(ValueError, match=r"19 NaN/inf member\(s\) of 20, at indices \[1, 2, 3, 4, 5, 6, 7, 8\] \.\.\."):
        check_fitness(f, 20)


@pytest.mark.parametrize("name", sorted(set(SHAPINGS) - {"none"}))
def test_nan_policy_worst_ranks_bad_members_last(name):
    f = t(0.3, float("nan"), -5.0, 2.0, float("inf"), -float("inf"), 1.0, 100.0)
    bad = ~torch.isfinite(f)
    fixed = check_fitness(f, 8, nan_policy="worst")
    assert torch.isfinite(fixed).all()
    assert torch.equal(fixed[~bad], f[~bad])  # finite members untouched
    assert fixed[bad].max() < f[~bad].min()
    shaped = SHAPINGS[name](fixed)
    assert torch.isfinite(shaped).all() and shaped[bad].max() < shaped[~bad].min()
    if name == "centered_rank":  # the three bad ones tie at ranks 0, 1, 2
        torch.testing.assert_close(shaped[bad], torch.full((3,), 1 / 7 - 0.5, dtype=torch.float64))


def test_nan_policy_worst_all_bad_raises():
    with pytest.raises(ValueError, match="Every fitness"):
        check_fitness(torch.full((4,), float("nan")), 4, nan_policy="worst")


def test_check_fitness_wrong_inputs_raise():
    with pytest.raises(ValueError, match=r"shape \(4,\), got \(5,\)"):
        check_fitness(torch.zeros(5), 4)
    with pytest.raises(ValueError, match=r"got \(4, 1\)"):
        check_fitness(torch.zeros(4, 1), 4)
    with pytest.raises(TypeError, match="torch.int64"):
        check_fitness(torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="list"):
        check_fitness([1.0, 2.0, 3.0, 4.0], 4)
    with pytest.raises(ValueError, match="meta"):
        check_fitness(torch.zeros(4, device="meta"), 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="'drop'"):
        check_fitness(torch.zeros(4), 4, nan_policy="drop")


def test_shape_fitness_applies_the_policy_then_the_shaping():
    """What the functional step and ``EggrollOptimizer.tell`` both call: hand-computed values."""
    f = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # z-score: mean 3, population variance 3.5
    torch.testing.assert_close(shape_fitness(f, "skip"), (f - 3.0) / math.sqrt(3.5 + 1e-8))
    torch.testing.assert_close(shape_fitness(f, "raise", centered_rank), torch.tensor([-0.5, -1 / 6, 1 / 6, 0.5]))
    bad = torch.tensor([1.0, float("nan"), 3.0, 6.0])
    assert torch.equal(shape_fitness(bad, "skip"), torch.zeros(4))  # skip: no update at all
    # worst: NaN becomes min - spread = 1 - 5 = -4, ranked last
    torch.testing.assert_close(shape_fitness(bad, "worst", identity), torch.tensor([1.0, -4.0, 3.0, 6.0]))
    with pytest.raises(ValueError, match="NaN/inf"):
        shape_fitness(bad, "raise")

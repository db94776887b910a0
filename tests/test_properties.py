"""Property-based tests (hypothesis): over random layer shapes, ranks 1..8, population and chunk
sizes and float32/float64,

- antithetic cancellation: a constant fitness, or pairs ``2k``/``2k+1`` with equal fitness, give a
  gradient of exactly zero and leave every parameter as it was;
- the gradient is the dense formula ``-(1/sqrt N) Σ_i f'_i E_i`` with ``E_i`` read off
  ``population.member_state_dict(i)``;
- chunked (explicit or ``"auto"`` pieces) equals unchunked: outputs and the update;
- a ``state_dict`` taken mid-run and loaded into a fresh optimizer continues bitwise as the run that
  was never interrupted;
- shaping: z-score has mean 0 and variance ``v / (v + 1e-8)``, centered ranks lie in [-0.5, 0.5] and
  sum to 0, both are strictly monotone (ties give equal values) and permutation-equivariant, and a
  half-precision fitness is shaped as float32;
- every invalid argument raises the documented exception and changes no parameter.

Examples are derandomized and bounded (``max_examples``) so the file runs in well under a minute.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer
from eggroll_optim.shaping import SHAPINGS, centered_rank, shape_fitness, zscore

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def setups(draw, chunks: bool = False):
    """A small MLP (random widths), its rank, population, optional chunk size, dtype and data."""
    sizes = [draw(st.integers(1, 6)) for _ in range(3)]
    population = 2 * draw(st.integers(1, 8))
    setup = dict(sizes=sizes, rank=draw(st.integers(1, 8)), N=population, dtype=draw(DTYPES),
                 batch=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**31 - 1)))
    if chunks:
        setup["chunk_size"] = 2 * draw(st.integers(1, population // 2))
    return setup


def _model(s):
    torch.manual_seed(s["seed"] % 1000)
    a, b, c = s["sizes"]
    return nn.Sequential(nn.Linear(a, b), nn.Tanh(), nn.Linear(b, c)).to(s["dtype"])


def _inputs(s, per_member=False):
    g = torch.Generator().manual_seed(s["seed"])
    shape = (s["N"], s["batch"], s["sizes"][0]) if per_member else (s["batch"], s["sizes"][0])
    return torch.randn(*shape, generator=g, dtype=s["dtype"])


def _opt(model, s, **kwargs):
    kwargs = {"lr": 0.1, "sigma": 0.2, "rank": s["rank"], "population_size": s["N"], "seed": s["seed"], **kwargs}
    return EggrollOptimizer(model, **kwargs)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, snapshot) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshot))


# ---------------------------------------------------------------- antithetic cancellation


@PROPERTY
@given(setups(), st.floats(-1e3, 1e3), st.sampled_from(sorted(SHAPINGS)))
def test_constant_fitness_gives_a_zero_update(s, value, shaping):
    model = _model(s)
    before, opt = _snapshot(model), _opt(model, s, fitness_shaping=shaping)
    with opt.ask():
        model(_inputs(s))
    opt.tell(torch.full((s["N"],), value, dtype=s["dtype"]))
    assert _unchanged(model, before)


@PROPERTY
@given(setups(), st.data())
def test_equal_fitness_within_each_pair_gives_a_zero_gradient(s, data):
    model = _model(s)
    before, opt = _snapshot(model), _opt(model, s, fitness_shaping="none")
    pairs = data.draw(st.lists(st.floats(-10, 10), min_size=s["N"] // 2, max_size=s["N"] // 2))
    with opt.ask():
        model(_inputs(s))
    opt.tell(torch.tensor(pairs, dtype=s["dtype"]).repeat_interleave(2))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert _unchanged(model, before)


# ---------------------------------------------------------------- the gradient's formula


@PROPERTY
@given(setups(), st.data())
def test_gradient_is_the_dense_formula_over_member_state_dicts(s, data):
    model = _model(s)
    opt = _opt(model, s, fitness_shaping="none")
    fitness = torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=s["N"], max_size=s["N"])), dtype=s["dtype"])
    with opt.ask() as population:
        model(_inputs(s))
        members = [population.member_state_dict(i) for i in range(s["N"])]
    names = dict(model.named_parameters())
    expected = {name: sum(float(f) * (m[name].double() - p.detach().double()) for f, m in zip(fitness, members))
                / -math.sqrt(s["N"]) for name, p in names.items()}
    opt.tell(fitness)
    tol = 1e-10 if s["dtype"] == torch.float64 else 2e-5
    for name, p in names.items():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=tol, atol=tol, msg=name)


# ---------------------------------------------------------------- chunks


@PROPERTY
@given(setups(chunks=True), st.booleans(), st.booleans())
def test_chunked_equals_unchunked(s, per_member, auto):
    x, fitness_of = _inputs(s, per_member), lambda out: out.double().square().sum(tuple(range(1, out.dim())))
    models = [_model(s), _model(s)]
    chunking = dict(max_memory=2_000 * s["N"] // s["chunk_size"]) if auto else dict(chunk_size=s["chunk_size"])
    opts = [_opt(models[0], s, chunk_size=s["N"]), _opt(models[1], s, **chunking)]
    tol = dict(rtol=0, atol=1e-12) if s["dtype"] == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for _ in range(2):
        outputs = []
        for model, opt in zip(models, opts):
            population, parts = opt.ask(), []
            with torch.no_grad():
                for _ in population.chunks():
                    parts.append(model(population.per_member(x) if per_member else x))
            outputs.append(torch.cat(parts))
            opt.tell(fitness_of(outputs[-1]))
        torch.testing.assert_close(outputs[1], outputs[0], **tol)
        for p, q in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(q, p, **tol)


# ---------------------------------------------------------------- resume


@PROPERTY
@given(setups(), st.integers(1, 3), st.integers(1, 3), st.sampled_from(["sgd", "adam"]), st.floats(0.5, 1.0))
def test_resume_from_state_dict_equals_the_uninterrupted_run(s, first, second, inner, sigma_decay):
    x = _inputs(s)
    kwargs = dict(optimizer=torch.optim.Adam if inner == "adam" else None, sigma_decay=sigma_decay)

    def steps(model, opt, k):
        for _ in range(k):
            opt.step(lambda: model(x).square().mean(tuple(range(1, 3))))

    model = _model(s)
    opt = _opt(model, s, **kwargs)
    steps(model, opt, first)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, second)
    resumed = _model(dict(s, seed=s["seed"] + 1))  # another init: everything comes from the checkpoint
    resumed.load_state_dict(saved_model)
    resumed_opt = _opt(resumed, s, **kwargs)
    resumed_opt.load_state_dict(saved_opt)
    steps(resumed, resumed_opt, second)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


# ---------------------------------------------------------------- shaping


fitness_lists = st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=2, max_size=64)


@PROPERTY
@given(fitness_lists, DTYPES)
def test_zscore_has_mean_zero_and_unit_variance(values, dtype):
    f = torch.tensor(values, dtype=dtype)
    z = zscore(f).double()
    var = f.double().var(unbiased=False)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert abs(float(z.mean())) < tol
    if float(f.max()) == float(f.min()):
        assert torch.equal(z, torch.zeros_like(z))
    else:
        assert float(z.var(unbiased=False)) == pytest.approx(float(var / (var + 1e-8)), rel=tol, abs=tol)


@PROPERTY
@given(fitness_lists, DTYPES, st.sampled_from(["zscore", "centered_rank"]), st.randoms(use_true_random=False))
def test_shapings_are_monotone_and_permutation_equivariant(values, dtype, name, rng):
    f = torch.tensor(values, dtype=dtype)
    shaped = SHAPINGS[name](f)
    order = f.argsort()
    a, b = f[order], shaped[order]
    assert bool((b[1:] >= b[:-1]).all())  # monotone
    assert torch.equal(b[1:][a[1:] == a[:-1]], b[:-1][a[1:] == a[:-1]])  # ties: equal values
    if name == "centered_rank":
        assert bool((b[1:] > b[:-1])[a[1:] > a[:-1]].all())  # strictly, where the fitness is
        assert float(shaped.min()) >= -0.5 and float(shaped.max()) <= 0.5 and abs(float(shaped.sum())) < 1e-4
    perm = list(range(len(values)))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    torch.testing.assert_close(SHAPINGS[name](f[perm]), shaped[perm], rtol=1e-5, atol=1e-6)


@PROPERTY
@given(st.lists(st.floats(-6e4, 6e4, width=16), min_size=2, max_size=64), st.sampled_from(sorted(SHAPINGS)))
def test_half_precision_fitness_is_shaped_as_float32(values, name):
    for half in (torch.float16, torch.bfloat16):
        f = torch.tensor(values, dtype=half)
        shaped = shape_fitness(f, "raise", SHAPINGS[name])
        assert shaped.dtype == torch.float32
        assert torch.equal(shaped, shape_fitness(f.float(), "raise", SHAPINGS[name]))


def test_centered_rank_of_distinct_values_is_linear():
    torch.testing.assert_close(centered_rank(torch.tensor([3.0, -1.0, 7.0])), torch.tensor([0.0, -0.5, 0.5]))


# ---------------------------------------------------------------- invalid arguments


INVALID_CONSTRUCTION = [
    (dict(population_size=3), ValueError), (dict(population_size=0), ValueError),
    (dict(population_size=2.0), ValueError),
    (dict(rank=0), ValueError), (dict(rank=-2), ValueError), (dict(rank=1.5), ValueError),
    (dict(sigma=0.0), ValueError), (dict(sigma=-0.1), ValueError), (dict(lr=-1e-3), ValueError),
    (dict(sigma_decay=0.0), ValueError), (dict(chunk_size=3), ValueError), (dict(chunk_size="all"), ValueError),
    (dict(max_memory=0), ValueError), (dict(max_memory=-5), ValueError),
    (dict(chunk_size=2, max_memory=0.5), ValueError),
    (dict(nan_policy="skip"), ValueError), (dict(unsupported="ignore"), ValueError),
    (dict(fitness_shaping="rank"), ValueError), (dict(fused="yes"), ValueError), (dict(noise_block=0), ValueError),
    (dict(optimizer=3), TypeError), (dict(optimizer=lambda groups: object()), TypeError),
]


@PROPERTY
@given(setups(), st.sampled_from(INVALID_CONSTRUCTION))
def test_an_invalid_argument_raises_the_documented_exception_and_changes_nothing(s, case):
    kwargs, error = case
    model = _model(s)
    before = _snapshot(model)
    with pytest.raises(error, match="Invalid|Unknown|optimizer must"):
        _opt(model, s, **kwargs)
    assert _unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())


def _bad_fitness(s, kind):
    N, dtype = s["N"], s["dtype"]
    return {
        "shape": (torch.zeros(N + 2, dtype=dtype), ValueError), "2d": (torch.zeros(N, 1, dtype=dtype), ValueError),
        "int": (torch.zeros(N, dtype=torch.int64), TypeError), "list": ([0.0] * N, TypeError),
        "nan": (torch.full((N,), float("nan"), dtype=dtype), ValueError),
        "inf": (torch.zeros(N, dtype=dtype).index_fill(0, torch.tensor([N - 1]), float("inf")), ValueError),
    }[kind]


@PROPERTY
@given(setups(), st.sampled_from(["shape", "2d", "int", "list", "nan", "inf"]))
def test_an_invalid_fitness_raises_changes_nothing_and_leaves_the_population_pending(s, kind):
    model = _model(s)
    before, opt = _snapshot(model), _opt(model, s)
    with opt.ask():
        model(_inputs(s))
    fitness, error = _bad_fitness(s, kind)
    with pytest.raises(error):
        opt.tell(fitness)
    assert _unchanged(model, before) and opt.step_count == 0 and opt.population is not None
    opt.tell(torch.arange(s["N"], dtype=s["dtype"]))  # the same population can still be told
    assert opt.step_count == 1


@PROPERTY
@given(setups(), st.sampled_from(["shape", "2d", "int", "list", "nan", "inf"]))
def test_an_invalid_closure_result_raises_changes_nothing_and_leaves_nothing_pending(s, kind):
    model = _model(s)
    before, opt = _snapshot(model), _opt(model, s)
    x = _inputs(s)
    fitness, _ = _bad_fitness(s, kind)
    with pytest.raises((ValueError, TypeError)):
        opt.step(lambda: (model(x), fitness)[1])
    assert _unchanged(model, before) and opt.step_count == 0 and opt.population is None

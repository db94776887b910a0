"""``EggrollOptimizer`` as a torch.optim citizen: schedulers that cycle momentum, step hooks once per
update on both paths, gradient clipping, the inner optimizer given as an instance, the direction of
``tell``/``step``, half-precision fitness, and the messages a user meets after a mistake.
Each test failed before the change it covers (issue 13)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from eggroll_optim import EggrollOptimizer, per_member_mse

from optim_helpers import N
from optim_helpers import data as _data
from optim_helpers import mlp as _mlp
from optim_helpers import params as _params


def _steps(opt, model, k, scheduler=None):
    x, y = _data()
    for _ in range(k):
        opt.step(lambda: per_member_mse(model(x), y))
        if scheduler is not None:
            scheduler.step()


def _seen_by_inner(opt, key):
    """The inner group's ``key`` at each of its steps (what the inner step really used)."""
    seen = []
    opt.inner.register_step_pre_hook(lambda inner, args, kwargs: seen.append(inner.param_groups[0][key]))
    return seen


# ---------------------------------------------------------------- schedulers


@pytest.mark.parametrize("inner, key", [(None, "momentum"), (lambda g: torch.optim.SGD(g, momentum=0.9), "momentum"),
                                        (torch.optim.Adam, "betas")])
def test_one_cycle_lr_with_defaults_cycles_the_inner_momentum(inner, key):
    model = _mlp()
    opt = EggrollOptimizer(model, lr=0.01, sigma=0.1, rank=2, population_size=N, optimizer=inner)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6)  # cycle_momentum=True
    ours, lrs = [], []
    seen, seen_lr = _seen_by_inner(opt, key), _seen_by_inner(opt, "lr")
    x, y = _data()
    for _ in range(5):
        ours.append(opt.param_groups[0][key])
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(lambda: per_member_mse(model(x), y))
        scheduler.step()
    assert seen == ours and seen_lr == lrs  # what the scheduler set is what the inner step used
    first = [m[0] if key == "betas" else m for m in seen]
    assert first[0] == pytest.approx(0.95) and min(first) < 0.9  # cycled: 0.95 -> 0.85 -> back
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) > 0.09


@pytest.mark.parametrize("inner, key", [(lambda g: torch.optim.SGD(g, momentum=0.9), "momentum"),
                                        (torch.optim.AdamW, "betas")])
def test_cyclic_lr_with_defaults_works_and_reaches_the_inner_optimizer(inner, key):
    model = _mlp()
    opt = EggrollOptimizer(model, lr=0.01, sigma=0.1, rank=2, population_size=N, optimizer=inner)
    scheduler = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.001, max_lr=0.01, step_size_up=2)
    seen = _seen_by_inner(opt, key)
    _steps(opt, model, 4, scheduler)
    first = [m[0] if key == "betas" else m for m in seen]
    assert first == pytest.approx([0.9, 0.85, 0.8, 0.85])  # max_momentum at the base lr, base at the peak


def test_scheduler_on_the_inner_optimizer_is_not_overridden_and_shows_in_ours():
    model = _mlp()
    opt = EggrollOptimizer(model, lr=0.5, sigma=0.1, rank=2, population_size=N)
    scheduler = torch.optim.lr_scheduler.StepLR(opt.inner, step_size=1, gamma=0.1)
    seen = _seen_by_inner(opt, "lr")
    _steps(opt, model, 3, scheduler)
    assert seen == pytest.approx([0.5, 0.05, 0.005])
    opt.ask()  # our groups read the inner's value from the next ask() on
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0005)
    opt.discard()


def test_lr_set_on_both_sides_is_an_error_naming_both():
    model = _mlp()
    opt = EggrollOptimizer(model, lr=0.5, population_size=N)
    opt.param_groups[0]["lr"], opt.inner.param_groups[0]["lr"] = 0.1, 0.2
    before = _params(model)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['lr'\] was set to 0.1 .* 0.2 on its inner"):
        _steps(opt, model, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ---------------------------------------------------------------- step hooks and clipping


@pytest.mark.parametrize("path", ["step", "ask_tell"])
def test_step_hooks_fire_once_per_update_on_both_paths(path):
    model, (x, y) = _mlp(), _data()
    opt = EggrollOptimizer(model, lr=0.1, population_size=N)
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o))),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o))),
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", o))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", o))),
        opt.inner.register_step_pre_hook(lambda o, a, k: calls.append(("inner pre", o))),
    ]
    try:
        for _ in range(2):
            if path == "step":
                opt.step(lambda: per_member_mse(model(x), y))
            else:
                with opt.ask():
                    fitness = -per_member_mse(model(x), y)
                opt.tell(fitness)
    finally:
        for handle in handles:
            handle.remove()
    once = [("global pre", opt), ("pre", opt), ("inner pre", opt.inner), ("post", opt), ("global post", opt)]
    assert calls == once * 2


def test_a_failed_step_fires_no_hook():
    model, (x, y) = _mlp(), _data()
    opt = EggrollOptimizer(model, population_size=N)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    with pytest.raises(ValueError, match="shape"):
        opt.step(lambda: per_member_mse(model(x), y).mean())
    assert calls == []


def test_clip_grad_norm_in_a_step_pre_hook_clips_the_estimate_before_the_inner_step():
    model, (x, y) = _mlp(), _data()
    opt = EggrollOptimizer(model, lr=1.0, sigma=0.3, population_size=N)
    norms = []

    def clip(optimizer, args, kwargs):
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)))

    opt.register_step_pre_hook(clip)
    before = _params(model)
    opt.step(lambda: per_member_mse(model(x), y))
    delta = torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), before)])
    assert norms[0] > 0.1  # the estimate was far above the limit
    assert float(delta.norm()) == pytest.approx(0.01, rel=1e-5)  # SGD(lr=1) took the clipped gradient


def test_a_pre_hook_cannot_replace_the_step_arguments():
    model, (x, y) = _mlp(), _data()
    opt = EggrollOptimizer(model, population_size=N)
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, kwargs))
    with pytest.raises(RuntimeError, match="edit p.grad in place"):
        opt.step(lambda: per_member_mse(model(x), y))


# ---------------------------------------------------------------- the inner optimizer


def test_an_optimizer_instance_is_adopted_with_its_lr():
    (x, y), models = _data(), [_mlp(), _mlp()]
    opts = [EggrollOptimizer(models[0], lr=0.01, population_size=N, optimizer=torch.optim.Adam),
            EggrollOptimizer(models[1], population_size=N, optimizer=torch.optim.Adam(models[1].parameters(), 0.01))]
    assert opts[1].param_groups[0]["lr"] == 0.01 and opts[1].param_groups[0]["betas"] == (0.9, 0.999)
    for model, opt in zip(models, opts):
        for _ in range(2):
            opt.step(lambda: per_member_mse(model(x), y))
    for p, q in zip(*(m.parameters() for m in models)):  # the same parameters, in another group order
        assert torch.equal(p, q)


def test_an_optimizer_instance_over_other_parameters_is_rejected_by_name():
    model = _mlp()
    with pytest.raises(ValueError, match=r"exactly the parameters .* also holds \['0.bias', '2.bias'\]"):
        EggrollOptimizer(model, population_size=N, evolve_biases=False, optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match=r"lacks \['2.weight', '2.bias'\]"):
        EggrollOptimizer(model, population_size=N, optimizer=torch.optim.Adam(model[0].parameters()))
    with pytest.raises(TypeError, match="torch.optim.Optimizer class, a factory .* or an Optimizer instance"):
        EggrollOptimizer(model, population_size=N, optimizer="adam")


# ---------------------------------------------------------------- direction, dtype, messages


def test_step_minimises_the_closure_and_maximize_true_equals_tell():
    x, y = _data()
    models = [_mlp(), _mlp(), _mlp()]
    opts = [EggrollOptimizer(m, lr=0.1, population_size=N, seed=3) for m in models]
    opts[0].step(lambda: per_member_mse(models[0](x), y))  # a loss: lower is better
    opts[1].step(lambda: -per_member_mse(models[1](x), y), maximize=True)  # a score: higher is better
    with torch.no_grad(), opts[2].ask():  # as step runs its closure
        fitness = -per_member_mse(models[2](x), y)
    opts[2].tell(fitness)  # fitness: higher is better
    for p, q, r in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q) and torch.equal(p, r)
    with pytest.raises(TypeError, match="maximize must be a bool"):
        opts[0].step(lambda: per_member_mse(models[0](x), y), maximize="yes")


def test_half_precision_fitness_is_shaped_in_float32():
    x = _data()[0]
    g = torch.Generator().manual_seed(0)
    fitness = (torch.randn(N, generator=g) * 400 - 1000).half()  # overflowed float16's variance: zero update
    deltas = []
    for f in (fitness, fitness.float()):
        model = _mlp()
        opt = EggrollOptimizer(model, lr=0.1, population_size=N)
        before = _params(model)
        with opt.ask():
            model(x)
        opt.tell(f)
        deltas.append(torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), before)]))
    assert deltas[0].norm() > 1e-3
    assert torch.equal(deltas[0], deltas[1])


def test_ask_after_an_exception_names_discard():
    model, (x, _) = _mlp(), _data()
    opt = EggrollOptimizer(model, population_size=N)
    population = opt.ask()
    with pytest.raises(ZeroDivisionError):
        model(x)
        1 / 0  # the user's evaluation fails between ask() and tell()
    with pytest.raises(RuntimeError, match=r"opt.discard\(\)"):
        opt.ask()
    opt.discard()
    assert population is not opt.ask()


def test_deepcopy_inside_ask_is_the_plain_model():
    model, (x, _) = _mlp(), _data()
    with torch.no_grad():
        plain = model(x)
    opt = EggrollOptimizer(model, population_size=N)
    with opt.ask():
        clone = copy.deepcopy(model)
        members = model(x)
        assert torch.equal(clone(x), plain)  # (7, 3): no population dim, the mean model
    assert members.shape == (N, 7, 3)
    opt.tell(members.sum((1, 2)))
    assert torch.equal(clone(x), plain) and not torch.equal(model(x), plain)


def test_a_chunked_step_closure_reaches_per_member_inputs_through_opt_population():
    x, y = _data()
    xs = x + torch.randn(N, *x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    models = [_mlp(), _mlp()]
    opts = [EggrollOptimizer(m, population_size=N, chunk_size=c) for m, c in zip(models, (2, N))]
    for model, opt in zip(models, opts):
        opt.step(lambda: per_member_mse(model(opt.population.per_member(xs)), y))
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert opts[0].population is None

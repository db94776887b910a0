"""eggroll_step's sync-free NaN policy ("skip") and a functional step captured in a CUDA graph."""
import pytest
import torch
import torch.nn as nn

from eggroll_optim import compute_classification_fitness
from eggroll_optim.core import (eggroll_step, generate_perturbations, get_params_dict, get_weight_shapes,
                                make_perturbed_forward_fn)


@pytest.fixture(autouse=True)
def _first_config_only(monkeypatch):
    """Autotuned kernels compile their first config alone (``kernels.fast._triton.autotune``): the tests check
    numbers, not speed, and the whole config lists cost minutes of compiling on a GPU."""
    monkeypatch.setenv("EGGROLL_AUTOTUNE", "first")


def _setup(device="cpu", N=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    params = get_params_dict(model, device)
    perts = generate_perturbations(get_weight_shapes(params), N, 2, 0.1, torch.Generator(device).manual_seed(seed))
    return model, params, perts


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_skip_leaves_the_weights_bitwise_on_nonfinite_fitness(bad):
    _, params, perts = _setup()
    before = {k: v.clone() for k, v in params.items()}
    fitness = torch.randn(8)
    fitness[3] = bad
    eggroll_step(params, fitness, perts, 0.5, 0.1, nan_policy="skip")
    for k in params:
        assert torch.equal(params[k], before[k]), k


def _two_copies():
    """The same parameters twice (to step them two ways) and the perturbations."""
    _, params, perts = _setup()
    return params, {k: v.clone() for k, v in params.items()}, perts


def test_skip_equals_raise_on_finite_fitness():
    p1, p2, perts = _two_copies()
    before = {k: v.clone() for k, v in p1.items()}
    fitness = torch.randn(8)
    eggroll_step(p1, fitness, perts, 0.5, 0.1)
    eggroll_step(p2, fitness, perts, 0.5, 0.1, nan_policy="skip")
    assert any(not torch.equal(p1[k], before[k]) for k in p1)  # the step moved something
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k


def test_worst_ranks_nonfinite_members_last_and_raise_raises():
    p1, p2, perts = _two_copies()
    fitness = torch.randn(8)
    bad = fitness.clone()
    bad[5] = float("nan")
    finite = fitness[torch.arange(8) != 5]
    replaced = fitness.clone()
    replaced[5] = finite.min() - max(1.0, float(finite.max() - finite.min()))  # below every finite member
    eggroll_step(p1, bad, perts, 0.5, 0.1, nan_policy="worst")
    eggroll_step(p2, replaced, perts, 0.5, 0.1)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k])
    with pytest.raises(ValueError, match="NaN/inf"):
        eggroll_step(p1, bad, perts, 0.5, 0.1)
    with pytest.raises(ValueError, match="nan_policy"):
        eggroll_step(p1, fitness, perts, 0.5, 0.1, nan_policy="ignore")


@pytest.mark.cuda
def test_functional_step_in_a_cuda_graph_matches_eager():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        N, steps = 64, 3
        model, p_graph, _ = _setup("cuda", N)
        p_eager = {k: v.clone() for k, v in p_graph.items()}
        shapes = get_weight_shapes(p_graph)
        forward, _ = make_perturbed_forward_fn(model)
        x, y = torch.rand(32, 6, device="cuda"), torch.randint(0, 3, (32,), device="cuda")

        def step(params, gen, xs, ys):
            perts = generate_perturbations(shapes, N, 2, 0.1, gen)
            fitness = compute_classification_fitness(forward(xs, params, perts), ys)
            eggroll_step(params, fitness, perts, 0.5, 0.1, nan_policy="skip")
            return fitness

        g_eager = torch.Generator("cuda").manual_seed(1)
        g_graph = torch.Generator("cuda").manual_seed(2)
        xs, ys = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (autotuning) on copies, so p_graph is untouched
            warm = {k: v.clone() for k, v in p_graph.items()}
            step(warm, torch.Generator("cuda").manual_seed(3), xs, ys)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(g_graph)
        with torch.cuda.graph(graph):
            fitness = step(p_graph, g_graph, xs, ys)
        g_graph.manual_seed(1)  # replays now draw what the eager steps draw
        for _ in range(steps):
            graph.replay()
            step(p_eager, g_eager, x, y)
        for k in p_eager:
            torch.testing.assert_close(p_graph[k], p_eager[k], rtol=1e-5, atol=1e-6)
        before = {k: v.clone() for k, v in p_graph.items()}
        xs[0, 0] = float("nan")  # a NaN input: non-finite fitness, the replayed step updates nothing
        graph.replay()
        assert not torch.isfinite(fitness).all()
        for k in p_graph:
            assert torch.equal(p_graph[k], before[k]), k
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

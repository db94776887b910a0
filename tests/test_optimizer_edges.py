"""Edge cases found in review: param-group generators, tied weights, parameters no hook perturbs,
frozen layers between evolved ones, padding_idx, dtype of functional factors, shaping callables."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eggroll_optim import EggrollOptimizer
from eggroll_optim.core import generate_perturbations, get_params_dict, get_weight_shapes, perturbed_forward

N = 4


def test_param_group_given_as_a_generator_is_read_once():
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = EggrollOptimizer(model, [{"params": model.parameters()}], population_size=N)
    assert [len(g["params"]) for g in opt.param_groups] == [4]
    before = model[0].weight.detach().clone()
    with opt.ask():
        out = model(torch.randn(6, 5))
    opt.tell(out.sum((1, 2)))
    assert not torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="at least one parameter"):
        EggrollOptimizer(model, [{"params": []}], population_size=N)


class Scaled(nn.Linear):  # a subclass with its own forward and an extra parameter
    def __init__(self, n_in=3, n_out=2):
        super().__init__(n_in, n_out)
        self.scale = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return super().forward(x) * self.scale


def _member_exact(model, x):
    opt = EggrollOptimizer(model, population_size=N, sigma=0.3)
    with opt.ask() as population:
        out = model(x)
    for i in range(N):
        ref = torch.func.functional_call(model, population.member_state_dict(i), (x,))
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
    assert (out[0] - out[1]).abs().max() > 1e-3
    return opt


def test_parameters_without_a_rule_get_full_rank_noise_and_big_ones_are_rejected():
    x = torch.randn(4, 3, dtype=torch.float64)
    # weight_norm's g and v, a subclass with its own forward: their parameters are perturbed full-rank
    norm = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)).double()
    opt = _member_exact(nn.Sequential(norm), x)
    assert not opt._plan.lowrank and len(opt._plan.free) == 3  # original0, original1, bias
    _member_exact(Scaled().double(), x)
    with pytest.raises(TypeError, match=r"weight .*Scaled.*\(600, 500\).*fullrank_max_numel"):
        EggrollOptimizer(Scaled(500, 600), population_size=N)
    with pytest.warns(UserWarning, match="untouched"):
        opt = EggrollOptimizer(Scaled(500, 600), population_size=N, unsupported="freeze")
    assert {opt._plan.names[p] for g in opt.param_groups for p in g["params"]} == {"bias", "scale"}


def test_tied_weight_is_perturbed_in_every_layer_that_holds_it():
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    opt = EggrollOptimizer(model, population_size=N, sigma=0.5)
    idx = torch.tensor([1, 2, 3])
    with opt.ask() as population:
        logits = model(idx)
    assert logits.shape == (N, 3, 10)
    A, B = population.noise.chunk_noise(0, N)[emb.weight]
    W = emb.weight.detach()
    for i in range(N):  # both uses see the same W + E_i
        E = A[i] @ B[i].T
        torch.testing.assert_close(logits[i], (W + E)[idx] @ (W + E).T)
    opt.tell(logits.sum((1, 2)))


def test_frozen_layers_between_evolved_ones_see_per_member_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8, affine=False),
                          nn.Conv2d(8, 4, 3, padding=1).requires_grad_(False), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    opt = EggrollOptimizer(model, population_size=N, sigma=0.5)
    x = torch.randn(8, 2, 5, 5)  # batch 8 == channels 8: an unhooked GroupNorm would mix them up
    with opt.ask() as population:
        out = model(x)
    noise = population.noise.chunk_noise(0, N)
    conv, _, frozen, _, lin = model
    for i in range(N):
        def value(p):
            v = noise[p]
            return p + (v[0][i] @ v[1][i].T).view_as(p) if isinstance(v, tuple) else p + v[i]
        h = F.conv2d(x, value(conv.weight), value(conv.bias), padding=1)
        h = F.conv2d(F.group_norm(h, 2), frozen.weight, frozen.bias, padding=1).flatten(1)
        torch.testing.assert_close(out[i], h @ value(lin.weight).T + value(lin.bias), rtol=1e-4, atol=1e-5)
    opt.tell(out.sum((1, 2)))


def test_embedding_padding_row_is_never_perturbed_or_updated():
    torch.manual_seed(0)
    emb = nn.Embedding(5, 4, padding_idx=0)
    opt = EggrollOptimizer(emb, population_size=N)
    with opt.ask():
        out = emb(torch.tensor([0, 1]))
    assert torch.equal(out[:, 0], torch.zeros(N, 4))  # the padding row, for every member
    assert out[:, 1].std(0).max() > 0
    opt.tell(out.sum((1, 2)))
    assert torch.equal(emb.weight[0], torch.zeros(4))


def test_functional_forward_casts_float32_factors_to_the_input_dtype():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    for dtype in (torch.float64, torch.bfloat16):
        params = get_params_dict(model, "cpu", dtype)
        perts = generate_perturbations(get_weight_shapes(params), N, 2, 0.1, torch.Generator().manual_seed(0))
        x = torch.randn(5, 6, dtype=dtype)
        out = perturbed_forward(x, params["weight"], params["bias"], perts, "weight")
        A, B = perts["weight"]
        ref = torch.stack([x.double() @ (params["weight"].double() + A[i].double() @ B[i].double().T).T
                           + params["bias"].double() for i in range(N)])
        assert out.dtype == dtype
        assert ((out.double() - ref).norm() / ref.norm()) < (1e-6 if dtype == torch.float64 else 2e-2)


def test_a_shaping_callable_that_returns_nan_or_a_wrong_shape_is_caught():
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    nan_for_constant = lambda f: (f - f.mean()) / (f - f.mean()).abs().max()  # noqa: E731  (0 / 0)
    for shaping, match in [(nan_for_constant, "NaN"), (lambda f: f[:, None], "shape")]:
        opt = EggrollOptimizer(model, population_size=N, fitness_shaping=shaping)
        with opt.ask():
            model(torch.randn(2, 3))
        with pytest.raises(ValueError, match=match):
            opt.tell(torch.ones(N))  # constant fitness: 0 / 0 in the first callable
        assert torch.equal(model.weight, before)


def test_exception_inside_ask_discards_the_population():
    model = nn.Linear(3, 2)
    opt = EggrollOptimizer(model, population_size=4)
    with pytest.raises(KeyError):
        with opt.ask():
            raise KeyError("evaluation failed")
    with pytest.raises(RuntimeError, match="before ask"):
        opt.tell(torch.zeros(4))
    with opt.ask():  # a fresh population: no "ask() called twice"
        out = model(torch.randn(5, 3))
    opt.tell(out.sum((1, 2)))
    assert opt.step_count == 1


def test_bad_nan_policy_is_rejected_at_construction():
    with pytest.raises(ValueError, match="nan_policy.*'ignore'"):
        EggrollOptimizer(nn.Linear(2, 2), population_size=4, nan_policy="ignore")


def test_discard_drops_the_population_without_changing_anything():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = EggrollOptimizer(model, population_size=4)
    with opt.ask():
        model(torch.randn(5, 3))
    opt.discard()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.step_count == 0
    with opt.ask():
        out = model(torch.randn(5, 3))
    opt.tell(out.sum((1, 2)))
    assert opt.step_count == 1

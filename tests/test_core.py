"""The seed's functional API (``eggroll_optim.core``) against explicit float64 computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eggroll_optim import core
from eggroll_optim.core import (
    EggrollConfig,
    apply_lowrank_perturbation,
    compute_es_gradient,
    compute_gradients,
    compute_weight_perturbation,
    eggroll_step,
    generate_lowrank_perturbations,
    generate_perturbations,
    get_params_dict,
    get_weight_shapes,
    normalize_fitnesses,
    perturbed_forward,
    update_params,
)
from eggroll_optim.losses import per_member_cross_entropy, per_member_mse
from eggroll_optim.recipes import compute_classification_fitness, perturbed_conv2d


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "fc": nn.Linear(5, 3),
        "c1": nn.Conv1d(2, 4, 3),
        "c2": nn.Conv2d(4, 6, (3, 2), groups=2),
        "ln": nn.LayerNorm(6),
    })


def _params_and_perts(seed, N=6, rank=3, sigma=0.2, dtype=torch.float64):
    params = get_params_dict(_model(), device="cpu", dtype=dtype)
    perts = generate_perturbations(get_weight_shapes(params), N, rank, sigma, torch.Generator().manual_seed(seed), dtype)
    return params, perts


# ---------------------------------------------------------------- params and shapes


def test_get_params_dict_clones_default_cpu_and_casts():
    model = _model()
    params = get_params_dict(model)
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert all(v.device == core.default_device() for v in params.values())
    if not torch.cuda.is_available():
        assert all(v.device.type == "cpu" for v in params.values())
    for name, p in model.named_parameters():
        assert torch.equal(params[name].cpu(), p.detach().cpu()) and not params[name].requires_grad
        assert params[name].data_ptr() != p.data_ptr()
    params["fc.weight"].zero_()
    assert model.fc.weight.abs().sum() > 0  # a clone, not a view
    p64 = get_params_dict(model, device="cpu", dtype=torch.float64)
    assert all(v.dtype == torch.float64 and v.device.type == "cpu" for v in p64.values())
    torch.testing.assert_close(p64["c2.weight"], model.c2.weight.detach().double(), rtol=0, atol=0)


def test_get_weight_shapes_flattens_convs_and_skips_biases():
    params = get_params_dict(_model(), device="cpu")
    params["extra"] = torch.zeros(3, 3)  # not named *weight
    assert get_weight_shapes(params) == {"fc.weight": (3, 5), "c1.weight": (4, 2 * 3), "c2.weight": (6, 2 * 3 * 2)}


# ---------------------------------------------------------------- perturbations


def test_generate_perturbations_shapes_and_draw_order():
    shapes = {"a.weight": (3, 5), "b.weight": (4, 2)}
    perts = generate_perturbations(shapes, 4, 2, 0.5, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    for name, (m, n) in shapes.items():
        A_scaled, A_signed, B = generate_lowrank_perturbations(4, m, n, 2, 0.5, g)
        assert perts[name][0].shape == (4, m, 2) and perts[name][1].shape == (4, n, 2)
        assert torch.equal(perts[name][0], A_scaled) and torch.equal(perts[name][1], B)
    g = torch.Generator().manual_seed(11)
    A_raw = torch.randn(2, 3, 2, generator=g)  # first weight's pair factors, unscaled
    torch.testing.assert_close(perts["a.weight"][0][0::2], A_raw * 0.5 / math.sqrt(2), rtol=1e-6, atol=0)
    assert perts["a.weight"][0].dtype == torch.float32


@pytest.mark.parametrize("bad", [dict(population_size=5), dict(population_size=0), dict(rank=0), dict(sigma=0.0)])
def test_generate_lowrank_perturbations_validates(bad):
    args = dict(population_size=4, out_dim=3, in_dim=2, rank=2, sigma=0.1) | bad
    with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
        generate_lowrank_perturbations(**args, generator=torch.Generator())


# ---------------------------------------------------------------- gradient and update


@pytest.mark.parametrize("rank", [1, 2, 8])
@pytest.mark.parametrize("seed", range(3))
def test_compute_es_gradient_is_explicit_sum(seed, rank):
    N, m, n = 8, 4, 6
    A_scaled, _, B = generate_lowrank_perturbations(N, m, n, rank, 0.3, torch.Generator().manual_seed(seed), torch.float64)
    f = torch.randn(N, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    explicit = sum(f[i] * A_scaled[i] @ B[i].T for i in range(N)) / math.sqrt(N)
    torch.testing.assert_close(compute_es_gradient(f, A_scaled, B, N), explicit, rtol=1e-12, atol=1e-12)
    E = compute_weight_perturbation(A_scaled, B)
    torch.testing.assert_close(E, torch.stack([A_scaled[i] @ B[i].T for i in range(N)]), rtol=1e-13, atol=1e-13)
    grads = compute_gradients(f, {"w": (A_scaled, B)}, N)
    torch.testing.assert_close(grads["w"], explicit, rtol=1e-12, atol=1e-12)


def test_update_params_in_place_ascent_with_conv_reshape():
    params, perts = _params_and_perts(0)
    before = {k: v.clone() for k, v in params.items()}
    ids = {k: id(v) for k, v in params.items()}
    grads = {k: torch.randn(*get_weight_shapes(params)[k], dtype=torch.float64) for k in perts}
    out = update_params(params, grads, lr=0.3)
    assert out is params and {k: id(v) for k, v in params.items()} == ids
    for k, v in params.items():
        expected = before[k] + 0.3 * grads[k].reshape(v.shape) if k in grads else before[k]
        torch.testing.assert_close(v, expected, rtol=1e-14, atol=1e-14)
    with pytest.raises(KeyError, match="nope"):
        update_params(params, {"nope": torch.zeros(1)}, 0.1)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 5\)"):
        update_params(params, {"fc.weight": torch.zeros(2, 2)}, 0.1)


@pytest.mark.parametrize("seed", range(3))
def test_eggroll_step_equals_manual_pipeline(seed):
    params, perts = _params_and_perts(seed)
    manual = {k: v.clone() for k, v in params.items()}
    f = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 1
    config = EggrollConfig(population_size=6, rank=3, sigma=0.2, lr=0.05, lr_decay=0.9, sigma_decay=0.8)
    lr, sigma = eggroll_step(params, f, perts, 0.05, 0.2, config)
    assert (lr, sigma) == (0.05 * 0.9, 0.2 * 0.8)
    z = (f - f.mean()) / torch.sqrt(f.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(normalize_fitnesses(f), z, rtol=1e-14, atol=1e-14)
    for name, (A_scaled, B) in perts.items():
        g = torch.einsum("n,nir,njr->ij", z, A_scaled, B) / math.sqrt(6)
        manual[name] += 0.05 * g.reshape(manual[name].shape)
    for name in params:
        torch.testing.assert_close(params[name], manual[name], rtol=1e-13, atol=1e-13)
    assert eggroll_step(params, f, perts, 0.05, 0.2) == (0.05, 0.2)  # no config: no decay


def test_eggroll_step_nan_raises_and_leaves_params_unchanged():
    params, perts = _params_and_perts(1)
    before = {k: v.clone() for k, v in params.items()}
    f = torch.randn(6, dtype=torch.float64)
    f[4] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/inf.*\[4\]"):
        eggroll_step(params, f, perts, 0.1, 0.1)
    assert all(torch.equal(params[k], before[k]) for k in params)
    with pytest.raises(ValueError, match=r"\(6,\)"):
        eggroll_step(params, torch.zeros(5, dtype=torch.float64), perts, 0.1, 0.1)
    with pytest.raises(ValueError, match="empty"):
        eggroll_step(params, f, {}, 0.1, 0.1)


def test_all_equal_fitness_gives_zero_update():
    params, perts = _params_and_perts(2)
    before = {k: v.clone() for k, v in params.items()}
    eggroll_step(params, torch.full((6,), 0.37, dtype=torch.float64), perts, 1.0, 0.1)
    assert all(torch.equal(params[k], before[k]) for k in params)


@pytest.mark.parametrize(
    "kwargs, value",
    [(dict(population_size=7), "7"), (dict(population_size=1), "1"), (dict(population_size=0), "0"),
     (dict(population_size=-2), "-2"), (dict(rank=0), "rank: 0"), (dict(sigma=0.0), "sigma: 0.0"),
     (dict(sigma=-0.5), "-0.5"), (dict(lr=-0.1), "lr: -0.1"), (dict(lr_decay=0.0), "lr_decay"),
     (dict(sigma_decay=-1.0), "sigma_decay")],
)
def test_config_validation(kwargs, value):
    with pytest.raises(ValueError, match=value):
        EggrollConfig(**kwargs)


def test_config_defaults_are_valid():
    c = EggrollConfig()
    assert (c.population_size, c.rank, c.lr) == (2048, 4, 0.1) and EggrollConfig(lr=0.0).lr == 0.0


# ---------------------------------------------------------------- forwards


def test_perturbed_forward_absent_key_is_plain_linear_and_present_key_matches_dense(dense):
    g = torch.Generator().manual_seed(3)
    W, b = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    perts = generate_perturbations({"w": (3, 5)}, 4, 2, 0.4, g, torch.float64)
    x = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(perturbed_forward(x, W, b, perts, "other"), x @ W.T + b, rtol=0, atol=0)
    torch.testing.assert_close(perturbed_forward(x, W, b, perts, "w"), dense.linear(x, W, b, *perts["w"]))
    delta = apply_lowrank_perturbation(x, perts["w"][1], perts["w"][0])
    torch.testing.assert_close(delta, dense.linear(x, W, None, *perts["w"]) - x @ W.T)


@pytest.mark.parametrize("padding, stride, dilation, groups", [(1, 1, 1, 1), (0, 2, 1, 2), ("same", 1, 2, 4), (2, 1, 1, 1)])
def test_perturbed_conv2d_matches_dense(padding, stride, dilation, groups, dense):
    g = torch.Generator().manual_seed(groups)
    W = torch.randn(8, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    perts = generate_perturbations(get_weight_shapes({"conv.weight": W}), 4, 3, 0.3, g, torch.float64)
    args = dict(padding=padding, stride=stride, dilation=dilation, groups=groups)
    for x in (torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64),
              torch.randn(4, 3, 4, 9, 9, generator=g, dtype=torch.float64)):
        out = perturbed_conv2d(x, W, perts, "conv.weight", bias=b, **args)
        torch.testing.assert_close(out, dense.conv(x, W, b, *perts["conv.weight"], **args), rtol=1e-11, atol=1e-11)
        plain = perturbed_conv2d(x, W, perts, "absent", bias=b, **args)
        ref = F.conv2d(x.reshape(-1, *x.shape[-3:]), W, b, **args)
        torch.testing.assert_close(plain, ref.view(*x.shape[:-3], *ref.shape[1:]), rtol=0, atol=0)
    default = perturbed_conv2d(x, W, {}, "absent", groups=groups)
    assert default.shape[-2:] == (9, 9)  # the seed's default padding=1 keeps 3x3 outputs the same size


def test_bf16_params_accumulate_gradient_in_float32():
    g = torch.Generator().manual_seed(0)
    N, m, n = 64, 16, 32
    A_scaled, _, B = generate_lowrank_perturbations(N, m, n, 4, 0.1, g, torch.float32)
    A16, B16 = A_scaled.bfloat16(), B.bfloat16()
    f = torch.randn(N, generator=g)
    grad = compute_es_gradient(f, A16, B16, N)
    assert grad.dtype == torch.float32
    ref = torch.einsum("n,nir,njr->ij", f.double(), A16.double(), B16.double()) / math.sqrt(N)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-6)
    # the same contraction in bf16 would be far off: float32 accumulation is what makes it close
    bf16_err = (torch.einsum("n,nir,njr->ij", f.bfloat16(), A16, B16).double() / math.sqrt(N) - ref).abs().max()
    assert (grad.double() - ref).abs().max() < bf16_err / 10
    W = torch.zeros(m, n, dtype=torch.bfloat16)
    update_params({"w": W}, {"w": grad}, 1.0)
    assert W.dtype == torch.bfloat16 and torch.equal(W, grad.bfloat16())


def test_classification_fitness_and_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (6,), generator=g)
    ce = torch.stack([F.cross_entropy(logits[i], labels) for i in range(4)])
    torch.testing.assert_close(compute_classification_fitness(logits, labels), -ce, rtol=1e-14, atol=1e-14)
    per_member_labels = torch.randint(0, 3, (4, 6), generator=g)
    ce = torch.stack([F.cross_entropy(logits[i], per_member_labels[i]) for i in range(4)])
    torch.testing.assert_close(per_member_cross_entropy(logits, per_member_labels), ce, rtol=1e-14, atol=1e-14)
    target = torch.randn(6, 3, generator=g, dtype=torch.float64)
    mse = torch.stack([F.mse_loss(logits[i], target) for i in range(4)])
    torch.testing.assert_close(per_member_mse(logits, target), mse, rtol=1e-14, atol=1e-14)


def test_generate_perturbations_draws_what_generate_lowrank_perturbations_draws():
    shapes = {"a": (5, 3), "b": (2, 5)}
    perts = generate_perturbations(shapes, 6, 2, 0.4, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    for name, (m, n) in shapes.items():  # the same generator, shape by shape, in order
        A_scaled, _, B = generate_lowrank_perturbations(6, m, n, 2, 0.4, g)
        assert torch.equal(perts[name][0], A_scaled) and torch.equal(perts[name][1], B), name

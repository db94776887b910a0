"""The CPU MLP paths against a float64 dense reference (``W + A_i B_iᵀ`` per member) and the
plain-torch ``perturbed_mlp_reference``: the chunked shared-input path and the per-member path
(``perturbed_mlp_cpu_members``), on its own and as the population's path for a per-member input."""
from __future__ import annotations

import pytest
import torch

import torch.nn as nn
from torch.func import functional_call

from eggroll_optim import EggrollOptimizer
from eggroll_optim.kernels import cpu_mlp
from eggroll_optim.kernels.cpu_mlp import perturbed_mlp_cpu, perturbed_mlp_cpu_members
from eggroll_optim.kernels.fast import mlp as fast_mlp
from eggroll_optim.kernels.fast.mlp import perturbed_mlp, perturbed_mlp_reference
from eggroll_optim.noise import antithetic_pairs

DENSE_ACT = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda h: h}


def _inputs(N, M, D, H, O, R, seed, dtype=torch.float32, bias=True, noise=False, scale=1.0):
    """``x (M, D)``, the two layers ``(W, b, A_scaled, B)`` and the bias noise, all seeded."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    x = rnd(M, D)
    layer1 = (rnd(H, D, s=0.5 * scale), rnd(H) if bias else None, rnd(N, H, R, s=0.2 * scale), rnd(N, D, R))
    layer2 = (rnd(O, H, s=0.5), rnd(O) if bias else None, rnd(N, O, R, s=0.2), rnd(N, H, R))
    bias_noise = (rnd(N, H, s=0.3), rnd(N, O, s=0.3)) if noise else (None, None)
    return x, layer1, layer2, bias_noise


def _dense(x, layer1, layer2, activation, bias_noise=(None, None)) -> torch.Tensor:
    """float64, member by member, with ``W + A_i B_iᵀ`` materialised: ``(N, *batch, O)``."""
    f64 = [[t.double() if t is not None else None for t in group] for group in (layer1, layer2, bias_noise)]
    (W1, b1, A1, B1), (W2, b2, A2, B2), (bn1, bn2) = f64
    x = x.double()
    outs = []
    for i in range(A1.shape[0]):
        h = x @ (W1 + A1[i] @ B1[i].T).T
        h = h + (b1 if b1 is not None else 0) + (bn1[i] if bn1 is not None else 0)
        y = DENSE_ACT[activation](h) @ (W2 + A2[i] @ B2[i].T).T
        outs.append(y + (b2 if b2 is not None else 0) + (bn2[i] if bn2 is not None else 0))
    return torch.stack(outs)


def _assert_matches(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """``out`` equals ``ref`` elementwise to ``rtol``, with an absolute floor of ``rtol * max|ref|``."""
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=rtol * ref.abs().max().item())


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("R", [1, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("noise", [False, True])
def test_matches_dense_float32_and_reference(activation, R, bias, noise):
    x, l1, l2, bn = _inputs(6, 5, 7, 9, 3, R, seed=R + 10 * bias + 100 * noise, bias=bias, noise=noise)
    out = perturbed_mlp_cpu(x, l1, l2, activation, bias_noise=bn)
    assert out.dtype == torch.float32 and out.is_contiguous()
    _assert_matches(out, _dense(x, l1, l2, activation, bn), rtol=1e-5)
    _assert_matches(out, perturbed_mlp_reference(x, l1, l2, activation, bias_noise=bn), rtol=1e-5)


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("noise", [False, True])
def test_matches_dense_float64(activation, noise):
    x, l1, l2, bn = _inputs(6, 5, 7, 9, 3, 4, seed=7, dtype=torch.float64, noise=noise)
    out = perturbed_mlp_cpu(x, l1, l2, activation, bias_noise=bn)
    assert out.dtype == torch.float64
    _assert_matches(out, _dense(x, l1, l2, activation, bn), rtol=1e-12)


@pytest.mark.parametrize("members_per_chunk", [1, 4, 5, 11, 64])
def test_chunk_boundaries(monkeypatch, members_per_chunk):
    N, M, D, H, O, R = 11, 3, 13, 10, 4, 2
    # the hidden block (and the projection's B1 block, smaller per member) holds that many members
    monkeypatch.setattr(cpu_mlp, "_CHUNK_BYTES", members_per_chunk * M * H * 4)
    assert cpu_mlp._chunk(N, M * H * 4) == min(N, members_per_chunk)
    x, l1, l2, bn = _inputs(N, M, D, H, O, R, seed=members_per_chunk, noise=True)
    out = perturbed_mlp_cpu(x, l1, l2, "tanh", bias_noise=bn)
    _assert_matches(out, _dense(x, l1, l2, "tanh", bn), rtol=1e-5)


def test_chunk_size_follows_block_bytes():
    # benchmark shape: 64 rows x 256 hidden float32 = 64 KiB per member -> 32 members per 2 MiB chunk
    assert cpu_mlp._chunk(512, 64 * 256 * 4) == 32
    assert cpu_mlp._chunk(512, 1 << 30) == 1
    assert cpu_mlp._chunk(7, 4) == 7


def test_tanh_via_sigmoid_is_accurate_and_saturates():
    z = torch.cat([torch.linspace(-20, 20, 4001), torch.tensor([1e-30, -1e-7, 50.0, -1e4, float("inf"), -float("inf")])])
    h = 2 * cpu_mlp._half_tanh_(2 * z)
    err = (h.double() - torch.tanh(z.double())).abs()
    assert err.max().item() < 2e-7
    assert h[-4:].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert torch.isnan(cpu_mlp._half_tanh_(torch.tensor([float("nan")]))).all()


def test_large_preactivations_saturate_without_nan():
    x, l1, l2, _ = _inputs(5, 4, 6, 8, 3, 2, seed=3, scale=1e4)
    out = perturbed_mlp_cpu(x, l1, l2, "tanh")
    assert torch.isfinite(out).all()
    _assert_matches(out, _dense(x, l1, l2, "tanh"), rtol=1e-5)


def test_small_preactivations_error_is_absolute_on_h():
    # tanh(z) ~ z ~ 1e-4: sigmoid's rounding leaves ~6e-8 absolute on each h (not relative to it),
    # so the output error is bounded by 1e-7 times the row sums of |W2 + A2_i B2_iᵀ|
    x, l1, l2, _ = _inputs(6, 5, 7, 9, 3, 4, seed=4, bias=False, scale=1e-4)
    W2, _, A2, B2 = (t.double() if t is not None else None for t in l2)
    bound = 1e-7 * (W2 + A2 @ B2.transpose(1, 2)).abs().sum(2).max().item()
    dense = _dense(x, l1, l2, "tanh")
    err = (perturbed_mlp_cpu(x, l1, l2, "tanh").double() - dense).abs().max().item()
    assert err < bound + 1e-5 * dense.abs().max().item()


def test_batch_dims_and_single_row():
    x, l1, l2, bn = _inputs(4, 6, 7, 9, 3, 2, seed=5, noise=True)
    out = perturbed_mlp_cpu(x.view(2, 3, 7), l1, l2, "relu", bias_noise=bn)
    assert out.shape == (4, 2, 3, 3)
    _assert_matches(out.view(4, 6, 3), _dense(x, l1, l2, "relu", bn), rtol=1e-5)
    out1 = perturbed_mlp_cpu(x[0], l1, l2, "tanh")
    assert out1.shape == (4, 3)
    _assert_matches(out1, _dense(x[:1], l1, l2, "tanh")[:, 0], rtol=1e-5)


def test_float32_noise_with_float64_weights():
    x, l1, l2, _ = _inputs(5, 4, 6, 8, 3, 2, seed=6, dtype=torch.float64)
    l1 = (l1[0], l1[1], l1[2].float(), l1[3].float())
    l2 = (l2[0], l2[1], l2[2].float(), l2[3].float())
    out = perturbed_mlp_cpu(x, l1, l2, "tanh")
    assert out.dtype == torch.float64
    _assert_matches(out, _dense(x, l1, l2, "tanh"), rtol=1e-12)


def test_per_member_input_goes_to_the_per_member_path(monkeypatch):
    N, M, D = 4, 3, 7
    _, l1, l2, bn = _inputs(N, M, D, 9, 3, 2, seed=8, noise=True)
    xm = torch.randn(N, M, D, generator=torch.Generator().manual_seed(9))
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return perturbed_mlp_cpu_members(*args)

    monkeypatch.setattr(cpu_mlp, "perturbed_mlp_cpu_members", spy)
    out = perturbed_mlp_cpu(xm, l1, l2, "tanh", shared=False, bias_noise=bn)
    assert calls == [(N, M, D)]
    _assert_matches(out, _dense_members(xm, l1, l2, "tanh", bn), rtol=1e-5)


def test_inputs_requiring_grad_keep_autograd():
    x, l1, l2, _ = _inputs(4, 3, 5, 6, 2, 2, seed=11)
    W1 = l1[0].clone().requires_grad_()
    out = perturbed_mlp_cpu(x, (W1, *l1[1:]), l2, "tanh")
    assert out.grad_fn is not None
    out.sum().backward()
    assert W1.grad is not None and W1.grad.abs().sum() > 0
    with torch.no_grad():
        _assert_matches(perturbed_mlp_cpu(x, (W1, *l1[1:]), l2, "tanh"), _dense(x, l1, l2, "tanh"), rtol=1e-5)


def test_unknown_activation_raises():
    x, l1, l2, _ = _inputs(2, 3, 4, 5, 2, 1, seed=0)
    with pytest.raises(ValueError, match="Unknown activation"):
        perturbed_mlp_cpu(x, l1, l2, "gelu")


def test_empty_batch_through_the_fx_forward():
    """A shared batch of 0 rows gives (N, 0, out) (the fused CPU path steps aside)."""
    import torch.nn as nn

    from eggroll_optim.core import generate_perturbations, get_params_dict, get_weight_shapes, make_perturbed_forward_fn

    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    params = get_params_dict(model, "cpu")
    perts = generate_perturbations(get_weight_shapes(params), 4, 2, 0.1, torch.Generator().manual_seed(0))
    forward, _ = make_perturbed_forward_fn(model)
    assert forward(torch.randn(0, 5), params, perts).shape == (4, 0, 3)


# ---------------------------------------------------------------------------------------------------
# per-member input: perturbed_mlp_cpu_members

# (N, D, H, O, R): both layers against effective weights W + A_i B_iᵀ (CartPole-like: few inputs and
# outputs), and both low rank (x Wᵀ plus the low-rank term); cpu_mlp._dense_fits picks
SHAPES = {"dense": (8, 4, 16, 2, 4), "lowrank": (6, 24, 20, 16, 2)}


def test_shapes_take_the_routes_they_are_named_for():
    for name, (N, D, H, O, R) in SHAPES.items():
        assert cpu_mlp._dense_fits(D, H, R) == cpu_mlp._dense_fits(H, O, R) == (name == "dense")


def _member_inputs(shape, M, seed, dtype=torch.float32, pairs=False, noise=False, bias=True, flat=False):
    """``x (N, M, D)`` and the layers as ``(W, b, factors)``; ``factors`` a ``noise.Pairs`` (antithetic) or a
    plain ``(A_scaled, B)`` tuple, or the flat ``(W, b, A_scaled, B)``."""
    N, D, H, O, R = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, s=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * s).to(dtype)

    def factors(out_dim, in_dim):
        if pairs:
            return antithetic_pairs(rnd(N // 2, out_dim, R), rnd(N // 2, in_dim, R), 0.4, R)
        return rnd(N, out_dim, R, s=0.2), rnd(N, in_dim, R)

    layers = []
    for out_dim, in_dim in ((H, D), (O, H)):
        W, b, f = rnd(out_dim, in_dim, s=0.5), rnd(out_dim) if bias else None, factors(out_dim, in_dim)
        layers.append((W, b, *f) if flat else (W, b, f))
    bias_noise = (rnd(N, H, s=0.3), rnd(N, O, s=0.3)) if noise else (None, None)
    return rnd(N, M, D), layers[0], layers[1], bias_noise


def _flat(layer):
    """``(W, b, A_scaled, B)`` of either layer format."""
    W, b, *rest = layer
    return (W, b, *(rest[0] if len(rest) == 1 else rest))


def _dense_members(x, layer1, layer2, activation, bias_noise=(None, None)) -> torch.Tensor:
    """float64 dense reference for a per-member ``x (N, *batch, D)``: member ``i`` sees ``x[i]``."""
    layer1, layer2 = _flat(layer1), _flat(layer2)
    return torch.stack([_dense(x[i], layer1, layer2, activation, bias_noise)[i] for i in range(x.shape[0])])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_members_match_dense(shape, activation, M, noise, pairs, dtype):
    seed = 1000 * M + 100 * noise + 10 * pairs + (dtype == torch.float64)
    x, l1, l2, bn = _member_inputs(shape, M, seed, dtype, pairs=pairs, noise=noise, flat=(seed % 2 == 0))
    out = perturbed_mlp_cpu_members(x, l1, l2, activation, bn)
    assert out.dtype == dtype and out.shape == (x.shape[0], M, l2[0].shape[0]) and out.is_contiguous()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    _assert_matches(out, _dense_members(x, l1, l2, activation, bn), rtol=rtol)
    _assert_matches(out, perturbed_mlp_reference(x, l1, l2, activation, False, bn), rtol=rtol)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_members_without_biases(shape):
    x, l1, l2, _ = _member_inputs(shape, 2, seed=21, bias=False)
    for activation in ("tanh", "identity"):
        out = perturbed_mlp_cpu_members(x, l1, l2, activation)
        _assert_matches(out, _dense_members(x, l1, l2, activation), rtol=1e-5)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("members_per_chunk", [1, 3, 5, 64])
def test_members_chunk_boundaries(monkeypatch, shape, members_per_chunk):
    M = 3
    N, _, H, _, _ = SHAPES[shape]
    monkeypatch.setattr(cpu_mlp, "_CHUNK_BYTES", members_per_chunk * M * H * 4)
    x, l1, l2, bn = _member_inputs(shape, M, seed=members_per_chunk, pairs=True, noise=True)
    out = perturbed_mlp_cpu_members(x, l1, l2, "tanh", bn)
    _assert_matches(out, _dense_members(x, l1, l2, "tanh", bn), rtol=1e-5)


def test_members_batch_dims_empty_batch_and_float32_noise_with_float64_weights():
    x, l1, l2, bn = _member_inputs("dense", 6, seed=31, noise=True)
    out = perturbed_mlp_cpu_members(x.view(8, 2, 3, -1), l1, l2, "relu", bn)
    assert out.shape == (8, 2, 3, 2)
    _assert_matches(out.view(8, 6, 2), _dense_members(x, l1, l2, "relu", bn), rtol=1e-5)
    assert perturbed_mlp_cpu_members(x[:, :0], l1, l2, "tanh", bn).shape == (8, 0, 2)
    for shape in SHAPES:
        x, l1, l2, _ = _member_inputs(shape, 2, seed=32, dtype=torch.float64)
        l1, l2 = [(W, b, (A.float(), B.float())) for W, b, (A, B) in (l1, l2)]
        out = perturbed_mlp_cpu_members(x, l1, l2, "tanh")
        assert out.dtype == torch.float64
        _assert_matches(out, _dense_members(x, l1, l2, "tanh"), rtol=1e-12)


def test_members_column_major_input_and_results_independent_of_the_reused_hidden_buffer():
    """gymnasium's vector envs hand back column-major observations; the hidden buffer is reused across
    calls (``_hidden_buffer``), never the result."""
    x, l1, l2, bn = _member_inputs("dense", 1, seed=35, noise=True)
    x_cm = x.reshape(8, -1).t().contiguous().t().view(x.shape)  # (N, 1, D) with the member dim innermost
    assert not x_cm.is_contiguous()
    first = perturbed_mlp_cpu_members(x_cm, l1, l2, "tanh", bn)
    kept = first.clone()
    _assert_matches(first, _dense_members(x, l1, l2, "tanh", bn), rtol=1e-5)
    for shape, dtype in (("lowrank", torch.float32), ("dense", torch.float64), ("dense", torch.float32)):
        x2, m1, m2, bn2 = _member_inputs(shape, 4, seed=36, dtype=dtype, noise=True)
        out = perturbed_mlp_cpu_members(x2, m1, m2, "relu", bn2)
        _assert_matches(out, _dense_members(x2, m1, m2, "relu", bn2), rtol=1e-5)
    assert torch.equal(first, kept)


def test_members_inputs_requiring_grad_keep_autograd():
    x, l1, l2, _ = _member_inputs("dense", 2, seed=41)
    W1 = l1[0].clone().requires_grad_()
    out = perturbed_mlp_cpu_members(x, (W1, *l1[1:]), l2, "tanh")
    assert out.grad_fn is not None
    out.sum().backward()
    assert W1.grad is not None and W1.grad.abs().sum() > 0


def _count_builds(monkeypatch) -> list:
    builds, get = [], cpu_mlp._DERIVED.get

    def counting(tag, sources, weight, build):
        return get(tag, sources, weight, lambda: builds.append(tag[0]) or build())

    monkeypatch.setattr(cpu_mlp._DERIVED, "get", counting)
    return builds


@pytest.mark.parametrize("shape", list(SHAPES))
def test_members_operands_built_once_and_rebuilt_when_their_sources_change(monkeypatch, shape):
    cpu_mlp._DERIVED.clear()
    builds = _count_builds(monkeypatch)
    x, l1, l2, bn = _member_inputs(shape, 2, seed=51, pairs=True, noise=True)
    check = lambda: _assert_matches(  # noqa: E731
        perturbed_mlp_cpu_members(x, l1, l2, "tanh", bn), _dense_members(x, l1, l2, "tanh", bn), rtol=1e-5)
    for _ in range(3):  # the same population: built on the first call only
        check()
    assert len(builds) == 2
    with torch.no_grad():
        l1[0].data.add_(0.25)  # the weight through .data (its _version stays): compared by value
        l2[0].add_(0.5)
    check()
    assert len(builds) == 2 + 2 * (shape == "dense")  # only the effective weights depend on W
    l1[2].A_scaled.mul_(2.0)  # the factors in place: _version
    l2[2].B.mul_(0.5)
    check()
    assert len(builds) == 4 + 2 * (shape == "dense")
    for _ in range(2):
        check()
    assert len(builds) == 4 + 2 * (shape == "dense")


def test_members_cache_entries_go_with_their_factors():
    cpu_mlp._DERIVED.clear()
    x, l1, l2, _ = _member_inputs("dense", 1, seed=61, pairs=True)
    perturbed_mlp_cpu_members(x, l1, l2, "tanh")
    assert len(cpu_mlp._DERIVED._entries) == 2
    del l1, l2
    assert len(cpu_mlp._DERIVED._entries) == 0
    for seed in range(12):  # at most `size` entries, least recently used out first
        x, l1, l2, _ = _member_inputs("dense", 1, seed=seed, pairs=True)
        perturbed_mlp_cpu_members(x, l1, l2, "tanh")
        kept = (l1, l2)  # noqa: F841  (alive until the next draw replaces them)
    assert len(cpu_mlp._DERIVED._entries) <= cpu_mlp._DERIVED.size


def test_perturbed_mlp_dispatches_cpu_inputs(monkeypatch):
    calls = []
    members = fast_mlp.perturbed_mlp_cpu_members
    monkeypatch.setattr(fast_mlp, "perturbed_mlp_cpu_members", lambda *a: calls.append(a[0].shape) or members(*a))
    for dtype in (torch.float32, torch.float64):
        x, l1, l2, bn = _member_inputs("dense", 1, seed=71, dtype=dtype, noise=True)
        assert fast_mlp.mlp_fast_path(x, 16, shared=False)
        out = perturbed_mlp(x, l1, l2, "tanh", False, bn)
        _assert_matches(out, _dense_members(x, l1, l2, "tanh", bn), rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert calls == [(8, 1, 4), (8, 1, 4)]
    assert not fast_mlp.mlp_fast_path(x.half(), 16, shared=False)  # other dtypes: the per-layer path
    assert not fast_mlp.mlp_fast_path(x[:, :0], 16, shared=False)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("rows", [(), (3,)])
@pytest.mark.parametrize("inputs", [4, 24])
def test_population_per_member_call_takes_the_per_member_path_and_is_member_exact(monkeypatch, activation, rows,
                                                                                   inputs):
    """``Sequential(Linear, act, Linear)`` on ``population.per_member(obs)`` (an RL step; ``rows``: a batch
    per member) runs ``perturbed_mlp_cpu_members`` once per call, member for member equal to
    ``functional_call`` with ``member_state_dict(i)`` in float64. ``inputs`` 4: both layers against
    effective weights; 24: the first layer low rank."""
    calls = []
    members = fast_mlp.perturbed_mlp_cpu_members
    monkeypatch.setattr(fast_mlp, "perturbed_mlp_cpu_members", lambda *a: calls.append(a[0].shape) or members(*a))
    N = 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, 16), activation(), nn.Linear(16, 2)).double()
    assert cpu_mlp._dense_fits(inputs, 16, 4) == (inputs == 4) and cpu_mlp._dense_fits(16, 2, 4)
    opt = EggrollOptimizer(model, population_size=N, rank=4, sigma=0.1, lr=0.1, seed=3)
    obs = torch.randn(N, *rows, inputs, dtype=torch.float64)
    for step in range(2):  # a second generation: new noise, the weights moved by tell
        with torch.no_grad(), opt.ask() as population:
            out = model(population.per_member(obs))
            again = model(population.per_member(obs))
        assert out.shape == (N, *rows, 2)
        torch.testing.assert_close(again, out, rtol=0, atol=0)
        with torch.no_grad():
            for i in range(N):
                member = functional_call(model, population.member_state_dict(i), (obs[i],))
                torch.testing.assert_close(out[i], member, rtol=0, atol=1e-13)
        assert (out[0] - out[1]).abs().max() > 1e-6  # antithetic twins differ
        opt.tell(out.flatten(1).sum(1))
    assert calls == [(N, rows[0] if rows else 1, inputs)] * 4

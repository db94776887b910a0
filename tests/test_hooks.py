"""The population forward against float64 dense references, and its inertness outside ``ask()``.

The reference materialises member ``i``'s parameters (``W + A_scaled_i B_iᵀ`` reshaped to the
weight, ``b + noise_i`` for full-rank ones) and runs the plain module through
``torch.func.functional_call``, one member at a time.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from eggroll_optim import EggrollOptimizer
from eggroll_optim.noise import keyed_pair_normals, noise_key

N, SIGMA, RANK = 4, 0.3, 2


def _member_params(module: nn.Module, noise: dict, i: int) -> dict:
    """Member ``i``'s materialised parameters."""
    params = {}
    for name, p in module.named_parameters():
        value = noise.get(p)
        if value is None:
            delta = torch.zeros_like(p)
        elif isinstance(value, tuple):  # (A_scaled (N, m, r), B (N, k, r))
            delta = (value[0][i] @ value[1][i].T).view(p.shape)
        else:  # full rank, carries sigma * s_i
            delta = value[i]
        params[name] = p.detach() + delta
    return params


def _dense(module: nn.Module, noise: dict, x: torch.Tensor, per_member: bool) -> torch.Tensor:
    xs = [x[i] for i in range(N)] if per_member else [x] * N
    return torch.stack([functional_call(module, _member_params(module, noise, i), (xi,)) for i, xi in enumerate(xs)])


def _run(module: nn.Module, x: torch.Tensor, per_member: bool, **kwargs):
    """Output inside ``ask()`` (``x`` marked per member or shared) and the population's noise."""
    module = module.double()
    opt = EggrollOptimizer(module, lr=0.1, sigma=SIGMA, rank=RANK, population_size=N, seed=7, **kwargs)
    with opt.ask() as population:
        out = module(population.per_member(x) if per_member else x)
        noise = population.noise.chunk_noise(0, N)
    return out, noise


def _check(module, x, per_member, expected_shape, **kwargs):
    out, noise = _run(module, x, per_member, **kwargs)
    ref = _dense(module, noise, x, per_member)
    assert out.shape == expected_shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    base = _dense(module, {}, x, per_member)
    assert (out - base).abs().amax() > 1e-2  # the noise is really there
    return out, noise


def test_linear_per_member_and_shared_inputs_never_guessed_from_sizes():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x = torch.randn(N, 6, 5, dtype=torch.float64)
    _check(lin, x, True, (N, 6, 3))
    out_shared, _ = _check(lin, x, False, (N, N, 6, 3))  # leading dim N, unmarked: a shared batch
    out_rows, _ = _check(lin, x[:, 0], True, (N, 3))  # one row per member: x[i] is (in,)
    torch.testing.assert_close(out_rows, torch.stack([out_shared[i, i, 0] for i in range(N)]), rtol=0, atol=1e-12)


def test_noise_is_the_keyed_draw_with_the_spec_scales():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    opt = EggrollOptimizer(lin, sigma=SIGMA, rank=RANK, population_size=N, seed=7)
    (A_scaled, B), bias_noise = opt.ask().noise.chunk_noise(0, N).values()
    # key (seed=7, step=0, param index); members 2k, 2k+1 share pair k with signs +, -
    keyed = dict(device="cpu", dtype=torch.float64, block_pairs=opt.noise_block)
    A, B_pairs = keyed_pair_normals(noise_key(7, 0, 0), [(3, RANK), (5, RANK)], 0, N // 2, **keyed)
    (eps,) = keyed_pair_normals(noise_key(7, 0, 1), [(3,)], 0, N // 2, **keyed)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    pair = torch.arange(N) // 2
    torch.testing.assert_close(A_scaled, signs[:, None, None] * SIGMA / RANK**0.5 * A[pair], rtol=1e-15, atol=0)
    assert torch.equal(B, B_pairs[pair])
    torch.testing.assert_close(bias_noise, signs[:, None] * SIGMA * eps[pair], rtol=1e-15, atol=0)  # no sqrt(r)


def test_evolve_biases_false_leaves_bias_unperturbed():
    torch.manual_seed(0)
    x = torch.randn(N, 6, 5, dtype=torch.float64)
    lin = nn.Linear(5, 3)
    _, noise = _check(lin, x, True, (N, 6, 3), evolve_biases=False)
    assert list(noise) == [lin.weight]


CONVS = [
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 9)),
    (lambda: nn.Conv1d(3, 5, 2, dilation=2, bias=False), (2, 3, 8)),
    (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, groups=2), (3, 4, 7, 6)),
    (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (2, 3, 5, 5)),
]


@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("per_member", [False, True])
def test_conv_matches_dense(case, per_member):
    torch.manual_seed(case)
    make, shape = CONVS[case]
    conv = make()
    x = torch.randn(*((N,) if per_member else ()), *shape, dtype=torch.float64)
    ref = conv.double()(torch.randn(*shape, dtype=torch.float64))
    _check(conv, x, per_member, (N, *ref.shape))


def test_conv_unbatched_input_and_bad_per_member_leading_dim_raises():
    torch.manual_seed(0)
    conv, shape = CONVS[2][0](), CONVS[2][1]
    out, _ = _check(conv, torch.randn(*shape[1:], dtype=torch.float64), False, (N, 6, 4, 7))  # no batch dim
    opt = EggrollOptimizer(conv, population_size=N)
    with opt.ask() as population, pytest.raises(ValueError, match="leading dim 4"):
        population.per_member(torch.randn(3, *shape, dtype=torch.float64))  # not N members


@pytest.mark.parametrize("per_member", [False, True])
def test_embedding_matches_dense(per_member):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 5)
    idx = torch.randint(0, 10, (N, 3, 7) if per_member else (3, 7))
    _check(emb, idx, per_member, (N, 3, 7, 5))


NORMS = [
    (lambda: nn.LayerNorm(6), (3, 5, 6)),
    (lambda: nn.LayerNorm((5, 6), bias=False), (3, 5, 6)),
    (lambda: nn.GroupNorm(2, 4), (3, 4, 5)),
    (lambda: nn.GroupNorm(3, 6), (2, 6, 3, 4)),
    (lambda: nn.RMSNorm(6), (3, 5, 6)),
]


@pytest.mark.parametrize("case", range(len(NORMS)))
@pytest.mark.parametrize("per_member", [False, True])
def test_norm_affine_full_rank_noise_matches_dense(case, per_member):
    torch.manual_seed(case)
    make, shape = NORMS[case]
    norm = make()
    with torch.no_grad():  # non-trivial affine parameters
        for p in norm.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(*((N,) if per_member else ()), *shape, dtype=torch.float64)
    _, noise = _check(norm, x, per_member, (N, *shape))
    assert all(v.shape == (N, *p.shape) for p, v in noise.items())


def test_small_cnn_with_pooling_and_flatten_matches_dense():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2),
    )
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    _check(net, x, False, (N, 3, 2))
    _check(net, torch.randn(N, 3, 2, 6, 6, dtype=torch.float64), True, (N, 3, 2))


# ---------------------------------------------------------------- inert outside ask


def _hook_count(module: nn.Module) -> int:
    """Forward hooks, pre-hooks and per-instance ``forward`` overrides."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__) for m in module.modules())


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 4), nn.LayerNorm(4))


def test_hooks_inert_outside_ask_and_remove_hooks():
    net = _net()
    twin = copy.deepcopy(net)  # a hook-free copy: "the plain module"
    x = torch.randn(5, 2, 8)

    def plain():
        twin.load_state_dict(net.state_dict())
        with torch.no_grad():
            return twin(x)

    opt = EggrollOptimizer(net, lr=0.1, sigma=0.5, rank=2, population_size=N)
    assert _hook_count(net) > 0 and _hook_count(twin) == 0
    assert torch.equal(net(x), plain())  # before ask
    with opt.ask():
        assert net(x).shape == (N, 5, 4)
    assert torch.equal(net(x), plain())  # after with-exit, before tell
    before = plain()
    opt.tell(torch.randn(N))
    assert not torch.equal(plain(), before)  # the weights did move
    assert torch.equal(net(x), plain())  # after tell
    population = opt.ask()
    assert net(x).shape == (N, 5, 4)
    opt.remove_hooks()
    assert _hook_count(net) == 0
    assert torch.equal(net(x), plain())  # even with a population pending
    population.close()


def test_deleting_the_optimizer_removes_its_hooks():
    net = _net()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        plain = net(x)
    opt = EggrollOptimizer(net, population_size=N)
    opt.step(lambda: net(x).square().flatten(1).mean(1))
    with torch.no_grad():
        stepped = net(x)
    assert not torch.equal(stepped, plain)
    del opt
    gc.collect()
    assert _hook_count(net) == 0
    assert torch.equal(net(x), stepped)


# ---------------------------------------------------------------- which layers, which inputs


class _Gate(nn.Module):  # a custom layer: its parameters are used directly
    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(*shape))

    def forward(self, x):
        return x * self.w.sum()


def test_big_matrix_without_a_rule_raises_or_is_frozen_with_a_warning():
    torch.manual_seed(0)
    net = nn.Sequential(_Gate((600, 500)), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"0\.w \(_Gate, \(600, 500\)\)"):
        EggrollOptimizer(net, population_size=N)
    with pytest.warns(UserWarning, match="_Gate"):
        opt = EggrollOptimizer(net, population_size=N, unsupported="freeze")
    gate_before, lin_before = net[0].w.detach().clone(), net[1].weight.detach().clone()
    x = torch.randn(5, 3)
    opt.step(lambda: net(x).square().flatten(1).mean(1))
    assert torch.equal(net[0].w, gate_before)  # never perturbed or updated
    assert not torch.equal(net[1].weight, lin_before)


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.ReLU()), lambda: nn.Linear(3, 2).requires_grad_(False)])
def test_module_with_nothing_to_optimise_raises(make):
    with pytest.raises(ValueError, match="no trainable parameter"):
        EggrollOptimizer(make(), population_size=N)


def test_chunked_population_takes_each_chunks_rows():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    opt = EggrollOptimizer(lin, population_size=2 * N, chunk_size=N)
    x = torch.randn(2 * N, 5, 3)
    with opt.ask() as population:
        with pytest.raises(RuntimeError, match="chunked"):
            lin(x)  # outside population.chunks()
        for members in population.chunks():
            out = lin(population.per_member(x))  # the chunk's rows of the whole population's input
            torch.testing.assert_close(out, lin(population.per_member(x[members])), rtol=0, atol=0)
            assert out.shape == (N, 5, 2) and lin(x).shape == (N, 2 * N, 5, 2)  # unmarked: shared
            with pytest.raises(ValueError, match=rf"leading dim {2 * N} \(or {N}, this chunk\)"):
                lin(population.per_member(x[:3]))
    with pytest.raises(ValueError, match=f"leading dim of {2 * N}"):
        population.slice(x[:N])


def test_submodule_called_directly_during_a_population_raises():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = EggrollOptimizer(net, population_size=N, fused=False)
    with opt.ask(), pytest.raises(RuntimeError, match="call the module given to EggrollOptimizer"):
        net[0](torch.randn(2, 3))
    opt.discard()
    population = opt.ask()
    marked = population.per_member(torch.randn(N, 3))
    opt.discard()
    with pytest.raises(RuntimeError, match="only read while that population is active"):
        net(marked)


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)
        self.use_b = False

    def forward(self, x):
        return self.a(x) + self.b(x) if self.use_b else self.a(x)


def test_layer_that_never_ran_raises_and_nothing_is_updated():
    torch.manual_seed(0)
    heads = _Heads()
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in heads.parameters()]
    opt = EggrollOptimizer(heads, population_size=N)
    with opt.ask():
        heads(x)  # head b never runs
    with pytest.raises(RuntimeError, match=r"\['b.weight', 'b.bias'\]"):
        opt.tell(torch.randn(N))
    assert all(torch.equal(p, p0) and p.grad is None for p, p0 in zip(heads.parameters(), before))
    assert opt.step_count == 0
    heads.use_b = True
    opt.step(lambda: heads(x).square().flatten(1).mean(1))  # ask() works again
    assert all(not torch.equal(p, p0) for p, p0 in zip(heads.parameters(), before))

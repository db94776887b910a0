"""The eager step's per-parameter work (issue 15, "fewer launches in the eager path"): the batched estimate
``kernels.es_gradients`` and ``tell``'s one negation give bit for bit what one ``es_gradient`` and one ``-g``
per parameter gave, and the work that depends on the fitness alone does not grow with the parameters."""
from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer, per_member_cross_entropy
from eggroll_optim.kernels import es_gradient
from eggroll_optim.kernels.gradient import accumulation_dtype, es_gradients
from eggroll_optim.noise import antithetic_pairs
from eggroll_optim.shaping import zscore


def _per_parameter_pairs(f: torch.Tensor, pairs, population_size: int) -> torch.Tensor:
    """The sum over pairs as it was written per parameter before the batching (the reference)."""
    A, B_pair = pairs.A_pair, pairs.B_pair
    acc = accumulation_dtype(A.dtype)
    P, m, r = A.shape
    f = f.to(acc)
    fA = (A.to(acc) * (f[0::2] - f[1::2])[:, None, None]).permute(1, 0, 2)
    return fA.reshape(m, P * r) @ B_pair.to(acc).view(B_pair.shape[0], P * r).t() / math.sqrt(population_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_es_gradients_is_es_gradient_for_each_noise_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    P, r, N = 5, 3, 40  # a chunk of 2P members of a population of N
    f = torch.randn(2 * P, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    pairs = [antithetic_pairs(torch.randn(P, m, r, generator=g).to(dtype), torch.randn(P, n, r, generator=g).to(dtype),
                              0.1, r) for m, n in ((4, 6), (7, 2), (1, 9))]
    plain = (torch.randn(2 * P, 3, r, generator=g).to(dtype), torch.randn(2 * P, 5, r, generator=g).to(dtype))
    fullrank = [torch.randn(2 * P, *shape, generator=g).to(dtype) for shape in ((6,), (2, 3), ())]
    noises = [pairs[0], fullrank[0], plain, pairs[1], fullrank[1], pairs[2], fullrank[2]]
    batched = es_gradients(f, noises, N)
    for noise, got in zip(noises, batched):
        assert torch.equal(got, es_gradient(f, noise, N))
    for noise, got in zip(pairs, (batched[0], batched[3], batched[5])):
        assert torch.equal(got, _per_parameter_pairs(f, noise, N))
    with pytest.raises(ValueError, match=r"fitness must have shape \(10,\)"):
        es_gradients(f[:4], noises, N)


def test_es_gradients_against_the_formula_with_mixed_dtypes():
    """``(1/sqrt(N)) Σ_i f_i noise_i`` in float64 for every kind of noise, one call mixing float32 and float64
    ``Pairs`` (each dtype keeps its own pairs' differences: a result equals that noise's own call)."""
    g = torch.Generator().manual_seed(5)
    P, r, N = 4, 2, 24
    f = torch.randn(2 * P, generator=g)
    noises = [antithetic_pairs(torch.randn(P, 3, r, generator=g).to(dt), torch.randn(P, 5, r, generator=g).to(dt),
                               0.2, r) for dt in (torch.float32, torch.float64, torch.float32)]
    noises += [(torch.randn(2 * P, 3, r, generator=g), torch.randn(2 * P, 4, r, generator=g)),
               torch.randn(2 * P, 6, generator=g)]
    got = es_gradients(f, noises, N)
    for noise, estimate in zip(noises, got):
        assert torch.equal(estimate, es_gradient(f, noise, N))
        if isinstance(noise, torch.Tensor):
            member = noise.double()
        else:
            member = torch.einsum("imr,ikr->imk", noise[0].double(), noise[1].double())
        expected = torch.einsum("i,i...->...", f.double(), member) / N ** 0.5
        torch.testing.assert_close(estimate.double(), expected, rtol=1e-5, atol=1e-6)


def _mlp(layers: int, dtype=torch.float32):
    torch.manual_seed(0)
    widths = [12] + [10] * (layers - 1) + [4]
    mods = []
    for i in range(layers):
        mods += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    return nn.Sequential(*mods[:-1]).to(dtype)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))


@pytest.mark.parametrize("case", ["mlp", "mlp-bfloat16", "mlp-float64", "cnn", "chunks", "blocks"])
def test_tell_sets_minus_each_parameters_estimate_bit_for_bit(case):
    """``p.grad`` in the step pre-hook is ``(-es_gradient(shaped chunk, noise, N)).to(p.dtype)`` summed over
    chunks, as one estimate and one negation per parameter gave it."""
    dtype = {"mlp-bfloat16": torch.bfloat16, "mlp-float64": torch.float64}.get(case, torch.float32)
    model = _cnn() if case == "cnn" else _mlp(3, dtype)
    x = torch.randn(6, 1, 5, 5) if case == "cnn" else torch.randn(6, 12).to(dtype)
    y = torch.randint(0, 4, (6,))
    N = 12
    opt = EggrollOptimizer(model, population_size=N, seed=3, chunk_size=4 if case == "chunks" else "auto",
                           noise_block=2 if case == "blocks" else None)
    seen = {}
    opt.register_step_pre_hook(lambda *_: seen.update({p: p.grad.clone() for p in model.parameters()}))
    for _ in range(2):
        population = opt.ask()
        fitness = torch.cat([-per_member_cross_entropy(model(x), y).float() for _ in population.chunks()])
        shaped = zscore(fitness)
        expected = collections.defaultdict(int)
        for start, stop in population.ranges():
            for p, noise in population.noise.chunk_noise(start, stop).items():
                g = es_gradient(shaped[start:stop], noise, N).view(p.shape)
                expected[p] = g if isinstance(expected[p], int) else expected[p] + g
        opt.tell(fitness)
        for p in model.parameters():
            assert torch.equal(seen[p], (-expected[p]).to(p.dtype))


def _tell_ops(layers: int) -> collections.Counter:
    """Top-level aten ops of one ``tell`` (the forward drew the noise before it)."""
    model, x, y = _mlp(layers), torch.randn(6, 12), torch.randint(0, 4, (6,))
    opt = EggrollOptimizer(model, population_size=16, seed=1)
    opt.ask()
    fitness = -per_member_cross_entropy(model(x), y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.tell(fitness)
    return collections.Counter(
        e.name for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def test_tell_fitness_work_does_not_grow_with_the_layers():
    """What depends on the fitness alone (the shaping, the pairs' differences) runs once per ``tell``, the
    negation of every estimate is one ``_foreach_neg``, and each added Linear layer (weight and bias) costs
    a bounded number of ops (11 here: its two contractions, their divisions, the GEMM's operand layout, the
    inner step's two ``add_``)."""
    two, four = _tell_ops(2), _tell_ops(4)
    for ops in (two, four):
        assert ops["aten::_foreach_neg"] == 1 and ops["aten::neg"] == 0
        assert ops["aten::select"] == 0
    assert four["aten::sub"] == two["aten::sub"]  # the pairs' differences: once, whatever the layers
    assert four["aten::slice"] == two["aten::slice"]
    per_layer = (sum(four.values()) - sum(two.values())) / 2
    assert per_layer <= 12, (per_layer, four - two)


def check_signed_members(device):
    """``noise.signed_members`` (the full-rank members' noise) is torch's stack-then-scale bit for bit,
    through the layout kernel where it runs (CUDA, Triton's interpreter), for a float and a device sigma."""
    from eggroll_optim.noise.layout import layout_kernels_available
    from eggroll_optim.noise import signed_members

    g = torch.Generator().manual_seed(2)
    for shape in [(5, 7), (3, 1), (4,), (2, 3, 4), (6, 256)]:
        for dtype in (torch.float32, torch.float64):
            eps = torch.randn(*shape, generator=g, dtype=dtype).to(device)
            for sigma in (0.37, torch.tensor(0.37, dtype=dtype, device=device)):
                scale = sigma.to(eps.dtype) if isinstance(sigma, torch.Tensor) else sigma
                expected = torch.stack((eps, -eps), dim=1).flatten(0, 1).mul_(scale)
                got = signed_members(eps, sigma)
                assert got.shape == (2 * shape[0], *shape[1:]) and torch.equal(got, expected), (shape, dtype, sigma)
    return layout_kernels_available(torch.zeros(2, 3, device=device))


def test_signed_members_on_cpu():
    check_signed_members("cpu")


def test_signed_members_in_triton_interpreter():
    from interpreted import run_interpreted

    run_interpreted(
        """
        from test_eager_launches import check_signed_members
        assert check_signed_members("cpu")  # the Triton pass ran
        """
    )


@pytest.mark.cuda
def test_signed_members_on_cuda():
    assert check_signed_members("cuda")

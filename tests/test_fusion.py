"""The fused Sequential(Linear, act, Linear) rule equals the dense float64 reference.

CPU: the fused path runs under Triton's interpreter in a subprocess (and the default CPU path is
the per-layer hooks, checked in the same way); CUDA: compiled (marked ``cuda``).
"""

import copy

import pytest
import torch
import torch.nn as nn

from interpreted import run_interpreted

from eggroll_optim import EggrollOptimizer
from eggroll_optim.layers import rule_for

pytest.importorskip("triton")


CASES = [(nn.Tanh, (6, 12), True), (nn.ReLU, (8, 12), True), (nn.Tanh, (8, 3, 12), False)]


def fused_vs_dense(device: str, dtype=torch.float32, cases=CASES, hidden=32) -> float:
    """Largest relative error of the optimizer's outputs against materialised ``W + E_i``."""
    worst = 0.0
    for act, shape, evolve in cases:
        torch.manual_seed(len(shape) + evolve)
        model = nn.Sequential(nn.Linear(12, hidden), act(), nn.Linear(hidden, 5)).to(device)
        opt = EggrollOptimizer(model, population_size=8, sigma=0.3, rank=3, evolve_biases=evolve)
        x = torch.randn(*shape, device=device)
        with opt.ask() as population, torch.no_grad():  # as step() runs it: autograd would take the torch path
            out = model(population.per_member(x) if shape[0] == 8 else x)
        noise = population.noise.chunk_noise(0, 8)
        lin1, _, lin2 = model
        refs = []
        for i in range(8):
            def value(p):
                v = noise.get(p)
                if v is None:
                    return p.double()
                return p.double() + (v[0][i].double() @ v[1][i].double().T if isinstance(v, tuple) else v[i].double())
            xi = x[i].double() if shape[0] == 8 else x.double()
            h = act()(xi @ value(lin1.weight).T + value(lin1.bias))
            refs.append(h @ value(lin2.weight).T + value(lin2.bias))
        ref = torch.stack(refs)
        worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
        opt.tell(out.flatten(1).sum(1))
    return worst


def test_block_rule_only_for_exact_blocks_and_not_with_fused_false():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    assert rule_for(model).fused and rule_for(model, fused=False) is None
    assert rule_for(nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))) is None
    opt = EggrollOptimizer(model, [model[0].weight], population_size=4)  # one weight evolved: per layer
    with opt.ask():
        assert model(torch.randn(3, 4)).shape == (4, 3, 2)


def test_fused_true_raises_where_the_kernel_cannot_run():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = EggrollOptimizer(model, population_size=4, fused=True)
    with opt.ask() as population, pytest.raises(RuntimeError, match="fused=True"):
        # an input in another dtype than the weights: no fused kernel (a float32 CPU input runs kernels.cpu_mlp)
        model(population.per_member(torch.randn(4, 3, 4, dtype=torch.float64)))


def test_per_layer_path_on_cpu_matches_dense():
    assert fused_vs_dense("cpu") < 1e-5


def test_fused_path_in_triton_interpreter_matches_dense():
    run_interpreted(
        """
        import eggroll_optim.layers.fused as fusion
        calls = []
        kernel = fusion.perturbed_mlp
        fusion.perturbed_mlp = lambda *a, **k: calls.append(1) or kernel(*a, **k)
        from test_fusion import fused_vs_dense
        err = fused_vs_dense("cpu")
        assert err < 1e-5, err
        assert len(calls) == 3, calls  # the fused block ran once per model call
        """
    )


@pytest.mark.cuda
def test_fused_path_on_cuda_matches_dense():
    assert fused_vs_dense("cuda") < 2e-3  # TF32 dots


@pytest.mark.cuda
def test_evolved_biases_keep_the_pair_kernel_on_cuda(monkeypatch):
    """A shared batch of 64 rows under TF32: the register-resident kernel, one layer-1 product per antithetic
    pair with the evolved layer-1 bias's noise in pairs (``PairedNoise``), and without evolved biases."""
    from eggroll_optim.kernels.fast import mlp

    calls, launch = [], mlp.launch_resident
    monkeypatch.setattr(mlp, "launch_resident", lambda *args: calls.append(args[-1]) or launch(*args))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setenv("EGGROLL_AUTOTUNE", "first")
    err = fused_vs_dense("cuda", cases=[(nn.Tanh, (64, 12), True), (nn.Tanh, (64, 12), False)], hidden=64)
    assert calls == [True, True] and err < 5e-3, (calls, err)  # float16 products


def test_a_root_mlp_block_runs_without_vmap_and_sees_parameter_edits(monkeypatch):
    """An MLP block as the root runs the whole chunk at once (``Rule.whole``: no vmap), member-exact, and
    the per-member values it reuses between calls follow an in-place edit of a parameter."""
    import eggroll_optim.hooks as hooks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = EggrollOptimizer(model, population_size=6, rank=2, sigma=0.3)
    plain = copy.deepcopy(model)  # a copy is the plain model: the reference's forward
    monkeypatch.setattr(hooks, "vmap", lambda *a, **k: pytest.fail("the root block ran under vmap"))
    obs = torch.randn(6, 4, dtype=torch.float64)
    with opt.ask() as population, torch.no_grad():
        for _ in range(2):
            out = model(population.per_member(obs))
            for i in range(6):
                ref = torch.func.functional_call(plain, population.member_state_dict(i), obs[i])
                torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-12)
            model[0].bias.add_(1.0)  # the next call must see it
    opt.discard()


def test_paired_bias_noise_of_the_wrong_shape_is_refused():
    """The pair kernel reads a ``PairedNoise`` row per pair unchecked: ``perturbed_mlp`` checks its shape first."""
    from eggroll_optim.kernels.fast.mlp import perturbed_mlp
    from eggroll_optim.noise import PairedNoise, antithetic_pairs

    g = torch.Generator().manual_seed(0)
    P, D, H, O, R = 3, 5, 8, 2, 2
    l1 = (torch.randn(H, D, generator=g), torch.randn(H, generator=g),
          antithetic_pairs(torch.randn(P, H, R, generator=g), torch.randn(P, D, R, generator=g), 0.1, R))
    l2 = (torch.randn(O, H, generator=g), None,
          antithetic_pairs(torch.randn(P, O, R, generator=g), torch.randn(P, H, R, generator=g), 0.1, R))
    x = torch.randn(4, D, generator=g)
    half = torch.randn(P, H, generator=g)
    members = torch.stack((half, -half), dim=1).flatten(0, 1)  # + then - per pair, built here by hand
    assert torch.equal(PairedNoise(half).members(), members) and PairedNoise(half).shape == members.shape
    out = perturbed_mlp(x, l1, l2, "tanh", True, (PairedNoise(half), None))
    torch.testing.assert_close(out, perturbed_mlp(x, l1, l2, "tanh", True, (members, None)), rtol=0, atol=0)
    for bad in (half[:2], torch.randn(P, H + 1, generator=g)):
        with pytest.raises(ValueError, match="one row per pair"):
            perturbed_mlp(x, l1, l2, "tanh", True, (PairedNoise(bad), None))


def test_the_pair_kernels_layers_on_cuda_and_the_cpu_layers():
    """``layers.fused._layers`` (what the block hands ``perturbed_mlp``), with a stand-in for a CUDA weight:
    on CUDA a shared bias is the layer's and an evolved layer-1 bias with its ``PairedNoise`` becomes
    ``(W1, b1, Pairs)`` plus that noise; on CPU every bias is per-member noise over no bias."""
    from types import SimpleNamespace

    from eggroll_optim.layers.fused import _layers
    from eggroll_optim.noise import PairedNoise, antithetic_pairs

    g = torch.Generator().manual_seed(3)
    P, H, O, D, R = 2, 6, 3, 5, 2
    pairs = [antithetic_pairs(torch.randn(P, m, R, generator=g), torch.randn(P, k, R, generator=g), 0.1, R)
             for m, k in ((H, D), (O, H))]
    b1, b2 = torch.randn(H, generator=g), torch.randn(O, generator=g)
    half = torch.randn(P, H, generator=g)
    evolved1 = b1 + torch.stack((half, -half), 1).flatten(0, 1)  # the chunk's per-member values
    for cuda in (True, False):
        w1, w2 = (SimpleNamespace(is_cuda=cuda, name=name) for name in ("W1", "W2"))
        first, second = SimpleNamespace(weight=w1, bias=b1), SimpleNamespace(weight=w2, bias=b2)
        paired = PairedNoise(half)
        layers, noise = _layers(first, second, pairs, (evolved1, b2), (b1, paired))
        if cuda:
            assert layers[0][0] is w1 and layers[0][1] is b1 and layers[0][2] is pairs[0] and noise[0] is paired
            assert layers[1][1] is b2 and noise[1] is None  # shared: the layer's own bias, no noise
        else:
            assert layers[0][1] is None and noise[0] is evolved1
            assert layers[1][1] is None and torch.equal(noise[1], b2.expand(2 * P, -1))
        # without the paired noise (a per-member input, a nested block): the per-member values
        layers, noise = _layers(first, second, pairs, (evolved1, b2), None)
        assert layers[0][1] is None and noise[0] is evolved1

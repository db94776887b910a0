"""The fused Triton MLP against its plain-torch twin and a float64 reference.

On CPU the kernel runs under Triton's interpreter (in a subprocess, since the interpreter is
chosen when triton is imported); on CUDA it runs compiled (marked ``cuda``).
"""

import pytest
import torch

from interpreted import run_interpreted

from eggroll_optim.kernels.fast.mlp import perturbed_mlp, perturbed_mlp_reference
from eggroll_optim.kernels.mlp import mlp_layer
from eggroll_optim.noise import PairedNoise

triton = pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _first_config_only(monkeypatch):
    """Autotuned kernels compile their first config alone (``kernels.fast._triton.autotune``): the tests check
    numbers, not speed, and the whole config lists cost minutes of compiling on a GPU."""
    monkeypatch.setenv("EGGROLL_AUTOTUNE", "first")

CASES = [(20, 30, 40, 10, 6, 4, "tanh"), (70, 16, 32, 3, 20, 1, "relu"), (5, 8, 17, 2, 2, 8, "identity"),
         (3, 4, 256, 2, 34, 4, "tanh"), (4, 8, 16, 70, 3, 2, "tanh"),
         (64, 12, 64, 5, 6, 2, "tanh")]  # tiles that divide M and H: the unmasked (EVEN) kernel variant


def _inputs(M, D, H, O, N, R, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = rnd(M, D)
    layer1 = (rnd(H, D, scale=0.3), rnd(H), rnd(N, H, R, scale=0.1), rnd(N, D, R))
    layer2 = (rnd(O, H, scale=0.3), rnd(O), rnd(N, O, R, scale=0.1), rnd(N, H, R))
    return x, layer1, layer2


def _member_major(layer):
    """The same layer with ``B (N, in, r)`` stored ``(in, N, r)``-major, as ``noise.antithetic`` returns it."""
    W, b, A, B = layer
    return W, b, A, B.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def _float64(layer):
    """A layer as float64 CPU tensors, its factors as a plain tuple."""
    W, b, factors = mlp_layer(layer)
    return W.double().cpu(), b.double().cpu(), tuple(t.double().cpu() for t in factors)


def _member_noise(noise):
    return noise.members() if isinstance(noise, PairedNoise) else noise


def _relative_error(x, layer1, layer2, activation, shared=True, bias_noise=(None, None)):
    out = perturbed_mlp(x, layer1, layer2, activation, shared, bias_noise)
    noise64 = [_member_noise(t).double().cpu() if t is not None else None for t in bias_noise]
    ref = perturbed_mlp_reference(x.double().cpu(), _float64(layer1), _float64(layer2), activation, shared, noise64)
    assert out.shape == ref.shape
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def test_reference_is_two_perturbed_linears_in_float64():
    from eggroll_optim.kernels import perturbed_linear

    x, l1, l2 = _inputs(9, 7, 12, 4, 6, 3, seed=1)
    x, l1, l2 = x.double(), [t.double() for t in l1], [t.double() for t in l2]
    dense = []
    for i in range(6):  # materialise W + E_i per member
        W1 = l1[0] + l1[2][i] @ l1[3][i].T
        W2 = l2[0] + l2[2][i] @ l2[3][i].T
        dense.append(torch.tanh(x @ W1.T + l1[1]) @ W2.T + l2[1])
    torch.testing.assert_close(perturbed_mlp_reference(x, l1, l2, "tanh"), torch.stack(dense))
    assert torch.allclose(perturbed_linear(x, *l1, shared=True), x @ l1[0].T + l1[1] + torch.einsum("md,ndr,nhr->nmh", x, l1[3], l1[2]))


def test_fused_kernel_leaves_autograd_to_the_torch_path_interpreted():
    """With grad on and a weight that requires it, the kernel (whose output autograd does not see) steps
    aside: the weights get the reference's gradients; under no_grad the kernel runs."""
    run_interpreted(
        """
        import torch
        import eggroll_optim.kernels.fast.mlp as fast
        from test_fast_mlp import _inputs
        calls = []
        kernel = fast._fused
        fast._fused = lambda *a, **k: calls.append(1) or kernel(*a, **k)
        x, l1, l2 = _inputs(8, 6, 16, 3, 4, 2, seed=5)
        with torch.no_grad():
            fast.perturbed_mlp(x, l1, l2, "tanh")
        assert calls == [1]
        W1 = l1[0].clone().requires_grad_()
        out = fast.perturbed_mlp(x, (W1, *l1[1:]), l2, "tanh")
        assert calls == [1] and out.requires_grad
        out.square().sum().backward()
        W1r = l1[0].clone().requires_grad_()
        fast.perturbed_mlp_reference(x, (W1r, *l1[1:]), l2, "tanh").square().sum().backward()
        torch.testing.assert_close(W1.grad, W1r.grad)
        """
    )


def test_fused_kernel_in_triton_interpreter():
    run_interpreted(
        """
        import torch
        from test_fast_mlp import CASES, _inputs, _member_major, _relative_error
        for i, case in enumerate(CASES):
            *shape, act = case
            err = _relative_error(*_inputs(*shape, seed=100 + i), act)
            assert err < 1e-5, (case, err)
            x, l1, l2 = _inputs(*shape, seed=200 + i)
            M, D, H, O, N, R = shape
            xm = torch.randn(N, M, D)
            noise = (torch.randn(N, H), torch.randn(N, O))
            err = _relative_error(xm, l1, l2, act, shared=False, bias_noise=noise)
            assert err < 1e-5, ("per-member", case, err)
            err = _relative_error(x, l1, l2, act, shared=True, bias_noise=noise)
            assert err < 1e-5, ("bias noise", case, err)
            x1 = torch.randn(N, 1, D)  # one row per member: the members-as-rows kernel
            err = _relative_error(x1, l1, l2, act, shared=False, bias_noise=noise)
            assert err < 1e-5, ("rows", case, err)
            l1, l2 = _member_major(l1), _member_major(l2)  # B as noise.antithetic lays it out
            err = _relative_error(x, l1, l2, act)
            assert err < 1e-5, ("feature-major B", case, err)
            err = _relative_error(xm, l1, l2, act, shared=False)
            assert err < 1e-5, ("feature-major B, per-member", case, err)
            err = _relative_error(x1, l1, l2, act, shared=False, bias_noise=noise)
            assert err < 1e-5, ("feature-major B, rows", case, err)
        """
    )


# shared input, tanh, TF32: the register-resident kernel (M >= 64, H <= 256, O <= 32, rank + bias column <= 16)
RESIDENT_CASES = [(64, 12, 64, 5, 6, 2), (100, 20, 100, 7, 5, 4), (70, 12, 16, 3, 4, 3), (64, 9, 40, 20, 3, 15),
                  (130, 6, 256, 10, 9, 1)]
# the same through noise.Pairs factors: (M, D, H, O, pairs, R)
RESIDENT_PAIRS = [(64, 12, 64, 5, 3, 2), (100, 20, 100, 7, 4, 4)]


def _resident_launch(fn):
    """``fn()`` and the ``twin`` flag of every ``launch_resident`` call it made (which resident kernel ran)."""
    from eggroll_optim.kernels.fast import mlp

    calls, launch = [], mlp.launch_resident
    mlp.launch_resident = lambda *args: calls.append(args[-1]) or launch(*args)
    try:
        return fn(), calls
    finally:
        mlp.launch_resident = launch


def _resident_errors(device, seed, cases=range(len(RESIDENT_CASES)), plain=None, pairs=range(len(RESIDENT_PAIRS)),
                     twins=()):
    """Relative errors of the resident kernels against float64: hand-built factors (one kernel per member),
    then ``Pairs`` (the twin kernel exactly where both layers are ``Pairs`` and layer 1's bias noise is none
    or a ``PairedNoise``).
    ``cases``: the ``RESIDENT_CASES`` run, each with B member-major (``noise.antithetic``'s layout) and, if in
    ``plain`` (default: all), plain ``(N, in, r)``; ``pairs``: the ``RESIDENT_PAIRS`` run through every
    ``Pairs`` check (``_resident_pair_errors``), ``twins``: those run through the twin kernel alone."""
    from eggroll_optim.kernels.fast.resident import resident_fits

    errors = []
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for i, (M, D, H, O, N, R) in enumerate(RESIDENT_CASES):
            if i not in cases:
                continue
            x, l1, l2 = _inputs(M, D, H, O, N, R, seed=seed + i, device=device)
            noise = (torch.randn(N, H, device=device) * 0.1, torch.randn(N, O, device=device) * 0.1)
            assert resident_fits(M, H, O, R, "tanh", True, R < 16)
            layouts = [(_member_major(l1), _member_major(l2))]
            if plain is None or i in plain:
                layouts.insert(0, (l1, l2))
            for layers in layouts:
                for bn in ((None, None), noise) if R < 16 else ((None, noise[1]),):
                    err, twin = _resident_launch(lambda: _relative_error(x, *layers, "tanh", True, bn))
                    assert twin == [False], "not the resident kernel, or the twin one for plain tensors"
                    errors.append(err)
        g = torch.Generator().manual_seed(seed)
        for j, shape in enumerate(RESIDENT_PAIRS):
            if j in pairs:
                errors += _resident_pair_errors(device, g, *shape)
            elif j in twins:
                errors += _twin_errors(device, g, *shape)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return errors


def _pair_inputs(device, g, M, D, H, O, P, R):
    """``rnd`` (more draws from ``g`` on ``device``), a shared input ``x (M, D)`` and two layers whose factors
    are ``Pairs`` of ``P`` antithetic pairs."""
    from eggroll_optim.noise import antithetic_pairs

    rnd = lambda *s, k=1.0: (torch.randn(*s, generator=g) * k).to(device)  # noqa: E731
    x = rnd(M, D)
    l1 = (rnd(H, D, k=0.3), rnd(H), antithetic_pairs(rnd(P, H, R), rnd(P, D, R), 0.3, R))
    l2 = (rnd(O, H, k=0.3), rnd(O), antithetic_pairs(rnd(P, O, R), rnd(P, H, R), 0.3, R))
    return rnd, x, l1, l2


def _twin_errors(device, g, M, D, H, O, P, R):
    """The twin kernel alone given ``Pairs``, without bias noise and with both layers' (layer 1's in pairs):
    ``_resident_pair_errors``' first checks, without the per-member kernels that its dispatch checks run."""
    rnd, x, l1, l2 = _pair_inputs(device, g, M, D, H, O, P, R)
    errors = []
    for bn in ((None, None), (PairedNoise(rnd(P, H, k=0.1)), rnd(2 * P, O, k=0.1))):
        err, kernels = _resident_launch(lambda: _relative_error(x, l1, l2, "tanh", True, bn))
        assert kernels == [True], "not the twin kernel"
        errors.append(err)
    return errors


def _resident_pair_errors(device, g, M, D, H, O, P, R):
    """The resident kernels given ``Pairs``: what runs follows the types of the factors alone."""
    from eggroll_optim.kernels.fast._triton import pinned
    from eggroll_optim.kernels.fast.mlp import _fused

    rnd, x, l1, l2 = _pair_inputs(device, g, M, D, H, O, P, R)
    plain1, plain2 = ((W, b, tuple(t.clone() for t in f)) for W, b, f in (l1, l2))  # the same numbers, no type
    run = lambda *layers, bn=(None, None): _resident_launch(lambda: _fused(x, *layers, "tanh", True, bn))  # noqa: E731
    errors = [_relative_error(x, l1, l2, "tanh", True)]
    twin, kernels = run(l1, l2)
    assert kernels == [True]  # the twin kernel ran: what follows compares two kernels, not one with itself
    # two float16 paths (each within TF32 accuracy of float64) agree to that accuracy
    close = lambda a, b: ((a - b).norm() / b.norm()).item() < 5e-3  # noqa: E731
    for layers in ((plain1, plain2), (l1, plain2), (plain1, l2)):  # one layer-1 product per member
        out, kernels = run(*layers)
        assert kernels == [False] and close(out, twin)
    # layer-2 bias noise keeps the twin kernel; layer 1's keeps it in pairs (PairedNoise), per member not
    bn1, bn2 = rnd(2 * P, H, k=0.1), rnd(2 * P, O, k=0.1)
    paired1 = PairedNoise(rnd(P, H, k=0.1))
    assert run(l1, l2, bn=(None, bn2))[1] == [True] and run(l1, l2, bn=(bn1, bn2))[1] == [False]
    paired, kernels = run(l1, l2, bn=(paired1, bn2))
    assert kernels == [True]
    per_member, kernels = run(l1, l2, bn=(paired1.members(), bn2))
    assert kernels == [False] and close(paired, per_member)
    assert run(plain1, l2, bn=(paired1, bn2))[1] == [False]  # per-member factors: the noise as its members
    errors.append(_relative_error(x, l1, l2, "tanh", True, (None, bn2)))
    errors.append(_relative_error(x, l1, l2, "tanh", True, (bn1, bn2)))
    errors.append(_relative_error(x, l1, l2, "tanh", True, (paired1, bn2)))
    errors.append(_relative_error(x, l1, l2, "tanh", True, (paired1, PairedNoise(bn2[0::2]))))
    with pinned(config=dict(PER_SM=2, LOOKAHEAD=False, num_warps=4)):  # the other schedule of the chunks
        assert close(_fused(x, l1, l2, "tanh", True, (None, None)), twin)
        assert close(_fused(x, l1, plain2, "tanh", True, (None, None)), twin)
    # a hand-built layer 2 that is not antithetic: the per-member kernel, right values
    errors.append(_relative_error(x, l1, (l2[0], l2[1], rnd(2 * P, O, R, k=0.3), rnd(2 * P, H, R)), "tanh"))
    # |x B1| and the base past float16's range: they saturate (no inf - inf = NaN); at such magnitudes a
    # 10-bit mantissa (TF32's too) no longer resolves pre-activations near 0, so only finiteness is checked
    for layers in ((l1, l2), (l1, plain2)):
        assert torch.isfinite(_fused(x * 1e5, *layers, "tanh", True, (None, None))).all()
    # an in-place edit changes no kernel (the type decides); edited copies as plain tensors: their own values
    A1, B1 = (t.clone() for t in l1[2])
    A1[1].mul_(3.0)  # member 1 no longer the negative of member 0
    errors.append(_relative_error(x, (l1[0], l1[1], (A1, B1)), l2, "tanh", True))
    l1[2].A_scaled[1].mul_(1.0)
    assert run(l1, l2)[1] == [True]
    return errors


def test_resident_kernel_in_triton_interpreter():
    run_interpreted(
        """
        from test_fast_mlp import _resident_errors
        errors = _resident_errors("cpu", 300)
        assert max(errors) < 5e-3, errors
        """
    )


@pytest.mark.cuda
def test_resident_kernel_on_cuda():
    # each specialization compiles (~1.5 s on an H200); the interpreter runs every case and pair shape in full.
    # Compiled: case 0 (EVEN_M/EVEN_H, NC 4, RP 2/4: its member-major runs are the compiles the Pairs checks'
    # per-member calls need, its plain ones test_fused_kernel_under_tf32_on_cuda[case3]'s), case 3 (RP 16, BO 32,
    # NC 3, masked chunks), case 4 member-major only (RP 1/2, HC 64, masked rows; plain B: the same constexprs,
    # other stride alignments), pair shape 0 in full (twin and PAIR=2 kernels, LOOKAHEAD both ways, HAS_BN1/2 each
    # way), pair shape 1 on the twin kernel alone (masked rows and chunks, RP 4/8). Left out, compiling those again:
    # cases 1 and 2, case 4's plain B, pair shape 1's dispatch checks
    errors = _resident_errors("cuda", 400, cases=(0, 3, 4), plain=(0, 3), pairs=(0,), twins=(1,))
    assert max(errors) < 5e-3, errors


# each case compiles the shared, per-member and rows kernels (~1 s each on an H200), and again with B member-major
# (other strides, the same constexprs): that layout on case 0 alone. Compiled: every ACT, EVEN_M/EVEN_H each way
# (case 5 both, 1 and 3 EVEN_H), HC 32/64, BH 16-256, BO 128, a shared input on the per-member kernel (4); the
# MNIST shape (256, 784, 256, 10, 64, 4) left out: cases 5 and 3's constexprs (it runs under TF32 below)
CUDA_CASES = [(case, i == 0) for i, case in enumerate(CASES)]


@pytest.mark.cuda
@pytest.mark.parametrize("case,member_major", CUDA_CASES)
def test_fused_kernel_on_cuda(case, member_major):
    *shape, act = case
    x, l1, l2 = _inputs(*shape, seed=7, device="cuda")
    assert _relative_error(x, l1, l2, act) < 2e-3  # TF32 dots
    M, D, H, O, N, R = shape
    noise = (torch.randn(N, H, device="cuda"), torch.randn(N, O, device="cuda"))
    xm = torch.randn(N, M, D, device="cuda")
    assert _relative_error(xm, l1, l2, act, shared=False, bias_noise=noise) < 2e-3
    x1 = torch.randn(N, 1, D, device="cuda")
    assert _relative_error(x1, l1, l2, act, shared=False, bias_noise=noise) < 2e-3
    if member_major:
        l1, l2 = _member_major(l1), _member_major(l2)
        assert _relative_error(x, l1, l2, act) < 2e-3
        assert _relative_error(xm, l1, l2, act, shared=False, bias_noise=noise) < 2e-3
        assert _relative_error(x1, l1, l2, act, shared=False, bias_noise=noise) < 2e-3


@pytest.mark.cuda
@pytest.mark.parametrize("case", [c for c in CASES if c[-1] == "tanh"] + [(256, 784, 256, 10, 64, 4, "tanh")])
def test_fused_kernel_under_tf32_on_cuda(case):
    """TF32 on: a tanh block takes its tanh and second layer in float16 (``tanh.approx.f16x2``)."""
    *shape, act = case
    x, l1, l2 = _inputs(*shape, seed=9, device="cuda")
    M, D, H, O, N, R = shape
    noise = (torch.randn(N, H, device="cuda"), torch.randn(N, O, device="cuda"))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert _relative_error(x, l1, l2, act) < 5e-3
        assert _relative_error(x, l1, l2, act, bias_noise=noise) < 5e-3
        big = (l1[0], l1[1] * 1e6, l1[2], l1[3])  # pre-activations past float16's range: tanh is still ±1
        assert _relative_error(x, big, l2, act) < 5e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
def test_make_perturbed_forward_fn_uses_the_fused_path_on_cuda():
    import torch.nn as nn

    from eggroll_optim.core import generate_perturbations, get_params_dict, get_weight_shapes, make_perturbed_forward_fn

    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
    params = get_params_dict(model, device="cuda")
    perts = generate_perturbations(get_weight_shapes(params), 32, 4, 0.1, torch.Generator("cuda").manual_seed(0))
    forward, _ = make_perturbed_forward_fn(model)
    x = torch.rand(64, 784, device="cuda")
    expected = perturbed_mlp_reference(x.double(), *[
        [params[f"{i}.weight"].double(), params[f"{i}.bias"].double(), *[t.double() for t in perts[f"{i}.weight"]]]
        for i in (0, 2)
    ])
    out = forward(x.expand(32, 64, 784), params, perts)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-3


@pytest.mark.cuda
def test_shared_kernel_with_tf32_and_fast_tanh_on_cuda():
    """Under TF32 the shared-input kernel uses tanh.approx (max rel. error ~2^-11): still TF32-accurate."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for case in CASES + [(256, 784, 256, 10, 64, 4, "tanh"), (100, 784, 256, 10, 1000, 4, "tanh")]:
            *shape, act = case
            x, l1, l2 = _inputs(*shape, seed=9, device="cuda")
            assert _relative_error(x, l1, l2, act) < 5e-3, case
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_autotune_prune_caps_hidden_chunks_and_drops_duplicates():
    from eggroll_optim.kernels.fast.mlp import _fit_chunks

    configs = [triton.Config({"BM": 64, "MEMBERS": 8, "HC": hc}, num_warps=4, num_stages=1, maxnreg=128)
               for hc in (64, 32, 64)] + [triton.Config({"BM": 32, "MEMBERS": 16, "HC": 32}, num_warps=4, num_stages=1)]
    kept = _fit_chunks(configs, {"H": 20})  # a 20-wide layer: chunks of at most pow2(20) = 32
    assert [c.kwargs["HC"] for c in kept] == [32, 32]  # the three 64/32/64 configs collapse into one
    assert {(c.kwargs["BM"], c.maxnreg) for c in kept} == {(64, 128), (32, None)}
    assert [c.kwargs["HC"] for c in _fit_chunks(configs, {"H": 256})] == [64, 32, 32]


def test_autotune_first_keeps_the_first_config(monkeypatch):
    """``EGGROLL_AUTOTUNE=first`` narrows every autotuned kernel to one config (after its own prune)."""
    from eggroll_optim.kernels.fast import mlp, resident

    monkeypatch.delenv("EGGROLL_AUTOTUNE")
    tuners = [mlp._mlp_shared_kernel_tuned, mlp._mlp_kernel_tuned, resident._mlp_twin_tuned,
              resident._mlp_resident_tuned]
    whole = [len(t.early_config_prune(t.configs, {"H": 256})) for t in tuners]
    assert whole == [len(t.configs) for t in tuners] and min(whole) > 1
    monkeypatch.setenv("EGGROLL_AUTOTUNE", "first")
    for t in tuners:
        kept = t.early_config_prune(t.configs, {"H": 20})
        assert len(kept) == 1 and kept[0].kwargs.get("BM") == t.configs[0].kwargs.get("BM")
    assert mlp._mlp_shared_kernel_tuned.early_config_prune(mlp._mlp_shared_kernel_tuned.configs, {"H": 20})[0].kwargs[
        "HC"] == 32  # the kernel's own prune ran first: chunks no wider than the layer

"""The chunked CPU MLP against a float64 dense reference (``W + A_i B_iᵀ`` per member) and the
plain-torch ``perturbed_mlp_reference``."""
from __future__ import annotations

import pytest
import torch

from eggroll_optim.kernels import cpu_mlp
from eggroll_optim.kernels.cpu_mlp import perturbed_mlp_cpu
from eggroll_optim.kernels.fast.mlp import perturbed_mlp_reference

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


def test_per_member_input_delegates_to_reference(monkeypatch):
    N, M, D = 4, 3, 7
    _, l1, l2, bn = _inputs(N, M, D, 9, 3, 2, seed=8, noise=True)
    xm = torch.randn(N, M, D, generator=torch.Generator().manual_seed(9))
    calls = []

    def spy(*args):
        calls.append(args[4])
        return perturbed_mlp_reference(*args)

    monkeypatch.setattr(cpu_mlp, "perturbed_mlp_reference", spy)
    out = perturbed_mlp_cpu(xm, l1, l2, "tanh", shared=False, bias_noise=bn)
    assert calls == [False]
    dense = torch.stack([_dense(xm[i], l1, l2, "tanh", bn)[i] for i in range(N)])
    _assert_matches(out, dense, rtol=1e-5)


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

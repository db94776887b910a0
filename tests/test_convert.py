"""``make_perturbed_forward_fn`` against hand-written perturbed forwards and float64 dense references."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eggroll_optim.core import (
    generate_perturbations,
    get_params_dict,
    get_weight_shapes,
    make_perturbed_forward_fn,
    perturbed_conv2d,
    perturbed_forward,
)

N = 4


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


class _Conv1dNet(nn.Module):  # functional pooling, flatten as a function or a method, a raw Parameter
    def __init__(self, method_flatten=False):
        super().__init__()
        self.method_flatten = method_flatten
        self.conv = nn.Conv1d(2, 6, 3, stride=2, dilation=1, padding=1)
        self.fc = nn.Linear(6 * 3, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        h = F.avg_pool1d(torch.relu(self.conv(x)), 2)
        h = h.flatten(start_dim=1) if self.method_flatten else torch.flatten(h, 1)
        return self.fc(h) * self.scale


def _setup(module, seed, rank=3, only=None):
    params = get_params_dict(module, device="cpu", dtype=torch.float64)
    shapes = get_weight_shapes(params)
    if only is not None:
        shapes = {k: v for k, v in shapes.items() if k in only}
    perts = generate_perturbations(shapes, N, rank, 0.3, torch.Generator().manual_seed(seed), torch.float64)
    return params, perts


def _dense(module, x, params, perts, per_member):
    """Member by member: ``functional_call`` with ``W + E_i`` (float64)."""
    outs = []
    for i in range(N):
        p = dict(params)
        for name, (A, B) in perts.items():
            p[name] = params[name] + (A[i] @ B[i].T).reshape(params[name].shape)
        outs.append(torch.func.functional_call(module, p, (x[i] if per_member else x,)))
    return torch.stack(outs)


def _mlp_by_hand(x, params, perts):
    h = torch.tanh(perturbed_forward(x, params["0.weight"], params["0.bias"], perts, "0.weight"))
    return perturbed_forward(h, params["2.weight"], params["2.bias"], perts, "2.weight")


def _cnn_by_hand(x, params, perts):
    h = torch.relu(perturbed_conv2d(x, params["0.weight"], perts, "0.weight", padding=1, bias=params["0.bias"]))
    pop, bt = h.shape[:2]
    h = F.max_pool2d(h.flatten(0, 1), 2).view(pop, bt, 8, 4, 4)
    h = perturbed_conv2d(h, params["3.weight"], perts, "3.weight", padding=1, groups=4, bias=params["3.bias"])
    h = torch.relu(h).flatten(2)
    return perturbed_forward(h, params["6.weight"], params["6.bias"], perts, "6.weight")


@pytest.mark.parametrize("seed", range(3))
def test_mlp_matches_hand_written_and_dense(seed):
    model = _mlp()
    fwd, _ = make_perturbed_forward_fn(model)
    params, perts = _setup(model, seed)
    g = torch.Generator().manual_seed(seed)
    x_member = torch.randn(N, 6, generator=g, dtype=torch.float64)
    out = fwd(x_member, params, perts)
    assert out.shape == (N, 4)
    torch.testing.assert_close(out, _mlp_by_hand(x_member, params, perts), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out, _dense(model, x_member, params, perts, True), rtol=1e-12, atol=1e-12)
    x_shared = torch.randn(5, 6, generator=g, dtype=torch.float64)
    out = fwd(x_shared, params, perts)
    assert out.shape == (N, 5, 4)
    torch.testing.assert_close(out, _mlp_by_hand(x_shared, params, perts), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out, _dense(model, x_shared, params, perts, False), rtol=1e-12, atol=1e-12)


def test_mlp_shared_expanded_and_per_member_inputs_agree():
    model = _mlp()
    fwd, _ = make_perturbed_forward_fn(model)
    params, perts = _setup(model, 5)
    x = torch.randn(5, 6, dtype=torch.float64)
    shared = fwd(x, params, perts)
    torch.testing.assert_close(fwd(x.expand(N, 5, 6), params, perts), shared, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(fwd(x.expand(N, 5, 6).contiguous(), params, perts), shared, rtol=1e-13, atol=1e-13)
    v = x[0]  # one sample: (in,) expanded to (N, in) vs its per-member copy
    torch.testing.assert_close(fwd(v.expand(N, 6), params, perts), fwd(v.expand(N, 6).clone(), params, perts))
    torch.testing.assert_close(fwd(v.expand(N, 6), params, perts), shared[:, 0], rtol=1e-13, atol=1e-13)


def test_mlp_partial_perts_perturbs_only_listed_layers():
    model = _mlp()
    fwd, _ = make_perturbed_forward_fn(model)
    params, perts = _setup(model, 2, only={"2.weight"})
    x = torch.randn(5, 6, dtype=torch.float64)
    out = fwd(x, params, perts)
    assert out.shape == (N, 5, 4)
    torch.testing.assert_close(out, _dense(model, x, params, perts, False), rtol=1e-12, atol=1e-12)
    for x_member in (torch.randn(N, 5, 6, dtype=torch.float64), torch.randn(N, 6, dtype=torch.float64)):
        # an unperturbed first layer on a per-member input, with and without a batch dim
        torch.testing.assert_close(fwd(x_member, params, perts), _dense(model, x_member, params, perts, True))


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("seed", range(2))
def test_cnn_matches_hand_written_and_dense(seed, rank):
    model = _cnn()
    fwd, _ = make_perturbed_forward_fn(model)
    params, perts = _setup(model, seed, rank)
    assert set(perts) == {"0.weight", "3.weight", "6.weight"}
    g = torch.Generator().manual_seed(seed)
    x_shared = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    x_member = torch.randn(N, 3, 3, 8, 8, generator=g, dtype=torch.float64)
    for x, per_member in ((x_shared, False), (x_member, True)):
        out = fwd(x, params, perts)
        assert out.shape == (N, 3, 5)
        torch.testing.assert_close(out, _cnn_by_hand(x, params, perts), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, _dense(model, x, params, perts, per_member), rtol=1e-11, atol=1e-11)
    expanded = fwd(x_shared.expand(N, *x_shared.shape), params, perts)
    torch.testing.assert_close(expanded, fwd(x_shared, params, perts), rtol=1e-13, atol=1e-13)
    copied = fwd(x_shared.expand(N, *x_shared.shape).contiguous(), params, perts)
    torch.testing.assert_close(copied, expanded, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method_flatten", [False, True])
def test_conv1d_functional_ops_flatten_and_raw_parameter(method_flatten):
    model = _Conv1dNet(method_flatten)
    fwd, _ = make_perturbed_forward_fn(model)
    params, perts = _setup(model, 9)
    params["scale"] = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)  # read from params, not the module
    x_shared = torch.randn(5, 2, 12, dtype=torch.float64)
    x_member = torch.randn(N, 5, 2, 12, dtype=torch.float64)
    torch.testing.assert_close(fwd(x_shared, params, perts), _dense(model, x_shared, params, perts, False))
    torch.testing.assert_close(fwd(x_member, params, perts), _dense(model, x_member, params, perts, True))


@pytest.mark.parametrize("make, shape", [(_mlp, (7, 6)), (_cnn, (2, 3, 8, 8)), (_Conv1dNet, (3, 2, 12))])
def test_forward_eval_equals_module(make, shape):
    model = make()
    _, fwd_eval = make_perturbed_forward_fn(model)
    x = torch.randn(*shape)
    params = get_params_dict(model, device="cpu")
    torch.testing.assert_close(fwd_eval(x, params), model(x), rtol=0, atol=0)
    params64 = get_params_dict(model, device="cpu", dtype=torch.float64)
    torch.testing.assert_close(fwd_eval(x.double(), params64), model.double()(x.double()), rtol=0, atol=0)


def test_forward_does_not_modify_module():
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fwd, _ = make_perturbed_forward_fn(model)
    params, perts = _setup(model, 0)
    fwd(torch.randn(3, 3, 8, 8, dtype=torch.float64), params, perts)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


def test_untraceable_module_raises_runtime_error():
    with pytest.raises(RuntimeError, match="_Untraceable.*perturbed_forward"):
        make_perturbed_forward_fn(_Untraceable())


def test_unsupported_conv_padding_mode_raises():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"))
    fwd, _ = make_perturbed_forward_fn(model)
    params, perts = _setup(model, 0)
    with pytest.raises(TypeError, match="Conv2d"):
        fwd(torch.randn(1, 2, 5, 5, dtype=torch.float64), params, perts)

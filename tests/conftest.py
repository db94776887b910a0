"""Shared fixtures: the device, float64 dense references, and the ``cuda`` marker skip.

The dense references materialise every member's weight ``W + E_i`` with
``E_i = A_scaled_i B_iᵀ`` (reshaped to the kernel shape for convs) and run the plain
``torch.nn.functional`` op member by member in float64: slow and obviously correct.
"""
from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# CUDA tests compile each autotuned Triton kernel once (its first configuration): the suite checks
# numbers, not launch configurations, and autotuning every case took minutes
os.environ.setdefault("EGGROLL_AUTOTUNE", "first")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu")


def member_weights(weight: torch.Tensor, A_scaled: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``W + A_scaled_i B_iᵀ`` for every member, float64: ``(N, *weight.shape)``."""
    E = torch.einsum("nir,njr->nij", A_scaled.double(), B.double())  # (N, m, n)
    return weight.double().unsqueeze(0) + E.reshape(E.shape[0], *weight.shape)


def _per_member(x: torch.Tensor, N: int, sample_dims: int) -> list[torch.Tensor]:
    """Member ``i``'s input: ``x[i]`` for a per-member ``(N, ...)`` input, else ``x`` itself."""
    if x.dim() > sample_dims and x.shape[0] == N:
        return [x[i].double() for i in range(N)]
    return [x.double()] * N


def dense_linear(x, weight, bias, A_scaled, B) -> torch.Tensor:
    """``x_i (W + E_i)ᵀ + b`` per member, float64, ``(N, *batch, out)``."""
    Ws = member_weights(weight, A_scaled, B)
    xs = _per_member(x, Ws.shape[0], 1)
    b = None if bias is None else bias.double()
    return torch.stack([F.linear(xi, Wi, b) for xi, Wi in zip(xs, Ws)])


def dense_conv(x, weight, bias, A_scaled, B, **conv_args) -> torch.Tensor:
    """``conv(x_i, W + E_i) + b`` per member, float64, ``(N, Bt, C_out, *S)``."""
    conv = _CONV[weight.dim() - 2]
    Ws = member_weights(weight, A_scaled, B)
    xs = _per_member(x, Ws.shape[0], weight.dim() - 1)
    b = None if bias is None else bias.double()
    return torch.stack([conv(xi, Wi, b, **conv_args) for xi, Wi in zip(xs, Ws)])


def dense_gradient(fitness, A_scaled, B, population_size=None) -> torch.Tensor:
    """``Σ_i f_i A_scaled_i B_iᵀ / sqrt(N)`` as an explicit float64 loop over members."""
    N = A_scaled.shape[0] if population_size is None else population_size
    total = torch.zeros(A_scaled.shape[1], B.shape[1], dtype=torch.float64)
    for f, A, Bi in zip(fitness.double(), A_scaled.double(), B.double()):
        total += f * (A @ Bi.T)
    return total / N**0.5


def random_factors(N, m, n, r, gen, dtype=torch.float32, sigma=0.3):
    """Random antithetic ``(A_scaled (N, m, r), B (N, n, r))`` (fresh draws from ``gen``)."""
    from eggroll_optim.core import generate_lowrank_perturbations

    A_scaled, _, B = generate_lowrank_perturbations(N, m, n, r, sigma, gen, dtype)
    return A_scaled, B


@pytest.fixture
def dense() -> types.SimpleNamespace:
    """The float64 dense references as one namespace: ``dense.linear(...)``, ``dense.conv(...)``."""
    return types.SimpleNamespace(
        weights=member_weights,
        linear=dense_linear,
        conv=dense_conv,
        gradient=dense_gradient,
        factors=random_factors,
    )

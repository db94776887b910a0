"""Shared by the optimizer tests: a small float64 MLP, its data, and parameter comparisons."""
import torch
import torch.nn as nn

N = 6


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(123)
    return torch.randn(7, 5, generator=g, dtype=dtype), torch.randn(7, 3, generator=g, dtype=dtype)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_params(a, b, atol=1e-12):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)

"""Kernels against float64 dense references that materialise ``W + E_i`` per member."""
from __future__ import annotations

import math
import re

import pytest
import torch

from eggroll_optim.kernels import (
    es_gradient,
    fullrank_gradient_sum,
    lowrank_linear_delta,
    perturbed_conv,
    perturbed_linear,
)
from eggroll_optim.kernels.population import split_shared
from eggroll_optim.noise import antithetic, antithetic_pairs, draw_pair_factors

SEEDS = range(4)
RANKS = [1, 2, 3, 8]
BATCHES = [(), (3,), (2, 3)]


def _shapes(seed: int) -> tuple[int, int, int]:
    g = torch.Generator().manual_seed(1000 + seed)
    N = 2 * int(torch.randint(1, 4, (), generator=g))
    m, n = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
    return N, m, n


# ---------------------------------------------------------------- linear


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("seed", SEEDS)
def test_perturbed_linear_per_member_matches_dense(seed, rank, batch, dense):
    g = torch.Generator().manual_seed(seed)
    N, m, n = _shapes(seed)
    A, B = dense.factors(N, m, n, rank, g, torch.float64)
    W, b = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    x = torch.randn(N, *batch, n, generator=g, dtype=torch.float64)
    y = perturbed_linear(x, W, b, A, B)
    assert y.shape == (N, *batch, m)
    torch.testing.assert_close(y, dense.linear(x, W, b, A, B), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("seed", SEEDS)
def test_perturbed_linear_float32_and_no_bias(seed, rank, dense):
    g = torch.Generator().manual_seed(seed)
    N, m, n = _shapes(seed)
    A, B = dense.factors(N, m, n, rank, g)
    W, x = torch.randn(m, n, generator=g), torch.randn(N, 4, n, generator=g)
    y = perturbed_linear(x, W, None, A, B)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), dense.linear(x, W, None, A, B), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [(), (3,), (5, 3)])  # odd leading dims never equal an even N
@pytest.mark.parametrize("seed", SEEDS)
def test_perturbed_linear_shared_equals_expanded_and_copied(seed, batch, dense):
    g = torch.Generator().manual_seed(seed)
    N, m, n = _shapes(seed)
    A, B = dense.factors(N, m, n, 3, g, torch.float64)
    W, b = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    x = torch.randn(*batch, 5, n, generator=g, dtype=torch.float64)
    shared = perturbed_linear(x, W, b, A, B)
    expanded = perturbed_linear(x.expand(N, *x.shape), W, b, A, B)
    copied = perturbed_linear(x.expand(N, *x.shape).contiguous(), W, b, A, B)
    assert shared.shape == (N, *batch, 5, m)
    torch.testing.assert_close(shared, dense.linear(x, W, b, A, B), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expanded, shared, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(copied, shared, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("seed", SEEDS)
def test_lowrank_linear_delta_is_x_E_transpose(seed, rank, dense):
    g = torch.Generator().manual_seed(seed)
    N, m, n = _shapes(seed)
    A, B = dense.factors(N, m, n, rank, g, torch.float64)
    E = dense.weights(torch.zeros(m, n), A, B)  # (N, m, n)
    x = torch.randn(N, 2, 3, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(lowrank_linear_delta(x, B, A), torch.einsum("nabj,nij->nabi", x, E))
    xs = x[0, 0]  # shared (3, n)
    torch.testing.assert_close(lowrank_linear_delta(xs, B, A), torch.einsum("bj,nij->nbi", xs, E))


# ---------------------------------------------------------------- conv

CONV_CASES = [  # (spatial dims, C_in, C_out, kernel, size, conv args)
    (1, 3, 4, (3,), (9,), dict()),
    (1, 4, 6, (2,), (10,), dict(stride=2, padding=1, dilation=2, groups=2)),
    (1, 2, 3, (3,), (7,), dict(padding="same")),
    (2, 3, 5, (3, 3), (6, 7), dict(padding=1)),
    (2, 4, 6, (3, 2), (7, 6), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
    (2, 6, 6, (3, 3), (5, 5), dict(padding="same", groups=3)),
    (2, 4, 4, (1, 1), (4, 4), dict(groups=4)),  # depthwise 1x1
    (2, 2, 3, (3, 3), (8, 8), dict(stride=3, dilation=2, padding="valid")),
    (3, 2, 4, (2, 2, 2), (4, 5, 3), dict(padding=1, stride=(1, 2, 1))),
    (3, 4, 2, (3, 1, 2), (5, 4, 4), dict(padding="same", groups=2, dilation=(1, 1, 2))),
]


def _conv_setup(case, rank, seed, dtype=torch.float64):
    d, C_in, C_out, k, S, args = case
    g = torch.Generator().manual_seed(seed)
    N = 2 * (1 + seed % 3)
    Cg = C_in // args.get("groups", 1)
    A_scaled, B = _factors(N, C_out, Cg * math.prod(k), rank, g, dtype)
    W = torch.randn(C_out, Cg, *k, generator=g, dtype=dtype)
    b = torch.randn(C_out, generator=g, dtype=dtype)
    return g, N, W, b, A_scaled, B


def _factors(N, m, n, r, g, dtype, sigma=0.3):
    A_scaled, _, B = antithetic(*draw_pair_factors(N // 2, m, n, r, g, dtype), sigma, r)
    return A_scaled, B


@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"conv{c[0]}d-{c[5]}")
@pytest.mark.parametrize("seed", range(2))
def test_perturbed_conv_per_member_matches_dense(case, rank, seed, dense):
    g, N, W, b, A, B = _conv_setup(case, rank, seed)
    x = torch.randn(N, 2, case[1], *case[4], generator=g, dtype=torch.float64)
    y = perturbed_conv(x, W, b, A, B, **case[5])
    ref = dense.conv(x, W, b, A, B, **case[5])
    assert y.shape == ref.shape and y.shape[:3] == (N, 2, case[2])
    torch.testing.assert_close(y, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("rank", [2, 8])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"conv{c[0]}d-{c[5]}")
def test_perturbed_conv_shared_expanded_per_member_agree(case, rank, dense):
    g, N, W, b, A, B = _conv_setup(case, rank, seed=7)
    x = torch.randn(3, case[1], *case[4], generator=g, dtype=torch.float64)  # Bt=3 != N
    shared = perturbed_conv(x, W, b, A, B, **case[5])
    expanded = perturbed_conv(x.expand(N, *x.shape), W, b, A, B, **case[5])
    per_member = perturbed_conv(x.expand(N, *x.shape).contiguous(), W, b, A, B, **case[5])
    torch.testing.assert_close(shared, dense.conv(x, W, b, A, B, **case[5]), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(expanded, shared, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_member, shared, rtol=1e-11, atol=1e-11)


def test_perturbed_conv_float32_no_bias(dense):
    case = CONV_CASES[4]
    g, N, W, _, A, B = _conv_setup(case, 4, seed=3, dtype=torch.float32)
    x = torch.randn(N, 2, case[1], *case[4], generator=g)
    y = perturbed_conv(x, W, None, A, B, **case[5])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), dense.conv(x, W, None, A, B, **case[5]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradient


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("seed", SEEDS)
def test_es_gradient_matches_explicit_sum(seed, rank, dense):
    g = torch.Generator().manual_seed(seed)
    N, m, n = _shapes(seed)
    A, B = dense.factors(N, m, n, rank, g, torch.float64)
    f = torch.randn(N, generator=g, dtype=torch.float64)
    torch.testing.assert_close(es_gradient(f, (A, B)), dense.gradient(f, A, B), rtol=1e-12, atol=1e-12)
    # an explicit population_size only changes the 1/sqrt(N) normalisation
    torch.testing.assert_close(es_gradient(f, (A, B), 4 * N), dense.gradient(f, A, B) / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("seed", SEEDS)
def test_es_gradient_over_pairs_matches_explicit_sum_and_chunks_add_up(seed, rank, dense):
    """``Pairs`` take the sum over pairs; the estimate of the whole population is the sum of its
    chunks' estimates (each with the population's ``1/sqrt(N)``), as ``Population.gradients`` adds them."""
    g = torch.Generator().manual_seed(seed)
    N, m, n = _shapes(seed)
    A, B = draw_pair_factors(N // 2, m, n, rank, g, torch.float64)
    pairs = antithetic_pairs(A, B, 0.3, rank)
    f = torch.randn(N, generator=g, dtype=torch.float64)
    torch.testing.assert_close(es_gradient(f, pairs), dense.gradient(f, *pairs), rtol=1e-12, atol=1e-12)
    chunks = [antithetic_pairs(A[k:k + 1], B[k:k + 1], 0.3, rank) for k in range(N // 2)]  # one pair each
    total = sum(es_gradient(f[2 * k:2 * k + 2], chunk, N) for k, chunk in enumerate(chunks))
    torch.testing.assert_close(total, es_gradient(f, pairs), rtol=1e-12, atol=1e-12)


def test_es_gradient_of_fullrank_noise_is_the_scaled_sum():
    g = torch.Generator().manual_seed(3)
    f, noise = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, 4, 2, generator=g, dtype=torch.float64)
    expected = sum(f[i] * noise[i] for i in range(6)) / math.sqrt(6)
    torch.testing.assert_close(es_gradient(f, noise), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(es_gradient(f, noise, 24), expected / 2, rtol=1e-14, atol=1e-14)


def test_es_gradient_antithetic_pair_with_equal_fitness_cancels(dense):
    A, B = dense.factors(6, 4, 5, 2, torch.Generator().manual_seed(0), torch.float64)
    f = torch.tensor([1.0, 1.0, -2.0, -2.0, 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(es_gradient(f, (A, B)), torch.zeros(4, 5, dtype=torch.float64), rtol=0, atol=1e-14)
    pairs = antithetic_pairs(*draw_pair_factors(3, 4, 5, 2, torch.Generator().manual_seed(0), torch.float64), 0.5, 2)
    torch.testing.assert_close(es_gradient(f, pairs), torch.zeros(4, 5, dtype=torch.float64), rtol=0, atol=0)


def test_fullrank_gradient_sum_is_explicit_sum():
    g = torch.Generator().manual_seed(0)
    f, noise = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fullrank_gradient_sum(f, noise), sum(f[i] * noise[i] for i in range(6)))
    out = fullrank_gradient_sum(f.float(), noise.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), torch.tensordot(f.float().double(), noise.bfloat16().double(), 1))


# ---------------------------------------------------------------- errors


def _linear_parts(N=4, m=3, n=5, r=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, m, r, generator=g), torch.randn(N, n, r, generator=g), torch.randn(m, n), torch.randn(N, n)


@pytest.mark.parametrize(
    "A_shape, B_shape, bad",
    [((4, 4, 2), (4, 5, 2), "(4, 4, 2)"), ((4, 3, 2), (4, 6, 2), "(4, 6, 2)"),
     ((4, 3, 2), (2, 5, 2), "(2, 5, 2)"), ((4, 3, 2), (4, 5, 3), "(4, 5, 3)"), ((3, 2), (4, 5, 2), "(3, 2)")],
)
def test_linear_mismatched_factor_shapes_raise(A_shape, B_shape, bad):
    _, _, W, x = _linear_parts()
    A, B = torch.randn(A_shape), torch.randn(B_shape)
    with pytest.raises(ValueError, match=re.escape(bad)):
        perturbed_linear(x, W, None, A, B)
    if len(A_shape) == 3 and A_shape[1] == 3:  # the delta alone has no weight: B or x is named
        with pytest.raises(ValueError, match=f"{re.escape(bad)}|{re.escape(str(tuple(x.shape)))}"):
            lowrank_linear_delta(x, B, A)


def test_input_features_mismatch_raises():
    A, B, W, _ = _linear_parts()
    with pytest.raises(ValueError, match=r"in_features=5.*\(4, 7\)"):
        perturbed_linear(torch.randn(4, 7), W, None, A, B)
    with pytest.raises(ValueError, match=r"\(2, 7\)"):
        lowrank_linear_delta(torch.randn(2, 7), B, A)
    _, N, Wc, b, Ac, Bc = _conv_setup(CONV_CASES[3], 2, seed=0)  # C_in = 3
    with pytest.raises(ValueError, match=r"channels.*\(2, 4, 6, 7\)"):
        perturbed_conv(torch.randn(2, 4, 6, 7, dtype=torch.float64), Wc, b, Ac, Bc)


def test_linear_weight_not_2d_raises():
    A, B, _, x = _linear_parts()
    with pytest.raises(ValueError, match=r"\(3, 5, 1\)"):
        perturbed_linear(x, torch.randn(3, 5, 1), None, A, B)


def test_factors_on_different_devices_raise():
    A, B, W, x = _linear_parts()
    with pytest.raises(ValueError, match="different devices.*meta"):
        perturbed_linear(x, W, None, A.to("meta"), B)
    with pytest.raises(ValueError, match="different devices"):
        perturbed_linear(x.to("meta"), W, None, A, B)
    with pytest.raises(ValueError, match="different devices"):
        perturbed_conv(torch.randn(2, 1, 4, 4), torch.randn(3, 1, 2, 2), None, A[:, :, :1], B[:, :4, :1].to("meta"))


def test_conv_mismatched_factors_and_wrong_leading_dim_raise():
    g, N, W, b, A, B = _conv_setup(CONV_CASES[3], 2, seed=0)  # N = 2, C_in = 3
    with pytest.raises(ValueError, match=r"\(2, 28, 2\)"):  # B built for a wrong kernel size
        perturbed_conv(torch.randn(1, 3, 6, 7, dtype=torch.float64), W, b, A, torch.randn(2, 28, 2))
    x_bad = torch.randn(N + 1, 2, 3, 6, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(3, 2, 3, 6, 7\)"):
        perturbed_conv(x_bad, W, b, A, B, padding=1)
    with pytest.raises(ValueError, match=r"\(3, 2, 3, 6, 7\)"):
        perturbed_conv(x_bad, W, b, A, B, padding=1, shared=False)
    with pytest.raises(ValueError, match="groups=4"):
        perturbed_conv(torch.randn(1, 3, 6, 7), W, b, A, B, groups=4)
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        perturbed_conv(torch.randn(1, 3, 6), torch.randn(5, 3), None, A, B)


def test_es_gradient_wrong_fitness_shape_raises():
    A, B, _, _ = _linear_parts()
    with pytest.raises(ValueError, match=r"\(4,\).*\(5,\)"):
        es_gradient(torch.zeros(5), (A, B))
    pairs = antithetic_pairs(*draw_pair_factors(2, 3, 5, 2, torch.Generator().manual_seed(0)), 0.1, 2)
    with pytest.raises(ValueError, match=r"\(4,\).*\(6,\)"):
        es_gradient(torch.zeros(6), pairs)
    with pytest.raises(ValueError, match=r"\(4,\).*\(2,\)"):
        es_gradient(torch.zeros(2), torch.zeros(4, 3))


def test_split_shared_rules():
    x = torch.randn(4, 3)
    assert split_shared(x, 4, 1) == (x, False)
    assert split_shared(x, 2, 1)[1] is True  # leading dim 4 != N: a shared batch
    base = torch.randn(3)
    out, shared = split_shared(base.expand(4, 3), 4, 1)
    assert shared and out.shape == (3,) and torch.equal(out, base)
    out, shared = split_shared(base.expand(4, 3), 4, 1, shared=True)
    assert shared and out.shape == (3,)
    with pytest.raises(ValueError, match=r"N=2.*\(4, 3\)"):
        split_shared(x, 2, 1, shared=False)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        split_shared(x, 4, 3)


@pytest.mark.cuda
def test_kernels_on_cuda_match_cpu(dense):  # CPU twin: the dense-reference tests above
    case = CONV_CASES[4]
    _, N, W, b, A, B = _conv_setup(case, 3, seed=1, dtype=torch.float64)
    x = torch.randn(N, 2, case[1], *case[4], dtype=torch.float64)
    cuda = [t.cuda() for t in (x, W, b, A, B)]
    torch.testing.assert_close(perturbed_conv(*cuda, **case[5]).cpu(), dense.conv(x, W, b, A, B, **case[5]))
    xl, Wl = torch.randn(N, 3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    Al, Bl = _factors(N, 4, 5, 2, torch.Generator().manual_seed(0), torch.float64)
    out = perturbed_linear(xl.cuda(), Wl.cuda(), None, Al.cuda(), Bl.cuda())
    torch.testing.assert_close(out.cpu(), dense.linear(xl, Wl, None, Al, Bl))
    f = torch.randn(N, dtype=torch.float64)
    torch.testing.assert_close(es_gradient(f.cuda(), (Al.cuda(), Bl.cuda())).cpu(), dense.gradient(f, Al, Bl))

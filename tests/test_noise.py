"""Antithetic layout, scaling, rank, and keyed (regenerable) noise."""
from __future__ import annotations

import math

import pytest
import torch

from eggroll_optim.core import generate_lowrank_perturbations
from eggroll_optim.kernels import perturbed_linear
from eggroll_optim.noise import antithetic, draw_pair_factors, keyed_pair_factors, noise_dtype, noise_key

CASES = [  # (N, m, n, rank, sigma)
    (2, 3, 5, 1, 0.1), (4, 4, 4, 2, 0.5), (6, 2, 7, 4, 0.05), (8, 6, 3, 8, 1.3), (4, 1, 1, 3, 0.2), (10, 9, 8, 5, 0.01),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("N, m, n, rank, sigma", CASES)
def test_antithetic_layout_and_scaling(N, m, n, rank, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    A_scaled, A_signed, B = generate_lowrank_perturbations(N, m, n, rank, sigma, g, torch.float64)
    assert A_scaled.shape == A_signed.shape == (N, m, rank) and B.shape == (N, n, rank)
    assert torch.equal(A_scaled[0::2], -A_scaled[1::2])
    assert torch.equal(A_signed[0::2], -A_signed[1::2])
    assert torch.equal(B[0::2], B[1::2])
    torch.testing.assert_close(A_scaled, A_signed * (sigma / math.sqrt(rank)), rtol=1e-15, atol=0)
    # distinct pairs are distinct draws
    if N >= 4:
        assert not torch.equal(B[0], B[2]) and not torch.equal(A_signed[0], A_signed[2])


@pytest.mark.parametrize("N, m, n, rank, sigma", CASES)
def test_each_perturbation_has_rank_min_r_m_n(N, m, n, rank, sigma):
    g = torch.Generator().manual_seed(N * 100 + rank)
    A_scaled, _, B = generate_lowrank_perturbations(N, m, n, rank, sigma, g, torch.float64)
    E = torch.einsum("nir,njr->nij", A_scaled, B)
    ranks = torch.linalg.matrix_rank(E)
    assert ranks.tolist() == [min(rank, m, n)] * N


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("N, m, n, rank, sigma", CASES)
def test_pair_mean_output_equals_base_output(N, m, n, rank, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    A_scaled, _, B = generate_lowrank_perturbations(N, m, n, rank, sigma, g, torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    y = perturbed_linear(x, W, b, A_scaled, B)  # (N, 3, m)
    base = x @ W.T + b
    pair_mean = (y[0::2] + y[1::2]) / 2
    torch.testing.assert_close(pair_mean, base.expand_as(pair_mean), rtol=0, atol=1e-13)
    torch.testing.assert_close(y.mean(0), base, rtol=0, atol=1e-13)
    # and the members really differ from the base (sigma is not ignored)
    assert (y[0] - base).abs().max() > 1e-3 * sigma


def test_generator_draw_order_and_determinism():
    A_scaled, A_signed, B = generate_lowrank_perturbations(6, 3, 4, 2, 0.1, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    A_ref = torch.randn(3, 3, 2, generator=g)
    B_ref = torch.randn(3, 4, 2, generator=g)
    assert torch.equal(A_signed[0::2], A_ref) and torch.equal(B[0::2], B_ref)
    again = generate_lowrank_perturbations(6, 3, 4, 2, 0.1, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip((A_scaled, A_signed, B), again))


def test_antithetic_interleaves_given_factors():
    A, B = torch.randn(2, 3, 1), torch.randn(2, 4, 1)
    A_scaled, A_signed, B_pop = antithetic(A, B, sigma=2.0, rank=4)
    assert torch.equal(A_signed, torch.stack([A[0], -A[0], A[1], -A[1]]))
    assert torch.equal(B_pop, torch.stack([B[0], B[0], B[1], B[1]]))
    torch.testing.assert_close(A_scaled, A_signed * 1.0)  # 2 / sqrt(4) = 1


def test_draw_pair_factors_are_standard_normal():
    A, B = draw_pair_factors(64, 50, 40, 4, torch.Generator().manual_seed(0), torch.float64)
    assert A.shape == (64, 50, 4) and B.shape == (64, 40, 4) and A.device.type == "cpu"
    for t in (A, B):  # within 5 standard errors
        assert abs(t.mean().item()) < 5 / t.numel() ** 0.5 and abs(t.std().item() - 1) < 5 / t.numel() ** 0.5


# ---------------------------------------------------------------- keyed noise


def _keyed(key, start, stop, block_pairs=4, m=3, n=5, r=2, dtype=torch.float32):
    return keyed_pair_factors(key, m, n, r, start, stop, device="cpu", dtype=dtype, block_pairs=block_pairs)


def test_keyed_same_key_is_bitwise_identical():
    key = noise_key(42, 7, 3)
    A1, B1 = _keyed(key, 0, 11)
    A2, B2 = _keyed(noise_key(42, 7, 3), 0, 11)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert A1.shape == (11, 3, 2) and B1.shape == (11, 5, 2)


@pytest.mark.parametrize("block_pairs", [1, 3, 4, 256])
@pytest.mark.parametrize("start, stop", [(0, 1), (2, 5), (3, 4), (3, 9), (4, 8), (5, 17), (11, 12), (0, 17)])
def test_keyed_slice_equals_slice_of_full_range(start, stop, block_pairs):
    key = noise_key(1, 2, 3)
    A_full, B_full = _keyed(key, 0, 17, block_pairs)
    A, B = _keyed(key, start, stop, block_pairs)
    assert torch.equal(A, A_full[start:stop]) and torch.equal(B, B_full[start:stop])


def test_keyed_chunks_concatenate_to_full_range():
    key = noise_key(9, 0, 0)
    A_full, B_full = _keyed(key, 0, 20, block_pairs=6, dtype=torch.float64)
    bounds = [0, 1, 5, 6, 13, 20]
    chunks = [_keyed(key, a, b, block_pairs=6, dtype=torch.float64) for a, b in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat([c[0] for c in chunks]), A_full)
    assert torch.equal(torch.cat([c[1] for c in chunks]), B_full)


def test_keyed_different_keys_give_different_noise():
    base_A, base_B = _keyed(noise_key(0, 0, 0), 0, 6)
    for parts in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:  # seed, step, param
        A, B = _keyed(noise_key(*parts), 0, 6)
        assert not torch.allclose(A, base_A) and not torch.allclose(B, base_B)
    # pairs within one block, and blocks, are different draws too
    A, _ = _keyed(noise_key(0, 0, 0), 0, 8, block_pairs=4)
    assert not torch.allclose(A[0], A[1]) and not torch.allclose(A[0], A[4])


def test_keyed_factors_are_standard_normal():
    A, B = keyed_pair_factors(noise_key(3), 40, 30, 4, 0, 300, device="cpu", dtype=torch.float64, block_pairs=64)
    for t in (A, B):  # within 5 standard errors
        assert abs(t.mean().item()) < 5 / t.numel() ** 0.5 and abs(t.std().item() - 1) < 5 / t.numel() ** 0.5


def test_keyed_invalid_range_raises():
    for start, stop in [(3, 3), (5, 2), (-1, 2)]:
        with pytest.raises(ValueError, match=rf"\[{start}, {stop}\)"):
            _keyed(1, start, stop)
    with pytest.raises(ValueError, match="block_pairs: 0"):
        _keyed(1, 0, 2, block_pairs=0)


def test_noise_key_is_splitmix64_and_deterministic():
    # splitmix64's first output from state 0 is 0xE220A8397B1DCDAF (Steele et al.)
    assert noise_key(0) == 0xE220A8397B1DCDAF >> 1
    assert noise_key(42, 7, 3) == noise_key(42, 7, 3)
    keys = {noise_key(s, t, p) for s in range(4) for t in range(4) for p in range(4)}
    assert len(keys) == 64 and all(0 <= k < 2**63 for k in keys)
    assert noise_key(1, 2) != noise_key(2, 1)
    assert noise_key(-1) == noise_key(2**64 - 1)  # parts are taken modulo 2**64


def test_noise_dtype():
    assert noise_dtype(torch.bfloat16) == torch.float32 and noise_dtype(torch.float16) == torch.float32
    assert noise_dtype(torch.float64) == torch.float64 and noise_dtype(torch.float32) == torch.float32


def test_block_cache_serves_consecutive_slices_with_the_same_numbers():
    from eggroll_optim.noise import keyed_pair_normals

    shapes, cache, draws = [(3, 2), (5, 2)], {}, []
    for start in range(0, 12, 2):  # six 2-pair slices of two 8-pair blocks
        cached = keyed_pair_normals(7, shapes, start, start + 2, device="cpu", block_pairs=8, cache=cache)
        fresh = keyed_pair_normals(7, shapes, start, start + 2, device="cpu", block_pairs=8)
        assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
        draws.append(cache[7][0])
    assert draws == [0, 0, 0, 0, 1, 1] and len(cache) == 1  # one block held per key, reused while it lasts


def test_antithetic_pairs_is_antithetic_without_the_signed_copy():
    from eggroll_optim.noise import antithetic, antithetic_pairs

    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(3, 5, 2, generator=g), torch.randn(3, 7, 2, generator=g)
    A_scaled, A_signed, B_pop = antithetic(A, B, 0.3, 2)
    A2, B2 = antithetic_pairs(A, B, 0.3, 2)
    assert torch.equal(A2, A_scaled) and torch.equal(B2, B_pop)
    assert torch.equal(A_signed[1::2], -A) and torch.equal(B_pop[0::2], B) and torch.equal(B_pop[1::2], B)


# ---------------------------------------------------------------- Pairs, the value


def test_pairs_is_the_seed_tuple_with_its_pair_structure():
    from eggroll_optim.noise import Pairs, antithetic_pairs

    g = torch.Generator().manual_seed(6)
    A = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    B = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    pairs = antithetic_pairs(A, B, 0.8, 2)
    A_scaled, B_pop = pairs
    assert isinstance(pairs, tuple) and len(pairs) == 2 and pairs[0] is A_scaled and pairs[1] is B_pop
    assert pairs.A_scaled is A_scaled and pairs.B is B_pop and pairs.num_pairs == 3
    assert pairs.scale == 0.8 / math.sqrt(2)
    assert torch.equal(pairs.A_pair, A * pairs.scale) and torch.equal(A_scaled[1::2], -pairs.A_pair)
    assert torch.equal(pairs.B_pair, B.permute(1, 0, 2)) and pairs.B_pair.is_contiguous()
    assert repr(pairs) == "Pairs(N=6, m=4, n=5, rank=2, scale=0.565685, dtype=torch.float64)"
    with pytest.raises(ValueError, match=r"even N.*\(5, 4, 2\)"):
        Pairs(A_scaled[:5], B_pop[:5], pairs.B_pair, 0.1)
    with pytest.raises(ValueError, match=r"B_pair \(5, 3, 2\).*\(5, 2, 2\)"):
        Pairs(A_scaled, B_pop, pairs.B_pair[:, :2], 0.1)


def test_pairs_as_a_pytree_are_their_member_tensors():
    """vmap over members hands each member a plain ``(A_i, B_i)``; copies and pickles keep the type."""
    import copy
    import io

    from torch.utils import _pytree as pytree

    from eggroll_optim.noise import Pairs, antithetic_pairs

    pairs = antithetic_pairs(torch.randn(2, 3, 2), torch.randn(2, 4, 2), 0.5, 2)
    leaves, spec = pytree.tree_flatten({"w": pairs})
    assert len(leaves) == 2 and leaves[0] is pairs.A_scaled and leaves[1] is pairs.B
    assert type(pytree.tree_unflatten(leaves, spec)["w"]) is tuple  # rebuilt from members alone: no pairs
    seen = []
    out = torch.vmap(lambda f: seen.append(type(f)) or f[0].sum(0) @ f[1].sum(0))(pairs)  # (r,) @ (r,) per member
    assert seen == [tuple] and out.shape == (4,)
    torch.testing.assert_close(out, torch.stack([a.sum(0) @ b.sum(0) for a, b in zip(*pairs)]))
    buffer = io.BytesIO()
    torch.save({"w": pairs}, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(pairs), torch.load(buffer, weights_only=False)["w"]):
        assert type(other) is Pairs and other.scale == pairs.scale
        assert all(torch.equal(a, b) for a, b in zip((*other, other.A_pair, other.B_pair),
                                                       (*pairs, pairs.A_pair, pairs.B_pair)))


def test_population_noise_hands_out_pairs_of_the_keyed_draws():
    """``PopulationNoise.chunk_noise``: ``Pairs`` for low-rank parameters, the keyed draws in them; a zero row
    (an embedding's ``padding_idx``) is zero for every member and in the pair structure too."""
    from eggroll_optim.noise import Pairs, keyed_pair_normals
    from eggroll_optim.population import PopulationNoise

    weight = torch.zeros(5, 3)
    noise = PopulationNoise([(weight, (1, 0, 0), 0.5, 2, True, 2)], block_pairs=4)
    for _ in range(2):  # the second call reads the cached block
        pairs = noise.chunk_noise(0, 6, reuse_blocks=True)[weight]
        assert isinstance(pairs, Pairs) and pairs.num_pairs == 3
        assert (pairs.A_scaled[:, 2] == 0).all() and (pairs.A_pair[:, 2] == 0).all() and pairs.A_scaled.abs().sum() > 0
    A, _ = keyed_pair_normals(noise_key(1, 0, 0), [(5, 2), (3, 2)], 0, 3, device="cpu", block_pairs=4)
    assert torch.equal(pairs.A_pair[:, :2], A[:, :2] * pairs.scale)

"""One input row per member: the rows kernels (stored and counter noise) against float64 dense references.

On CPU the Triton kernels run under the interpreter in a subprocess (the interpreter is chosen when
triton is imported); on CUDA they run compiled (marked ``cuda``).
"""
import math

import pytest
import torch

from interpreted import run_interpreted

from eggroll_optim.kernels.fast.counter import counter_normals, counter_pair_factors, pair_stride
from eggroll_optim.kernels.fast.counter_linear import launch_counter_rows, perturbed_linear_counter
from eggroll_optim.kernels.fast.rows import fused_rows_available, rows_lowrank_delta

# from (4, 2100, 2050, 1) on: partial and whole blocks (2048 / rank rows) of the counter kernels, at
# every power-of-two rank, and (2, 1300, 129, 16): projections in chunks of two blocks
CASES = [(6, 37, 19, 1), (4, 64, 40, 4), (8, 33, 70, 2), (2, 5, 3, 3), (10, 300, 129, 16), (4, 2100, 2050, 1),
         (2, 700, 260, 8), (4, 4096, 2048, 1), (2, 1024, 512, 4), (2, 1024, 1024, 2), (2, 512, 256, 8),
         (2, 256, 128, 16), (2, 1300, 129, 16)]
SEEDS = {3: -5, 7: 2**63 + 7}  # keys mod 2^64, both ways; the other cases use 2^40 + 977 i
PINNED = [0.5711340308189392, 1.207757830619812, -0.08898027241230011, -0.5871822237968445]  # seed 0: 0, 1, 2, 256


def dense_counter(x, W, b, seed, sigma, rank):
    """float64: materialise W + s_i sigma/sqrt(r) A_p B_pᵀ per member from the twin's factors."""
    N = x.shape[0]
    A, B = counter_pair_factors(seed, 0, N // 2, W.shape[0], W.shape[1], rank)
    A, B, x, W = A.double(), B.double(), x.double().cpu(), W.double().cpu()
    rows = []
    for i in range(N):
        sign = 1.0 if i % 2 == 0 else -1.0
        E = sign * sigma / math.sqrt(rank) * A[i // 2] @ B[i // 2].T
        rows.append(x[i] @ (W + E).T + (0.0 if b is None else b.double().cpu()))
    return torch.stack(rows)


def rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


def check_all(device="cpu", dtype=torch.float32, tol=5e-6, cases=range(len(CASES)), accumulate=(False, True),
              chunks=(1, 3, 100)):
    """The counter kernels (two launches with each ``accumulate``, one launch, two launches with the
    projections in ``chunks`` parts) and the stored kernel on ``CASES[cases]``, against float64."""
    g = torch.Generator().manual_seed(11)
    for i, (N, D, O, R) in enumerate(CASES):
        if i not in cases:
            continue
        x = torch.randn(N, D, generator=g).to(device, dtype)
        W = (torch.randn(O, D, generator=g) / math.sqrt(D)).to(device, dtype)
        b = torch.randn(O, generator=g).to(device, dtype) if i % 2 else None
        seed = SEEDS.get(i, 2**40 + 977 * i)
        ref = dense_counter(x, W, b, seed, 0.7, R)
        for acc in accumulate:
            err = rel(perturbed_linear_counter(x, W, b, seed, 0.7, R, accumulate=acc), ref)
            assert err < tol, ("counter", N, D, O, R, acc, err)
        if fused_rows_available(x) and R & (R - 1) == 0 and R <= 16:
            out = x @ W.T  # the one-launch mode (a program per pair) of the same kernel
            launch_counter_rows(x, b, out, seed, 0.7 / math.sqrt(R), R, True, split=False)
            assert rel(out, ref) < tol, ("counter, one launch", N, D, O, R)
            for parts in chunks:  # projections in other chunks, the term written without accumulating
                out = torch.full((N, O), float("nan"), device=device, dtype=dtype)
                launch_counter_rows(x, b, out, seed, 0.7 / math.sqrt(R), R, False, parts=parts)
                assert rel(out + x @ W.T, ref) < tol, ("counter, parts", parts, N, D, O, R)
        A = torch.randn(N, O, R, generator=g).to(device, dtype)
        B = torch.randn(N, D, R, generator=g).to(device, dtype)
        ref = torch.einsum("nr,nor->no", torch.einsum("nd,ndr->nr", x.double().cpu(), B.double().cpu()),
                           A.double().cpu())
        ref = ref + (0.0 if b is None else b.double().cpu())
        assert rel(rows_lowrank_delta(x, A, B, b), ref) < tol, ("stored", N, D, O, R)
        B_major = B.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # noise.antithetic's layout
        assert rel(rows_lowrank_delta(x, A, B_major, b), ref) < tol, ("stored, feature-major B", N, D, O, R)
        base = torch.randn(N, O, generator=g).to(device, dtype)
        assert rel(rows_lowrank_delta(x, A, B, b, out=base.clone()), ref + base.double().cpu()) < tol


def check_linear_rows():
    """``perturbed_linear`` with one row per member (the rows-kernel route on CUDA / interpreted)
    against materialised ``W + A_i B_iᵀ`` in float64; strided bias and ``out``; autograd falls back."""
    from eggroll_optim.kernels import perturbed_linear

    g = torch.Generator().manual_seed(21)
    N, D, O, R = 6, 37, 19, 3
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)):
        x = torch.randn(N, 1, D, generator=g)
        W = torch.randn(O, D, generator=g) / D ** 0.5
        big = torch.randn(O, 3, generator=g)
        bias = big[:, 1]  # a strided bias
        A, B = torch.randn(N, O, R, generator=g) * 0.3, torch.randn(N, D, R, generator=g)
        dense = torch.stack([x[i, 0].double() @ (W.double() + A[i].double() @ B[i].double().T).T
                             for i in range(N)]) + bias.double()
        for xin in (x, x[:, 0]):  # (N, 1, D) and (N, D)
            y = perturbed_linear(xin.to(dtype), W.to(dtype), bias.to(dtype), A.to(dtype), B.to(dtype), shared=False)
            assert rel(y.reshape(N, O), dense) < tol, (dtype, tuple(xin.shape))
    x32, A32, B32 = x[:, 0].float(), A.float(), B.float()
    base = torch.randn(O, N, generator=g).t()  # a transposed out: the kernel cannot write it, torch does
    expected = base.double() + torch.einsum("nd,ndr,nor->no", x32.double(), B32.double(), A32.double())
    assert rel(rows_lowrank_delta(x32, A32, B32, out=base), expected) < 1e-5
    xg = x[:, 0].float().clone().requires_grad_()
    y = perturbed_linear(xg, W.float(), bias.float(), A32, B32, shared=False)
    y.square().sum().backward()
    xr = x[:, 0].double().clone().requires_grad_()
    Wi = W.double() + torch.einsum("nor,ndr->nod", A.double(), B.double())
    (torch.einsum("nd,nod->no", xr, Wi) + bias.double()).square().sum().backward()
    assert rel(xg.grad, xr.grad) < 1e-5  # the in-place kernel would have hidden the low-rank term from autograd
    try:
        rows_lowrank_delta(x32, A32[:-1], B32)
    except ValueError:
        pass
    else:
        raise AssertionError("a population mismatch must raise")


def test_linear_rows_route_on_cpu():
    check_linear_rows()


def test_counter_twin_matches_dense_on_cpu():
    check_all()


def test_counter_normals_are_standard_normal_and_sliceable():
    z = counter_normals(123, 0, 200_000)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1.0) < 0.01
    assert abs((z.abs() < 1.0).float().mean().item() - 0.6827) < 0.01  # the normal's 1-sigma mass
    assert z.abs().max().item() < 4.86  # 16-bit uniforms: |z| <= sqrt(2 ln 2^17)
    assert abs((z.abs() < 2.0).float().mean().item() - 0.9545) < 0.005
    assert abs((z**4).mean().item() - 3.0) < 0.1  # kurtosis
    torch.testing.assert_close(counter_normals(123, 1001, 37), z[1001:1038], rtol=0, atol=0)
    torch.testing.assert_close(counter_normals(123, 2040, 3000), z[2040:5040], rtol=0, atol=0)  # across blocks
    assert not torch.equal(counter_normals(124, 0, 64), z[:64])  # another key, other numbers


def test_counter_pair_factors_depend_only_on_the_pair():
    A, B = counter_pair_factors(5, 0, 8, 7, 9, 3)
    A2, B2 = counter_pair_factors(5, 3, 6, 7, 9, 3)
    assert A.shape == (8, 7, 3) and B.shape == (8, 9, 3)
    assert torch.equal(A[3:6], A2) and torch.equal(B[3:6], B2)
    L = pair_stride(7, 9, 3)
    assert L % 2048 == 0 and L >= 7 * 3 + 9 * 3
    assert not torch.allclose(A[0], A[1])


def test_counter_rejects_odd_population():
    with pytest.raises(ValueError, match="even"):
        perturbed_linear_counter(torch.randn(3, 4), torch.randn(2, 4), None, 0, 0.1, 1)


def test_philox_twin_matches_triton_in_interpreter():
    run_interpreted(
        """
        import torch, triton, triton.language as tl
        from eggroll_optim.kernels.fast.counter import _philox4x32
        from test_rows import check_all

        @triton.jit
        def words(o0, o1, o2, o3, seed, start, ROUNDS: tl.constexpr):
            q = start + tl.arange(0, 64).to(tl.int64)
            a, b, c, d = tl.randint4x(seed, q, ROUNDS)
            i = tl.arange(0, 64)
            tl.store(o0 + i, a.to(tl.int64)); tl.store(o1 + i, b.to(tl.int64))
            tl.store(o2 + i, c.to(tl.int64)); tl.store(o3 + i, d.to(tl.int64))

        for seed, start, rounds in ((7, 0, 7), (2**62 + 12345, 2**33 - 5, 7), (3, 11, 10)):
            out = [torch.zeros(64, dtype=torch.int64) for _ in range(4)]
            words[(1,)](*out, seed, start, rounds)
            twin = _philox4x32(torch.arange(start, start + 64), seed, rounds)
            for a, b in zip(out, twin):
                assert torch.equal(a & 0xFFFFFFFF, b), (seed, start)
        check_all()
        from test_rows import check_linear_rows
        check_linear_rows()
        """
    )


def test_counter_normals_follow_their_definition():
    """Values rebuilt from Philox words by the formula in ``rows``' docstring (lane-major blocks of
    2048, 16-bit uniforms u = low half, v = high half, lane 2k = r cos t, 2k + 1 = r sin t), and a few
    pinned values, so the stream cannot change unnoticed."""
    from eggroll_optim.kernels.fast.counter import _philox4x32

    seed = 2**40 + 3
    for e in (0, 1, 255, 256, 257, 1000, 2047, 2048, 2048 * 5 + 1799):
        block, t = divmod(e, 2048)
        lane, counter = t // 256, 256 * block + t % 256
        word = int(_philox4x32(torch.tensor([counter]), seed, 7)[lane // 2])
        u, v = ((word & 0xFFFF) + 0.5) / 65536, ((word >> 16) + 0.5) / 65536
        r, angle = math.sqrt(-2 * math.log(u)), 2 * math.pi * v - math.pi
        want = r * (math.cos(angle) if lane % 2 == 0 else math.sin(angle))
        assert abs(counter_normals(seed, e, 1).item() - want) < 1e-5, e
    pinned = counter_normals(0, 0, 3).tolist() + counter_normals(0, 256, 1).tolist()
    assert pinned == pytest.approx(PINNED, abs=1e-6), pinned


@pytest.mark.cuda
def test_rows_kernels_on_cuda():
    # each case compiles its own kernels (rank and block shapes are constexprs): on the GPU the cases that
    # differ in kind (a ragged block, a bias, keys mod 2^64, rank 16, a 4096-wide input); the interpreter
    # (test_philox_twin_matches_triton_in_interpreter) runs them all
    check_all("cuda", torch.float32, tol=1e-5, cases=(0, 1, 3, 4, 7))
    check_linear_rows_cuda()
    # bfloat16 changes the loads and stores, not the blocks: a partial block with a bias at rank 4, a whole one
    # at rank 1, each launch mode adding into bfloat16 (PHASE 0, 1, 2 with ACCUM); writing the term alone
    # (ACCUM off), projections in chunks (n_parts > 1) and case 0 (rank 1, partial, no bias) add compiles of
    # dtype-blind code (~1 s each), checked in float32 above
    check_all("cuda", torch.bfloat16, tol=1.5e-2, cases=(1, 7), accumulate=(True,), chunks=())


def test_counter_noise_steps_through_pairs():
    """The documented route to a gradient on the counter noise: its factors as ``Pairs``, into ``es_gradient``."""
    from eggroll_optim.kernels import es_gradient
    from eggroll_optim.noise import Pairs, antithetic_pairs

    N, D, O, R, sigma = 6, 9, 5, 2, 0.4
    pairs = antithetic_pairs(*counter_pair_factors(77, 0, N // 2, O, D, R), sigma, R)
    A, B = counter_pair_factors(77, 0, N // 2, O, D, R)
    f = torch.randn(N, generator=torch.Generator().manual_seed(2))
    signs = torch.tensor([1.0, -1.0] * (N // 2), dtype=torch.float64)
    expected = sum(f[i].double() * signs[i] * sigma / math.sqrt(R) * A[i // 2].double() @ B[i // 2].double().T
                   for i in range(N)) / math.sqrt(N)
    assert isinstance(pairs, Pairs)
    assert rel(es_gradient(f, pairs), expected) < 1e-5


@pytest.mark.cuda
def test_counter_kernels_with_and_without_pdl_eager_and_graphed():
    """The two-launch counter path (programmatic dependent launch on sm_90+) against PDL off, and
    replayed from a CUDA graph (PDL edges captured), on the microbenchmark's shape at rank 1 and a
    ragged one at rank 4: bit for bit the same output every way."""
    from eggroll_optim.kernels.fast import counter_linear

    key = torch.cuda.current_device()
    g = torch.Generator(device="cuda").manual_seed(3)
    for N, D, O, R, dtype in ((256, 8192, 4096, 1, torch.bfloat16), (6, 700, 300, 4, torch.float32)):
        x = torch.randn(N, D, device="cuda", generator=g).to(dtype)
        W = (torch.randn(O, D, device="cuda", generator=g) / math.sqrt(D)).to(dtype)
        outs = {}
        try:
            for pdl in (True, False):
                counter_linear._PDL[key] = pdl
                outs[pdl] = perturbed_linear_counter(x, W, None, 77, 0.3, R)
                static = torch.empty_like(outs[pdl])
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static.copy_(perturbed_linear_counter(x, W, None, 77, 0.3, R))
                for _ in range(3):
                    static.zero_()
                    graph.replay()
                    torch.testing.assert_close(static, outs[pdl], rtol=0, atol=0)
        finally:
            counter_linear._PDL.pop(key, None)
        torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
        ref = dense_counter(x.float()[:4], W.float(), None, 77, 0.3, R)  # the first two pairs, float64
        assert rel(outs[True][:4].float(), ref) < (1.5e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.cuda
def test_counter_normals_twin_on_cuda_matches_cpu():
    torch.testing.assert_close(counter_normals(99, 3, 5000, "cuda").cpu(), counter_normals(99, 3, 5000),
                               rtol=1e-5, atol=1e-5)


def check_linear_rows_cuda():
    """The rows route on CUDA against the CPU float64 result (TF32 off)."""
    from eggroll_optim.kernels import perturbed_linear

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        g = torch.Generator().manual_seed(5)
        N, D, O, R = 64, 300, 129, 4
        x, W, b = torch.randn(N, 1, D, generator=g), torch.randn(O, D, generator=g) / 17, torch.randn(O, generator=g)
        A, B = torch.randn(N, O, R, generator=g) * 0.1, torch.randn(N, D, R, generator=g)
        ref = perturbed_linear(*(t.double() for t in (x, W, b, A, B)), shared=False)
        out = perturbed_linear(*(t.cuda() for t in (x, W, b, A, B)), shared=False)
        assert rel(out, ref) < 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

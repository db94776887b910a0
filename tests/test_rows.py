"""One input row per member: the rows kernels (stored and counter noise) against float64 dense references.

On CPU the Triton kernels run under the interpreter in a subprocess (the interpreter is chosen when
triton is imported); on CUDA they run compiled (marked ``cuda``).
"""
import math

import pytest
import torch

from interpreted import run_interpreted

from eggroll_optim.kernels.fast.rows import (counter_normals, counter_pair_factors, fused_rows_available,
                                             launch_counter_rows, pair_stride, perturbed_linear_counter,
                                             rows_lowrank_delta)

# the last three: partial and whole blocks (2048 / rank rows) of the counter kernels
CASES = [(6, 37, 19, 1), (4, 64, 40, 4), (8, 33, 70, 2), (2, 5, 3, 3), (10, 300, 129, 16), (4, 2100, 2050, 1),
         (2, 700, 260, 8), (4, 4096, 2048, 1), (2, 1024, 512, 4)]


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


def check_all(device="cpu", dtype=torch.float32, tol=5e-6):
    g = torch.Generator().manual_seed(11)
    for i, (N, D, O, R) in enumerate(CASES):
        x = torch.randn(N, D, generator=g).to(device, dtype)
        W = (torch.randn(O, D, generator=g) / math.sqrt(D)).to(device, dtype)
        b = torch.randn(O, generator=g).to(device, dtype) if i % 2 else None
        seed = 2**40 + 977 * i
        ref = dense_counter(x, W, b, seed, 0.7, R)
        for accumulate in (False, True):
            err = rel(perturbed_linear_counter(x, W, b, seed, 0.7, R, accumulate=accumulate), ref)
            assert err < tol, ("counter", N, D, O, R, accumulate, err)
        if fused_rows_available(x) and R & (R - 1) == 0 and R <= 16:  # the one-launch mode (one program per pair) of the same kernel
            out = x @ W.T
            launch_counter_rows(x, b, out, seed, 0.7 / math.sqrt(R), R, True, split=False)
            assert rel(out, ref) < tol, ("counter, one launch", N, D, O, R)
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
        from eggroll_optim.kernels.fast.rows import _philox4x32
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


@pytest.mark.cuda
def test_rows_kernels_on_cuda():
    check_all("cuda", torch.float32, tol=1e-5)
    check_linear_rows_cuda()
    check_all("cuda", torch.bfloat16, tol=1.5e-2)


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

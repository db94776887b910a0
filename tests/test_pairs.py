"""The antithetic layout kernels (``kernels.fast.pairs``) against the torch ops they replace, bit for bit.

On CPU the kernel runs under Triton's interpreter (in a subprocess); on CUDA it runs compiled (marked ``cuda``).
"""

import pytest
import torch

from interpreted import run_interpreted

SHAPES = [(3, 5, 4), (17, 70, 3), (1, 1, 1), (40, 130, 8), (5, 9, 16)]


def torch_layout(B):
    P, n, r = B.shape
    return B.permute(1, 0, 2).unsqueeze(2).expand(n, P, 2, r).contiguous()


def check(device):
    from eggroll_optim.kernels.fast.pairs import (
        layout_kernels_available, pair_rows, pair_scaled_transpose, scaled_transpose, signed_pairs,
    )
    from eggroll_optim.noise import _pair_rows

    g = torch.Generator().manual_seed(0)
    half = [torch.bfloat16] if device == "cuda" else []  # Triton's interpreter: float32/float64 only
    for shape in SHAPES:
        for dtype in (torch.float32, torch.float64, *half):
            B = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
            assert layout_kernels_available(B)
            assert torch.equal(pair_rows(B), torch_layout(B)), (shape, dtype)
            both, one = pair_rows(B, half=True)  # the pair layout and, in the same pass, one row set per pair
            assert torch.equal(both, torch_layout(B)) and torch.equal(one, B.permute(1, 0, 2)), (shape, dtype)
            P, n, r = shape
            pop = _pair_rows(B)  # (2P, n, r), stored (n, 2P, r)
            assert pop.shape == (2 * P, n, r) and pop.permute(1, 0, 2).is_contiguous()
            assert torch.equal(pop[0::2], B) and torch.equal(pop[1::2], B)
        if not half:  # bfloat16 where the interpreter cannot run the kernel: torch's copy, the same layout
            B16 = torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)
            pop = _pair_rows(B16)
            assert pop.permute(1, 0, 2).is_contiguous() and torch.equal(pop[0::2], B16) and torch.equal(pop[1::2], B16)
    assert not layout_kernels_available(torch.randn(4, 3, 2, device=device).permute(1, 0, 2))  # not contiguous
    if device == "cpu":
        assert not layout_kernels_available(torch.randn(4, 3, 2).bfloat16())
    dtypes = [(torch.float32, torch.float32), (torch.float64, torch.float64)]
    if device == "cuda":  # Triton's interpreter has no bfloat16 arithmetic
        dtypes.append((torch.bfloat16, torch.float32))
    for shape in SHAPES:
        for dtype, acc in dtypes:
            A = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
            scale = 0.37
            expected = torch.stack((A, -A), dim=1).flatten(0, 1).mul_(scale)
            if dtype == torch.float64:
                with pytest.raises(ValueError, match="float64"):
                    signed_pairs(A, scale)
            else:
                assert torch.equal(signed_pairs(A, scale), expected), ("signed", shape, dtype)
            f = torch.randn(shape[0], generator=g, dtype=torch.float64).to(device)
            expected = (A.to(acc) * f.to(acc)[:, None, None]).permute(1, 0, 2).contiguous()
            got = scaled_transpose(A, f, acc)
            assert got.dtype == acc and torch.equal(got, expected), ("transpose", shape, dtype)
            wide = torch.randn(shape[0], 2, *shape[1:], generator=g).to(device=device, dtype=dtype)
            got = scaled_transpose(wide[:, 0], f, acc)  # every other row of a bigger tensor, read by strides
            expected = (wide[:, 0].to(acc) * f.to(acc)[:, None, None]).permute(1, 0, 2).contiguous()
            assert torch.equal(got, expected), ("strided transpose", shape, dtype)
            f2 = torch.randn(2 * shape[0], generator=g, dtype=torch.float64).to(device)
            diff = f2.to(acc)[0::2] - f2.to(acc)[1::2]
            got = pair_scaled_transpose(wide[:, 0], f2, acc)  # a pair's fitness difference, taken in the kernel
            expected = (wide[:, 0].to(acc) * diff[:, None, None]).permute(1, 0, 2).contiguous()
            assert torch.equal(got, expected), ("pair transpose", shape, dtype)


def test_kernel_in_triton_interpreter():
    pytest.importorskip("triton")
    run_interpreted(
        """
        from test_pairs import check
        check("cpu")
        """
    )


@pytest.mark.cuda
def test_kernel_on_cuda():
    check("cuda")


def check_callers(device):
    """``noise.antithetic_pairs`` and ``kernels.gradient.lowrank_gradient_sum`` through the kernels, against
    float64 references; a fitness that broadcasts (shape (1,)) takes the torch path."""
    from eggroll_optim.kernels.fast.pairs import layout_kernels_available
    from eggroll_optim.kernels.gradient import lowrank_gradient_sum
    from eggroll_optim.noise import antithetic_half, antithetic_pairs

    g = torch.Generator().manual_seed(1)
    P, m, n, r = 6, 5, 7, 3
    A, B = torch.randn(P, m, r, generator=g).to(device), torch.randn(P, n, r, generator=g).to(device)
    A_s, B_pop = antithetic_pairs(A, B, 0.2, r)
    assert torch.equal(A_s, torch.stack((A, -A), dim=1).flatten(0, 1).mul_(0.2 / r ** 0.5))
    assert torch.equal(B_pop[0::2], B) and torch.equal(B_pop[1::2], B)
    f = torch.randn(2 * P, generator=g).to(device)
    d = lambda t: t.double().cpu()  # noqa: E731
    expected = torch.einsum("n,nmr,nkr->mk", d(f), d(A_s), d(B_pop))
    torch.testing.assert_close(d(lowrank_gradient_sum(f, A_s, B_pop)), expected, rtol=1e-5, atol=1e-5)
    expected1 = torch.einsum("n,nmr,nkr->mk", d(f[:1]).expand(2 * P), d(A_s), d(B_pop))
    torch.testing.assert_close(d(lowrank_gradient_sum(f[:1], A_s, B_pop)), expected1, rtol=1e-5, atol=1e-5)
    # the pair path (the kernels made B's one-row-per-pair copy) against the generic one on unmarked copies
    paired, half = antithetic_half(B_pop)
    assert paired and antithetic_half(A_s)[0] and (half is not None) == layout_kernels_available(B)
    plain = lowrank_gradient_sum(f, A_s.clone(), B_pop.clone())
    torch.testing.assert_close(lowrank_gradient_sum(f, A_s, B_pop), plain, rtol=1e-5, atol=1e-5)
    B_pop[3].mul_(2.0)  # an in-place change voids the pair note: the generic path, the new values
    assert antithetic_half(B_pop) == (False, None)
    expected = torch.einsum("n,nmr,nkr->mk", d(f), d(A_s), d(B_pop))
    torch.testing.assert_close(d(lowrank_gradient_sum(f, A_s, B_pop)), expected, rtol=1e-5, atol=1e-5)
    A_s[0].neg_()
    assert antithetic_half(A_s) == (False, None)
    A_s, B_pop = antithetic_pairs(A, B, 0.2, r)
    A_s[1].mul_(3.0)  # A no longer antithetic while B still is, with its per-pair copy: the generic sum
    assert not antithetic_half(A_s)[0] and antithetic_half(B_pop)[0]
    expected = torch.einsum("n,nmr,nkr->mk", d(f), d(A_s), d(B_pop))
    torch.testing.assert_close(d(lowrank_gradient_sum(f, A_s, B_pop)), expected, rtol=1e-5, atol=1e-5)
    A_s, B_pop = antithetic_pairs(A, B, 0.2, r)
    B_pop.data = B_pop.data.clone()  # a new storage under the same tensor: the note is void too
    assert antithetic_half(B_pop) == (False, None)


def test_callers_in_triton_interpreter():
    run_interpreted(
        """
        from test_pairs import check_callers
        check_callers("cpu")
        """
    )


def test_callers_on_cpu_without_triton_kernels():
    check_callers("cpu")


@pytest.mark.cuda
def test_callers_on_cuda():
    check_callers("cuda")

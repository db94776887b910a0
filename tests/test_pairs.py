"""The antithetic layouts: the Triton kernels of ``noise.layout`` against the torch ops they replace, bit
for bit, and ``noise.Pairs`` through the gradient: the pair path exactly for a ``Pairs``.

On CPU the kernels run under Triton's interpreter (in a subprocess); on CUDA they run compiled (marked ``cuda``).
"""

import pytest
import torch

from interpreted import run_interpreted

SHAPES = [(3, 5, 4), (17, 70, 3), (1, 1, 1), (40, 130, 8), (5, 9, 16)]


def torch_layout(B):
    P, n, r = B.shape
    return B.permute(1, 0, 2).unsqueeze(2).expand(n, P, 2, r).contiguous()


def check(device, shapes=SHAPES):
    from eggroll_optim.noise import antithetic_pairs
    from eggroll_optim.noise.layout import (
        layout_kernels_available, pair_rows, pair_scaled_transpose, scaled_transpose, signed_pairs,
    )

    g = torch.Generator().manual_seed(0)
    half = [torch.bfloat16] if device == "cuda" else []  # Triton's interpreter: float32/float64 only
    for shape in shapes:
        for dtype in (torch.float32, torch.float64, *half):
            B = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
            assert layout_kernels_available(B)
            assert torch.equal(pair_rows(B), torch_layout(B)), (shape, dtype)
            both, one = pair_rows(B, half=True)  # the pair layout and, in the same pass, one row set per pair
            assert torch.equal(both, torch_layout(B)) and torch.equal(one, B.permute(1, 0, 2)), (shape, dtype)
            check_pairs_layout(antithetic_pairs(B[:, :1], B, 0.5, shape[2]), B)
        if not half:  # bfloat16 where the interpreter cannot run the kernel: torch's copy, the same layout
            B16 = torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)
            check_pairs_layout(antithetic_pairs(B16[:, :1], B16, 0.5, shape[2]), B16)
    assert not layout_kernels_available(torch.randn(4, 3, 2, device=device).permute(1, 0, 2))  # not contiguous
    if device == "cpu":
        assert not layout_kernels_available(torch.randn(4, 3, 2).bfloat16())
    dtypes = [(torch.float32, torch.float32), (torch.float64, torch.float64)]
    if device == "cuda":  # Triton's interpreter has no bfloat16 arithmetic
        dtypes.append((torch.bfloat16, torch.float32))
    for shape in shapes:
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
    # R is a constexpr: each shape compiles ~14 kernels per dtype set. Kept: rank 3 (masked rank columns) over
    # several tiles each way, 1 x 1 x 1 (Triton's size-1 specializations), rank 16; (3, 5, 4) and (40, 130, 8)
    # would compile one tile and several tiles of an unmasked rank again (the interpreter runs all five)
    check("cuda", shapes=[SHAPES[i] for i in (1, 2, 4)])


def check_pairs_layout(pairs, B):
    """``Pairs.B`` (2P, n, r) stored (n, 2P, r) with both members of a pair holding ``B_p``; ``B_pair`` (n, P, r)."""
    P, n, r = B.shape
    assert pairs.B.shape == (2 * P, n, r) and pairs.B.permute(1, 0, 2).is_contiguous()
    assert torch.equal(pairs.B[0::2], B) and torch.equal(pairs.B[1::2], B)
    assert pairs.B_pair.is_contiguous() and torch.equal(pairs.B_pair, B.permute(1, 0, 2))


def _paths(fn):
    """``fn()`` and the sums it ran, in order: ``"pairs"`` or ``"members"``."""
    from eggroll_optim.kernels import gradient

    ran, pair_sum, member_sum = [], gradient.pair_gradient_sum, gradient.lowrank_gradient_sum
    gradient.pair_gradient_sum = lambda *a: ran.append("pairs") or pair_sum(*a)
    gradient.lowrank_gradient_sum = lambda *a: ran.append("members") or member_sum(*a)
    try:
        return fn(), ran
    finally:
        gradient.pair_gradient_sum, gradient.lowrank_gradient_sum = pair_sum, member_sum


def check_callers(device):
    """``noise.antithetic_pairs`` and ``kernels.es_gradient`` (through the layout kernels where they run) against
    float64 references: the sum over pairs for a ``Pairs`` and only for one; a plain tuple, also of the very same
    tensors, takes the sum over members; an in-place edit changes no path (there is nothing to void)."""
    from eggroll_optim.kernels import es_gradient, lowrank_gradient_sum
    from eggroll_optim.noise import Pairs, antithetic_pairs

    g = torch.Generator().manual_seed(1)
    P, m, n, r = 6, 5, 7, 3
    A, B = torch.randn(P, m, r, generator=g).to(device), torch.randn(P, n, r, generator=g).to(device)
    pairs = antithetic_pairs(A, B, 0.2, r)
    A_s, B_pop = pairs  # the seed's (A_scaled, B)
    assert isinstance(pairs, Pairs) and pairs.scale == 0.2 / r ** 0.5 and pairs.num_pairs == P
    assert torch.equal(A_s, torch.stack((A, -A), dim=1).flatten(0, 1).mul_(0.2 / r ** 0.5))
    assert torch.equal(pairs.A_pair, A_s[0::2]) and pairs.A_pair.data_ptr() == A_s.data_ptr()  # a view
    check_pairs_layout(pairs, B)
    f = torch.randn(2 * P, generator=g).to(device)
    d = lambda t: t.double().cpu()  # noqa: E731
    expected = torch.einsum("n,nmr,nkr->mk", d(f), d(A_s), d(B_pop)) / (2 * P) ** 0.5
    got, ran = _paths(lambda: es_gradient(f, pairs))
    assert ran == ["pairs"]
    torch.testing.assert_close(d(got), expected, rtol=1e-5, atol=1e-5)
    for plain in (tuple(pairs), (A_s.clone(), B_pop.clone())):  # no pair structure: the sum over members
        got, ran = _paths(lambda: es_gradient(f, plain))
        assert ran == ["members"]
        torch.testing.assert_close(d(got), expected, rtol=1e-5, atol=1e-5)
    expected1 = torch.einsum("n,nmr,nkr->mk", d(f[:1]).expand(2 * P), d(A_s), d(B_pop))
    torch.testing.assert_close(d(lowrank_gradient_sum(f[:1], A_s, B_pop)), expected1, rtol=1e-5, atol=1e-5)
    before = es_gradient(f, pairs)
    A_s.mul_(1.0), B_pop.mul_(1.0)  # in place, same values: the old pair note was voided by this, the type is not
    after, ran = _paths(lambda: es_gradient(f, pairs))
    assert ran == ["pairs"] and torch.equal(after, before)
    A_e, B_e = A_s.clone(), B_pop.clone()
    A_e[1].mul_(3.0), B_e[3].mul_(2.0)  # hand-built factors that are not antithetic: their own values
    expected = torch.einsum("n,nmr,nkr->mk", d(f), d(A_e), d(B_e)) / (2 * P) ** 0.5
    torch.testing.assert_close(d(es_gradient(f, (A_e, B_e))), expected, rtol=1e-5, atol=1e-5)


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

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
        layout_kernels_available, pair_rows, scaled_transpose, signed_pairs,
    )
    from eggroll_optim.noise import _pair_rows

    pair_rows_available = layout_kernels_available

    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            B = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
            assert pair_rows_available(B)
            assert torch.equal(pair_rows(B), torch_layout(B)), (shape, dtype)
            P, n, r = shape
            pop = _pair_rows(B)  # (2P, n, r), stored (n, 2P, r)
            assert pop.shape == (2 * P, n, r) and pop.permute(1, 0, 2).is_contiguous()
            assert torch.equal(pop[0::2], B) and torch.equal(pop[1::2], B)
    assert not pair_rows_available(torch.randn(4, 3, 2, device=device).permute(1, 0, 2))  # not contiguous
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

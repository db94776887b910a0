"""The one-launch z-score (``kernels.fast.zscore``) against the torch formula of ``shaping.zscore``.

On CPU the kernel runs under Triton's interpreter (in a subprocess); on CUDA it runs compiled (marked ``cuda``).
"""

import pytest
import torch

from interpreted import run_interpreted

pytest.importorskip("triton")


def torch_zscore(f, eps=1e-8):
    centered = f - f.mean()
    if bool(f.amax() == f.amin()):
        return torch.zeros_like(f)
    return centered / torch.sqrt(centered.square().mean() + eps)


def check(device):
    from eggroll_optim.kernels.fast.zscore import fused_zscore, fused_zscore_available
    from eggroll_optim.shaping import zscore

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1023, 1024, 1025, 5000):
        f = (torch.randn(n, generator=g) * 3 + 1).to(device)
        assert fused_zscore_available(f)
        expected = torch_zscore(f.double()).float()
        torch.testing.assert_close(fused_zscore(f), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(zscore(f), expected, rtol=1e-5, atol=1e-6)  # the shaping dispatches to it
        assert torch.equal(fused_zscore(f, skip_nonfinite=True), fused_zscore(f))
        bad = f.clone()
        bad[n // 2] = float("nan") if n % 2 else float("inf")
        assert torch.equal(fused_zscore(bad, skip_nonfinite=True), torch.zeros_like(f))  # "skip": no update
        assert torch.isnan(fused_zscore(bad)).all() and torch.isnan(torch_zscore(bad)).all()  # as torch: all NaN
        assert torch.isnan(zscore(bad)).all()  # the shaping too (the "skip" zeros are shape_fitness's, not its)
    one_nan = torch.tensor([float("nan"), 0.0, 0.0, 0.0], device=device)  # max/min skip NaN: not "all equal"
    assert torch.isnan(fused_zscore(one_nan)).all()
    flat = torch.full((300,), 0.1, device=device)
    assert torch.equal(fused_zscore(flat), torch.zeros_like(flat))  # all equal: exact zeros
    assert not fused_zscore_available(torch.randn(4, 2, device=device))
    assert not fused_zscore_available(torch.randn(4, device=device, dtype=torch.float64))
    batch = torch.randn(3, 50, generator=g).to(device)  # vmap: batched tensors have no storage, torch's formula
    got = torch.func.vmap(zscore)(batch)
    torch.testing.assert_close(got, torch.stack([torch_zscore(b) for b in batch]), rtol=1e-5, atol=1e-6)


def test_fused_zscore_in_triton_interpreter():
    run_interpreted(
        """
        from test_fast_zscore import check
        check("cpu")
        """
    )


@pytest.mark.cuda
def test_fused_zscore_on_cuda():
    check("cuda")


def test_eggroll_step_skip_policy_matches_the_torch_formula():
    """``eggroll_step(nan_policy="skip")`` through the fused z-score (interpreter) updates as the torch
    formula says (float64, by hand), and a NaN member leaves the weights untouched."""
    run_interpreted(
        """
        import torch
        from test_fast_zscore import torch_zscore
        from eggroll_optim.core import EggrollConfig, eggroll_step, generate_perturbations
        shapes = {"w": (5, 7)}
        perts = generate_perturbations(shapes, 8, 2, 0.1, torch.Generator().manual_seed(0))
        f = torch.randn(8, generator=torch.Generator().manual_seed(1))
        p1 = {"w": torch.zeros(5, 7)}
        eggroll_step(p1, f, perts, 0.5, 0.1, EggrollConfig(population_size=8), nan_policy="skip")
        A, B = (t.double() for t in perts["w"])
        expected = 0.5 * torch.einsum("n,nir,njr->ij", torch_zscore(f.double()), A, B) / 8 ** 0.5
        torch.testing.assert_close(p1["w"].double(), expected, rtol=1e-5, atol=1e-6)
        assert p1["w"].abs().sum() > 0
        f[3] = float("nan")
        p3 = {"w": torch.zeros(5, 7)}
        eggroll_step(p3, f, perts, 0.5, 0.1, EggrollConfig(population_size=8), nan_policy="skip")
        assert torch.equal(p3["w"], torch.zeros(5, 7))
        """
    )

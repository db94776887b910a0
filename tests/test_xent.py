"""``per_member_cross_entropy``'s one-pass Triton path against float64 ``F.cross_entropy``.

On CPU the kernel runs under Triton's interpreter in a subprocess; on CUDA it runs compiled (marked ``cuda``).
"""

import pytest
import torch
import torch.nn.functional as F

from interpreted import run_interpreted

from eggroll_optim.losses import per_member_cross_entropy

CASES = [(3, 5, 10), (4, 300, 7), (2, 1, 2), (5, 17, 130), (6, 64, 1000)]


def reference(logits, labels):
    z = logits.double().cpu()
    y = labels.cpu().expand(z.shape[:-1])
    return torch.stack([F.cross_entropy(z[i].reshape(-1, z.shape[-1]), y[i].reshape(-1)) for i in range(z.shape[0])])


def max_error(device="cpu", seed=0):
    """Largest abs. error over CASES, shared and per-member labels, float32 and bfloat16 logits."""
    from eggroll_optim.kernels.fast.xent import member_cross_entropy

    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for N, B, C in CASES:
        z = (torch.randn(N, B, C, generator=g) * 3).to(device)
        for labels in (torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (N, B), generator=g)):
            labels = labels.to(device)
            worst = max(worst, (member_cross_entropy(z, labels).double().cpu() - reference(z, labels)).abs().max().item())
            zb = z.bfloat16()
            err = (member_cross_entropy(zb, labels).double().cpu() - reference(zb.float(), labels)).abs().max().item()
            worst = max(worst, err)
    return worst


def test_torch_path_on_cpu_matches_reference():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(4, 2, 3, 5, generator=g), torch.randint(0, 5, (2, 3), generator=g)
    torch.testing.assert_close(per_member_cross_entropy(z, y), reference(z, y).float())


def test_kernel_in_triton_interpreter():
    pytest.importorskip("triton")
    run_interpreted(
        """
        import torch
        from test_xent import max_error
        from eggroll_optim.kernels.fast.xent import member_cross_entropy
        err = max_error(seed=2)
        assert err < 1e-5, err
        z = torch.randn(3, 4, 5)
        bad = torch.tensor([0, 1, 5, 2])  # 5 is out of range for 5 classes
        out = member_cross_entropy(z, bad)
        assert torch.isnan(out).all(), out
        """
    )


@pytest.mark.cuda
def test_kernel_and_dispatch_on_cuda():
    assert max_error("cuda") < 1e-5
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 2, 16, 10, generator=g).cuda()  # (N, *batch, C) with two batch dims
    y = torch.randint(0, 10, (2, 16), generator=g).cuda()
    torch.testing.assert_close(per_member_cross_entropy(z, y).double().cpu(), reference(z, y), rtol=1e-5, atol=1e-6)
    yn = torch.randint(0, 10, (8, 2, 16), generator=g).cuda()
    torch.testing.assert_close(per_member_cross_entropy(z, yn).double().cpu(), reference(z, yn), rtol=1e-5, atol=1e-6)
    zg = z.clone().requires_grad_()  # autograd: the torch path, differentiable
    per_member_cross_entropy(zg, y).sum().backward()
    assert zg.grad is not None and torch.isfinite(zg.grad).all()


def test_labels_that_match_neither_the_batch_nor_the_members_are_refused():
    """Labels shared ``(*batch,)`` or per member ``(N, *batch)`` give the mean per member; any other shape is a
    clear error (a 5-label batch against 4 rows had failed inside ``expand``)."""
    z = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(1))
    shared = per_member_cross_entropy(z, y)
    per_member = per_member_cross_entropy(z, y.expand(3, 4))
    expected = torch.stack([torch.nn.functional.cross_entropy(z[i], y) for i in range(3)])
    torch.testing.assert_close(shared, expected)
    torch.testing.assert_close(per_member, expected)
    for bad in (torch.zeros(5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"got labels \((5,|2, 4)\)"):
            per_member_cross_entropy(z, bad)

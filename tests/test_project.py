"""``shared_projection``: ``x B_i`` for every member, against a float64 einsum.

On CPU the Triton kernel runs under the interpreter in a subprocess; on CUDA it runs compiled (marked ``cuda``).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from eggroll_optim.kernels.fast.project import shared_projection

CASES = [(7, 33, 5, 4), (40, 100, 37, 1), (3, 16, 70, 2), (64, 784, 48, 8), (1, 5, 1, 4), (9, 12, 6, 3)]


def max_error(device="cpu", seed=0):
    """Largest relative error over CASES (rank 3 exercises the non-power-of-two fallback)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for M, D, N, R in CASES:
        x = torch.randn(M, D, generator=g).to(device)
        B = torch.randn(N, D, R, generator=g).to(device)
        out = shared_projection(x, B)
        assert out.shape == (M, N * R)
        ref = torch.einsum("md,ndr->mnr", x.double().cpu(), B.double().cpu()).reshape(M, N * R)
        worst = max(worst, ((out.double().cpu() - ref).norm() / ref.norm()).item())
    return worst


def test_fallback_on_cpu():
    assert max_error() < 1e-6


def test_kernel_in_triton_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_project import max_error
        err = max_error(seed=3)
        assert err < 1e-6, err
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.cuda
def test_kernel_on_cuda():
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert max_error("cuda") < 1e-5
        torch.backends.cuda.matmul.allow_tf32 = True
        assert max_error("cuda") < 2e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

"""The conv kernels (``kernels.fast.conv``) against a float64 dense reference, alone and inside a population,
where ``fused=False`` runs the conv under vmap instead: the dense per-member kernel (``conv2d_members``: a
conv on a per-member input, and ``Conv2d → ReLU → MaxPool2d(2)`` windows of a Sequential on any input) and
the low-rank kernel (``lowrank_conv2d_members``: a per-member input whose dense kernels would not fit). On
CPU the kernels run under Triton's interpreter (a subprocess); on CUDA compiled."""

import pytest
import torch

from interpreted import run_interpreted

triton = pytest.importorskip("triton")

# (n, Bt, C, H, W, C_out, r, kernel, stride, padding, dilation): odd sizes, masks on every edge, rank 1,
# more output channels than one block (BO = 32), a non-square kernel, stride, dilation, no padding
CASES = [
    (3, 2, 4, 9, 7, 5, 2, (3, 3), 1, 1, 1),
    (2, 3, 3, 10, 11, 40, 4, (3, 2), (2, 1), (1, 0), 1),
    (4, 1, 2, 12, 12, 7, 1, (3, 3), 2, 2, 2),
    (2, 2, 5, 6, 5, 3, 3, (1, 1), 1, 0, 1),
    (2, 2, 16, 14, 14, 32, 4, (3, 3), 1, 1, 1),  # the MNIST CNN's second conv
]

CHECK = """
import torch
import torch.nn.functional as F
from eggroll_optim.kernels.fast.conv import lowrank_conv2d_fits, lowrank_conv2d_members


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def check(case, device, dtype):
    n, Bt, C, H, W, C_out, r, k, stride, padding, dilation = case
    g = torch.Generator().manual_seed(sum(map(hash, map(str, case))) % 2**31)
    x = torch.randn(n, Bt, C, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(C_out, C, *k, generator=g, dtype=torch.float64) * 0.3
    A = torch.randn(n, C_out, r, generator=g, dtype=torch.float64) * 0.2
    B = torch.randn(n, C * k[0] * k[1], r, generator=g, dtype=torch.float64)
    args = dict(stride=stride, padding=padding, dilation=dilation)
    dense = torch.stack([F.conv2d(x[i], weight + (A[i] @ B[i].T).view(C_out, C, *k), **args) for i in range(n)])
    base = torch.stack([F.conv2d(x[i], weight, **args) for i in range(n)]).to(dtype)
    base = base.transpose(0, 1).contiguous().transpose(0, 1)  # any strides: batch-major storage
    xd = x.to(dtype).to(device)
    assert lowrank_conv2d_fits(xd, weight, 1, padding, r)
    out = lowrank_conv2d_members(xd, base.to(device), A.to(dtype).to(device), B.to(dtype).to(device), k,
                                 stride, padding, dilation)
    assert out.shape == dense.shape and out.dtype == dtype and out.is_contiguous()
    err = ((out.double().cpu() - dense).abs().max() / dense.abs().max()).item()
    assert err < (1e-12 if dtype == torch.float64 else 1e-5), (case, dtype, err)
"""


def test_lowrank_conv2d_matches_the_float64_dense_conv_interpreted():
    run_interpreted(CHECK + f"""
for case in {CASES[:4]!r}:  # the MNIST-sized case on CUDA only (minutes in the interpreter's loops)
    check(case, "cpu", torch.float64)
check({CASES[1]!r}, "cpu", torch.float32)
x = torch.zeros(2, 1, 3, 5, 5)
w = torch.zeros(4, 3, 3, 3)
assert not lowrank_conv2d_fits(x, w, 1, "same", 2)  # string padding
assert not lowrank_conv2d_fits(torch.zeros(2, 3, 5, 5), w, 1, 1, 2)  # no per-member batch dim
assert not lowrank_conv2d_fits(x.half(), w, 1, 1, 2)
assert not lowrank_conv2d_fits(x, torch.zeros(4, 1, 3, 3), 3, 1, 2)  # groups
assert not lowrank_conv2d_fits(x, w, 1, 1, 17)  # rank above 16: the torch path
assert not lowrank_conv2d_fits(x, w.requires_grad_(), 1, 1, 2)  # autograd through the weight
with torch.no_grad():
    assert lowrank_conv2d_fits(x, w, 1, 1, 2)
""")


# (per_member, relu, pool, bias, n, Bt, C, H, W, C_out, r, kernel, stride, padding, dilation): shared and
# per-member inputs, each epilogue, shared and per-member biases, an odd pooled size (floor), C_out over one
# block (BO = 64), a reduction over several blocks (C k_h k_w = 40 > BK), channels over one block (C = 20)
DENSE_CASES = [
    (False, True, True, None, 3, 2, 1, 9, 7, 16, 4, (3, 3), 1, 1, 1),  # the MNIST CNN's first window
    (True, True, True, "member", 2, 3, 5, 8, 9, 6, 2, (3, 3), 1, 1, 1),
    (True, False, False, "shared", 2, 2, 10, 7, 6, 70, 3, (2, 2), (2, 1), (1, 0), 1),
    (False, True, False, "member", 2, 1, 3, 11, 10, 5, 1, (3, 3), 2, 2, 2),
    (True, False, True, None, 3, 1, 4, 7, 7, 3, 4, (1, 3), 1, (0, 1), 1),
    (True, True, True, "shared", 2, 2, 20, 6, 7, 9, 2, (3, 3), 1, 1, 1),
    (False, True, False, None, 2, 1, 16, 5, 5, 4, 3, (2, 3), (1, 2), (1, 0), (2, 1)),
]

DENSE = """
import torch
import torch.nn.functional as F
from eggroll_optim.kernels.fast.conv import conv2d_members, conv2d_members_fits


def dense_check(case, device, dtype, tol=None):
    per_member, relu, pool, bias_kind, n, Bt, C, H, W, C_out, r, k, stride, padding, dilation = case
    g = torch.Generator().manual_seed(sum(map(hash, map(str, case))) % 2**31)
    x = torch.randn(*((n,) if per_member else ()), Bt, C, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(C_out, C, *k, generator=g, dtype=torch.float64) * 0.3
    A = torch.randn(n, C_out, r, generator=g, dtype=torch.float64) * 0.2
    B = torch.randn(n, C * k[0] * k[1], r, generator=g, dtype=torch.float64)
    bias = {None: None, "shared": torch.randn(C_out, generator=g, dtype=torch.float64),
            "member": torch.randn(n, C_out, generator=g, dtype=torch.float64)}[bias_kind]
    want = []
    for i in range(n):
        b = None if bias is None else bias[i] if bias.dim() == 2 else bias
        y = F.conv2d(x[i] if per_member else x, weight + (A[i] @ B[i].T).view(C_out, C, *k), b, stride=stride,
                     padding=padding, dilation=dilation)
        y = y.relu() if relu else y
        want.append(F.max_pool2d(y, 2) if pool else y)
    want = torch.stack(want)
    on = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    xd = on(x)
    assert conv2d_members_fits(xd, per_member, on(weight), 1, padding, on(A), on(B), on(bias))
    out = conv2d_members(xd, per_member, on(weight), on(A), on(B), on(bias), stride, padding, dilation, relu, pool)
    assert out.shape == want.shape and out.dtype == dtype and out.is_contiguous(), (out.shape, want.shape)
    err = ((out.double().cpu() - want).abs().max() / want.abs().max()).item()
    assert err < (tol or (1e-12 if dtype == torch.float64 else 1e-5)), (case, dtype, err)
    return err
"""


def test_dense_conv2d_members_matches_the_float64_conv_interpreted():
    run_interpreted(DENSE + f"""
for case in {DENSE_CASES!r}:
    dense_check(case, "cpu", torch.float64)
dense_check({DENSE_CASES[1]!r}, "cpu", torch.float32)
x, w, A = torch.zeros(2, 1, 3, 5, 5), torch.zeros(4, 3, 3, 3), torch.zeros(2, 4, 2)
assert not conv2d_members_fits(x, True, w, 1, "same", A)  # string padding
assert not conv2d_members_fits(x, False, w, 1, 1, A)  # a shared input is 4-D
assert not conv2d_members_fits(x.half(), True, w.half(), 1, 1, A)
assert not conv2d_members_fits(x.double(), True, w, 1, 1, A)  # not the weight's dtype
assert not conv2d_members_fits(x, True, torch.zeros(4, 1, 3, 3), 3, 1, A)  # groups
assert not conv2d_members_fits(x, True, w.requires_grad_(), 1, 1, A)  # autograd through the weight
with torch.no_grad():
    assert conv2d_members_fits(x, True, w, 1, 1, A)
    assert conv2d_members_fits(x[0], False, w, 1, 1, A)
    with torch.autocast("cpu", torch.bfloat16):  # autocast picks the modules' dtypes: the modules run
        assert not conv2d_members_fits(x, True, w, 1, 1, A)
# NaN passes the ReLU and the pool as in torch (the epilogue's max would otherwise drop it)
xn = torch.randn(2, 1, 3, 6, 6)
xn[0, 0, 1, 2, 3] = float("nan")
wn, An, Bn = torch.randn(4, 3, 3, 3), torch.randn(2, 4, 2) * 0.1, torch.randn(2, 27, 2)
got = conv2d_members(xn, True, wn, An, Bn, None, 1, 1, 1, True, True)
want = torch.stack([F.max_pool2d(F.conv2d(xn[i], wn + (An[i] @ Bn[i].T).view(4, 3, 3, 3), padding=1).relu(), 2)
                    for i in range(2)])
assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any(), (got.isnan().sum(), want.isnan().sum())
from eggroll_optim.kernels.fast._triton import pinned
with pinned(conv=dict(BQ=32, BK=32, num_warps=4)):  # another tile: rows over images, two K blocks in one
    got32 = conv2d_members(xn, True, wn, An, Bn, None, 1, 1, 1, True, True)
assert torch.equal(got32.isnan(), want.isnan())
assert torch.allclose(got32.nan_to_num(), want.nan_to_num(), atol=1e-5)
try:  # an input too small for the conv and its pool
    conv2d_members(xn[:, :, :, :3, :3], True, wn, An, Bn, None, 1, 0, 1, True, True)
    raise AssertionError("no error")
except ValueError as e:
    assert "too small" in str(e)
""")


POPULATION = """
import torch
import torch.nn as nn
from eggroll_optim import EggrollOptimizer
import eggroll_optim.kernels.fast.conv as kconv
import eggroll_optim.layers.linear as linear

calls, dense_calls = [], []
kernel, dense_kernel = linear.lowrank_conv2d_members, linear.conv2d_members
linear.lowrank_conv2d_members = lambda *a, **k: calls.append(1) or kernel(*a, **k)
linear.conv2d_members = lambda *a, **k: dense_calls.append(a[-2:]) or dense_kernel(*a, **k)


def opt_for(model, fused):
    return EggrollOptimizer(model, population_size=6, rank=2, sigma=0.1, seed=3, fused=fused)


def run(fused, device, grad=False, keep=False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, (3, 1), stride=2, dilation=(1, 2)),
        nn.Flatten(), nn.LazyLinear(3),
    ).to(device)
    model(torch.zeros(1, 1, 8, 8, device=device))
    opt = opt_for(model, fused)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.set_grad_enabled(grad), opt.ask():
        out = model(x)
    if keep:
        return out, opt
    if not grad:
        return out
    out.square().mean().backward()  # autograd through the population: the kernel stays out
    return [p.grad for p in model.parameters()]


def check(device):
    del calls[:], dense_calls[:]
    plain = run(False, device)
    assert not calls and not dense_calls
    fused = run(None, device)
    # the first conv's window (shared input, ReLU and pooling), the second's (ReLU), the third alone
    assert dense_calls == [(True, True), (True, False), (False, False)] and not calls, (dense_calls, calls)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # tell() after fused windows: the convs whose forward did not run still count as used
    _, opt = run(None, device, keep=True)
    opt.tell(torch.arange(6.0, device=device))
    # too small for the second window's pool: torch's own error, as without the kernel
    del dense_calls[:]
    errors = []
    for fused in (None, False):
        torch.manual_seed(0)
        small = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2)).to(device)
        with opt_for(small, fused).ask():
            try:
                small(torch.zeros(2, 1, 3, 3, device=device))
            except RuntimeError as e:
                errors.append(str(e))
    assert len(errors) == 2 and errors[0] == errors[1] and not dense_calls, (errors, dense_calls)
    kconv_limit = kconv._DENSE_MAX_BYTES
    kconv._DENSE_MAX_BYTES = 0  # dense kernels too large: the windows run module by module, the
    try:  # per-member convs take the low-rank kernel
        del dense_calls[:]
        torch.testing.assert_close(run(None, device), plain, rtol=1e-5, atol=1e-5)
        assert not dense_calls and len(calls) == 2, (dense_calls, calls)
    finally:
        kconv._DENSE_MAX_BYTES = kconv_limit
    del calls[:]
    grads, plain_grads = run(None, device, grad=True), run(False, device, grad=True)
    assert not calls and not dense_calls and all(grads[i] is not None for i in (0, 1, 3))  # the convs' weights
    for g, h in zip(grads, plain_grads):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h)
"""


def test_population_conv_takes_the_kernel_and_matches_vmap_interpreted():
    run_interpreted(POPULATION + "\ncheck('cpu')\n")


# the MNIST CNN's two windows (chunks of 4 members; 8 images each)
MNIST_WINDOWS = [(False, True, True, None, 4, 8, 1, 28, 28, 16, 4, (3, 3), 1, 1, 1),
                 (True, True, True, None, 4, 8, 16, 14, 14, 32, 4, (3, 3), 1, 1, 1)]


@pytest.mark.cuda
def test_conv_kernels_on_cuda(monkeypatch):
    monkeypatch.setenv("EGGROLL_AUTOTUNE", "first")  # one compile a shape, not the whole list's
    namespace = {}
    exec(CHECK + DENSE, namespace)
    for case in (CASES[1], CASES[4]):  # the low-rank kernel (a fallback now): the interpreter runs the rest
        namespace["check"](case, "cuda", torch.float32)
    namespace["check"](CASES[1], "cuda", torch.float64)
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # IEEE float32 products, as the reference's tolerance assumes
    try:
        for case in DENSE_CASES[1:2] + MNIST_WINDOWS:  # the rest under the interpreter (a compile a case here)
            namespace["dense_check"](case, "cuda", torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    # torch's default for float32 convs, TF32: the kernel's products follow it (a 10-bit mantissa's error)
    assert 1e-5 < namespace["dense_check"](MNIST_WINDOWS[1], "cuda", torch.float32, tol=5e-3)
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the vmap path's convs in IEEE float32, as the kernel
    try:
        exec(POPULATION + "\ncheck('cuda')\n", {})
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def test_windows_are_exact_conv_relu_pool_runs_without_hooks():
    """Which children form a window (``layers.sequential._window``): the pool must be 2×2 with stride 2, no
    padding, dilation or ceil mode; the conv without groups, padding mode or string padding; no hooks."""
    import torch.nn as nn

    from eggroll_optim.layers import rule_for
    from eggroll_optim.layers.sequential import _global_hooks, _window, has_window

    conv, relu, pool = lambda **kw: nn.Conv2d(2, 3, 3, **kw), nn.ReLU, nn.MaxPool2d  # noqa: E731
    assert _window([conv(), relu(), pool(2)], 0) == (3, True, True)
    assert _window([conv(), relu(inplace=True), nn.Tanh()], 0) == (2, True, False)
    assert _window([conv(), pool((2, 2), stride=2), relu()], 0) == (2, False, True)  # ReLU after the pool: apart
    assert _window([conv(), nn.Identity()], 0) is None and _window([relu(), pool(2)], 0) is None
    for other in (pool(2, stride=1), pool(2, padding=1), pool(3), pool(2, ceil_mode=True), pool(2, dilation=2),
                  pool(2, return_indices=True)):
        assert _window([conv(), relu(), other], 0) == (2, True, False), other
    for c in (conv(groups=1, padding_mode="reflect", padding=1), conv(padding="same"),
              nn.Conv2d(2, 4, 3, groups=2)):
        assert _window([c, relu(), pool(2)], 0) is None
    hooked = relu()
    hooked.register_forward_hook(lambda *a: None)
    assert _window([conv(), hooked, pool(2)], 0) is None
    seq = nn.Sequential(nn.Flatten(), conv(), relu())
    assert has_window(seq) and rule_for(seq).forward.__name__ == "sequential_forward"
    assert rule_for(seq, fused=False) is None and not has_window(nn.Sequential(conv(), nn.Tanh()))
    assert not _global_hooks()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert _global_hooks()
    finally:
        handle.remove()
    assert not _global_hooks()

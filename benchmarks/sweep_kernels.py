"""Sweep the launch configurations of the fused kernels on the paper's shapes (GPU); prints ms per config.

  mlp    the streaming shared-input MLP kernel (``kernels.fast.mlp``, pinned ``resident=False``) on the MNIST
         step's shapes: x (256, 784), 784-256(tanh)-10, N=4096, rank 4, TF32; whole ``_fused`` call (base
         and x B1 GEMMs included); tiles, register caps, float16 second layer (h16) or TF32
  resident the register-resident MLP kernels (the default for tanh under TF32) on the same shapes, with
         the factors as ``noise.Pairs``: without bias noise the twin kernel (one
         layer-1 product per antithetic pair), with it one per member; programs per SM, register cap,
         stages, lookahead
  parts  the GEMMs around the MLP kernel: x W1ᵀ + b1, and x B1 (a copy of B1, then cuBLAS)
  rows   the counter-noise rows kernels (``kernels.fast.counter_linear``) alone on the microbenchmark's
         shapes: x (1024, 8192) bf16, rank 1; next to ``x @ W.T`` and ``addmm`` for scale; two launches (projection
         in parts, then the output blocks) or one, warps of each
  conv   the dense conv kernel (``kernels.fast.conv.conv2d_members``) on the MNIST CNN's two windows
         (Conv2d → ReLU → MaxPool2d(2), chunks of 512 members, B=64, TF32): row tile BQ, reduction block
         BK, warps, stages; next to cuDNN's conv + ReLU + pool of the same images and the window's floor
Timer: ``triton.testing.do_bench`` (L2 flushed, median); the rows kernels as CUDA-graph replays. The
autotune lists in the kernels come from here; the launch choices are set through
``kernels.fast._triton.pinned``, never through the kernels' arguments.
Usage: python benchmarks/sweep_kernels.py [rows] [parts] [mlp] [resident] [conv]
"""
from __future__ import annotations

import itertools
import sys

import torch

from eggroll_optim.kernels.fast._triton import pinned, triton
from eggroll_optim.kernels.fast.conv import conv2d_members
from eggroll_optim.kernels.fast.counter_linear import launch_counter_rows
from eggroll_optim.kernels.fast.mlp import _fused
from eggroll_optim.kernels.fast.rows import rows_lowrank_delta
from eggroll_optim.noise import antithetic_pairs


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn):
    """``bench`` of one CUDA-graph replay of ``fn``: for launches short enough that eager timing would
    measure the host (a ~20 µs pair of Triton launches)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def fused(x, l1, l2, activation="tanh", bias=(None, None), **choices):
    """The fused MLP on the shared ``x`` with ``choices`` pinned (``config``, ``h16``, ``resident``)."""
    with pinned(**choices):
        return _fused(x, l1, l2, activation, True, bias)


def mnist_inputs(antithetic: bool):
    """The MNIST step's shapes under TF32: ``x (256, 784)``, 784-256-10, N=4096, rank 4; factors drawn per
    member, or (``antithetic``) as ``noise.Pairs``. Also bias noise ``(N, H), (N, O)``."""
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator(device="cuda").manual_seed(0)
    N, M, D, H, O, R = 4096, 256, 784, 256, 10, 4

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * s

    def factors(m, n):
        if antithetic:
            return antithetic_pairs(rnd(N // 2, m, R), rnd(N // 2, n, R), 0.05, R)
        return rnd(N, m, R, s=0.01), rnd(N, n, R)

    x = torch.rand(M, D, device="cuda", generator=g)
    l1 = (rnd(H, D, s=0.03), rnd(H), factors(H, D))
    l2 = (rnd(O, H, s=0.06), rnd(O), factors(O, H))
    return x, l1, l2, (rnd(N, H, s=0.01), rnd(N, O, s=0.01))


def sweep_mlp():
    x, l1, l2, _ = mnist_inputs(antithetic=False)
    ref = fused(x, l1, l2, config=dict(BM=32, MEMBERS=8, num_warps=4, HC=32), h16=False, resident=False)
    results = []
    shapes = ((64, 8, 64, 4), (64, 16, 64, 4), (64, 32, 64, 4), (64, 8, 32, 4), (128, 16, 64, 8), (32, 16, 32, 4))
    for (bm, mem, hc, w), reg, h16 in itertools.product(shapes, (None, 80, 96, 112, 128), (True, False)):
        cfg = dict(BM=bm, MEMBERS=mem, HC=hc, num_warps=w, num_stages=1, **({"maxnreg": reg} if reg else {}))
        try:
            out = fused(x, l1, l2, config=cfg, h16=h16, resident=False)
            err = ((out - ref).norm() / ref.norm()).item()
            ms = bench(lambda: fused(x, l1, l2, config=cfg, h16=h16, resident=False))
        except Exception as exc:  # noqa: BLE001 - a config that does not fit is reported, not fatal
            print(f"mlp {cfg} h16 {h16}: failed {type(exc).__name__}: {str(exc)[:80]}", flush=True)
            continue
        results.append((ms, cfg, err, h16))
        print(f"mlp {cfg} h16 {h16}: {ms:.4f} ms (rel. diff {err:.1e})", flush=True)
    _, cfg, _, h16 = min(results, key=lambda t: t[0])
    for act in ("identity", "relu"):
        ms = bench(lambda: fused(x, l1, l2, act, config=cfg, h16=h16, resident=False))
        print(f"mlp best config with {act}: {ms:.4f} ms")
    for ms, cfg, err, h in sorted(results, key=lambda t: t[0])[:6]:
        print(f"mlp best: {ms:.4f} ms {cfg} h16 {h} (rel. diff {err:.1e})")
    print(f"mlp autotuned: {bench(lambda: fused(x, l1, l2, resident=False)):.4f} ms")


def sweep_resident():
    x, l1, l2, noise = mnist_inputs(antithetic=True)
    print(f"resident: the streaming kernel, autotuned: "
          f"{bench(lambda: fused(x, l1, l2, resident=False)):.4f} ms", flush=True)
    for bias in ((None, None), noise):
        ref = fused(x, l1, l2, bias=bias, resident=False)
        results = []
        for (per_sm, reg), ahead, stages in itertools.product(((3, 168), (6, 168), (4, 128), (2, 232)), (False, True),
                                                               (2, 3)):
            cfg = dict(PER_SM=per_sm, LOOKAHEAD=ahead, num_warps=4, num_stages=stages, maxnreg=reg)
            try:
                err = ((fused(x, l1, l2, bias=bias, resident=True, config=cfg) - ref).norm() / ref.norm()).item()
                ms = bench(lambda: fused(x, l1, l2, bias=bias, resident=True, config=cfg))
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                print(f"resident {cfg}: failed {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                continue
            results.append((ms, str(cfg)))
            print(f"resident bias noise {bias[0] is not None} {cfg}: {ms:.4f} ms (rel. diff {err:.1e})", flush=True)
        for ms, cfg in sorted(results)[:4]:
            print(f"resident best (bias noise {bias[0] is not None}): {ms:.4f} ms {cfg}")
        print(f"resident autotuned (bias noise {bias[0] is not None}): "
              f"{bench(lambda: fused(x, l1, l2, bias=bias)):.4f} ms", flush=True)


def mlp_parts():
    """The GEMMs around the fused kernel: the shared base, and x B1 (copy + cuBLAS)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator(device="cuda").manual_seed(0)
    N, M, D, H, R = 4096, 256, 784, 256, 4
    x = torch.randn(M, D, device="cuda", generator=g)
    W1, b1 = torch.randn(H, D, device="cuda", generator=g), torch.randn(H, device="cuda", generator=g)
    B1 = torch.randn(N, D, R, device="cuda", generator=g)
    print(f"mlp parts: base GEMM {bench(lambda: torch.nn.functional.linear(x, W1, b1)):.4f} ms, "
          f"x B1 by copy + cuBLAS {bench(lambda: x @ B1.permute(1, 0, 2).reshape(D, N * R)):.4f} ms", flush=True)


def sweep_rows():
    g = torch.Generator(device="cuda").manual_seed(0)
    N, d, r = 1024, 8192, 1
    x = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    W = (torch.randn(d, d, device="cuda", generator=g) / 90).bfloat16()
    C = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    A = torch.randn(N, d, r, device="cuda", generator=g).bfloat16()
    B = torch.randn(N, d, r, device="cuda", generator=g).bfloat16()
    out = torch.empty(N, d, device="cuda", dtype=torch.bfloat16)
    print(f"rows: mm {bench(lambda: torch.mm(x, W.t())):.4f} ms, "
          f"addmm {bench(lambda: torch.addmm(C, x, W.t())):.4f} ms,"
          f" stored delta {bench(lambda: rows_lowrank_delta(x, A, B)):.4f} ms, stored delta in place "
          f"{bench(lambda: rows_lowrank_delta(x, A, B, out=C)):.4f} ms (accumulating below)", flush=True)
    results = []
    for split, parts, warps in itertools.chain(
        itertools.product((True,), (1, 2, 4), ((4, 2), (4, 4), (2, 4), (2, 2), (1, 2), (8, 4))),
        itertools.product((False,), (1,), ((4, 4), (8, 8))),
    ):
        ms = bench_graph(lambda: launch_counter_rows(x, None, out, 12345, 0.01, r, True, split, warps, parts))
        results.append((ms, split, parts, warps))
        print(f"rows split {split} parts {parts} warps {warps}: {ms:.4f} ms", flush=True)
    for ms, split, parts, warps in sorted(results)[:3]:
        print(f"rows best: {ms:.4f} ms split {split} parts {parts} warps {warps}")


def sweep_conv():
    """The MNIST CNN's windows at chunks of 512 members and B=64, TF32 (torch's default for convs)."""
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    n, Bt, r = 512, 64, 4
    peak = 345e12  # the H200's measured TF32 matmul peak (benchmarks/RESULTS.md, run AZ); bandwidth 4.25e12 B/s
    windows = [  # (name, input, per_member, weight)
        ("conv1 (shared 1x28x28 -> 16)", torch.randn(Bt, 1, 28, 28, device="cuda", generator=g), False,
         torch.randn(16, 1, 3, 3, device="cuda", generator=g) * 0.3),
        ("conv2 (per member 16x14x14 -> 32)", torch.randn(n, Bt, 16, 14, 14, device="cuda", generator=g), True,
         torch.randn(32, 16, 3, 3, device="cuda", generator=g) * 0.1),
    ]
    for name, x, per_member, W in windows:
        C_out, C, KH, KW = W.shape
        A = torch.randn(n, C_out, r, device="cuda", generator=g) * 0.01
        B = torch.randn(n, C * KH * KW, r, device="cuda", generator=g)
        H, Wd = x.shape[-2:]
        flops = 2 * n * Bt * H * Wd * C_out * C * KH * KW
        bytes_ = 4 * (x.numel() + n * Bt * C_out * H * Wd // 4)
        floor = max(flops / peak, bytes_ / 4.25e12) * 1e3
        images = x.reshape(-1, C, H, Wd) if per_member else x.repeat(n, 1, 1, 1)
        plain = bench(lambda: F.max_pool2d(F.relu(F.conv2d(images, W, padding=1)), 2))
        tuned = bench(lambda: conv2d_members(x, per_member, W, A, B, None, 1, 1, 1, True, True))
        print(f"conv {name}: {flops / 1e9:.1f} GFLOP, floor {floor:.3f} ms; cuDNN conv+relu+pool of the same "
              f"images {plain:.3f} ms; autotuned {tuned:.3f} ms", flush=True)
        results = []
        for bq, bk, warps, stages in itertools.product((16, 32, 64, 128), (16, 32, 64), (4, 8), (2, 3, 4)):
            if bq * 4 * max(16, C_out) > 128 * 32 * warps:  # the accumulator past ~128 registers a thread
                continue
            with pinned(conv=dict(BQ=bq, BK=bk, num_warps=warps, num_stages=stages)):
                try:
                    ms = bench(lambda: conv2d_members(x, per_member, W, A, B, None, 1, 1, 1, True, True))
                except Exception as e:  # a config the compiler refuses (shared memory): skip it
                    print(f"conv {name} BQ {bq} BK {bk} warps {warps} stages {stages}: {type(e).__name__}")
                    continue
            results.append((ms, bq, bk, warps, stages))
            print(f"conv {name} BQ {bq} BK {bk} warps {warps} stages {stages}: {ms:.3f} ms", flush=True)
        for ms, bq, bk, warps, stages in sorted(results)[:4]:
            print(f"conv {name} best: {ms:.3f} ms ({floor / ms:.2f} of the floor) BQ {bq} BK {bk} warps {warps} "
                  f"stages {stages}")


if __name__ == "__main__":
    if not torch.cuda.is_available() or triton is None:
        sys.exit("sweep_kernels.py times the CUDA kernels: it needs a CUDA GPU and Triton")
    which = sys.argv[1:] or ["rows", "parts", "mlp", "resident", "conv"]
    if "parts" in which:
        mlp_parts()
    if "rows" in which:
        sweep_rows()
    if "mlp" in which:
        sweep_mlp()
    if "resident" in which:
        sweep_resident()
    if "conv" in which:
        sweep_conv()

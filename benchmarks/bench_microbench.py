"""EGGROLL paper Fig. 2a: one d x d bf16 linear layer, N members each with its own input row, rank r.

Throughput ratio of each variant to plain batched inference ``x @ W.T`` (cuBLAS) of the same
N rows, timed in this process:
  eggroll_pregen_kernel   eggroll_optim.kernels.perturbed_linear, x per member (N, 1, d), stored factors
                          (cuBLAS x Wᵀ, then the rows kernel adds the low-rank term in place)
  eggroll_pregen_ops      x@W.T + ((x*B).sum(-1, keepdim)) * A_scaled as plain torch ops, stored factors
  eggroll_fly_randn       A, B drawn with torch.randn (N members, no antithetic) every call + kernel
  eggroll_fly_generate    eggroll_optim.core.generate_lowrank_perturbations (antithetic) every call + kernel
  eggroll_fly_counter     kernels.fast.counter_linear.perturbed_linear_counter: antithetic Philox noise regenerated
                          inside the kernel that writes the low-rank term, then addmm onto it (no noise
                          in memory)
  eggroll_fly_counter_accum  the same with x@W.T first and the kernel adding in place
  eggroll_fly_keyed       eggroll_optim.noise.keyed_pair_factors (the optimizer's keyed float32 noise,
                          cast to bf16 as its hooks do) every call + antithetic + kernel
  openes_stored           full-rank OpenES, stored E_i: materialise W + E_i, bmm
  openes_stored_nomat     full-rank OpenES, stored E_i, not materialised: x@W.T + bmm(E_i, x_i)
  openes_fly              full-rank OpenES, E_i drawn every call, W + E_i materialised, bmm
OpenES cannot hold 1024 full d x d perturbations (1024 * 8192^2 * 2 B = 137 GB), so it runs M
members (``--openes-members``, default 16) and its time is scaled linearly to N:
``t_N = t_M * N / M`` (members are independent; work and bytes are linear in M).
Paper: 0.91 (stored), 0.69 (on the fly), OpenES 0.0041 / 0.00054.
"""
from __future__ import annotations

import math

import torch

import common
from eggroll_optim.core import generate_lowrank_perturbations
from eggroll_optim.kernels import perturbed_linear
from eggroll_optim.kernels.fast.counter import counter_pair_factors
from eggroll_optim.kernels.fast.counter_linear import perturbed_linear_counter
from eggroll_optim.noise import antithetic, keyed_pair_factors, noise_dtype, noise_key


def ref_lowrank(x, W, A, B):
    """float64 ``x_i (W + A_i B_iᵀ)ᵀ`` for x (N, d), A (N, m, r), B (N, d, r)."""
    x, W, A, B = (t.double().cpu() for t in (x, W, A, B))
    return x @ W.T + torch.einsum("nr,nor->no", torch.einsum("nk,nkr->nr", x, B), A)


def ref_fullrank(x, W, E):
    x, W, E = (t.double().cpu() for t in (x, W, E))
    return x @ W.T + torch.einsum("nok,nk->no", E, x)


class Variants:
    """The forward variants; each takes (x, W, A, B, E) and returns (N, d) (and its noise on request)."""

    def __init__(self, N, d, r, sigma, dtype, device, seed):
        self.N, self.d, self.r, self.sigma, self.dtype, self.device = N, d, r, sigma, dtype, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.scale = sigma / math.sqrt(r)
        self.key = noise_key(seed, 0, 0)

    def inference(self, x, W, A, B, E, out=None):
        return x @ W.T if out is None else torch.mm(x, W.t(), out=out)  # out=: poisoned buffer check

    def pregen_kernel(self, x, W, A, B, E, noise=False):
        y = perturbed_linear(x.unsqueeze(1), W, None, A, B).squeeze(1)
        return (y, A, B) if noise else y

    def pregen_ops(self, x, W, A, B, E, noise=False):
        xB = (x.unsqueeze(-1) * B).sum(1, keepdim=True)  # (N, 1, r); r = 1: (x * B).sum(-1, keepdim)
        y = x @ W.T + (xB * A).sum(-1)
        return (y, A, B) if noise else y

    def fly_randn(self, x, W, A, B, E, noise=False):
        kw = dict(generator=self.gen, dtype=self.dtype, device=self.device)
        An = torch.empty(x.shape[0], self.d, self.r, dtype=self.dtype, device=self.device).normal_(
            0.0, self.scale, generator=self.gen)  # one pass: draw and scale
        Bn = torch.randn(x.shape[0], x.shape[1], self.r, **kw)
        return self.pregen_kernel(x, W, An, Bn, None, noise)

    def fly_generate(self, x, W, A, B, E, noise=False):
        An, _, Bn = generate_lowrank_perturbations(x.shape[0], self.d, x.shape[1], self.r, self.sigma,
                                                   self.gen, self.dtype)
        return self.pregen_kernel(x, W, An, Bn, None, noise)

    def _counter(self, x, W, noise, accumulate):
        y = perturbed_linear_counter(x, W, None, self.key, self.sigma, self.r, accumulate=accumulate)
        if not noise:
            return y
        A, B = counter_pair_factors(self.key, 0, x.shape[0] // 2, self.d, x.shape[1], self.r, self.device)
        An, _, Bn = antithetic(A, B, self.sigma, self.r)
        return y, An, Bn

    def fly_counter(self, x, W, A, B, E, noise=False):
        return self._counter(x, W, noise, accumulate=False)

    def fly_counter_accum(self, x, W, A, B, E, noise=False):
        return self._counter(x, W, noise, accumulate=True)

    def fly_keyed(self, x, W, A, B, E, noise=False):
        Ap, Bp = keyed_pair_factors(self.key, self.d, x.shape[1], self.r, 0, x.shape[0] // 2,
                                    device=self.device, dtype=noise_dtype(self.dtype))
        An, _, Bn = antithetic(Ap, Bp, self.sigma, self.r)
        return self.pregen_kernel(x, W, An.to(self.dtype), Bn.to(self.dtype), None, noise)

    def openes_stored(self, x, W, A, B, E, noise=False):
        M = E.shape[0]
        y = torch.bmm(W + E, x[:M].unsqueeze(-1)).squeeze(-1)  # (M, d, d) materialised
        return (y, E) if noise else y

    def openes_stored_nomat(self, x, W, A, B, E, noise=False):
        M = E.shape[0]
        y = torch.baddbmm((x[:M] @ W.T).unsqueeze(-1), E, x[:M].unsqueeze(-1)).squeeze(-1)
        return (y, E) if noise else y

    def openes_fly(self, x, W, A, B, E, noise=False):
        En = torch.empty(E.shape, dtype=self.dtype, device=self.device).normal_(0.0, self.sigma, generator=self.gen)
        return self.openes_stored(x, W, A, B, En, noise)


EGG = ["pregen_kernel", "pregen_ops", "fly_counter", "fly_counter_accum", "fly_randn", "fly_generate", "fly_keyed"]
OES = ["openes_stored", "openes_stored_nomat", "openes_fly"]


def make_set(N, d, r, M, sigma, dtype, device, g, with_E=True):
    x = torch.randn(N, d, device=device, generator=g).to(dtype)
    W = (torch.randn(d, d, device=device, generator=g) / math.sqrt(d)).to(dtype)
    A = (torch.randn(N, d, r, device=device, generator=g) * sigma / math.sqrt(r)).to(dtype)
    B = torch.randn(N, d, r, device=device, generator=g).to(dtype)
    E = (torch.randn(M, d, d, device=device, generator=g) * sigma).to(dtype) if with_E else None
    return x, W, A, B, E


def correctness(args, dtype, log, failures):
    """Every variant on a small size against float64; sigma makes the noise term comparable to x Wᵀ.
    The output buffer (inference) or the allocator (the rest) is poisoned with NaN first."""
    d, N, M = 256, 8, 4
    sigma = 1.0 / math.sqrt(d)
    g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    v = Variants(N, d, args.rank, sigma, dtype, args.device, args.seed + 1)
    x, W, A, B, E = make_set(N, d, args.rank, M, sigma, dtype, args.device, g)
    out = torch.full((N, d), float("nan"), dtype=dtype, device=args.device)
    v.inference(x, W, A, B, E, out=out)
    common.check("inference", out, ref_lowrank(x, W, A * 0, B), common.TOL[dtype], log)  # fatal: the baseline

    def one(name):
        common.poison(args.device)
        if name in OES:
            y, En = getattr(v, name)(x, W, A, B, E, noise=True)
            return common.check(name, y, ref_fullrank(x[:M], W, En), common.TOL[dtype], log)
        y, An, Bn = getattr(v, name)(x, W, A, B, E, noise=True)
        common.check(name, y, ref_lowrank(x, W, An, Bn), common.TOL[dtype], log)
        if name.startswith("fly") and rel_noise_scale(An, sigma / math.sqrt(args.rank)) > 0.2:
            raise AssertionError(f"{name}: A_scaled does not have the scale sigma/sqrt(r)")

    for name in EGG + OES:
        common.guard(name, lambda: one(name), failures)


def rel_noise_scale(A, scale):
    return abs(float(A.float().std()) / scale - 1.0)


def main(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--members", type=int, default=1024)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--openes-members", type=int, default=16)
    p.add_argument("--sets", type=int, default=3, help="rotating input sets")
    args = common.parse(p, argv)
    if args.quick:
        args.dim, args.members, args.openes_members, args.sets = 256, 64, 2, 2
    budget = args.budget or (0.2 if args.quick else 1.0)
    dev, dtype, N, d, r, M = args.device, torch.bfloat16, args.members, args.dim, args.rank, args.openes_members
    ceil = common.measure_ceilings(dev, args.quick)
    common.header(args, ceil)
    checks, failures = {}, {}
    correctness(args, dtype, checks, failures)
    print(f"# correctness vs float64 (rel. err, tol {common.TOL[dtype]:.0e}): "
          + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()), flush=True)

    sigma = 0.01
    g = torch.Generator(device=dev).manual_seed(args.seed)
    sets = [make_set(N, d, r, M, sigma, dtype, dev, g, with_E=(i == 0)) for i in range(args.sets)]
    E0 = sets[0][4]
    sets = [s[:4] + (E0,) for s in sets]  # one stored E (M d^2 values): it is far larger than L2
    v = Variants(N, d, r, sigma, dtype, dev, args.seed)
    b2 = 2  # bytes per bf16 value
    base_flops, base_bytes = 2 * N * d * d, b2 * (d * d + 2 * N * d)
    lr_flops, ab_bytes = 4 * N * d * r, b2 * 2 * N * d * r
    floors = {
        "inference": (base_flops, base_bytes),
        "pregen_kernel": (base_flops + lr_flops, base_bytes + ab_bytes),
        "pregen_ops": (base_flops + lr_flops, base_bytes + ab_bytes),
        **{k: (base_flops + lr_flops, base_bytes) for k in EGG if k.startswith("fly")},  # fused RNG: no noise bytes
        "openes_stored": (2 * N * d * d, b2 * N * d * d),  # read each E_i once (per N members)
        "openes_stored_nomat": (2 * N * d * d, b2 * N * d * d),
        "openes_fly": (2 * N * d * d, 2 * b2 * N * d * d),  # E_i written then read (as structured)
    }
    rows, times = [], {}

    def run(name, fn, sset, scale=1.0):
        common.free(dev)
        t = common.bench(fn, dev, sset, budget_s=budget)
        times.setdefault(name, []).append(t["median_ms"] * scale)
        return t

    run("inference", v.inference, sets)
    for name in EGG:
        if name not in failures:
            run(name, getattr(v, name), sets)
    for name in OES:
        if name not in failures:
            run(name, getattr(v, name), sets[:1], scale=N / M)
    run("inference", v.inference, sets)  # timed twice: the spread is the noise level
    # the same variants interleaved with inference, repeat by repeat: a ratio from one stretch of time
    mixed = {"inference": v.inference, **{name: getattr(v, name) for name in EGG if name not in failures}}
    common.free(dev)
    interleaved = common.bench_interleaved(mixed, dev, sets, budget_s=budget * len(mixed))
    x0, W0 = sets[0][:2]
    dobench = {"inference": common.do_bench_ms(lambda: x0 @ W0.T, dev),
               "pregen_kernel": common.do_bench_ms(lambda: v.pregen_kernel(*sets[0]), dev)}
    t_base = min(times["inference"])
    spread = abs(times["inference"][0] - times["inference"][1]) / t_base
    paper = {"pregen_kernel": 0.91, "pregen_ops": 0.91, "fly_counter": 0.69,
             "fly_counter_accum": 0.69, "fly_randn": 0.69, "fly_generate": 0.69,
             "fly_keyed": 0.69, "openes_stored": 0.0041, "openes_stored_nomat": 0.0041, "openes_fly": 0.00054}
    for name in ["inference"] + EGG + OES:
        if name in failures:
            rows.append({"variant": name, "check": "FAILED"})
            continue
        t = times[name][0] if name != "inference" else t_base
        fl = common.floor(*floors[name], ceil, "bf16")
        mixed_ratio = None
        if name in interleaved:
            mixed_ratio = interleaved["inference"]["median_ms"] / interleaved[name]["median_ms"]
        rows.append({"variant": name, "time_ms": t, "ratio_vs_inference": t_base / t,
                     "ratio_interleaved": mixed_ratio, "paper_ratio": paper.get(name), **fl,
                     "time_over_floor": t / fl["floor_ms"], "members_timed": M if name in OES else N, "check": "ok"})
    payload = {
        "config": {"dim": d, "members": N, "rank": r, "dtype": "bfloat16", "openes_members": M,
                   "openes_scaling": f"t_{N} = t_{M} * {N}/{M} (linear in members)", "sets": args.sets,
                   "timer": "cuda events, L2 flushed, median" if common.is_cuda(dev) else "perf_counter median"},
        "ceilings": ceil, "checks": checks, "failures": failures, "baseline_spread": spread, "rows": rows,
        "do_bench_cross_check_ms": dobench, "event_timer_ms": {k: times[k][0] for k in dobench if k in times},
        "interleaved": interleaved, "inference_timings_ms": times["inference"],
        "figures": {r_["variant"]: r_.get("ratio_vs_inference") for r_ in rows},
    }
    common.save(args, payload)
    cols = ["variant", "time_ms", "ratio_vs_inference", "ratio_interleaved", "paper_ratio", "floor_ms", "floor_bound",
            "time_over_floor", "check"]
    print(f"# inference timed twice: spread {spread:.1%}; OpenES timed at {M} members, scaled x{N / M:g}")
    if dobench["inference"] is not None:
        print(f"# triton do_bench cross-check (one input set, median): inference {dobench['inference']:.4f} ms, "
              f"pregen_kernel {dobench['pregen_kernel']:.4f} ms")
    print(common.table(rows, cols, f"Fig.2a microbench: d={d}, N={N}, rank {r}, bf16"))
    common.finish(failures)
    return payload


if __name__ == "__main__":
    main()

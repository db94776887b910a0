"""One full ES step of an MNIST MLP (784-256(tanh)-10), population N, shared batch B, rank r, TF32.

A step = noise, forward of every member, fitness = -cross-entropy, gradient, update. Variants:
  functional_fx    generate_perturbations + make_perturbed_forward_fn (torch.fx) + eggroll_step, shared x
  functional_hand  generate_perturbations + perturbed_forward per layer + eggroll_step, shared x
  functional_graph (CUDA) functional_fx's step with eggroll_step(..., nan_policy="skip") (no host sync),
                   captured once in a CUDA graph with the generator registered, then replayed
  optimizer        EggrollOptimizer.step(closure) with per_member_cross_entropy (also evolves biases)
  optimizer_graph  (CUDA) the same step through EggrollOptimizer.compile_step: one CUDA graph replay a step
                   (its equality with the eager step is tests/test_capture.py's; no float64 check here)
  optimizer_graph_weights  (CUDA) optimizer_graph with evolve_biases=False: the functional variants' work
                   (noise and updates for the two weight matrices only)
  naive            plain torch: x.expand(N, B, 784).contiguous(), x_i W^T per member (no shared base),
                   bmm low-rank terms, z-score, einsum gradient, update
  inference        plain inference of the same N*B samples, one (N*B, 784) batch, unperturbed MLP
Ratios are time(variant) / time(inference) (the paper's "pure batch inference"; lower is better)
and naive / functional (speed-up of the shared-base path). Peak memory: of the second step of each
variant (state included; the first also runs Triton's autotuner once per shape). The floor is the minimum work of the
step (shared base product, low-rank terms, per-member second layer, gradient) at the measured TF32
peak: ~16 GFLOP at N=4096, B=256, r=4.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from eggroll_optim import EggrollOptimizer, compute_classification_fitness, per_member_cross_entropy
from eggroll_optim.core import (EggrollConfig, eggroll_step, generate_perturbations, get_params_dict,
                                get_weight_shapes, make_perturbed_forward_fn, perturbed_forward)

IN, HID, OUT = 784, 256, 10
NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))


def es_flops(N, B, r):
    """Minimum FLOPs of one step with a shared input (what a fused implementation must do)."""
    base = 2 * B * IN * HID  # x W1ᵀ once
    low1 = 2 * B * IN * N * r + 2 * N * B * r * HID  # x B_i, then (x B_i) A_iᵀ
    layer2 = 2 * N * B * HID * OUT + 2 * N * B * HID * r + 2 * N * B * r * OUT
    grad = 2 * N * r * (HID * IN + OUT * HID)
    return base + low1 + layer2 + grad


def inference_work(N, B):
    return 2 * N * B * (IN * HID + HID * OUT), 4 * N * B * (IN + OUT)  # FLOPs, bytes (read x, write logits)


class Functional:
    def __init__(self, model, N, r, sigma, lr, device, seed, hand=False):
        self.params = get_params_dict(model, device)
        self.shapes = get_weight_shapes(self.params)
        self.forward, _ = make_perturbed_forward_fn(copy.deepcopy(model))
        self.config = EggrollConfig(population_size=N, rank=r, sigma=sigma, lr=lr, lr_decay=1.0, sigma_decay=1.0)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.N, self.r, self.sigma, self.lr, self.hand = N, r, sigma, lr, hand

    def logits(self, x, perts):
        if not self.hand:
            return self.forward(x, self.params, perts)
        p = self.params
        h = torch.tanh(perturbed_forward(x, p["0.weight"], p["0.bias"], perts, "0.weight"))
        return perturbed_forward(h, p["2.weight"], p["2.bias"], perts, "2.weight")

    def step(self, x, y):
        perts = generate_perturbations(self.shapes, self.N, self.r, self.sigma, self.gen)
        logits = self.logits(x, perts)
        fitness = compute_classification_fitness(logits, y)
        eggroll_step(self.params, fitness, perts, self.lr, self.sigma, self.config)
        return {k: ("lowrank", *v) for k, v in perts.items()}, logits, fitness

    def weights(self):
        return {k: self.params[k].clone() for k in NAMES}


class GraphedFunctional(Functional):
    """``Functional``'s step with the sync-free NaN policy, captured in one CUDA graph on the first call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph = None

    def eager_step(self, x, y):
        perts = generate_perturbations(self.shapes, self.N, self.r, self.sigma, self.gen)
        logits = self.forward(x, self.params, perts)
        fitness = compute_classification_fitness(logits, y)
        eggroll_step(self.params, fitness, perts, self.lr, self.sigma, self.config, nan_policy="skip")
        return {k: ("lowrank", *v) for k, v in perts.items()}, logits, fitness

    def capture(self, x, y):
        if self.graph is None:
            self.x, self.y = x.clone(), y.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: autotuning and allocator pools before capture
                for _ in range(3):
                    self.eager_step(self.x, self.y)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            self.graph.register_generator_state(self.gen)
            with torch.cuda.graph(self.graph):
                self.out = self.eager_step(self.x, self.y)

    def step(self, x, y):
        self.capture(x, y)
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.out


class Optim:
    def __init__(self, model, N, r, sigma, lr, device, seed, chunk_size=None, evolve_biases=True):
        self.model = copy.deepcopy(model).to(device)
        self.opt = EggrollOptimizer(self.model, lr=lr, sigma=sigma, rank=r, population_size=N, seed=seed,
                                    chunk_size=chunk_size, evolve_biases=evolve_biases)
        self.N = N

    def step(self, x, y):
        return self.opt.step(lambda: per_member_cross_entropy(self.model(x), y))

    def checked_step(self, x, y):
        pop = self.opt.ask()
        raw = pop.noise.chunk_noise(0, self.N)  # a pure function of the keys: what the hooks used
        names = {p: n for n, p in self.model.named_parameters()}
        noise = {names[p]: ("lowrank", *v) if isinstance(v, tuple) else ("full", v) for p, v in raw.items()}
        with torch.no_grad():
            logits = self.model(x)
        fitness = -per_member_cross_entropy(logits, y)
        self.opt.tell(fitness)
        return noise, logits, fitness

    def weights(self):
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}


class OptimGraph(Optim):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compiled = self.opt.compile_step(lambda x, y: per_member_cross_entropy(self.model(x), y))

    def step(self, x, y):
        return self.compiled(x, y)


class Naive:
    def __init__(self, model, N, r, sigma, lr, device, seed):
        self.p = {k: v.detach().to(device).clone() for k, v in model.named_parameters()}
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.N, self.r, self.sigma, self.lr, self.device = N, r, sigma, lr, device

    def _noise(self, m, n):
        kw = dict(generator=self.gen, device=self.device)
        A, B = torch.randn(self.N // 2, m, self.r, **kw), torch.randn(self.N // 2, n, self.r, **kw)
        A = torch.stack((A, -A), 1).flatten(0, 1) * (self.sigma / math.sqrt(self.r))
        return A, torch.stack((B, B), 1).flatten(0, 1)

    def step(self, x, y):
        N, p = self.N, self.p
        (A1, B1), (A2, B2) = self._noise(HID, IN), self._noise(OUT, HID)
        xe = x.expand(N, *x.shape).contiguous()  # (N, B, 784): every member its own copy
        h = torch.tanh(xe @ p["0.weight"].T + p["0.bias"] + torch.bmm(torch.bmm(xe, B1), A1.transpose(1, 2)))
        logits = h @ p["2.weight"].T + p["2.bias"] + torch.bmm(torch.bmm(h, B2), A2.transpose(1, 2))
        nll = -F.log_softmax(logits, -1).gather(-1, y.expand(N, -1).unsqueeze(-1)).squeeze(-1)
        fitness = -nll.mean(1)
        f = fitness - fitness.mean()
        f = f / torch.sqrt(f.square().mean() + 1e-8)
        for name, A, B in (("0.weight", A1, B1), ("2.weight", A2, B2)):
            p[name] += self.lr * torch.einsum("nir,njr->ij", f[:, None, None] * A, B) / math.sqrt(N)
        return {"0.weight": ("lowrank", A1, B1), "2.weight": ("lowrank", A2, B2)}, logits, fitness

    def weights(self):
        return {k: v.clone() for k, v in self.p.items()}


class Inference:
    def __init__(self, model, N, r, sigma, lr, device, seed, x=None):
        self.model = copy.deepcopy(model).to(device)
        self.N, self.x = N, x
        self.xbig = None if x is None else x.repeat(N, 1)  # (N*B, 784), materialised

    def step(self, x, y):
        return self.model(self.xbig)


VARIANTS = {"functional_fx": Functional, "functional_hand": lambda *a: Functional(*a, hand=True),
            "functional_graph": GraphedFunctional, "optimizer": Optim, "optimizer_graph": OptimGraph,
            "optimizer_graph_weights": lambda *a: OptimGraph(*a, evolve_biases=False), "naive": Naive}
CUDA_ONLY = {"functional_graph", "optimizer_graph", "optimizer_graph_weights"}
UNCHECKED = {"optimizer_graph", "optimizer_graph_weights"}


def reference(before, noise, x, y, fitness, lr):
    """float64: every member's logits with W + A Bᵀ (and b + eps), its fitness, and the update that
    the variant's own fitness implies (so TF32 noise in the fitness does not enter the check)."""
    d = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    P = {k: d(v) for k, v in before.items()}
    N = fitness.shape[0]
    member = {}
    for k in NAMES:
        kind, *t = noise.get(k, ("none",))
        if kind == "lowrank":
            member[k] = P[k] + torch.einsum("nir,njr->nij", d(t[0]), d(t[1]))
        elif kind == "full":
            member[k] = P[k] + d(t[0])
        else:
            member[k] = P[k].expand(N, *P[k].shape)
    xd = d(x)
    h = torch.tanh(torch.einsum("bi,noi->nbo", xd, member["0.weight"]) + member["0.bias"][:, None])
    logits = torch.einsum("nbi,noi->nbo", h, member["2.weight"]) + member["2.bias"][:, None]
    fit_ref = -F.cross_entropy(logits.flatten(0, 1), d(y).long().repeat(N), reduction="none").view(N, -1).mean(1)
    f = d(fitness)
    f = (f - f.mean()) / torch.sqrt((f - f.mean()).square().mean() + 1e-8)
    deltas = {}
    for k, (kind, *t) in noise.items():
        g = torch.einsum("n,nir,njr->ij", f, d(t[0]), d(t[1])) if kind == "lowrank" else torch.einsum("n,n...->...", f, d(t[0]))
        deltas[k] = lr * g.view(P[k].shape) / math.sqrt(N)
    return logits, fit_ref, deltas


def correctness(args, log, failures):
    """Each variant at N=8, B=4 on the device (TF32) vs float64: logits, fitness, and the update."""
    N, B, r, sigma, lr, dev = 8, 4, args.rank, 0.5, 1.0, args.device
    tol = common.TOL["tf32"]
    g = torch.Generator(device=dev).manual_seed(args.seed + 7)
    x = torch.randn(B, IN, device=dev, generator=g)
    y = torch.randint(0, OUT, (B,), device=dev, generator=g)
    model = make_mlp(args.seed + 7)

    def one(name, cls):
        v = cls(model, N, r, sigma, lr, dev, args.seed + 7)
        if hasattr(v, "capture"):
            with torch.no_grad():
                v.capture(x, y)  # its warm-up steps move the weights: take "before" after them
        before = v.weights()
        common.poison(dev)
        with torch.no_grad():
            noise, logits, fitness = (v.checked_step if name == "optimizer" else v.step)(x, y)
        after = v.weights()
        ref_logits, ref_fit, deltas = reference(before, noise, x, y, fitness, lr)
        common.check(f"{name}.logits", logits, ref_logits, tol, log)
        common.check(f"{name}.fitness", fitness, ref_fit, tol, log)
        for k, delta in deltas.items():
            common.check(f"{name}.update.{k}", after[k] - before[k], delta, tol, log)
        untouched = [k for k in NAMES if k not in deltas and not torch.equal(after[k], before[k])]
        if untouched:
            raise AssertionError(f"{name}: parameters without noise changed: {untouched}")

    def inference():
        inf = Inference(model, N, r, sigma, lr, dev, 0, x)
        common.poison(dev)
        with torch.no_grad():
            out = inf.step(x, y).view(N, B, OUT)
        ref, _, _ = reference(inf.model.state_dict(), {}, x, y, torch.zeros(N), lr)
        common.check("inference.logits", out, ref, tol, log)

    inference()  # the baseline: fatal
    for name, cls in VARIANTS.items():
        if name not in UNCHECKED and (name not in CUDA_ONLY or common.is_cuda(dev)):
            common.guard(name, lambda: one(name, cls), failures)


def main(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--population", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--sigma", type=float, default=0.15)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sets", type=int, default=4, help="rotating (x, y) batches")
    args = common.parse(p, argv)
    if args.quick:
        args.population, args.batch = 64, 16
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 with TF32 (a no-op on CPU)
    torch.backends.cudnn.allow_tf32 = True
    dev, N, B, r = args.device, args.population, args.batch, args.rank
    budget = args.budget or (0.2 if args.quick else 1.0)
    ceil = common.measure_ceilings(dev, args.quick)  # restores the TF32 setting it changes
    common.header(args, ceil)
    checks, failures = {}, {}
    correctness(args, checks, failures)
    print(f"# correctness vs float64: max rel. err {max(checks.values()):.1e} over {len(checks)} checks "
          f"(tol {common.TOL['tf32']:.0e})", flush=True)

    g = torch.Generator(device=dev).manual_seed(args.seed)
    sets = [(torch.randn(B, IN, device=dev, generator=g), torch.randint(0, OUT, (B,), device=dev, generator=g))
            for _ in range(args.sets)]
    model = make_mlp(args.seed)
    es_floor = common.floor(es_flops(N, B, r), 4 * 2 * (IN * HID + HID * OUT) + 4 * B * IN, ceil, "tf32")
    inf_floor = common.floor(*inference_work(N, B), ceil, "tf32")
    times, mem = {}, {}
    order = ["inference", "functional_fx", "functional_hand", "functional_graph", "optimizer", "optimizer_graph",
             "optimizer_graph_weights", "naive", "inference"]
    order = [n for n in order if n not in CUDA_ONLY or common.is_cuda(dev)]
    for name in order:
        if name in failures:
            continue
        common.free(dev)
        base = torch.cuda.memory_allocated(dev) if common.is_cuda(dev) else 0
        if name == "inference":
            v = Inference(model, N, r, args.sigma, args.lr, dev, args.seed, sets[0][0])
        else:
            v = VARIANTS[name](model, N, r, args.sigma, args.lr, dev, args.seed)
        fn = torch.no_grad()(v.step)
        # a step that has run once: the first call of a shape also autotunes the Triton kernels, whose
        # benchmark allocates a 256 MB L2-flush buffer for a moment, and captures the graphed variant
        fn(*sets[0])
        m = common.peak_memory(lambda: fn(*sets[0]), dev)
        if m["peak_gb"] is not None:
            m["peak_gb"] = (torch.cuda.max_memory_allocated(dev) - base) / 1e9  # incl. the variant's own state
        mem.setdefault(name, m)
        t = common.bench(fn, dev, sets, budget_s=budget)
        times.setdefault(name, []).append(t["median_ms"])
        del v, fn
    t_inf = min(times["inference"])
    spread = abs(times["inference"][0] - times["inference"][-1]) / t_inf
    rows = []
    t_naive = times["naive"][0] if "naive" in times else None
    for name in order[:-1]:
        if name in failures:
            rows.append({"variant": name, "check": "FAILED"})
            continue
        t = t_inf if name == "inference" else times[name][0]
        fl = inf_floor if name == "inference" else es_floor
        rows.append({"variant": name, "time_ms": t, "ratio_vs_inference": t / t_inf,
                     "naive_over_variant": t_naive and t_naive / t, "peak_gb": mem[name]["peak_gb"],
                     **fl, "time_over_floor": t / fl["floor_ms"], "check": "ok"})
    figures = {f"{r_['variant']}_ms": r_.get("time_ms") for r_ in rows}
    figures.update({f"{r_['variant']}_vs_inference": r_.get("ratio_vs_inference") for r_ in rows})
    for name in ("functional_fx", "functional_hand", "functional_graph", "optimizer", "optimizer_graph"):
        figures[f"naive_over_{name}"] = t_naive / times[name][0] if t_naive and name in times else None
    payload = {
        "config": {"population": N, "batch": B, "rank": r, "sigma": args.sigma, "lr": args.lr, "dtype": "float32+tf32",
                   "mlp": "784-256(tanh)-10", "sets": args.sets, "es_floor_gflop": es_floor["gflop"]},
        "ceilings": ceil, "checks": checks, "failures": failures, "baseline_spread": spread, "rows": rows, "figures": figures,
    }
    common.save(args, payload)
    print(f"# inference timed first and last: spread {spread:.1%}; ES floor {es_floor['gflop']:.1f} GFLOP = "
          f"{es_floor['floor_ms']:.3f} ms at the measured TF32 peak")
    cols = ["variant", "time_ms", "ratio_vs_inference", "naive_over_variant", "peak_gb", "floor_ms", "time_over_floor",
            "check"]
    print(common.table(rows, cols, f"MNIST-MLP ES step: N={N}, batch {B}, rank {r}, float32+TF32"))
    common.finish(failures)
    return payload


if __name__ == "__main__":
    main()

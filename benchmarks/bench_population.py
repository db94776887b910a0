"""MNIST-MLP ES step vs population size: EggrollOptimizer.step(closure) with chunk_size, N = 2^lo .. 2^hi.

Per N: step time, member-samples/s (N * batch / step time), peak memory, and the ratio of
member-samples/s to the samples/s of plain inference of the unperturbed MLP (a (rows, 784) batch,
timed in this process; ``--inference-rows``, default 4096 * 256). The floor is the minimum work of
the step at the measured TF32 peak (see bench_mnist_step.es_flops; the shared base product is paid
once per chunk). The optimizer evolves biases too (full-rank noise) and regenerates each chunk's
noise in ``tell`` (the noise is keyed, never stored). The measured step and its timing are
``eggroll_optim.recipes.hyperscale.measure`` (what ``--experiment hyperscale`` runs): CUDA events
around ``max_epochs`` steps after one warm-up step, peak memory over those steps.
"""
from __future__ import annotations

import torch

import common
from bench_mnist_step import IN, OUT, Inference, Optim, es_flops, inference_work, make_mlp

from eggroll_optim.recipes import hyperscale
from eggroll_optim.recipes.hyperscale import HyperscaleConfig


def check_chunked(args, log):
    """Chunked step == unchunked step (keyed noise) and both == the float64 reference."""
    from bench_mnist_step import reference

    N, B, dev = 16, 4, args.device
    x = torch.randn(B, IN, device=dev)
    y = torch.randint(0, OUT, (B,), device=dev)
    model = make_mlp(args.seed + 11)
    full, chunked = (Optim(model, N, 4, 0.5, 1.0, dev, 5, chunk_size=c) for c in (None, 4))
    before = full.weights()
    noise, logits, fitness = full.checked_step(x, y)
    ref_logits, _, deltas = reference(before, noise, x, y, fitness, 1.0)
    common.check("unchunked.logits", logits, ref_logits, common.TOL["tf32"], log)
    after = full.weights()
    for k, delta in deltas.items():
        common.check(f"unchunked.update.{k}", after[k] - before[k], delta, common.TOL["tf32"], log)
    with torch.no_grad():  # same fitness through the chunked path: same update
        pop = chunked.opt.ask()
        for members in pop.chunks():
            chunked.model(x)
        chunked.opt.tell(fitness)
    for k, v in chunked.weights().items():
        common.check(f"chunked_vs_unchunked.{k}", v - before[k], after[k] - before[k], common.TOL["tf32"], log)


def main(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--log2-min", type=int, default=10)
    p.add_argument("--log2-max", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--inference-rows", type=int, default=4096 * 256)
    p.add_argument("--sets", type=int, default=2)
    args = common.parse(p, argv)
    if args.quick:
        args.log2_min, args.log2_max, args.batch, args.chunk_size, args.inference_rows = 4, 6, 12, 32, 1200
    torch.backends.cuda.matmul.allow_tf32 = True
    dev, B, r = args.device, args.batch, args.rank
    budget = args.budget or (0.2 if args.quick else 1.0)
    ceil = common.measure_ceilings(dev, args.quick)  # restores the TF32 setting it changes
    common.header(args, ceil)
    checks, failures = {}, {}
    common.guard("chunked", lambda: check_chunked(args, checks), failures)
    print(f"# correctness vs float64 and chunked vs unchunked: max rel. err {max(checks.values()):.1e}", flush=True)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    sets = [(torch.randn(B, IN, device=dev, generator=g), torch.randint(0, OUT, (B,), device=dev, generator=g))
            for _ in range(args.sets)]
    model = make_mlp(args.seed)

    def inference_rate():
        common.free(dev)
        rows_ = args.inference_rows
        inf = Inference(model, rows_ // B, r, 0.1, 0.1, dev, 0, sets[0][0])
        t = common.bench(torch.no_grad()(inf.step), dev, sets, budget_s=budget)
        del inf
        return rows_ / (t["median_ms"] * 1e-3), t["median_ms"]

    inf_rate, inf_ms = inference_rate()
    # The step and its timing are the recipe's (`--experiment hyperscale`): one definition of the sweep;
    # this script adds the same-process inference baseline, the floor and the correctness checks.
    cfg = HyperscaleConfig(seed=args.seed, device=str(dev), rank=r, sigma=0.15, lr=0.1, batch_size=B,
                           chunk_size=args.chunk_size, max_epochs=2 if args.quick else 5)
    rows = []
    for k in range(args.log2_min, args.log2_max + 1):
        N = 2**k
        chunk = min(N, args.chunk_size)
        common.free(dev)
        row = hyperscale.measure(cfg, "mnist_mlp", N, torch.device(dev))
        if "error" in row:  # out of memory: record and go on with the next size
            rows.append({"log2_N": k, "N": N, "chunk": chunk, "error": row["error"]})
            continue
        ms = row["step_s"] * 1e3
        chunks = -(-N // chunk)
        flops = es_flops(N, B, r) + (chunks - 1) * 2 * B * IN * 256
        fl = common.floor(flops, 0, ceil, "tf32")
        rate = N * B / (ms * 1e-3)
        peak = row.get("peak_cuda_mib")
        rows.append({"log2_N": k, "N": N, "chunk": chunk, "step_ms": ms, "member_samples_per_s": rate,
                     "ratio_vs_inference": rate / inf_rate, "peak_gb": peak * 2**20 / 1e9 if peak else None,
                     "floor_ms": fl["floor_ms"], "time_over_floor": ms / fl["floor_ms"], "steps": cfg.max_epochs})
        print(f"# N=2^{k}: {ms:.3f} ms/step, {rate:.3e} member-samples/s", flush=True)
    inf_rate2, inf_ms2 = inference_rate()
    payload = {
        "config": {"batch": B, "rank": r, "chunk_size": args.chunk_size, "mlp": "784-256(tanh)-10",
                   "dtype": "float32+tf32", "log2_range": [args.log2_min, args.log2_max]},
        "ceilings": ceil, "checks": checks, "failures": failures,
        "inference": {"rows": args.inference_rows, "ms": [inf_ms, inf_ms2], "samples_per_s": [inf_rate, inf_rate2],
                      "floor_ms": common.floor(*inference_work(args.inference_rows // B, B), ceil, "tf32")["floor_ms"]},
        "baseline_spread": abs(inf_ms - inf_ms2) / min(inf_ms, inf_ms2), "rows": rows,
        "figures": {f"N=2^{r_['log2_N']}_member_samples_per_s": r_.get("member_samples_per_s") for r_ in rows},
    }
    common.save(args, payload)
    print(f"# inference {args.inference_rows} rows: {inf_ms:.3f} / {inf_ms2:.3f} ms (first / last), "
          f"{inf_rate:.3e} samples/s")
    cols = ["N", "chunk", "step_ms", "member_samples_per_s", "ratio_vs_inference", "peak_gb", "floor_ms",
            "time_over_floor", "error"]
    print(common.table(rows, cols, f"EggrollOptimizer MNIST-MLP step vs population (batch {B}, rank {r})"))
    common.finish(failures)
    return payload


if __name__ == "__main__":
    main()

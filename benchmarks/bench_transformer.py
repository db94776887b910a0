"""Greedy decoding by a whole population against plain batched inference of the same transformer.

The model is the arithmetic recipe's :class:`AdditionTransformer` (``nn.TransformerEncoder``,
causal mask, ``pos(arange(T))``); ``B`` prompts of ``3 + 3 =`` digits are decoded ``digits + 1``
tokens, greedily, by every one of ``N`` members (the population forward the recipe's fitness
runs: shared prompts on the first token, ``population.per_member(seq)`` after), and by the
unperturbed model on the same ``N·B`` sequences in one plain batch. Both recompute the whole
sequence at each token (no KV cache, as ``nn.TransformerEncoder`` has none). Figures: generated
tokens/s of each, their ratio (population over plain: the issue's target is >= 0.8), the whole
ES step (ask, decode, reward, tell), peak memory. Check: members 0 and 1 decode what plain
decoding with their dense weights (``population.member_state_dict``) decodes.

    python benchmarks/bench_transformer.py [--quick] [--population-size 512] [--batch-size 256]
"""
from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)
import torch

from eggroll_optim import EggrollOptimizer
from eggroll_optim.recipes.arithmetic import AdditionTransformer, answer_reward, greedy_decode, make_problems


def _setup(args, device):
    torch.manual_seed(args.seed)
    model = AdditionTransformer(3 * args.digits + 3, args.d_model, args.heads, args.layers).to(device).eval()
    opt = EggrollOptimizer(model, lr=1e-3, sigma=0.02, rank=args.rank, population_size=args.population_size,
                           chunk_size=args.chunk_size, optimizer=torch.optim.Adam, seed=args.seed)
    prompts, answers = make_problems(args.batch_size, args.digits, torch.Generator().manual_seed(args.seed))
    return model, opt, prompts.to(device), answers.to(device)


def _decoders(model, opt, prompts, answers, length):
    N = opt.population_size
    flat = prompts.repeat(N, 1)  # (N·B, P): member-major, as the population's rows

    @torch.no_grad()
    def population():
        out = []
        with opt.ask() as pop:
            for _ in pop.chunks():
                out.append(greedy_decode(model, prompts, length, pop))  # (n, B, L)
        opt.discard()
        return torch.cat(out)

    @torch.no_grad()
    def plain():
        return greedy_decode(model, flat, length)  # (N·B, L)

    def es_step():
        with torch.no_grad():
            pop = opt.ask()
            fitness = torch.cat([answer_reward(greedy_decode(model, prompts, length, pop), answers, 0.5)[0]
                                 for _ in pop.chunks()])
        opt.tell(fitness)

    return population, plain, es_step


@torch.no_grad()
def check_members(model, opt, prompts, length, log: dict) -> None:
    """Members 0, 1 of the population decode as plain decoding with their dense weights does."""
    pop = opt.ask()
    decoded = torch.cat([greedy_decode(model, prompts, length, pop) for _ in pop.chunks()])  # (N, B, L)
    weights = [pop.member_state_dict(i) for i in (0, 1)]
    opt.discard()
    for i, w in enumerate(weights):
        agree = float((decoded[i] == _decode_with(model, w, prompts, length)).float().mean())
        log[f"member{i}.disagreement"] = 1.0 - agree
        if agree < 0.99:  # argmax may flip where two logits tie to rounding; more is a bug
            raise AssertionError(f"member {i}: population decoding agrees with its dense weights on {agree:.3f}")


def _decode_with(model, weights, prompts, length):
    seq = prompts
    for _ in range(length):
        token = torch.func.functional_call(model, weights, (seq,))[:, -1].argmax(-1)
        seq = torch.cat((seq, token[:, None]), dim=1)
    return seq[:, prompts.shape[1]:]


def main(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--population-size", type=int, default=None, help="N (default 512; --quick 16)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts B (default 256; --quick 8)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    args = common.parse(p, argv)
    args.population_size = args.population_size or (16 if args.quick else 512)
    args.batch_size = args.batch_size or (8 if args.quick else 256)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model, opt, prompts, answers = _setup(args, device)
    N, B, L = args.population_size, args.batch_size, args.digits + 1
    population, plain, es_step = _decoders(model, opt, prompts, answers, L)
    checks, failures = {}, {}
    common.guard("members", lambda: check_members(model, opt, prompts, L, checks), failures)
    budget = args.budget or (0.3 if args.quick else 2.0)
    rows = []
    for name, fn in (("plain", plain), ("population", population), ("es_step", es_step)):
        t = common.bench(fn, device, budget_s=budget)
        rows.append({"variant": name, "ms": t["median_ms"], "tokens_per_s": N * B * L / (t["median_ms"] * 1e-3),
                     "peak_gb": common.peak_memory(fn, device)["peak_gb"], "reps": t["reps"]})
    for row in rows:
        row["vs_plain"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    common.header(args, common.measure_ceilings(device, args.quick))
    print(f"# N={N} members x B={B} prompts, {L} tokens each (N·B·L = {N * B * L} generated tokens), "
          f"d_model {args.d_model}, {args.layers} layers, rank {args.rank}, chunk {args.chunk_size or N}")
    print(f"# population / plain decoding throughput: {rows[1]['vs_plain']:.3f}")
    print(common.table(rows, ["variant", "ms", "tokens_per_s", "vs_plain", "peak_gb", "reps"],
                       "greedy decoding: population forward vs plain batched inference"))
    common.save(args, {"config": {k: getattr(args, k) for k in ("population_size", "batch_size", "chunk_size",
                                                               "digits", "d_model", "heads", "layers", "rank")},
                       "rows": rows, "checks": checks, "failures": failures})
    common.finish(failures)


if __name__ == "__main__":
    main()

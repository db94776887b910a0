"""One whole ES step (ask, population forward, tell) of ``EggrollOptimizer`` against plain inference
of the same model on ``N·B`` inputs, in the same process, for the models of the "Any model" issue.

Models: the MNIST MLP (784-256-10, a shared batch), the MNIST CNN recipe's model, ResNet-18 on
32×32 inputs (N·B ≥ 8192 images), a transformer LM (``nn.TransformerEncoder``, N·B ≥ 2048 sequences
of 64 tokens, ``pos(arange(T))`` positions, causal mask) and an LSTM policy on per-member
observation sequences. For each: the step's time, inference's time, their ratio, the peak memory of
both, and the ratio's floor: the FLOPs of the population forward (``torch.utils.flop_counter``
counts the physical ops under vmap) over inference's, i.e. what the low-rank terms add at equal
throughput. Usage: ``python benchmarks/bench_models.py [--quick] [--models mlp,cnn,...]``.
"""
from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from eggroll_optim import EggrollOptimizer, per_member_cross_entropy
from eggroll_optim.recipes.mnist import make_cnn, make_mlp


class LM(nn.Module):
    """A small causal transformer LM written for ordinary batches ``(B, T)``."""

    def __init__(self, vocab=64, d=256, T=64, layers=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):  # (B, T) -> (B, T, vocab)
        T = tokens.shape[1]
        h = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=h.dtype)
        return self.head(self.enc(h, mask=mask, is_causal=True))


class LSTMPolicy(nn.Module):
    def __init__(self, obs=8, hidden=64, actions=4):
        super().__init__()
        self.lstm, self.head = nn.LSTM(obs, hidden, batch_first=True), nn.Linear(hidden, actions)

    def forward(self, obs):  # (B, T, obs) -> (B, T, actions)
        return self.head(self.lstm(obs)[0])


def _cases(quick: bool, device):
    """``name -> (model, N, x (shared or per member), labels, per_member)``."""
    s = 8 if quick else 1
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    ints = lambda hi, *shape: torch.randint(0, hi, shape, generator=g).to(device)  # noqa: E731
    import torchvision

    return {
        "mlp": (make_mlp(), 4096 // s, rnd(256 // s, 784), ints(10, 256 // s), False),
        "cnn": (make_cnn(), 512 // s, rnd(64 // s, 1, 28, 28), ints(10, 64 // s), False),
        "resnet18": (torchvision.models.resnet18(num_classes=10), 64 // s, rnd(128 // s, 3, 32, 32),
                     ints(10, 128 // s), False),
        "lm": (LM(T=64 // s), 64 // s, ints(64, 32 // s, 64 // s), ints(64, 32 // s, 64 // s), False),
        "lstm": (LSTMPolicy(), 1024 // s, rnd(1024 // s, 1, 32 // s, 8), ints(4, 1024 // s, 1, 32 // s), True),
    }


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _inference_flops(model, infer, x_all) -> float:
    """FLOPs of plain inference; torch's fused LSTM is invisible to the counter, so it is counted by
    hand (four gates: ``2 (in + H) 4H`` a step and row)."""
    flops = _flops(infer)
    for m in model.modules():
        if isinstance(m, nn.LSTM):
            rows, steps = x_all.shape[0], x_all.shape[1]
            flops += 2 * rows * steps * 4 * m.hidden_size * (m.input_size + m.hidden_size)
    return flops


def _profile(name, step, device) -> None:
    """The step's top kernels by device time (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if common.is_cuda(device) else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        common.sync(device)
    key = "self_cuda_time_total" if common.is_cuda(device) else "self_cpu_time_total"
    print(f"## {name}: 3 steps\n" + prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))


def measure(name, case, device, budget, profile=False) -> dict:
    model, N, x, y, per_member = case
    model = model.to(device)
    B = x.shape[1] if per_member else x.shape[0]
    opt = EggrollOptimizer(model, lr=0.01, sigma=0.01, rank=4, population_size=N, seed=0)
    xin = (lambda pop: pop.per_member(x)) if per_member else (lambda pop: x)
    step = lambda: opt.step(lambda: per_member_cross_entropy(model(xin(opt.population)), y))  # noqa: E731
    x_all = x.reshape(N * B, *x.shape[2:]) if per_member else x.repeat(N, *([1] * (x.dim() - 1)))
    infer = torch.no_grad()(lambda: model(x_all))

    def population_forward():
        with torch.no_grad(), opt.ask() as pop:
            model(xin(pop))
        opt.discard()

    floor = _flops(population_forward) / max(_inference_flops(model, infer, x_all), 1.0)
    t_step = common.bench(step, device, budget_s=budget)["median_ms"]
    t_inf = common.bench(infer, device, budget_s=budget)["median_ms"]
    mem_step = common.peak_memory(step, device)["peak_gb"]
    mem_inf = common.peak_memory(infer, device)["peak_gb"]
    if profile:
        _profile(name, step, device)
    return {"model": name, "N": N, "B": B, "step_ms": t_step, "inference_ms": t_inf, "ratio": t_step / t_inf,
            "floor": floor, "step_gb": mem_step, "inference_gb": mem_inf,
            "mem_ratio": None if mem_step is None else mem_step / max(mem_inf, 1e-9)}


def main(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn,resnet18,lm,lstm")
    p.add_argument("--profile", action="store_true", help="print each step's top kernels")
    args = common.parse(p, argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cases = _cases(args.quick, device)
    rows, failures = [], {}
    for name in args.models.split(","):
        if name not in cases:
            raise SystemExit(f"unknown model {name!r}; expected some of {sorted(cases)}")
        common.guard(name, lambda: rows.append(measure(name, cases[name], device, args.budget or 1.0, args.profile)), failures)
        common.free(device)
    m = common.meta(args)
    print(f"# {m['card']} | torch {m['torch']} | {m['date']} | {m['command']}")
    print(common.table(rows, ["model", "N", "B", "step_ms", "inference_ms", "ratio", "floor", "step_gb",
                              "inference_gb", "mem_ratio"], "ES step (ask, forward, tell) vs inference on N·B inputs"))
    common.save(args, {"rows": rows})
    common.finish(failures)


if __name__ == "__main__":
    main()

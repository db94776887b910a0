"""Cost of EggrollOptimizer's hooks outside ask(): a plain forward with and without them, one run.

Times the same module and input alternately (hooks removed / installed) so both see the same machine
state; prints the median per-forward time of each and the ratio. CPU by default.
Usage: python benchmarks/bench_hook_overhead.py [--device cpu] [--repeats 300]
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer


def models():
    mlp = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 14 * 14, 64), nn.LayerNorm(64), nn.Linear(64, 10),
    )
    return {"mlp 784-256-10, batch 64": (mlp, torch.rand(64, 784)),
            "cnn conv+groupnorm+pool+linear+layernorm, batch 16": (cnn, torch.rand(16, 1, 28, 28)),
            "mlp, batch 1 (overhead-bound)": (mlp, torch.rand(1, 784))}


@torch.no_grad()
def median_ms(module, x, repeats):
    for _ in range(10):
        module(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {args.device} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(f"{'model':<52} {'plain ms':>9} {'hooked ms':>9} {'ratio':>6}")
    for name, (module, x) in models().items():
        module, x = module.to(args.device), x.to(args.device)
        expected = module(x)
        opt = EggrollOptimizer(module, population_size=8)
        assert torch.equal(module(x), expected), "hooks must be inert outside ask()"
        hooked, plain = [], []
        for _ in range(3):  # alternate so both see the same machine state
            hooked.append(median_ms(module, x, args.repeats))
            opt.remove_hooks()
            plain.append(median_ms(module, x, args.repeats))
            opt._install()
        opt.remove_hooks()
        p, h = statistics.median(plain), statistics.median(hooked)
        print(f"{name:<52} {p:>9.4f} {h:>9.4f} {h / p:>6.3f}")


if __name__ == "__main__":
    main()

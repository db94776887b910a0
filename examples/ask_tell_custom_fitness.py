"""Maximise a non-differentiable fitness with ask/tell: classification *accuracy* (an argmax).

Backprop cannot use accuracy (its gradient is zero almost everywhere); ES only needs its value.
Accuracy on a mini-batch is quantised (many ties), so the fitness is shaped by centered ranks.
The population is evaluated in chunks (``chunk_size``), and every antithetic pair (2k, 2k+1)
gets its own mini-batch: a per-member input (N, B, 2), marked with ``population.per_member`` (the active chunk's rows are taken).

    python examples/ask_tell_custom_fitness.py [--quick] [--check] [--device cpu] [--seed 0]
"""
import argparse
import math
import time

import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless test accuracy ends above 0.8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--population-size", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    return parser.parse_args()


def spirals(n, device, gen, classes=3):
    """Points on ``classes`` interleaved noisy spiral arms: x (n, 2), labels (n,)."""
    labels = torch.randint(classes, (n,), generator=gen, device=device)
    t = torch.rand(n, generator=gen, device=device)  # position along the arm
    angle = 2 * math.pi * labels / classes + 3.5 * t + 0.2 * torch.randn(n, generator=gen, device=device)
    x = torch.stack((torch.cos(angle), torch.sin(angle)), dim=1) * (0.2 + t)[:, None]
    return x * 2, labels


@torch.no_grad()
def accuracy(logits, labels):
    """Fraction of argmax hits over the last batch dim: (..., B, C), (..., B) -> (...)."""
    return (logits.argmax(-1) == labels).float().mean(-1)


def main():
    args = parse_args()
    device = torch.device(args.device)
    steps = args.steps or (60 if args.quick else 400)
    N, B = args.population_size, args.batch_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x_train, y_train = spirals(8192, device, gen)
    x_test, y_test = spirals(2048, device, gen)
    print(f"device {device}, torch {torch.__version__}, {steps} steps, population {N} in chunks of {args.chunk_size}")

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)).to(device)
    opt = EggrollOptimizer(model, lr=0.05, sigma=0.1, rank=4, population_size=N, chunk_size=args.chunk_size,
                           fitness_shaping="centered_rank", optimizer=torch.optim.Adam, seed=args.seed)
    initial = accuracy(model(x_test), y_test).item()
    t0 = time.perf_counter()
    for step in range(steps):
        # one mini-batch per antithetic pair: both members of a pair see the same points
        idx = torch.randint(x_train.shape[0], (N // 2, B), generator=gen, device=device)
        idx = idx.repeat_interleave(2, dim=0)  # (N, B)
        x, y = x_train[idx], y_train[idx]  # (N, B, 2), (N, B)
        fitness = torch.empty(N, device=device)
        population = opt.ask()
        for members in population.chunks():  # members: slice(start, stop), its noise active
            logits = model(population.per_member(x))  # member i sees x[i]: (n, B, 3)
            fitness[members] = accuracy(logits, population.slice(y))  # (n,)
        opt.tell(fitness)
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            test = accuracy(model(x_test), y_test).item()  # the mean model: hooks inert after tell
            print(f"  step {step:4d}  population accuracy {fitness.mean().item():.3f}  test accuracy {test:.3f}")
    final = accuracy(model(x_test), y_test).item()
    print(f"test accuracy {initial:.3f} -> {final:.3f} in {time.perf_counter() - t0:.1f} s")
    print(f"RESULT initial={initial:.4f} final={final:.4f}")
    if args.check and not final > 0.8:
        raise SystemExit(f"check failed: test accuracy {final:.3f} is not above 0.8")


if __name__ == "__main__":
    main()

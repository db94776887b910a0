"""An ordinary PyTorch training loop, then the same loop with EggrollOptimizer (no backward pass).

Task: regress a small MLP onto y = sin(2 x0) * cos(x1) + 0.5 x0 x1 from mini-batches.
The only changes for EGGROLL: the optimizer, and a closure returning per-member losses (N,),
because inside ``opt.step`` the model maps a shared batch (B, 2) to every member's output (N, B, 1).

    python examples/drop_in_training_loop.py [--quick] [--check] [--device cpu] [--seed 0]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from eggroll_optim import EggrollOptimizer, per_member_mse


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless EGGROLL halves the initial test loss")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--population-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=0.02)
    return parser.parse_args()


def make_data(n, device, gen):
    x = torch.rand(n, 2, generator=gen, device=device) * 4 - 2  # (n, 2) in [-2, 2)
    y = torch.sin(2 * x[:, :1]) * torch.cos(x[:, 1:]) + 0.5 * x[:, :1] * x[:, 1:]  # (n, 1)
    return x, y


def make_model(device, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)


def batches(x, y, batch_size, gen):
    while True:
        order = torch.randperm(x.shape[0], generator=gen, device=x.device)
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]


@torch.no_grad()
def test_loss(model, x, y):
    return F.mse_loss(model(x), y).item()  # outside ask()/step() the model is the plain mean model


def train_backprop(model, data, steps, test):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _, (x, y) in zip(range(steps), data):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        scheduler.step()
    return test_loss(model, *test)


def train_eggroll(model, data, steps, test, args):
    opt = EggrollOptimizer(model, lr=0.02, sigma=args.sigma, rank=4, population_size=args.population_size,
                           optimizer=torch.optim.Adam, seed=args.seed)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)  # drives opt's lr
    for step, (x, y) in zip(range(steps), data):
        loss = opt.step(lambda: per_member_mse(model(x), y))  # model(x): (N, B, 1) -> losses (N,)
        scheduler.step()
        if step % max(1, steps // 5) == 0:
            print(f"  step {step:4d}  population loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.4f}")
    opt.remove_hooks()
    return test_loss(model, *test)


def main():
    args = parse_args()
    device = torch.device(args.device)
    steps = args.steps or (150 if args.quick else 1000)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    train, test = make_data(4096, device, gen), make_data(1024, device, gen)
    print(f"device {device}, torch {torch.__version__}, {steps} steps")

    initial = test_loss(make_model(device, args.seed), *test)
    t0 = time.perf_counter()
    adam = train_backprop(make_model(device, args.seed), batches(*train, args.batch_size, gen), steps, test)
    print(f"backprop + Adam: test mse {initial:.4f} -> {adam:.4f} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    model = make_model(device, args.seed)
    eggroll = train_eggroll(model, batches(*train, args.batch_size, gen), steps, test, args)
    print(f"EGGROLL + Adam:  test mse {initial:.4f} -> {eggroll:.4f} ({time.perf_counter() - t0:.1f} s)")

    print(f"RESULT initial={initial:.4f} final={eggroll:.4f} (backprop reference {adam:.4f})")
    if args.check and not eggroll < 0.5 * initial:
        raise SystemExit(f"check failed: EGGROLL test mse {eggroll:.4f} is not below half the initial {initial:.4f}")


if __name__ == "__main__":
    main()

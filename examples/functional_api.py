"""The seed's functional API (``eggroll_optim.core``): the README Quick Start on a task that learns.

Task: imitate a fixed random "teacher" network, fitness = -MSE to its outputs. The functional
API keeps parameters in a dict, draws explicit perturbations from a ``torch.Generator`` each epoch,
runs every member through a ``torch.fx`` trace of the model, and updates the dict in place.
Like the seed, it perturbs only the weight matrices (biases stay at their initial values).

    python examples/functional_api.py [--quick] [--check] [--device cpu] [--seed 0]
"""
import argparse
import time

import torch
import torch.nn as nn

from eggroll_optim.core import (
    EggrollConfig, eggroll_step, generate_perturbations, get_params_dict, get_weight_shapes,
    make_perturbed_forward_fn,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and members (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the MSE falls below a third")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--population-size", type=int, default=None)
    parser.add_argument("--sigma", type=float, default=0.03)
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    teacher = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)).to(device)
    model = nn.Sequential(nn.Linear(4, 256), nn.Tanh(), nn.Linear(256, 2))

    params = get_params_dict(model, device)              # {name: cloned tensor} on `device`
    shapes = get_weight_shapes(params)                   # {'0.weight': (256, 4), '2.weight': (2, 256)}
    forward, forward_eval = make_perturbed_forward_fn(model)
    population_size = args.population_size or (256 if args.quick else 2048)
    config = EggrollConfig(population_size=population_size, rank=4, sigma=args.sigma, lr=0.1,
                           lr_decay=0.995, sigma_decay=0.995, seed=args.seed)
    epochs = args.epochs or (80 if args.quick else 400)
    current_lr, current_sigma = config.lr, config.sigma
    print(f"device {device}, torch {torch.__version__}, {epochs} epochs, population {config.population_size}")

    x_test = torch.randn(1024, 4, device=device)
    with torch.no_grad():
        y_test = teacher(x_test)                           # (1024, 2)
        initial = (forward_eval(x_test, params) - y_test).square().mean().item()

    t0 = time.perf_counter()
    for epoch in range(epochs):
        gen = torch.Generator(device=device).manual_seed(config.seed + epoch)
        x = torch.randn(64, 4, device=device, generator=gen)      # a batch shared by every member
        with torch.no_grad():
            y = teacher(x)                                 # (64, 2)
            perts = generate_perturbations(shapes, config.population_size, config.rank, current_sigma,
                                           gen, config.dtype)  # {name: (A_scaled (N, out, r), B (N, in, r))}
            output = forward(x, params, perts)             # (N, 64, 2)
            fitness = -(output - y).square().mean(dim=(1, 2))  # (N,), higher is better
            current_lr, current_sigma = eggroll_step(params, fitness, perts, current_lr, current_sigma, config)
        if epoch % max(1, epochs // 5) == 0:
            print(f"  epoch {epoch:4d}  population mse {-fitness.mean().item():.4f}  sigma {current_sigma:.4f}")

    with torch.no_grad():
        final = (forward_eval(x_test, params) - y_test).square().mean().item()  # unperturbed
    print(f"test mse {initial:.4f} -> {final:.4f} in {time.perf_counter() - t0:.1f} s")
    print(f"RESULT initial={initial:.4f} final={final:.4f}")
    if args.check and not final < initial / 3:
        raise SystemExit(f"check failed: test mse {final:.4f} is not below a third of {initial:.4f}")


if __name__ == "__main__":
    main()

"""Where an MNIST-MLP ES step spends its time: host (Python, launches) or device (kernels).

Prints, for the functional step and EggrollOptimizer.step at N=4096, B=256: wall time per step
with and without a trailing sync, the summed CUDA kernel time, the kernel count, and the top
kernels from torch.profiler. Usage: python benchmarks/profile_step.py [--population N]
"""
import argparse
import time

import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer, per_member_cross_entropy
from eggroll_optim.core import (
    EggrollConfig, eggroll_step, generate_perturbations, get_params_dict, get_weight_shapes,
    make_perturbed_forward_fn,
)
from eggroll_optim.losses import compute_classification_fitness


def make(args, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10)).to(device)
    x = torch.rand(args.batch, 784, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    return model, x, y


def functional_step_fn(args, device):
    model, x, y = make(args, device)
    params, config = get_params_dict(model, device), EggrollConfig(population_size=args.population)
    shapes, (forward, _) = get_weight_shapes(params), make_perturbed_forward_fn(model)
    gen = torch.Generator(device).manual_seed(0)
    state = {"lr": config.lr, "sigma": config.sigma}

    def step():
        perts = generate_perturbations(shapes, args.population, config.rank, state["sigma"], gen, config.dtype)
        fitness = compute_classification_fitness(forward(x, params, perts), y)
        state["lr"], state["sigma"] = eggroll_step(params, fitness, perts, state["lr"], state["sigma"], config)
    return step


def optimizer_step_fn(args, device):
    model, x, y = make(args, device)
    opt = EggrollOptimizer(model, lr=0.1, sigma=0.1, rank=4, population_size=args.population)
    return lambda: opt.step(lambda: per_member_cross_entropy(model(x), y))


def measure(name, step, steps=30):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host_ms = (time.perf_counter() - t0) / steps * 1e3  # time to enqueue (host-bound if ~= wall)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages()]
    gpu_ms = sum(e.self_device_time_total for e in events) / 5 / 1e3
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / 5
    print(f"{name}: wall {wall_ms:.3f} ms/step, host enqueue {host_ms:.3f} ms/step, "
          f"GPU kernel time {gpu_ms:.3f} ms/step, ~{kernels:.0f} kernels/step")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--population", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    measure("functional", functional_step_fn(args, device))
    measure("optimizer", optimizer_step_fn(args, device))


if __name__ == "__main__":
    main()

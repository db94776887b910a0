"""Reinforcement learning with ask/tell on a gymnasium vector env: one env per population member.

``gym.make_vec(env, num_envs=N)`` steps N copies together; member i acts in env i, so the policy
gets per-member observations (N, obs_dim) and returns (N, act_dim). ``opt.ask()`` is held open
(no ``with``) across the whole episode; each member's return is summed until its env's first
done, and ``opt.tell(returns)``. Pair members (2k, 2k+1) start from the same seed.
Discrete actions: argmax of the logits. Box actions: tanh, scaled to the action bounds.

    python examples/rl_gymnasium.py [--env CartPole-v1|Acrobot-v1|Pendulum-v1] [--quick] [--check]
"""
import argparse
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--quick", action="store_true", help="fewer generations (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the mean return improves")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generations", type=int, default=None)
    parser.add_argument("--population-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--sigma", type=float, default=0.1)
    return parser.parse_args()


class Policy(nn.Module):
    """MLP from observations to actions: (n, obs_dim) -> (n,) discrete or (n, act_dim) in bounds."""

    def __init__(self, space_in, space_out, hidden=32):
        super().__init__()
        self.discrete = isinstance(space_out, gym.spaces.Discrete)
        out_dim = int(space_out.n) if self.discrete else int(np.prod(space_out.shape))
        self.net = nn.Sequential(nn.Linear(space_in.shape[0], hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
        if not self.discrete:
            low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (space_out.low, space_out.high))
            self.register_buffer("center", (high + low) / 2)
            self.register_buffer("half_range", (high - low) / 2)

    def forward(self, obs):
        out = self.net(obs)  # (out_dim,) per observation; inside ask() each member's own perturbation
        return out.argmax(-1) if self.discrete else self.center + self.half_range * torch.tanh(out)


@torch.no_grad()
def episode_returns(envs, policy, seed, device):
    """Run every env until its first done; returns (num_envs,) float32 undiscounted returns."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=[seed + i // 2 for i in range(n)])  # pairs share a start state
    returns, alive = np.zeros(n), np.ones(n, dtype=bool)
    while alive.any():
        action = policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += reward * alive  # envs past their first done autoreset: ignore them
        alive &= ~(terminated | truncated)
    return torch.as_tensor(returns, dtype=torch.float32)


def main():
    args = parse_args()
    device = torch.device(args.device)
    generations = args.generations or (12 if args.quick else 100)
    N = args.population_size
    envs = gym.make_vec(args.env, num_envs=N, vectorization_mode="sync")
    torch.manual_seed(args.seed)
    policy = Policy(envs.single_observation_space, envs.single_action_space).to(device)
    opt = EggrollOptimizer(policy, lr=args.lr, sigma=args.sigma, rank=4, population_size=N,
                           optimizer=torch.optim.Adam, seed=args.seed)
    print(f"device {device}, torch {torch.__version__}, gymnasium {gym.__version__}, {args.env}, "
          f"population {N}, {generations} generations")

    eval_seed = 10_000 + args.seed  # held-out start states for the mean policy
    initial = episode_returns(envs, policy, eval_seed, device).mean().item()  # hooks inert: mean policy
    t0 = time.perf_counter()
    for generation in range(generations):
        population = opt.ask()  # perturbations stay active for every forward until tell()
        act = lambda obs: policy(population.per_member(obs))  # member i acts on observation i
        returns = episode_returns(envs, act, args.seed * 100_000 + generation * N, device)
        opt.tell(returns.to(device))
        print(f"  generation {generation:3d}  population mean return {returns.mean().item():8.1f}  "
              f"max {returns.max().item():8.1f}")
    final = episode_returns(envs, policy, eval_seed, device).mean().item()
    envs.close()
    print(f"mean-policy return {initial:.1f} -> {final:.1f} in {time.perf_counter() - t0:.1f} s")
    print(f"RESULT initial={initial:.4f} final={final:.4f}")
    if args.check and not final > initial:
        raise SystemExit(f"check failed: mean return {final:.1f} did not improve on {initial:.1f}")


if __name__ == "__main__":
    main()

"""CartPole-v1 with ``EggrollOptimizer``: the seed's recipe, ask/tell around whole episodes.

Policy 4-256(tanh)-2 (weights ~ N(0, 0.1²), zero biases), action = argmax. One ES step runs one
episode per population member and tells the optimizer the episode returns.

Backends (``env_backend``):
- ``"gymnasium"`` (default, the seed's): one ``CartPoleVectorEnv`` of ``population_size`` envs on
  the CPU, reset with a new seed each step; observations ``(N, 4)`` go to the policy's device.
  Without gymnasium installed, the recipe warns and uses ``"torch"``.
- ``"torch"``: :class:`TorchCartPole` on the policy's device; antithetic members ``2k, 2k+1``
  start from the same state (common random numbers), and the population runs in chunks.

"Solved" is a population mean return ``>= 475``; the unperturbed policy is then evaluated for
10 episodes of gymnasium's ``CartPole-v1`` (or of the torch env when gymnasium is missing).
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import launch
from .envs import TorchCartPole, evaluate_gymnasium, rollout_returns
from .errors import InputError
from ..capture import CompiledStep
from .runner import RunConfig, Task, make_optimizer, step_function, train

__all__ = ["CartPoleConfig", "CartPoleTask", "QUICK", "make_policy", "run"]

MAX_EPISODE_STEPS = 500


@dataclass
class CartPoleConfig(RunConfig):
    """The seed's recipe (rank 4, sigma 0.2, decays 0.9995 / 0.999) at ``N = 256`` instead of 2048.

    The update ``lr · Σ f'_i E_i / sqrt(N)`` grows like ``sqrt(N)``, so ``lr = 0.3`` at 256 keeps the
    seed's step (``0.1 · sqrt(2048) ≈ 0.3 · sqrt(256)``) at an eighth of the cost per step: on two
    CPU cores it solves in 15-21 steps (seeds 1-10), under 10 s of training; hence a checkpoint
    every 5 steps (the policy is small: a save costs about a millisecond).
    """

    population_size: int = 256
    rank: int = 4
    sigma: float = 0.2
    lr: float = 0.3
    lr_decay: float = 0.9995
    sigma_decay: float = 0.999
    max_epochs: int = 300
    checkpoint_every: int = 5
    hidden: int = 256
    env_backend: str = "gymnasium"  # or "torch"
    solve_threshold: float = 475.0
    eval_episodes: int = 10
    eval_every: int = 10**9  # no periodic evaluation: the population's returns are the metric


QUICK = dict(population_size=128, max_epochs=6, checkpoint_every=2)


def make_policy(hidden: int = 256) -> nn.Sequential:
    """The seed's policy: Linear(4, hidden) - tanh - Linear(hidden, 2), N(0, 0.1²) weights, zero biases."""
    policy = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    for layer in (policy[0], policy[2]):
        nn.init.normal_(layer.weight, std=0.1)
        nn.init.zeros_(layer.bias)
    return policy


def _step_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (the same on every run and device)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % 2**63
    return value


class GymnasiumRollouts:
    """Episodes of the whole population in one gymnasium ``CartPoleVectorEnv`` (host numpy)."""

    def __init__(self, num_envs: int, device: torch.device):
        import gymnasium as gym

        self.envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")
        self.num_envs, self.device = num_envs, device

    @torch.no_grad()
    def __call__(self, model: nn.Module, population, seed: int):
        obs, _ = self.envs.reset(seed=seed % 2**31)
        returns = np.zeros(self.num_envs)
        done = np.zeros(self.num_envs, dtype=bool)
        for _ in range(MAX_EPISODE_STEPS):
            obs_t = population.per_member(torch.from_numpy(obs).to(self.device))  # member i acts on obs[i]
            actions = model(obs_t).argmax(-1).cpu().numpy()  # (N,)
            obs, reward, terminated, truncated, _ = self.envs.step(actions)
            returns += reward * ~done
            done |= terminated | truncated
            if done.all():
                break
        env_steps = float(returns.sum())  # on the host already: no device sync
        return torch.from_numpy(returns).to(self.device, torch.float32), env_steps

    def close(self) -> None:
        self.envs.close()


def _acting(model: nn.Module, population):
    """The population's greedy policy: member ``i`` acts on ``obs[i]``."""
    return lambda obs: model(population.per_member(obs)).argmax(-1)


class TorchRollouts:
    """Episodes chunk by chunk in :class:`TorchCartPole` on the policy's device, paired starts."""

    def __init__(self, device: torch.device):
        self.device, self.envs, self.starts = device, {}, {}

    def env(self, n: int, envs: dict | None = None) -> TorchCartPole:
        envs = self.envs if envs is None else envs
        if n not in envs:
            envs[n] = TorchCartPole(n, device=self.device)
        return envs[n]

    @torch.no_grad()
    def __call__(self, model: nn.Module, population, seed: int):
        returns, env_steps = [], []
        for members in population.chunks():
            env = self.env(members.stop - members.start)
            r, s = rollout_returns(_acting(model, population), env, MAX_EPISODE_STEPS,
                                   seed=_step_seed(seed, members.start), paired=True)
            returns.append(r)
            env_steps.append(s)
        return torch.cat(returns), torch.stack(env_steps).sum()

    def start_states(self, members: slice, chunk: int, seed: int) -> torch.Tensor:
        """The initial states ``(n, 4)`` that ``__call__`` draws for the members, chunk by chunk."""
        parts = []
        for start in range(members.start, members.stop, chunk):
            env = self.env(min(start + chunk, members.stop) - start, self.starts)
            parts.append(env.reset(seed=_step_seed(seed, start), paired=True))
        return torch.cat(parts)

    def fixed_length(self, model: nn.Module, population, states: torch.Tensor, env_steps: torch.Tensor):
        """The active chunk's returns from ``states``: all ``MAX_EPISODE_STEPS`` steps, finished episodes
        masked, no host sync (a CUDA graph's rollout); adds the chunk's env steps to ``env_steps``."""
        members, first = population.members, population.local[0]
        rows = slice(members.start - first, members.stop - first)
        r, s = rollout_returns(_acting(model, population), self.env(members.stop - members.start), MAX_EPISODE_STEPS,
                               state=states[rows], check_every=None)
        if members.start == first:
            env_steps.copy_(s)
        else:
            env_steps.add_(s)
        return r

    def close(self) -> None:
        pass


class CartPoleTask(Task):
    name, metric_name = "cartpole", "mean_return"
    labels = {"metric": "population mean return (steps per episode)"}

    def __init__(self, cfg: CartPoleConfig):
        if cfg.env_backend not in ("gymnasium", "torch"):
            raise InputError(f"--env-backend {cfg.env_backend}: expected gymnasium or torch")
        if cfg.env_backend == "gymnasium" and importlib.util.find_spec("gymnasium") is None:
            warnings.warn("gymnasium is not installed: CartPole runs on env_backend='torch'", stacklevel=2)
            cfg = replace(cfg, env_backend="torch")
        if cfg.env_backend == "gymnasium" and (cfg.chunk_size or cfg.population_size) < cfg.population_size:
            raise InputError(f"--chunk-size {cfg.chunk_size}: the gymnasium backend steps all members together; "
                             "chunks need --env-backend torch")
        self.cfg, self.device = cfg, torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = make_policy(cfg.hidden).to(self.device)
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg)
        gym = cfg.env_backend == "gymnasium"
        members = self.optimizer.local_members  # all of them, or this rank's share under torchrun
        self.rollouts = GymnasiumRollouts(members.stop - members.start, self.device) if gym else TorchRollouts(self.device)
        self.compiled = None  # the torch env on CUDA: each step (rollout included) replayed from a CUDA graph
        if not gym and self.device.type == "cuda" and cfg.cuda_graph:
            self.env_steps = torch.zeros((), dtype=torch.int64, device=self.device)
            step = step_function(self.optimizer, self._graph_rollout, cfg, maximize=True)
            self.compiled = step if isinstance(step, CompiledStep) else None  # (under torchrun: eager rollouts)

    def _graph_rollout(self, states: torch.Tensor) -> torch.Tensor:
        return self.rollouts.fixed_length(self.model, self.optimizer.population, states, self.env_steps)

    per_member_input = True

    def warmup_input(self) -> torch.Tensor:
        return torch.zeros(self.cfg.population_size, 4, device=self.device)  # per-member observations

    def train_step(self, step: int) -> dict:
        if self.compiled is not None:
            seed = _step_seed(self.cfg.seed, step)
            states = self.rollouts.start_states(self.optimizer.local_members, self.optimizer.chunk_size, seed)
            mean_return = self.compiled(states).clone()  # the graph's outputs are overwritten next step
            if self.scheduler is not None:
                self.scheduler.step()
            return {"metric": mean_return, "env_steps": self.env_steps.clone()}
        population = self.optimizer.ask()
        returns, env_steps = self.rollouts(self.model, population, _step_seed(self.cfg.seed, step))
        self.optimizer.tell(returns)
        if self.scheduler is not None:
            self.scheduler.step()
        return {"metric": launch.mean_over_ranks(returns.sum(), returns.numel()), "env_steps": env_steps}

    def solved(self, record: dict) -> bool:
        return record["metric"] >= self.cfg.solve_threshold

    @torch.no_grad()
    def final_evaluation(self) -> dict:
        """``eval_episodes`` episodes of the unperturbed policy (gymnasium, else the torch env)."""
        self.rollouts.close()
        seed, episodes = self.cfg.seed + 10_000, self.cfg.eval_episodes
        act = lambda obs: self.model(obs).argmax(-1)  # noqa: E731 (a plain call: outside a population)
        try:
            returns = evaluate_gymnasium(lambda obs: int(act(obs.to(self.device))), episodes, seed)
            backend = "gymnasium"
        except ImportError:
            env = TorchCartPole(episodes, device=self.device)
            returns, _ = rollout_returns(act, env, MAX_EPISODE_STEPS, seed=seed)
            returns, backend = returns.tolist(), "torch"
        return {"eval_backend": backend, "eval_returns": returns, "eval_mean_return": float(np.mean(returns))}


def run(cfg: CartPoleConfig, out: Path, checkpoint: dict | None = None, progress: bool = True) -> dict:
    task = CartPoleTask(cfg)
    summary = train(task, task.cfg, out, checkpoint, progress)
    solved = summary["solved_at_step"]
    head = f"solved at step {solved}" if solved is not None else f"not solved after {summary['steps']} steps"
    print(f"cartpole: {head} (population mean return {summary['final_metric']:.1f}), "
          f"{summary['train_time_s']:.1f} s of training")
    print(f"cartpole: unperturbed policy over {cfg.eval_episodes} {summary['eval_backend']} episodes: "
          f"mean return {summary['eval_mean_return']:.1f} {summary['eval_returns']}")
    return summary

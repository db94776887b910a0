"""Batched CartPole-v1 in plain torch, on any device (CPU, CUDA), for ES rollouts.

Dynamics, constants, termination and truncation follow gymnasium's ``CartPoleEnv`` /
``CartPoleVectorEnv`` (gymnasium 1.x): euler integrator, |x| > 2.4 or |theta| > 12 deg
terminates, ``steps >= max_episode_steps`` truncates, reward 1 per step (termination step
included).  gymnasium keeps a float64 state and returns float32 observations; here the
state *and* the observations use ``dtype``.  With ``dtype=torch.float64`` trajectories
match gymnasium to ~1e-12; with float32 they match to float32 rounding (the upright pole is
unstable, so that rounding grows ~e^{4t} and very long float32 trajectories drift apart).

Done handling (``step``):
  * ``autoreset=False`` (default, for ES): an env that returned terminated or truncated is
    frozen; later steps keep its state, return reward 0 and repeat its final flags.
  * ``autoreset=True``: gymnasium's ``AutoresetMode.NEXT_STEP`` exactly: the step *after* a
    done step returns a fresh uniform(-0.05, 0.05) state, reward 0, terminated=truncated=False.
``step`` never syncs with the host; with ``autoreset=False`` it draws no random numbers either.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["TorchCartPole", "rollout_returns", "evaluate_gymnasium"]

GRAVITY, MASSCART, MASSPOLE, LENGTH, FORCE_MAG, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
TOTAL_MASS = MASSPOLE + MASSCART
POLEMASS_LENGTH = MASSPOLE * LENGTH
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
INIT_LOW, INIT_HIGH = -0.05, 0.05


class TorchCartPole:
    """``num_envs`` CartPole-v1 copies stepped together on ``device``.

    Public state (read-only for callers): ``state`` (num_envs, 4) = [x, x_dot, theta,
    theta_dot]; ``steps`` (num_envs,) int32 steps in the current episode; ``done``
    (num_envs,) bool, True once an env returned terminated or truncated (sticky unless
    autoreset).  Action 1 pushes right (+10 N), anything else pushes left (-10 N).
    """

    def __init__(self, num_envs: int, device=None, dtype=torch.float32,
                 max_episode_steps: int = 500, autoreset: bool = False):
        self.num_envs, self.dtype = int(num_envs), dtype
        self.device = torch.device("cpu" if device is None else device)
        self.max_episode_steps, self.autoreset = int(max_episode_steps), bool(autoreset)
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()  # nondeterministic until reset(seed=...)
        self.state = torch.zeros(self.num_envs, 4, device=self.device, dtype=dtype)
        self._clear()

    def _clear(self) -> None:
        n, dev = self.num_envs, self.device
        self.steps = torch.zeros(n, device=dev, dtype=torch.int32)
        self.terminated = torch.zeros(n, device=dev, dtype=torch.bool)
        self.truncated = torch.zeros(n, device=dev, dtype=torch.bool)
        self.done = torch.zeros(n, device=dev, dtype=torch.bool)

    def _uniform(self, n: int) -> torch.Tensor:  # (n, 4) in [INIT_LOW, INIT_HIGH)
        u = torch.rand(n, 4, generator=self.generator, device=self.device, dtype=self.dtype)
        return INIT_LOW + (INIT_HIGH - INIT_LOW) * u

    def reset(self, seed: int | None = None, state: torch.Tensor | None = None,
              paired: bool = False) -> torch.Tensor:
        """Start new episodes in all envs; returns obs (num_envs, 4).

        seed: reseeds the env's device ``torch.Generator`` (None: continue its stream).
        state: (num_envs, 4) exact initial states (no random draw).
        paired: draw num_envs // 2 states and repeat each twice, so antithetic pairs
            (2k, 2k+1) share an initial state (common random numbers); needs even num_envs.
        """
        if seed is not None:
            self.generator.manual_seed(int(seed))
        if state is not None:
            s = torch.as_tensor(state).to(device=self.device, dtype=self.dtype).clone()
            if s.shape != (self.num_envs, 4):
                raise ValueError(f"state must be ({self.num_envs}, 4), got {tuple(s.shape)}")
        elif paired:
            if self.num_envs % 2:
                raise ValueError("paired=True needs an even num_envs")
            s = self._uniform(self.num_envs // 2).repeat_interleave(2, dim=0)
        else:
            s = self._uniform(self.num_envs)
        self.state = s
        self._clear()
        return self.state

    def step(self, action: torch.Tensor):
        """action (num_envs,) in {0, 1} -> (obs (num_envs, 4), reward (num_envs,) dtype,
        terminated (num_envs,) bool, truncated (num_envs,) bool).  No host syncs."""
        x, x_dot, theta, theta_dot = self.state.unbind(1)
        force = torch.where(action.to(self.device) == 1, FORCE_MAG, -FORCE_MAG).to(self.dtype)
        costheta, sintheta = torch.cos(theta), torch.sin(theta)
        temp = (force + POLEMASS_LENGTH * theta_dot.square() * sintheta) / TOTAL_MASS
        thetaacc = (GRAVITY * sintheta - costheta * temp) / (
            LENGTH * (4.0 / 3.0 - MASSPOLE * costheta.square() / TOTAL_MASS))
        xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS
        x, theta = x + TAU * x_dot, theta + TAU * theta_dot  # euler: positions use old velocities
        x_dot, theta_dot = x_dot + TAU * xacc, theta_dot + TAU * thetaacc
        new = torch.stack((x, x_dot, theta, theta_dot), dim=1)
        term = (x < -X_THRESHOLD) | (x > X_THRESHOLD) | (theta < -THETA_THRESHOLD) | (
            theta > THETA_THRESHOLD)
        steps = self.steps + 1
        trunc = steps >= self.max_episode_steps
        prev = self.done
        if self.autoreset:  # gymnasium NEXT_STEP: reset envs that were done last step
            new = torch.where(prev[:, None], self._uniform(self.num_envs), new)
            steps = torch.where(prev, 0, steps)
            term, trunc = term & ~prev, trunc & ~prev
        else:  # freeze finished envs, keep their final flags
            new = torch.where(prev[:, None], self.state, new)
            steps = torch.where(prev, self.steps, steps)
            term = torch.where(prev, self.terminated, term)
            trunc = torch.where(prev, self.truncated, trunc)
        reward = (~prev).to(self.dtype)
        self.state, self.steps, self.terminated, self.truncated = new, steps, term, trunc
        self.done = term | trunc
        return self.state, reward, term, trunc


@torch.no_grad()
def rollout_returns(policy: Callable[[torch.Tensor], torch.Tensor], env: TorchCartPole,
                    max_steps: int = 500, seed: int | None = None, *,
                    check_every: int | None = 50, paired: bool = False,
                    state: torch.Tensor | None = None):
    """One episode per env; reward counts until each env's first terminated/truncated.

    policy(obs (num_envs, 4)) -> actions (num_envs,) long.  ``seed`` / ``paired`` /
    ``state`` are passed to ``env.reset``.  Runs ``max_steps`` steps of device ops with
    finished envs masked; every ``check_every`` steps it syncs once to stop early if all
    envs are done (``check_every=None`` or 0: never sync; a fixed, CUDA-graph-friendly
    sequence).  Returns (returns (num_envs,) env.dtype, steps_taken () int64 = total
    env steps taken by live envs, i.e. the sum of episode lengths).
    """
    obs = env.reset(seed=seed, state=state, paired=paired)
    alive = torch.ones(env.num_envs, device=env.device, dtype=torch.bool)
    returns = torch.zeros(env.num_envs, device=env.device, dtype=env.dtype)
    steps_taken = torch.zeros((), device=env.device, dtype=torch.int64)
    for t in range(max_steps):
        obs, reward, term, trunc = env.step(policy(obs))
        returns = returns + torch.where(alive, reward, 0)
        steps_taken = steps_taken + alive.sum()
        alive = alive & ~(term | trunc)
        if check_every and (t + 1) % check_every == 0 and not bool(alive.any()):
            break
    return returns, steps_taken


@torch.no_grad()
def evaluate_gymnasium(policy_fn: Callable[[torch.Tensor], int], episodes: int = 10,
                       seed: int = 1000) -> list[float]:
    """Returns of ``episodes`` episodes of gymnasium's own ``CartPole-v1`` (seeds seed,
    seed+1, ...).  policy_fn maps a (4,) float32 CPU tensor obs to an int action."""
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    out = []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            total, done = 0.0, False
            while not done:
                obs, r, term, trunc, _ = env.step(int(policy_fn(torch.as_tensor(obs))))
                total, done = total + float(r), term or trunc
            out.append(total)
    finally:
        env.close()
    return out

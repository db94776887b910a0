"""TorchCartPole vs gymnasium's CartPole-v1 (CartPoleVectorEnv and the single CartPoleEnv).

Autoreset: gymnasium's CartPoleVectorEnv uses AutoresetMode.NEXT_STEP.  The parity test
runs TorchCartPole(autoreset=True), which mirrors that mode step for step; the only thing
that cannot match is the random reset state itself, so on each auto-reset step the test
checks the torch reset state is in [-0.05, 0.05] and copies it into the gym env's `state`.
Everything else (obs, reward, terminated, truncated) is compared on every step.
The default TorchCartPole(autoreset=False) freezes finished envs; it is compared with
gymnasium up to and including each env's first done.
"""
import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv  # noqa: E402

from eggroll_optim.recipes.envs import TorchCartPole, evaluate_gymnasium, rollout_returns  # noqa: E402


def _gym_vec(states: np.ndarray, max_episode_steps: int = 500) -> CartPoleVectorEnv:
    genv = CartPoleVectorEnv(num_envs=len(states), max_episode_steps=max_episode_steps)
    genv.reset(seed=0)
    genv.state = np.array(states, dtype=np.float64).T.copy()  # gym keeps (4, num_envs) float64
    return genv


def _heuristic(obs: torch.Tensor) -> torch.Tensor:  # balances the pole for a long time
    return (obs[..., 2] + 0.5 * obs[..., 3] > 0).long()


# float64 matches gymnasium's float64 state to rounding (measured ~1e-17) for whole episodes.
# float32 is checked with a 25-step time limit: its rounding grows like e^{4t} on the unstable
# pole (measured ~1e-6 after 25 steps, ~4e-3 in a 155-step balanced episode).
@pytest.mark.parametrize("dtype,atol,max_episode_steps", [
    (torch.float64, 1e-12, 500), (torch.float64, 1e-12, 25), (torch.float32, 1e-5, 25)])
def test_vector_parity_with_next_step_autoreset(dtype, atol, max_episode_steps):
    n, rng = 32, np.random.default_rng(0)
    env = TorchCartPole(n, dtype=dtype, max_episode_steps=max_episode_steps, autoreset=True)
    obs = env.reset(seed=1)
    genv = _gym_vec(obs.double().numpy(), max_episode_steps)
    n_resets = n_trunc = 0
    for t in range(300):
        prev_done = env.done.clone().numpy()
        # mostly random actions, sometimes the balancing policy so episodes reach truncation
        if t % 100 < 50:
            action = rng.integers(0, 2, size=n)
        else:
            action = _heuristic(torch.as_tensor(genv.state.T)).numpy()
        gobs, grew, gterm, gtrunc, _ = genv.step(action.astype(np.int64))
        obs, rew, term, trunc = env.step(torch.as_tensor(action))
        assert obs.dtype == dtype and rew.dtype == dtype
        assert np.array_equal(term.numpy(), gterm), t
        assert np.array_equal(trunc.numpy(), gtrunc), t
        np.testing.assert_array_equal(rew.numpy(), grew)
        live = ~prev_done
        np.testing.assert_allclose(obs.numpy()[live], gobs[live], atol=1e-5, rtol=0)  # float32 obs
        np.testing.assert_allclose(obs.double().numpy()[live], genv.state.T[live], atol=atol, rtol=0)
        if prev_done.any():  # auto-reset step: sync gym's random reset state to ours
            assert (obs[prev_done].abs() <= 0.05).all()
            assert (rew.numpy()[prev_done] == 0).all() and not gterm[prev_done].any()
            genv.state[:, prev_done] = obs.double().numpy()[prev_done].T
            n_resets += int(prev_done.sum())
        n_trunc += int(gtrunc.sum())
    assert n_resets > n  # the autoreset path was exercised many times
    if max_episode_steps == 25:
        assert n_trunc > 0  # and truncation was too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_episode_parity_and_freeze(dtype):
    n, rng = 64, np.random.default_rng(1)
    env = TorchCartPole(n, dtype=dtype)
    obs = env.reset(seed=2)
    genv = _gym_vec(obs.double().numpy())
    first_done = np.zeros(n, dtype=bool)
    for t in range(200):
        action = rng.integers(0, 2, size=n)
        gobs, grew, gterm, gtrunc, _ = genv.step(action.astype(np.int64))
        frozen_before = env.state.clone()
        obs, rew, term, trunc = env.step(torch.as_tensor(action))
        cmp = ~first_done  # up to and including each env's first done
        np.testing.assert_allclose(obs.numpy()[cmp], gobs[cmp], atol=1e-5, rtol=0)
        assert np.array_equal(term.numpy()[cmp], gterm[cmp])
        assert np.array_equal(trunc.numpy()[cmp], gtrunc[cmp])
        assert (rew.numpy()[cmp] == 1).all()
        # finished envs are frozen: same state, reward 0, flags kept
        assert torch.equal(obs[first_done], frozen_before[first_done])
        assert (rew.numpy()[first_done] == 0).all() and term.numpy()[first_done].all()
        first_done |= gterm | gtrunc
    assert first_done.all() and env.done.all()


@pytest.mark.parametrize("name,policy", [
    ("always_left", lambda obs: torch.zeros(obs.shape[0], dtype=torch.long)),
    ("heuristic", _heuristic),
])
def test_rollout_episode_lengths_match_gymnasium(name, policy):
    n = 16
    states = np.random.default_rng(3).uniform(-0.05, 0.05, size=(n, 4))
    returns, steps_taken = rollout_returns(
        policy, TorchCartPole(n, dtype=torch.float64), state=torch.as_tensor(states))
    lengths = []
    for s in states:  # gymnasium's registered single env (TimeLimit 500) from the same state
        genv = gym.make("CartPole-v1")
        genv.reset(seed=0)
        genv.unwrapped.state = s.copy()
        obs, k, done = torch.as_tensor(s), 0, False
        while not done:
            obs, _, term, trunc, _ = genv.step(int(policy(torch.as_tensor(obs)[None])[0]))
            k, done = k + 1, term or trunc
        lengths.append(k)
    assert returns.tolist() == [float(k) for k in lengths]
    assert int(steps_taken) == sum(lengths)
    if name == "always_left":
        assert max(lengths) < 20
    else:
        assert max(lengths) > 100  # long episodes: the float64 parity holds over hundreds of steps


def test_truncation_with_balanced_state():
    n = 6
    env = TorchCartPole(n, max_episode_steps=20)
    env.reset(state=torch.zeros(n, 4))
    for t in range(1, 21):
        obs, rew, term, trunc = env.step(_heuristic(env.state))
        assert not term.any() and (rew == 1).all()
        assert bool(trunc.all()) == (t == 20)
    obs, rew, term, trunc = env.step(torch.ones(n, dtype=torch.long))  # frozen afterwards
    assert (rew == 0).all() and trunc.all() and not term.any()
    returns, steps = rollout_returns(_heuristic, env, max_steps=500, state=torch.zeros(n, 4))
    assert (returns == 20).all() and int(steps) == 20 * n
    returns, _ = rollout_returns(_heuristic, env, max_steps=7, state=torch.zeros(n, 4))
    assert (returns == 7).all()  # max_steps shorter than the time limit cuts the rollout


def test_reset_seeding_bounds_and_pairs():
    env = TorchCartPole(10)
    a, b = env.reset(seed=5).clone(), env.reset(seed=5).clone()
    assert torch.equal(a, b) and not torch.equal(a, env.reset(seed=6))
    assert (a.abs() <= 0.05).all() and a.unique().numel() == a.numel()
    p = env.reset(seed=5, paired=True)
    assert torch.equal(p[0::2], p[1::2])
    assert p[0::2].unique(dim=0).shape[0] == 5 and (p.abs() <= 0.05).all()
    # antithetic pairs start equal, so equal actions give equal returns
    returns, _ = rollout_returns(_heuristic, env, seed=7, paired=True)
    assert torch.equal(returns[0::2], returns[1::2])
    with pytest.raises(ValueError):
        TorchCartPole(3).reset(paired=True)
    with pytest.raises(ValueError):
        env.reset(state=torch.zeros(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rollout_no_nan_dtype_and_check_every(dtype):
    n = 256
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(64, 4, generator=gen, dtype=dtype)  # 64 random linear policies

    def policy(obs):  # (n, 4) -> (n,) long; env i uses policy i % 64
        return ((obs.view(64, -1, 4) * weights[:, None]).sum(-1) > 0).view(-1).long()

    env = TorchCartPole(n, dtype=dtype)
    r1, s1 = rollout_returns(policy, env, seed=11, check_every=50)
    assert r1.dtype == dtype and s1.dtype == torch.int64 and s1.shape == ()
    assert torch.isfinite(env.state).all() and torch.isfinite(r1).all()
    assert ((r1 >= 1) & (r1 <= 500)).all() and int(s1) == int(r1.sum())
    r2, s2 = rollout_returns(policy, env, seed=11, check_every=None)  # fixed 500 steps
    assert torch.equal(r1, r2) and torch.equal(s1, s2)
    assert torch.isfinite(env.state).all()


def test_evaluate_gymnasium():
    returns = evaluate_gymnasium(lambda obs: int(_heuristic(obs)), episodes=3, seed=1000)
    assert len(returns) == 3 and all(1 <= r <= 500 for r in returns)
    left = evaluate_gymnasium(lambda obs: 0, episodes=2, seed=0)
    assert all(r < 20 for r in left)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_cuda_no_host_sync_and_graph_capture():
    n, dev = 1024, "cuda"
    env = TorchCartPole(n, device=dev)
    env.reset(seed=0)
    action = torch.zeros(n, dtype=torch.long, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside step raises
    try:
        for _ in range(30):
            obs, rew, term, trunc = env.step(action)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert obs.is_cuda and rew.is_cuda and term.is_cuda and bool(term.all())
    # a fixed-length masked rollout (check_every=None) is capturable in a CUDA graph
    start = torch.rand(n, 4, generator=torch.Generator().manual_seed(0)) * 0.1 - 0.05
    eager, _ = rollout_returns(_heuristic, env, max_steps=40, state=start.to(dev), check_every=None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up off the default stream before capture
        rollout_returns(_heuristic, env, max_steps=40, state=start.to(dev), check_every=None)
    torch.cuda.current_stream().wait_stream(s)
    static_start, graph = start.to(dev), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed, _ = rollout_returns(_heuristic, env, max_steps=40, state=static_start,
                                     check_every=None)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graphed, eager)
    # same episode lengths as on CPU for short (always-left) episodes
    left = lambda obs: torch.zeros(obs.shape[0], dtype=torch.long, device=obs.device)  # noqa: E731
    r_gpu, st_gpu = rollout_returns(left, env, state=start.to(dev))
    r_cpu, st_cpu = rollout_returns(left, TorchCartPole(n), state=start)
    assert r_gpu.is_cuda and torch.equal(r_gpu.cpu(), r_cpu) and int(st_gpu) == int(st_cpu)

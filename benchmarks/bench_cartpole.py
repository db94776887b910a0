"""CartPole env-steps/s with a rank-4 perturbed 4-256-2 policy (EggrollOptimizer.ask()), N envs = N members.

Throughput = N * T / time for a fixed-length rollout of T steps (finished envs are masked, never
dropped, so every step costs the same; ``check_every`` is larger than T, so no host sync). Rows:
  env_only        TorchCartPole + rollout_returns with a trivial policy (obs -> action, no network):
                  the baseline every other torch row is divided by
  plain_policy    the same rollout with the unperturbed MLP policy (no population active)
  eggroll         ask() -> rollout_returns with the perturbed policy -> tell(returns): a whole ES
                  generation (noise, T policy+env steps, update)
  eggroll_graph   CUDA only: the T-step loop (perturbed policy + env step + return bookkeeping) is
                  captured once in a CUDA graph and replayed; the initial state is copied into the
                  captured input buffers before each replay. The noise tensors the hooks read are
                  the ones of the population active at capture time, so a replay re-evaluates that
                  population: ask()/tell() (and a copy of new noise into those buffers) stay outside
                  the graph. Its time counts replay only.
  gym_vector      gymnasium's CartPole vector env (numpy, CPU) + the perturbed policy on --device,
                  obs/actions moved each step (skipped with a note if gymnasium does not import)
"""
from __future__ import annotations


import torch
import torch.nn as nn

import common
from eggroll_optim import EggrollOptimizer
from eggroll_optim.recipes.envs import TorchCartPole, rollout_returns


def make_policy(seed, device):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 256), nn.Tanh(), nn.Linear(256, 2)).to(device)


def trivial(obs):
    return (obs[:, 2] + 0.5 * obs[:, 3] > 0).long()


class Rollout:
    """One ES generation or a bare rollout over ``TorchCartPole(N)`` of fixed length T."""

    def __init__(self, N, T, device, seed, perturbed=True, policy_net=True):
        self.N, self.T, self.device = N, T, device
        self.net = make_policy(seed, device)
        self.opt = EggrollOptimizer(self.net, lr=0.05, sigma=0.1, rank=4, population_size=N, seed=seed) if perturbed else None
        self.env = TorchCartPole(N, device=device)
        self.policy = self._act if policy_net else trivial
        self.seed = seed

    def _act(self, obs):
        population = self.opt.population if self.opt is not None else None
        return self.net(obs if population is None else population.per_member(obs)).argmax(-1)

    def rollout(self):
        return rollout_returns(self.policy, self.env, self.T, seed=self.seed, check_every=10 * self.T, paired=True)

    @torch.no_grad()
    def generation(self):
        if self.opt is None:
            return self.rollout()
        self.opt.ask()
        returns, steps = self.rollout()
        self.opt.tell(returns)
        return returns, steps


class GraphRollout:
    """The T-step loop of ``rollout_returns`` captured in a CUDA graph (one population's noise)."""

    def __init__(self, base: Rollout):
        self.b, env = base, base.env
        base.opt.ask()  # the population stays active: its noise buffers are baked into the graph
        env.reset(seed=base.seed, paired=True)
        self.inputs = {k: getattr(env, k).clone() for k in ("state", "steps", "terminated", "truncated", "done")}
        self.init = {k: v.clone() for k, v in self.inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self._loop()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.returns = self._loop()

    def _loop(self):
        env = self.b.env
        for k, v in self.inputs.items():
            setattr(env, k, v)
        obs, returns = env.state, torch.zeros(env.num_envs, device=env.device, dtype=env.dtype)
        alive = torch.ones(env.num_envs, device=env.device, dtype=torch.bool)
        for _ in range(self.b.T):
            obs, reward, term, trunc = env.step(self.b.policy(obs))
            returns = returns + torch.where(alive, reward, 0)
            alive = alive & ~(term | trunc)
        return returns

    def replay(self):
        for k, v in self.inputs.items():
            v.copy_(self.init[k])
        self.graph.replay()
        return self.returns

    def eager(self):
        with torch.no_grad():
            for k, v in self.inputs.items():
                v.copy_(self.init[k])
            return self._loop().clone()


def gym_rollout(N, T, device, seed):
    """gymnasium's vector CartPole with the perturbed policy; returns a step function and a note."""
    try:
        import gymnasium as gym
    except Exception as err:  # noqa: BLE001
        return None, f"gymnasium not importable ({type(err).__name__}: {err}); row skipped"
    import numpy as np
    envs = gym.make_vec("CartPole-v1", num_envs=N, vectorization_mode="vector_entry_point")
    base = Rollout(N, T, device, seed)

    @torch.no_grad()
    def run():
        base.opt.ask()
        obs, _ = envs.reset(seed=seed)
        total = torch.zeros(N, device=device)
        for _ in range(T):
            act = base.policy(torch.as_tensor(obs, device=device))
            obs, rew, term, trunc, _ = envs.step(act.cpu().numpy())
            total += torch.as_tensor(np.asarray(rew, dtype=np.float32), device=device)
        base.opt.tell(total)
        return total
    return run, f"gymnasium {gym.__version__} {type(envs.unwrapped).__name__} (autoreset NEXT_STEP, numpy on CPU)"


def check_policy(args, log):
    """Perturbed policy logits vs a float64 dense reference; CUDA graph replay vs the eager loop."""
    N, dev = 8, args.device
    r = Rollout(N, 5, dev, args.seed + 3)
    w0 = {k: w.detach().to("cpu", torch.float64).clone() for k, w in r.net.named_parameters()}
    obs = torch.randn(N, 4, device=dev)
    pop = r.opt.ask()
    noise = {n: pop.noise.chunk_noise(0, N)[p] for n, p in r.net.named_parameters()}
    common.poison(dev)
    with torch.no_grad():
        out = r.net(pop.per_member(obs))  # member i acts on obs[i]: (N, 2)
    r.opt.tell(torch.randn(N, device=dev))
    h = obs.detach().to("cpu", torch.float64)
    for i in (0, 2):
        A, B = (t.detach().to("cpu", torch.float64) for t in noise[f"{i}.weight"])
        W = w0[f"{i}.weight"][None] + torch.einsum("nir,njr->nij", A, B)
        h = torch.einsum("ni,noi->no", h, W) + w0[f"{i}.bias"] + noise[f"{i}.bias"].to("cpu", torch.float64)
        h = torch.tanh(h) if i == 0 else h
    common.check("policy.logits", out, h, common.TOL[torch.float32], log)


def check_graph(args, log):
    g = GraphRollout(Rollout(64, 50, args.device, args.seed + 4))
    common.check("graph_vs_eager.returns", g.replay().clone(), g.eager(), 1e-6, log)


def main(argv=None):
    p = common.make_parser(__doc__.splitlines()[0])
    p.add_argument("--populations", type=int, nargs="+", default=[2048, 65536])
    p.add_argument("--steps", type=int, default=500, help="T, rollout length (CartPole-v1 max 500)")
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--gym-population", type=int, default=2048)
    args = common.parse(p, argv)
    if args.quick:
        args.populations, args.steps, args.gym_population = [16, 64], 20, 16
    dev, T = args.device, args.steps
    budget = args.budget or (0.2 if args.quick else 1.5)
    ceil = common.measure_ceilings(dev, args.quick)
    common.header(args, ceil)
    checks, failures = {}, {}
    common.guard("policy", lambda: check_policy(args, checks), failures)
    graph_ok = common.is_cuda(dev) and not args.no_graph and common.guard("graph", lambda: check_graph(args, checks), failures)
    print("# correctness: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()), flush=True)
    rows, notes = [], {}

    def add(name, N, fn, t_base=None):
        common.free(dev)
        mem = common.peak_memory(fn, dev)
        t = common.bench(fn, dev, budget_s=budget, min_reps=3, flush=False)
        sps = N * T / (t["median_ms"] * 1e-3)
        rows.append({"variant": name, "envs": N, "steps": T, "time_ms": t["median_ms"], "msteps_per_s": sps / 1e6,
                     "ratio_vs_env_only": None if t_base is None else t_base / t["median_ms"],
                     "peak_gb": mem["peak_gb"], "reps": t["reps"]})
        return t["median_ms"]

    for N in args.populations:
        t_env = add("env_only", N, Rollout(N, T, dev, args.seed, perturbed=False, policy_net=False).generation)
        add("plain_policy", N, Rollout(N, T, dev, args.seed, perturbed=False).generation, t_env)
        add("eggroll", N, Rollout(N, T, dev, args.seed).generation, t_env)
        if graph_ok:
            common.guard(f"graph@{N}", lambda: add("eggroll_graph", N, GraphRollout(Rollout(N, T, dev, args.seed)).replay,
                                                   t_env), failures)
        else:
            notes["eggroll_graph"] = ("--no-graph" if args.no_graph else "skipped: CUDA graphs need --device cuda"
                                      if not common.is_cuda(dev) else f"skipped: {failures.get('graph')}")
    run, note = gym_rollout(args.gym_population, T, dev, args.seed)
    notes["gym_vector"] = note
    if run is not None:
        t_env = next((r_["time_ms"] for r_ in rows if r_["variant"] == "env_only" and r_["envs"] == args.gym_population), None)
        add("gym_vector", args.gym_population, run, t_env)
    # floor per env step: policy FLOPs (dense 2*(4*256 + 256*2), low-rank 2*r*(4+256+256+2) more when
    # perturbed; none for env_only) at the TF32 peak; bytes: the 4-float state read and written
    dense, lowrank = 2 * (4 * 256 + 256 * 2), 2 * 4 * (4 + 256 + 256 + 2)
    for r_ in rows:
        per_step = {"env_only": 0, "plain_policy": dense}.get(r_["variant"], dense + lowrank)
        fl = common.floor(per_step * r_["envs"] * T, 2 * 4 * 4 * r_["envs"] * T, ceil, "tf32")
        r_.update(floor_ms=fl["floor_ms"], time_over_floor=r_["time_ms"] / fl["floor_ms"])
    payload = {"config": {"populations": args.populations, "steps": T, "policy": "4-256(tanh)-2, rank 4",
                          "check_every": 10 * T, "gym_population": args.gym_population},
               "ceilings": ceil, "checks": checks, "failures": failures, "notes": notes, "rows": rows,
               "figures": {f"{r_['variant']}@{r_['envs']}_msteps_per_s": r_["msteps_per_s"] for r_ in rows}}
    common.save(args, payload)
    for k, v in notes.items():
        print(f"# {k}: {v}")
    cols = ["variant", "envs", "time_ms", "msteps_per_s", "ratio_vs_env_only", "peak_gb", "floor_ms", "time_over_floor"]
    print(common.table(rows, cols, f"CartPole rollout throughput, T={T} steps"))
    common.finish(failures)
    return payload


if __name__ == "__main__":
    main()

"""One rank of the distributed tests: ``run_rank(rank, world, port, out, scenario)``.

``tests/test_distributed.py`` runs each rank as a process forked from a server that has imported
torch and ``eggroll_optim`` once (``tests/forked.py``): a fresh interpreter per rank would pay
seconds of imports, and more tearing torch down at exit. By hand:
``python distributed_worker.py RANK WORLD PORT OUT [SCENARIO]``.

World size 1 runs without a process group: the single-process reference. Every scenario runs a few
ES steps on a small float64 model from the same seed and saves the parameters to ``OUT/rank{R}.pt``
(``{scenario: [tensors]}``); ``SCENARIO`` is ``all`` or a comma-separated list. ``die`` makes rank 1 exit in the middle of a step; the
other ranks write what they raised to ``OUT/rank{R}.err``. A rank that raises writes its traceback
to ``OUT/rank{R}.log`` and exits 1.
"""
import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout without the install
from eggroll_optim import EggrollOptimizer, per_member_mse  # noqa: E402

N, STEPS = 12, 3


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.LayerNorm(3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)


def make(group, **kwargs):
    net = model()
    return net, EggrollOptimizer(net, lr=0.1, sigma=0.2, rank=2, population_size=N, seed=3, process_group=group,
                                 **kwargs)


def run_step(group, **kwargs):
    net, opt = make(group, **kwargs)
    x, y = data()
    for _ in range(STEPS):
        opt.step(lambda: per_member_mse(net(x), y))
    return [p.detach().clone() for p in net.parameters()]


def run_ask_tell(group, **kwargs):
    net, opt = make(group, **kwargs)
    x, y = data()
    obs = torch.randn(N, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # one row per member
    for _ in range(STEPS):
        population = opt.ask()
        fitness = []
        for members in population.chunks():
            out = net(population.per_member(obs))  # (n, 3): this rank's members only
            fitness.append(-(out - y[0]).square().sum(-1))
        opt.tell(torch.cat(fitness))
    return [p.detach().clone() for p in net.parameters()]


SCENARIOS = {
    "step": lambda g: run_step(g),
    "step_gradient": lambda g: run_step(g, distributed_strategy="gradient"),
    "step_chunked_adam": lambda g: run_step(g, chunk_size=2, optimizer=torch.optim.Adam),
    "ask_tell": lambda g: run_ask_tell(g, check_ranks=True),
    "ask_tell_chunked": lambda g: run_ask_tell(g, chunk_size=2, distributed_strategy="gradient"),
}


def _run(rank: int, world: int, port: int, out: str, scenario: str) -> None:
    torch.set_num_threads(1)  # tiny models; every rank (and the reference) rounds the same way
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=20))
        group = dist.group.WORLD
    if scenario == "die":
        net, opt = make(group)
        x, y = data()

        def closure():
            if rank == 1:
                os._exit(3)  # dies between its forward and the gather
            return per_member_mse(net(x), y)
        t0 = time.monotonic()
        try:
            opt.step(closure)
            msg = "no error"
        except Exception as err:  # noqa: BLE001 - reported to the test
            msg = f"{type(err).__name__} after {time.monotonic() - t0:.1f}s: {err}"
        with open(os.path.join(out, f"rank{rank}.err"), "w") as fh:
            fh.write(msg)
        os._exit(0)
    names = list(SCENARIOS) if scenario == "all" else scenario.split(",")
    results = {name: SCENARIOS[name](group) for name in names}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_rank(rank: int, world: int, port: int, out: str, scenario: str = "all") -> None:
    """One rank; what it raised goes to ``OUT/rank{R}.log`` (a forked rank's stderr is the forkserver's)."""
    try:
        _run(rank, world, port, out, scenario)
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.log"), "w") as fh:
            fh.write(traceback.format_exc())
        raise


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    run_rank(rank, world, port, out, sys.argv[5] if len(sys.argv) > 5 else "all")


if __name__ == "__main__":
    main()

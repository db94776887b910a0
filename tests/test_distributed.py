"""A population split across gloo ranks on localhost equals the single-process run.

Each test spawns ``tests/distributed_worker.py`` once per rank (plain processes on 127.0.0.1).
"""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from eggroll_optim.distributed import choose_strategy, member_shares

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out, scenario: str = "all", timeout: float = 120):
    port = _port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), str(out), scenario], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    codes, outputs = _launch(1, out)
    assert codes == [0], outputs
    return torch.load(out / "rank0.pt")


@pytest.mark.parametrize("world,scenarios", [(2, "all"), (4, "step_chunked_adam,ask_tell_chunked")])
def test_ranks_bitwise_identical_and_equal_to_one_process(world, scenarios, single, tmp_path):
    codes, outputs = _launch(world, tmp_path, scenarios)  # 4 ranks: the chunked scenarios, both strategies
    assert codes == [0] * world, outputs
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for scenario in ranks[0]:
        reference = single[scenario]
        for r in range(1, world):
            for p, q in zip(ranks[0][scenario], ranks[r][scenario]):
                assert torch.equal(p, q), f"{scenario}: rank {r} differs from rank 0"
        for p, q in zip(ranks[0][scenario], reference):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=f"{scenario}: differs from one process")


def test_a_dead_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    codes, outputs = _launch(2, tmp_path, "die", timeout=90)
    assert codes[1] == 3, outputs
    message = (tmp_path / "rank0.err").read_text()
    assert message != "no error" and "Error" in message, message
    assert time.monotonic() - t0 < 60


def test_shares_are_whole_pairs_covering_the_population():
    assert member_shares(12, 4) == [(0, 4), (4, 8), (8, 10), (10, 12)]
    assert member_shares(8, 3) == [(0, 4), (4, 6), (6, 8)]
    for N, W in [(2, 1), (10, 3), (4096, 8)]:
        shares = member_shares(N, W)
        assert shares[0][0] == 0 and shares[-1][1] == N
        assert all(a % 2 == 0 and b % 2 == 0 and a < b for a, b in shares)
        assert all(shares[i][1] == shares[i + 1][0] for i in range(W - 1))


def test_strategy_choice_follows_model_size():
    mlp = [(256, 784, 4), (10, 256, 4)]
    small = choose_strategy(mlp, 266, 4096, 8)
    assert small["strategy"] == "fitness" and small["fitness_bytes"] == 4 * 4096 * 7 / 8  # the others' shares
    big = choose_strategy([(4096, 4096, 4)] * 48, 0, 2 ** 20, 8)  # a 0.8 B-parameter model at 2^20 members
    assert big["strategy"] == "gradient" and big["gradient_bytes"] > big["fitness_bytes"]

"""A population split across gloo ranks on localhost equals the single-process run.

Each test runs ``distributed_worker.run_rank`` in one process per rank (gloo over 127.0.0.1). The
processes are forked from a server that imported torch and ``eggroll_optim`` once (``tests/forked.py``)
and exit without tearing the interpreter down: a fresh interpreter per rank paid ~5 s of imports and
~2 s of teardown, 9 times.
"""
import socket
import time

import pytest
import torch
from forked import start

from eggroll_optim.distributed import choose_strategy, member_shares

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out, scenario: str = "all", timeout: float = 120):
    """Exit codes of the ``world`` ranks and what each wrote to ``rank{R}.log`` (a traceback, if it raised)."""
    import distributed_worker

    port = _port()
    procs = [start(distributed_worker.run_rank, r, world, port, str(out), scenario) for r in range(world)]
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    logs = [(out / f"rank{r}.log").read_text() if (out / f"rank{r}.log").exists() else "" for r in range(world)]
    assert not hung, f"ranks {hung} still running after {timeout} s; logs: {logs}"
    return [p.exitcode for p in procs], logs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    codes, outputs = _launch(1, out)
    assert codes == [0], outputs
    return torch.load(out / "rank0.pt")


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_bitwise_identical_and_equal_to_one_process(world, single, tmp_path):
    codes, outputs = _launch(world, tmp_path)  # every scenario: a rank costs a fork now, not an interpreter
    assert codes == [0] * world, outputs
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert list(ranks[0]) == list(single)
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

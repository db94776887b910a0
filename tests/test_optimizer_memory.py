"""``chunk_size="auto"`` (the default): each call of the model runs the population in pieces that fit a
memory budget, measured on a first probe piece; an out-of-memory error halves a piece once; nothing
about the step's result depends on the split."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer, per_member_cross_entropy, per_member_mse
from eggroll_optim.memory import PROBE_MEMBERS, Planner, even_pieces, measured

from optim_helpers import data as _data
from optim_helpers import mlp as _mlp


@pytest.mark.parametrize("start, stop, fit", [(0, 64, 20), (0, 96, 40), (4, 4 + 2 * 97, 30), (0, 12, 100), (0, 8, 1)])
def test_even_pieces_cover_the_members_in_whole_pairs_of_at_most_fit(start, stop, fit):
    pieces = even_pieces(start, stop, fit)
    assert pieces[0][0] == start and pieces[-1][1] == stop
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    sizes = [b - a for a, b in pieces]
    assert all(s % 2 == 0 and 2 <= s <= max(fit, 2) for s in sizes)
    if (stop - start) % 32 == 0:  # a power-of-two count of pairs splits into one size
        assert len(set(sizes)) == 1


def _step(model, chunk_size="auto", max_memory=None, per_member=False, N=64):
    x, y = _data()
    xs = x + 0.1 * torch.randn(N, *x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    opt = EggrollOptimizer(model, lr=0.2, sigma=0.2, rank=2, population_size=N, seed=2,
                           chunk_size=chunk_size, max_memory=max_memory)
    outputs = []
    for _ in range(2):  # the second step runs from the measurement, without a probe
        with torch.no_grad(), opt.ask() as population:
            out = model(population.per_member(xs) if per_member else x)
        outputs.append(out)
        opt.tell(-per_member_mse(out, y))
    return outputs, opt


@pytest.mark.parametrize("per_member", [False, True])
def test_auto_pieces_give_bitwise_the_unchunked_outputs_and_update(per_member):
    reference, _ = _step(_mlp(), chunk_size=64, per_member=per_member)
    model = _mlp()
    outputs, opt = _step(model, max_memory=40_000, per_member=per_member)  # a few KB a member: pieces
    (fit,) = opt._planner.fits.values()
    assert 2 <= fit < 32
    for out, ref in zip(outputs, reference):
        assert torch.equal(out, ref)
    for p, q in zip(model.parameters(), _step(_mlp(), chunk_size=64, per_member=per_member)[1].module.parameters()):
        assert torch.equal(p, q)


def test_pieces_update_batchnorm_running_stats_as_one_call():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()

    whole, pieces = make(), make()
    _step(whole, chunk_size=64)
    _step(pieces, max_memory=40_000)
    for a, b in zip(whole[1].buffers(), pieces[1].buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for p, q in zip(whole.parameters(), pieces.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


class _FailsOnce(nn.Module):
    """Raises a CUDA-style out-of-memory error in its second call (the first piece after the probe)."""

    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(5, 3).double(), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.lin(x)


def test_out_of_memory_in_a_piece_halves_it_once_and_changes_nothing():
    torch.manual_seed(0)
    reference = _FailsOnce()
    reference.calls = 10  # never fails
    flaky = _FailsOnce()
    flaky.load_state_dict(reference.state_dict())
    ref_out, _ = _step(reference, max_memory=10**9)
    with pytest.warns(UserWarning, match=r"Out of memory running members \[16, 64\) at once: retrying in pieces of 24"):
        out, opt = _step(flaky, max_memory=10**9)
    assert torch.equal(out[0], ref_out[0]) and torch.equal(out[1], ref_out[1])
    assert all(torch.equal(p, q) for p, q in zip(flaky.parameters(), reference.parameters()))
    assert list(opt._planner.fits.values()) == [24]  # later calls use the halved size


def test_a_second_out_of_memory_in_one_call_is_raised():
    class AlwaysFails(nn.Linear):
        def forward(self, x):
            raise torch.OutOfMemoryError("simulated")

    model = AlwaysFails(5, 3)
    opt = EggrollOptimizer(model, population_size=64)
    with pytest.warns(UserWarning, match="Out of memory"), pytest.raises(torch.OutOfMemoryError):
        with opt.ask():
            model(torch.randn(2, 5))
    assert opt.population is None  # the failed evaluation is discarded


def test_a_population_no_larger_than_the_probe_runs_whole_and_unmeasured():
    model = _mlp()
    opt = EggrollOptimizer(model, population_size=PROBE_MEMBERS)
    with opt.ask():
        out = model(_data()[0])
    assert out.shape[0] == PROBE_MEMBERS and opt._planner.fits == {}  # no dispatch mode, no CUDA peak reset
    opt.discard()


def test_the_cpu_estimate_counts_what_a_call_allocates():
    x = torch.randn(64, 100)
    with measured(torch.device("cpu")) as m:
        y = torch.tanh(x @ torch.randn(100, 200))  # randn 80 KB, matmul 51 KB, tanh 51 KB
        y.add_(1)  # in place: nothing new
    assert m.bytes == 4 * (100 * 200 + 2 * 64 * 200)


def test_a_budget_fraction_reads_the_free_memory():
    planner = Planner(0.25)
    budget = planner.budget(torch.device("cpu"))
    assert 0 < budget < 10**13
    assert Planner(12345).budget(torch.device("cpu")) == 12345


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_size="big"), "Invalid chunk_size: 'big'"), (dict(chunk_size=5), "Invalid chunk_size: 5"),
    (dict(max_memory=0), "Invalid max_memory: 0"), (dict(max_memory=-1.0), "Invalid max_memory: -1.0"),
    (dict(max_memory=True), "Invalid max_memory: True"),
    (dict(chunk_size=4, max_memory=10**9), "with chunk_size='auto'"),
])
def test_bad_chunk_and_memory_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EggrollOptimizer(_mlp(), population_size=8, **kwargs)


def test_a_large_population_of_the_mnist_mlp_steps_within_a_memory_budget():
    """2^16 members of a 784-256-10 MLP (rank 1, a shared batch of 4, ~15 s on two cores): unchunked,
    activations and noise would take ~1 GB at once; with a 128 MB budget the call runs in pieces of
    4096 and the gradient in noise blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
    N, budget = 1 << 16, 128 << 20
    opt = EggrollOptimizer(model, lr=0.1, sigma=0.1, rank=1, population_size=N, max_memory=budget)
    x, y = torch.randn(4, 784), torch.randint(0, 10, (4,))
    before = model[0].weight.detach().clone()
    loss = opt.step(lambda: per_member_cross_entropy(model(x), y))
    (fit,) = opt._planner.fits.values()
    assert PROBE_MEMBERS < fit < N // 8, fit  # pieces, each within the budget
    assert torch.isfinite(loss) and not torch.equal(model[0].weight, before)


@pytest.mark.cuda
def test_cuda_probe_is_measured_on_its_second_run_not_the_first_calls_scratch():
    """A first call compiles and autotunes (Triton's benchmark buffers, a library's workspace): that scratch
    is not the members'. Measured, it had made a cold process plan smaller pieces than a warm one (new
    shapes to tune again). The probe runs twice on CUDA; the running statistics keep one call's result."""

    class FirstCallScratch(nn.Module):
        seen = False

        def forward(self, x):
            if not self.seen:
                self.seen = True
                torch.empty(256 * 2**20, dtype=torch.uint8, device=x.device)  # like Triton's benchmark buffer
            return x

    def run(scratch: bool, chunk_size="auto"):
        torch.manual_seed(0)
        layers = [nn.Linear(64, 256), nn.BatchNorm1d(256), nn.Tanh(), nn.Linear(256, 8)]
        model = nn.Sequential(*([FirstCallScratch()] if scratch else []), *layers).cuda()
        opt = EggrollOptimizer(model, population_size=1024, rank=2, seed=1, chunk_size=chunk_size,
                               max_memory=2**30 if chunk_size == "auto" else None)
        x = torch.randn(32, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
        with torch.no_grad(), opt.ask():
            out = model(x)
        return opt, model[-3 if scratch else 1], out

    (opt, bn, out), (opt_scratch, bn_scratch, out_scratch) = run(False), run(True)
    assert opt_scratch._planner.fits == opt._planner.fits  # counted, 256 MiB / 16 members would cap it at ~64
    assert min(opt._planner.fits.values()) >= 1024
    _, bn_whole, out_whole = run(False, chunk_size=1024)
    torch.testing.assert_close(out_scratch, out_whole)
    torch.testing.assert_close(bn_scratch.running_mean, bn_whole.running_mean)
    torch.testing.assert_close(bn_scratch.running_var, bn_whole.running_var)
    assert bn_scratch.num_batches_tracked.item() == bn_whole.num_batches_tracked.item() == 1


def _probe_twice(device: str, rng_state) -> None:
    """The unmeasured run puts the random state back (the measured run draws what one run would), and an
    out-of-memory error in it is not the user's: the measured run goes on (halving its piece if it fails too)."""

    class Recorded(nn.Module):
        def __init__(self, fail_first: bool):
            super().__init__()
            self.lin, self.drop, self.fail_first, self.states = nn.Linear(64, 8), nn.Dropout(0.5), fail_first, []

        def forward(self, x):
            self.states.append(rng_state())
            if self.fail_first and len(self.states) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.drop(self.lin(x))

    for fail_first in (False, True):
        model = Recorded(fail_first).to(device).train()
        opt = EggrollOptimizer(model, population_size=64, rank=2, max_memory=2**30)
        with torch.no_grad(), opt.ask():
            out = model(torch.randn(32, 64, device=device))
        assert out.shape == (64, 32, 8) and torch.isfinite(out).all()
        assert len(model.states) == 3  # the probe twice, then the other 48 members in one piece
        assert torch.equal(model.states[0], model.states[1])  # the first run's draws were put back
        assert not torch.equal(model.states[1], model.states[2])


def test_probes_first_run_keeps_the_random_state_and_leaves_out_of_memory_to_the_measured_run(monkeypatch):
    """The CUDA-only first run, forced on CPU (where the measurement needs none): the same contract."""
    import eggroll_optim.population as population

    monkeypatch.setattr(population, "_warm_before_measuring", lambda device: True)
    _probe_twice("cpu", torch.get_rng_state)


def test_the_probe_runs_once_on_cpu():
    class Counted(nn.Linear):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    model = Counted(64, 8)
    opt = EggrollOptimizer(model, population_size=64, rank=2, max_memory=2**30)
    with torch.no_grad(), opt.ask():
        model(torch.randn(32, 64))
    assert model.calls == 2  # the probe, measured by counting its tensors, then the rest


@pytest.mark.cuda
def test_cuda_probes_first_run_keeps_the_random_state_and_leaves_out_of_memory_to_the_measured_run():
    _probe_twice("cuda", torch.cuda.get_rng_state)

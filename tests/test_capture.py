"""``EggrollOptimizer.compile_step``: one CUDA graph per step, equal to the eager steps.

CUDA: after the warm-up and the capture, replayed steps leave the same parameters as eager steps
(to float rounding) for the fused MLP path and for a vmapped CNN with BatchNorm, with SGD and Adam,
an lr scheduler and sigma decay; NaN fitness zeroes a replayed step's update and ``check`` reports it.
CPU: the compiled callable is the eager ``step``, bit for bit; the sync-free NaN policy and
``centered_rank`` give the eager numbers.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer, per_member_cross_entropy
from eggroll_optim.shaping import apply_nan_policy, identity, shape_checked, shape_in_graph, zscore


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 5))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


def _pair(make, device, optimizer=None, **kw):
    """Two identical (model, optimizer, scheduler) triples on ``device``."""
    out = []
    for _ in range(2):
        model = make().to(device)
        opt = EggrollOptimizer(model, lr=0.05, sigma=0.05, rank=2, population_size=32, seed=3, sigma_decay=0.97,
                               optimizer=optimizer, **kw)
        out.append((model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)))
    return out


def _batches(shape, n, device, steps):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, *shape, generator=g).to(device), torch.randint(0, 5, (n,), generator=g).to(device))
            for _ in range(steps)]


def test_compiled_step_on_cpu_is_the_eager_step():
    (m1, o1, s1), (m2, o2, s2) = _pair(_mlp, "cpu")
    compiled = o2.compile_step(lambda x, y: per_member_cross_entropy(m2(x), y))
    for x, y in _batches((12,), 16, "cpu", 4):
        a = o1.step(lambda: per_member_cross_entropy(m1(x), y))
        b = compiled(x, y)
        s1.step(), s2.step()
        assert torch.equal(a, b)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert o1.step_count == o2.step_count == 4 and o1.param_groups[0]["sigma"] == o2.param_groups[0]["sigma"]


def test_compile_step_arguments_are_checked():
    model = _mlp()
    opt = EggrollOptimizer(model, population_size=8)
    with pytest.raises(TypeError, match="callable"):
        opt.compile_step(None)
    with pytest.raises(ValueError, match="warmup"):
        opt.compile_step(lambda: None, warmup=0)


@pytest.mark.parametrize("policy", ["raise", "worst", "skip"])
def test_sync_free_nan_policy_matches_the_eager_one(policy):
    f = torch.tensor([0.5, float("nan"), -2.0, 3.0, float("inf")], dtype=torch.float64)
    flagged = torch.zeros((), dtype=torch.int64)
    out = shape_in_graph(f, policy, identity, flagged)
    assert int(flagged) == 1
    if policy == "worst":  # below every finite member by max(spread, 1): -2 - 5
        expected = torch.tensor([0.5, -7.0, -2.0, 3.0, -7.0], dtype=torch.float64)
        assert torch.equal(out, expected) and torch.equal(apply_nan_policy(f, "worst"), expected)
        torch.testing.assert_close(shape_in_graph(f, policy, zscore, flagged), shape_checked(f, policy, zscore),
                                   rtol=0, atol=0)
        narrow = torch.tensor([0.1, float("nan"), 0.3], dtype=torch.float64)  # spread 0.2 < 1: 0.1 - 1
        expected = torch.tensor([0.1, 0.1 - 1.0, 0.3], dtype=torch.float64)
        assert torch.equal(shape_in_graph(narrow, policy, identity, flagged), expected)
        assert torch.equal(apply_nan_policy(narrow, "worst"), expected)
    else:
        assert torch.equal(out, torch.zeros_like(f))  # no update, as eager "skip"
    flagged.zero_()
    finite = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(shape_in_graph(finite, policy, identity, flagged), finite) and int(flagged) == 0
    assert torch.equal(shape_in_graph(torch.full((3,), float("nan")), "worst", identity, flagged), torch.zeros(3))
    half = torch.tensor([1.0, 3.0], dtype=torch.float16)  # shaped in float32, as the eager path
    shaped = shape_in_graph(half, policy, zscore, flagged)
    assert shaped.dtype == torch.float32 and torch.equal(shaped, shape_checked(half.float(), policy, zscore))


def _run(make, shape, optimizer, steps, **kw):
    (m1, o1, s1), (m2, o2, s2) = _pair(make, "cuda", optimizer, **kw)
    compiled = o2.compile_step(lambda x, y: per_member_cross_entropy(m2(x), y))
    for x, y in _batches(shape, 16, "cuda", steps):
        a = o1.step(lambda: per_member_cross_entropy(m1(x), y))
        b = compiled(x, y)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        s1.step(), s2.step()
    assert compiled.graph is not None  # captured and replayed (steps > warmup)
    return (m1, o1), (m2, o2), compiled


@pytest.mark.cuda
@pytest.mark.parametrize("make,shape,optimizer,kw", [
    (_mlp, (12,), None, {}),  # the fused MLP block, SGD (fused, tensor lr)
    (_mlp, (12,), torch.optim.Adam, dict(chunk_size=8)),  # chunks of 8 members, Adam capturable
    (_cnn, (1, 6, 6), lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9), {}),  # vmapped conv + BatchNorm
])
def test_replayed_steps_equal_eager_steps_on_cuda(make, shape, optimizer, kw):
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        (m1, o1), (m2, o2), _ = _run(make, shape, optimizer, 7, **kw)
        for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")
        for b1, b2 in zip(m1.buffers(), m2.buffers()):  # BatchNorm's running statistics
            torch.testing.assert_close(b2, b1, rtol=1e-4, atol=1e-5)
        assert o1.step_count == o2.step_count == 7
        assert o2.param_groups[0]["sigma"] == pytest.approx(o1.param_groups[0]["sigma"])
        assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.cuda
def test_replayed_step_with_nan_fitness_updates_nothing_and_check_raises():
    model = _mlp().cuda()
    opt = EggrollOptimizer(model, lr=0.05, sigma=0.05, rank=2, population_size=16)
    compiled = opt.compile_step(lambda x, y: per_member_cross_entropy(model(x), y), warmup=1)
    (x, y), = _batches((12,), 8, "cuda", 1)
    compiled(x, y), compiled(x, y)  # warm-up, then capture + replay
    compiled.check()
    before = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[0, 0] = float("nan")
    compiled(bad, y)
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)
    assert compiled.nonfinite_steps == 1
    with pytest.raises(ValueError, match="NaN/inf"):
        compiled.check()
    with pytest.raises(ValueError, match="captured as"):
        compiled(x[:4], y[:4])


def test_cartpole_fixed_length_rollout_is_the_eager_rollout():
    """The CUDA-graph form of the CartPole step (start states drawn outside, 500 masked steps inside
    the compiled step) gives the eager step's returns, env steps and update (run eagerly on CPU)."""
    from eggroll_optim.recipes.cartpole import CartPoleConfig, CartPoleTask

    cfg = CartPoleConfig(device="cpu", env_backend="torch", population_size=16, hidden=16, chunk_size=8)
    eager, graphable = CartPoleTask(cfg), CartPoleTask(cfg)
    graphable.env_steps = torch.zeros((), dtype=torch.int64)
    graphable.compiled = graphable.optimizer.compile_step(graphable._graph_rollout, maximize=True)
    for step in range(3):
        a, b = eager.train_step(step), graphable.train_step(step)
        assert torch.equal(torch.as_tensor(a["metric"]), b["metric"]) and int(a["env_steps"]) == int(b["env_steps"])
    for p, q in zip(eager.model.parameters(), graphable.model.parameters()):
        assert torch.equal(p, q)


_SYNCING_CLOSURE = """
import torch, torch.nn as nn, pytest
from eggroll_optim import EggrollOptimizer, per_member_cross_entropy
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 5)).cuda()
opt = EggrollOptimizer(model, lr=0.05, sigma=0.05, rank=2, population_size=32)
x, y = torch.randn(16, 12, device="cuda"), torch.randint(0, 5, (16,), device="cuda")

def closure(x, y):
    loss = per_member_cross_entropy(model(x), y)
    return loss if bool(loss.sum() > 0) else -loss  # a host sync

compiled = opt.compile_step(closure)
compiled(x, y)  # the eager warm-up step
with pytest.raises(RuntimeError, match="synchronises with the host"):
    compiled(x, y)
assert opt.population is None and opt.step_count == 1
opt.step(lambda: closure(x, y))  # eager steps and the default generator still work
torch.randn(3, device="cuda")
assert opt.step_count == 2
print("ok")
"""


@pytest.mark.cuda
def test_a_closure_that_syncs_is_named_and_the_optimizer_stays_usable():
    """In a process of its own: a failed capture must not leave CUDA's generators unusable. The model, population
    and batch are those of test_replayed_steps_equal_eager_steps_on_cuda[_mlp-shape0-None-kw0], so the process
    loads that test's Triton kernels from the on-disk cache instead of compiling its own (~1 s each)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SYNCING_CLOSURE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_replay_copies_every_tensor_of_nested_arguments_and_checks_them():
    """The replay's argument handling (CPU, with a stand-in graph): tensors inside lists and dicts are
    copied into the captured ones; another structure, shape or non-tensor value is an error."""
    from types import SimpleNamespace

    model = _mlp()
    opt = EggrollOptimizer(model, population_size=8)
    compiled = opt.compile_step(lambda batch, scale: None)
    compiled._keep_arguments(({"x": torch.zeros(2, 3)}, 1.0))
    compiled.baked = [{} for _ in opt.inner.param_groups]
    compiled.graph, compiled.out, replays = SimpleNamespace(replay=lambda: replays.append(1)), torch.zeros(()), []
    compiled._replay(({"x": torch.ones(2, 3)}, 1.0))
    assert torch.equal(compiled.static[0]["x"], torch.ones(2, 3)) and replays == [1] and opt.step_count == 1
    with pytest.raises(ValueError, match="captured as"):
        compiled._replay(({"x": torch.ones(3, 3)}, 1.0))
    with pytest.raises(TypeError, match="shaped"):
        compiled._replay(({"y": torch.ones(2, 3)}, 1.0))
    with pytest.raises(ValueError, match="not a tensor"):
        compiled._replay(({"x": torch.ones(2, 3)}, 2.0))
    assert replays == [1]


def test_graph_mode_tell_zeroes_the_estimate_of_a_nonfinite_shaping_and_counts_it():
    """The optimizer's graph-mode tell (what a capture records), run eagerly on CPU: a shaping callable
    that returns NaN gives a zero estimate (plain SGD: nothing moves) and is counted; a finite one
    updates as the eager tell does."""
    from eggroll_optim.capture import GraphScalars

    def run(shaping, graph):
        model = _mlp()
        opt = EggrollOptimizer(model, population_size=8, fitness_shaping=shaping, seed=1)
        if graph:
            opt._graph = GraphScalars(opt, torch.device("cpu"))
        (x, y), = _batches((12,), 4, "cpu", 1)
        opt.step(lambda: per_member_cross_entropy(model(x), y))
        return model, opt

    nan_model, nan_opt = run(lambda f: f * float("nan"), True)
    assert all(torch.equal(p, q) for p, q in zip(nan_model.parameters(), _mlp().parameters()))
    assert int(nan_opt._graph.flagged) == 1
    (m1, _), (m2, o2) = run(lambda f: f - f.mean(), True), run(lambda f: f - f.mean(), False)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

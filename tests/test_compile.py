"""torch.compile of a hooked module: the same numbers as eager, no recompilation per step or per chunk.

Inside a population the members run eagerly (``Population.run`` is not traced: its chunk bounds
would be guarded constants); outside, the compiled module is the compiled plain model."""
import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer

dynamo = pytest.importorskip("torch._dynamo")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def test_compiled_module_matches_eager_and_compiles_once():
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")  # no C++ toolchain needed; same tracing
    opt = EggrollOptimizer(model, population_size=8, sigma=0.3)
    x = torch.randn(5, 4)
    for _ in range(4):
        with opt.ask():
            out = compiled(x)  # (8, 5, 3)
            torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)  # the step's noise, not a stale one
        assert out.shape == (8, 5, 3) and out.std(0).mean() > 1e-3  # members really differ
        opt.tell(out.sum((1, 2)))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))  # inert hooks: the mean model
    frames = counters["stats"]["unique_graphs"]
    assert 1 <= frames <= 3, f"recompiled per step: {frames} graphs for 4 steps"


def _chunked_steps(chunking: dict) -> int:
    """Three steps of a compiled model over 16 members with per-member inputs, against an eager
    unchunked twin, the compiled plain model called between them; returns the graphs compiled."""
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    model, reference = _model(), _model()
    compiled = torch.compile(model, backend="aot_eager")
    opts = [EggrollOptimizer(m, population_size=16, sigma=0.3, seed=1, **c)
            for m, c in ((model, chunking), (reference, dict(chunk_size=16)))]
    xs = torch.randn(16, 5, 4)
    with torch.no_grad():
        for _ in range(3):
            compiled(xs[0])  # the plain model
            population, outputs = opts[0].ask(), []
            for _ in population.chunks():
                outputs.append(compiled(population.per_member(xs)))
            with opts[1].ask() as ref_population:
                expected = reference(ref_population.per_member(xs))
            torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-6, atol=1e-6)
            for opt, out in zip(opts, (torch.cat(outputs), expected)):
                opt.tell(out.sum((1, 2)))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    return counters["stats"]["unique_graphs"]


def test_no_recompilation_per_chunk():
    """8 chunks of 2, uneven chunks of 6 (the last one 4) and ``"auto"`` pieces compile exactly the
    graphs one chunk compiles (the plain model's), however many chunks and steps."""
    once = _chunked_steps(dict(chunk_size=16))
    assert 1 <= once <= 2
    for chunking in (dict(chunk_size=2), dict(chunk_size=6), dict(max_memory=20_000)):
        assert _chunked_steps(chunking) == once, chunking

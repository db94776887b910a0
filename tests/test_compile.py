"""torch.compile of a hooked module: the same numbers as eager, and no recompilation per step."""
import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer

dynamo = pytest.importorskip("torch._dynamo")


def test_compiled_module_matches_eager_and_compiles_once():
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
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
    print("unique graphs", frames)
    assert frames <= 3, f"recompiled per step: {frames} graphs for 4 steps"

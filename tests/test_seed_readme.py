"""Every ```python block of the seed README runs against ``eggroll_optim``.

The blocks are read from ``shared/seed/functional-eggroll-torch-README.md`` at run time and get only
mechanical substitutions: the import path (``hyperscalees.torch`` -> ``eggroll_optim``), the device
(``"cuda"`` -> the available one) and smaller literal sizes. Each substitution must match, so a
README that drifts fails here instead of silently running at full size.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

SEED_README = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / "functional-eggroll-torch-README.md"
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POP = 32  # reduced population size (even, as the antithetic layout requires)


# ----------------------------------------------------------------------------- extraction helpers

def _python_blocks() -> list[str]:
    if not SEED_README.is_file():
        pytest.skip(f"seed README not found at {SEED_README}")
    return re.findall(r"```python\n(.*?)```", SEED_README.read_text(), flags=re.S)


def _block(marker: str) -> str:
    """The one python block containing ``marker``."""
    blocks = _python_blocks()
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one python block containing {marker!r}, found {len(found)} of {len(blocks)}"
    return found[0]


def _sub(src: str, pattern: str, repl: str, *, count: int | None = None) -> str:
    """``re.subn`` that fails unless ``pattern`` matched (exactly ``count`` times when given)."""
    out, n = re.subn(pattern, repl, src)
    assert n >= 1, f"README drift: pattern {pattern!r} no longer matches"
    if count is not None:
        assert n == count, f"README drift: pattern {pattern!r} matched {n} times, expected {count}"
    return out


def _adapt(src: str, sizes: list[tuple[str, str]]) -> str:
    """Import rename, device swap and the given size reductions (each must match)."""
    src = _sub(src, r"\bhyperscalees\.torch\b", "eggroll_optim")
    assert "hyperscalees" not in src
    src = _sub(src, r'"cuda"', repr(DEVICE))
    for pattern, repl in sizes:
        src = _sub(src, pattern, repl, count=1)
    return src


def _run(src: str, name: str, **namespace) -> dict:
    ns = {"__name__": f"seed_readme_{name}", **namespace}
    exec(compile(src, f"<seed README: {name}>", "exec"), ns)
    return ns


def _assert_weights_moved(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """The evolved weight matrices differ from the module's (untouched) initial ones and are finite."""
    initial = dict(model.named_parameters())
    weights = [k for k in params if k.endswith("weight")]
    assert weights, "no weight parameters in the params dict"
    for name in weights:
        p = params[name]
        assert torch.isfinite(p).all(), f"{name} has non-finite values"
        assert not torch.equal(p.cpu(), initial[name].detach().cpu()), f"{name} did not change"


def test_readme_has_the_four_python_blocks():
    blocks = _python_blocks()
    assert len(blocks) == 4, f"expected 4 python blocks (Quick Start + 3 recipes), found {len(blocks)}"
    assert all("hyperscalees.torch" in b for b in blocks)


# ----------------------------------------------------------------------------- Quick Start

def test_quick_start_block():
    src = _adapt(
        _block("your_fitness_fn"),
        [(r"population_size=2048\b", f"population_size={POP}"), (r"range\(100\)", "range(3)")],
    )
    torch.manual_seed(0)
    x = torch.randn(16, 4, device=DEVICE)  # shared CartPole-like observations (batch, 4)
    outputs = []

    def your_fitness_fn(output):  # (N, batch, 2) -> (N,): prefer action 0
        outputs.append(output)
        return output[..., 0].mean(-1) - output[..., 1].mean(-1)

    ns = _run(src, "quick_start", x=x, your_fitness_fn=your_fitness_fn)

    assert len(outputs) == 3
    assert all(o.shape == (POP, 16, 2) for o in outputs)
    assert ns["output"].shape == (16, 2) and torch.isfinite(ns["output"]).all()
    _assert_weights_moved(ns["model"], ns["params"])
    cfg = ns["config"]
    assert ns["current_lr"] == pytest.approx(cfg.lr * cfg.lr_decay**3)
    assert ns["current_sigma"] == pytest.approx(cfg.sigma * cfg.sigma_decay**3)


# ----------------------------------------------------------------------------- Recipe 1: CartPole

def test_recipe_cartpole_block():
    pytest.importorskip("gymnasium")
    src = _adapt(
        _block("gym.make_vec"),
        [
            (r"population_size=2048,", f"population_size={POP},"),
            (r"max_epochs=300,", "max_epochs=2,"),
            (r"range\(500\)", "range(50)"),
        ],
    )
    ns = _run(src, "cartpole")

    returns = ns["episode_returns"]
    assert returns.shape == (POP,)
    assert torch.isfinite(returns).all() and (returns > 0).all()
    assert (returns <= 50).all()  # at most one reward per step of the shortened episode
    assert ns["epoch"] == 1  # both epochs ran (not "solved" at this size)
    _assert_weights_moved(ns["model"], ns["params"])


# ----------------------------------------------------------------------------- Recipe 2: MNIST MLP

@pytest.fixture
def mnist_data_dir(monkeypatch):
    if not (DATA_DIR / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found under {DATA_DIR}/MNIST/raw")
    monkeypatch.setenv("EGGROLL_DATA_DIR", str(DATA_DIR))
    return DATA_DIR


def test_recipe_mnist_mlp_block(mnist_data_dir, capsys):
    src = _adapt(
        _block("load_mnist_flat"),
        [
            (r"population_size=4096,", f"population_size={POP},"),
            (r"max_epochs=100,", "max_epochs=3,"),
            (r"batch_size=256,", "batch_size=32,"),
        ],
    )
    ns = _run(src, "mnist_mlp")

    accs = [float(a) for a in re.findall(r"test_acc=\s*([0-9.]+)%", capsys.readouterr().out)]
    assert len(accs) == 3, f"expected one test accuracy per epoch, got {accs}"
    assert all(0.0 <= a <= 100.0 for a in accs)
    assert ns["logits"].shape == (POP, 32, 10)
    assert ns["test_imgs"].shape == (10000, 784)
    _assert_weights_moved(ns["model"], ns["params"])


# ----------------------------------------------------------------------------- Recipe 3: CNN

def test_recipe_cnn_block(mnist_data_dir):
    src = _adapt(
        _block("load_mnist_2d"),
        [
            (r"population_size = 2048\b", f"population_size = {POP}"),
            (r"max_epochs = 100\b", "max_epochs = 2"),
            (r"batch_size = 64\b", "batch_size = 32"),
        ],
    )
    ns = _run(src, "mnist_cnn")
    assert ns["train_imgs"].shape == (60000, 1, 28, 28)

    # "Same pattern as Recipe 2": the training loop, written with the namespace's functions.
    params, shapes = ns["params"], ns["shapes"]
    assert set(shapes) == {"conv1.weight", "conv2.weight", "fc.weight"}
    initial = {k: v.clone() for k, v in params.items()}
    pop, batch, lr, sigma = ns["population_size"], ns["batch_size"], ns["lr"], ns["sigma"]
    gen_idx = torch.Generator().manual_seed(ns["seed"])
    for epoch in range(ns["max_epochs"]):
        idx = torch.randint(0, len(ns["train_imgs"]), (batch,), generator=gen_idx).to(DEVICE)
        imgs, labels = ns["train_imgs"][idx], ns["train_labels"][idx]
        gen = torch.Generator(device=DEVICE).manual_seed(ns["seed"] + epoch * 1000)
        perts = ns["generate_perturbations"](shapes, pop, ns["rank"], sigma, gen, torch.float32)
        logits = ns["forward"](imgs, params, perts)
        assert logits.shape == (pop, batch, 10)
        fitnesses = ns["compute_classification_fitness"](logits, labels)
        assert fitnesses.shape == (pop,) and torch.isfinite(fitnesses).all()
        grads = ns["compute_gradients"](ns["normalize_fitnesses"](fitnesses), perts, pop)
        ns["update_params"](params, grads, lr)
        lr, sigma = lr * ns["lr_decay"], sigma * ns["sigma_decay"]

    for name in shapes:
        assert torch.isfinite(params[name]).all(), f"{name} has non-finite values"
        assert not torch.equal(params[name], initial[name]), f"{name} did not change"
    assert torch.equal(params["fc.bias"], initial["fc.bias"])  # biases are not perturbed

    with torch.no_grad():
        eval_logits = ns["forward_eval"](ns["test_imgs"][:256], params)
    assert eval_logits.shape == (256, 10) and torch.isfinite(eval_logits).all()

"""Every experiment's ``--quick`` mode through ``main([...])``, on CPU: it learns, it writes
well-formed outputs, ``--resume`` continues exactly, and a failed save never corrupts a checkpoint."""
import json
import sys
from pathlib import Path

import pytest
import torch

from eggroll_optim.recipes.__main__ import main
from eggroll_optim.recipes.runner import CHECKPOINT

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (DATA / "MNIST").is_dir(), reason=f"MNIST not found under {DATA}")


def _run(out: Path, *flags: str) -> dict:
    assert main(["--quick", "--device", "cpu", "--no-progress", "--out", str(out), *flags]) == 0
    return json.loads((out / "summary.json").read_text())


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_outputs(out: Path, steps: int) -> list[dict]:
    records = _records(out)
    assert [r["step"] for r in records] == list(range(steps))
    for r in records:
        assert {"step", "time", "metric", "lr", "sigma"} <= set(r)
        assert all(isinstance(r[k], float) for k in ("time", "metric", "lr", "sigma"))
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == steps and ckpt["config"]["max_epochs"] >= steps
    assert {"model", "optimizer", "rng", "scheduler"} <= set(ckpt)
    assert ckpt["optimizer"]["eggroll"]["step"] == steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["final_metric"] == records[-1]["metric"]
    assert summary["environment"]["torch"] == torch.__version__
    assert (out / "learning_curve.png").is_file() or "matplotlib" in summary["plot"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    return records


def _same_trajectory(a: Path, b: Path) -> None:
    keys = ("step", "metric", "lr", "sigma")
    assert [[r[k] for k in keys] for r in _records(a)] == [[r[k] for k in keys] for r in _records(b)]
    ca, cb = (torch.load(p / CHECKPOINT, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"]
    for name, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][name]), name


@pytest.fixture(scope="module")
def cartpole_torch(tmp_path_factory):
    """The uninterrupted quick run (6 steps, torch env backend)."""
    out = tmp_path_factory.mktemp("cartpole_torch")
    return out, _run(out, "--experiment", "cartpole", "--env-backend", "torch")


# resuming is checked for exactness, not learning: 16 members (short episodes), 5 steps, a checkpoint every 2
SMALL = ("--experiment", "cartpole", "--env-backend", "torch", "--population-size", "16")


@pytest.fixture(scope="module")
def cartpole_small(tmp_path_factory):
    """The uninterrupted small run the resumed ones must equal."""
    out = tmp_path_factory.mktemp("cartpole_small")
    _run(out, *SMALL, "--max-epochs", "5")
    _check_outputs(out, 5)
    return out


def test_cartpole_gymnasium_learns_and_evaluates(tmp_path):
    pytest.importorskip("gymnasium")
    summary = _run(tmp_path, "--experiment", "cartpole")
    records = _check_outputs(tmp_path, summary["steps"])
    assert summary["status"] in ("completed", "solved") and summary["config"]["env_backend"] == "gymnasium"
    assert records[-1]["metric"] > 3 * records[0]["metric"] and records[-1]["metric"] > 60
    assert summary["eval_backend"] == "gymnasium" and len(summary["eval_returns"]) == 10
    assert summary["eval_mean_return"] == sum(summary["eval_returns"]) / 10


def test_cartpole_torch_backend_learns(cartpole_torch):
    out, summary = cartpole_torch
    records = _check_outputs(out, 6)
    assert records[-1]["metric"] > 3 * records[0]["metric"]
    assert all(r["env_steps"] == pytest.approx(128 * r["metric"], rel=1e-5) for r in records)
    assert len(summary["eval_returns"]) == 10


def test_resume_continues_to_the_uninterrupted_result(tmp_path, cartpole_small):
    first = _run(tmp_path, *SMALL, "--max-epochs", "3")
    assert first["steps"] == 3 and torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 3
    resumed = _run(tmp_path, *SMALL, "--max-epochs", "5", "--resume")
    assert resumed["steps"] == 5 and resumed["resumed_from_step"] == 3
    _check_outputs(tmp_path, 5)
    _same_trajectory(cartpole_small, tmp_path)


def test_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, cartpole_small):
    """The save at step 4 dies half-written; the step-2 checkpoint survives and resumes exactly."""
    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if obj["step"] == 4:
            f.write(b"PK\x03\x04 truncated")
            raise OSError("No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        _run(tmp_path, *SMALL, "--max-epochs", "5")
    monkeypatch.undo()
    assert calls == [2, 4]
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "metrics.jsonl"]
    resumed = _run(tmp_path, *SMALL, "--max-epochs", "5", "--resume")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 5
    _same_trajectory(cartpole_small, tmp_path)


@needs_mnist
def test_mnist_mlp_quick_reaches_80_percent(tmp_path):
    summary = _run(tmp_path, "--experiment", "mnist", "--data-dir", str(DATA))
    records = _check_outputs(tmp_path, 50)
    assert summary["test_acc"] > 80.0
    assert records[-1]["metric"] < 0.6 * records[0]["metric"]  # mean train cross-entropy
    assert [r["step"] for r in records if "test_acc" in r] == [24, 49]
    assert summary["config"]["train_subset"] == 10_000 and summary["config"]["model"] == "mlp"


@needs_mnist
def test_mnist_resume_restores_adam_state_and_batches(tmp_path):
    flags = ("--experiment", "mnist_mlp", "--data-dir", str(DATA), "--eval-every", "2", "--checkpoint-every", "2")
    _run(tmp_path / "full", *flags, "--max-epochs", "4")
    _run(tmp_path / "part", *flags, "--max-epochs", "2")
    assert _run(tmp_path / "part", *flags, "--max-epochs", "4", "--resume")["resumed_from_step"] == 2
    _same_trajectory(tmp_path / "full", tmp_path / "part")
    state = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)["optimizer"]["eggroll"]["inner"]["state"]
    assert state and all(int(s["step"]) == 4 for s in state.values())  # Adam's moments came along


@needs_mnist
def test_mnist_cnn_quick_beats_chance(tmp_path):
    summary = _run(tmp_path, "--experiment", "mnist_cnn", "--data-dir", str(DATA))
    records = _check_outputs(tmp_path, 20)
    assert summary["test_acc"] > 25.0  # chance is 10 %
    assert records[-1]["metric"] < records[0]["metric"]
    assert summary["config"]["model"] == "cnn" and summary["config"]["chunk_size"] == 32


def test_hyperscale_quick_writes_the_table(tmp_path):
    rows = _run(tmp_path, "--experiment", "hyperscale")["rows"]
    assert [(r["workload"], r["population"]) for r in rows] == [
        ("cartpole_policy", 16), ("cartpole_policy", 64), ("mnist_mlp", 16), ("mnist_mlp", 64)]
    for r in rows:
        assert r["step_s"] > 0 and r["member_evals_per_s"] == pytest.approx(r["population"] / r["step_s"])
    assert rows[0]["env_steps_per_s"] == pytest.approx(rows[0]["member_evals_per_s"] * 5)
    assert rows[2]["member_samples_per_s"] == pytest.approx(rows[2]["member_evals_per_s"] * 8)
    table = (tmp_path / "hyperscale.md").read_text()
    assert "member_evals_per_s" in table and "cartpole_policy" in table and torch.__version__ in table


def test_cartpole_without_gymnasium_falls_back_to_the_torch_env(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now raises ImportError
    with pytest.warns(UserWarning, match="gymnasium is not installed"):
        summary = _run(tmp_path, "--experiment", "cartpole", "--max-epochs", "2", "--population-size", "16")
    assert summary["config"]["env_backend"] == "torch"
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["config"]["env_backend"] == "torch"
    assert summary["eval_backend"] == "torch" and len(summary["eval_returns"]) == 10

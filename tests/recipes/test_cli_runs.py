"""Nothing lost: a finished run is never replaced, a signal saves and resumes exactly, a torn
metrics line is dropped, checkpoints also follow the clock, files get the umask, plots are labelled."""
import json
import os
import signal
import sys
import types
import warnings

import pytest
import torch
from cli_helpers import TINY, one_line_error, snapshot, start_cli, wait_for

from eggroll_optim.recipes import runner
from eggroll_optim.recipes.__main__ import main
from eggroll_optim.recipes.cartpole import CartPoleConfig
from eggroll_optim.recipes.checkpoint import FORMAT
from eggroll_optim.recipes.mnist import MnistTask
from eggroll_optim.recipes.outputs import plot_learning_curve
from eggroll_optim.recipes.runner import CHECKPOINT


def _tiny(out, mnist_root, *flags) -> list[str]:
    return [*TINY, "--data-dir", str(mnist_root), "--out", str(out), *flags]


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_run(a, b) -> None:
    """Same trajectory (a run's last step also evaluates: compared apart) and a bitwise-equal model."""
    keys = ("step", "metric", "lr", "sigma")
    assert [[r[k] for k in keys] for r in _records(a)] == [[r[k] for k in keys] for r in _records(b)]
    ca, cb = (torch.load(p / CHECKPOINT, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"] and ca["format"] == FORMAT and ca["experiment"] == "mnist_mlp"
    assert all(torch.equal(t, cb["model"][k]) for k, t in ca["model"].items())
    assert torch.equal(ca["rng"]["cpu"], cb["rng"]["cpu"])


def test_a_second_run_into_a_finished_folder_is_refused(tmp_path, mnist_root, capsys):
    out = tmp_path / "run"
    assert main(_tiny(out, mnist_root, "--max-epochs", "2")) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(_tiny(out, mnist_root, "--max-epochs", "2")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(out) in line and "mnist_mlp" in line and "--resume" in line and "--fresh" in line
    assert snapshot(out) == before
    assert main(_tiny(out, mnist_root, "--max-epochs", "2", "--fresh")) == 0  # beside it, in run-2
    assert snapshot(out) == before and json.loads((tmp_path / "run-2" / "summary.json").read_text())["steps"] == 2


def test_resume_into_another_experiments_folder_is_refused(tmp_path, mnist_root, capsys):
    assert main(_tiny(tmp_path, mnist_root, "--max-epochs", "1")) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    for experiment, expected in (("hyperscale", "holds a mnist_mlp run, not hyperscale"),
                                 ("mnist_cnn", "is a checkpoint of experiment 'mnist_mlp', not 'mnist_cnn'")):
        code = main(["--experiment", experiment, "--resume", "--device", "cpu", "--out", str(tmp_path),
                     "--data-dir", str(mnist_root)])
        assert code == 2 and expected in one_line_error(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_sigint_saves_and_resume_equals_the_uninterrupted_run(tmp_path, mnist_root):
    """Ctrl-C mid-run (a real SIGINT to the CLI): exit 130, status "interrupted", then --resume."""
    part, full = tmp_path / "part", tmp_path / "full"
    proc = start_cli(*_tiny(part, mnist_root, "--max-epochs", "100000", "--checkpoint-every", "100000"), cwd=tmp_path)
    metrics = part / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3 or proc.poll() is not None,
             what="three steps")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped by SIGINT" in err and "--resume" in err
    summary = json.loads((part / "summary.json").read_text())
    step = summary["steps"]
    assert summary["status"] == "interrupted" and step >= 3
    assert torch.load(part / CHECKPOINT, weights_only=True)["status"] == "interrupted"
    assert [r["step"] for r in _records(part)] == list(range(step))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI subprocess: CPU products round differently with other thread counts
    try:
        assert main(_tiny(part, mnist_root, "--max-epochs", str(step + 2), "--resume")) == 0
        assert main(_tiny(full, mnist_root, "--max-epochs", str(step + 2), "--checkpoint-every", "100000")) == 0
    finally:
        torch.set_num_threads(threads)
    _same_run(part, full)


def test_sigterm_mid_run_in_process(tmp_path, mnist_root, monkeypatch, capsys):
    """SIGTERM takes the same path: the step in progress ends, then save, summary, exit 130."""
    real_step = MnistTask.train_step

    def step_then_term(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, step)

    monkeypatch.setattr(MnistTask, "train_step", step_then_term)
    assert main(_tiny(tmp_path / "part", mnist_root, "--max-epochs", "6")) == 130
    assert "stopped by SIGTERM after step 3" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.undo()
    assert main(_tiny(tmp_path / "part", mnist_root, "--max-epochs", "6", "--resume")) == 0
    assert main(_tiny(tmp_path / "full", mnist_root, "--max-epochs", "6")) == 0
    _same_run(tmp_path / "part", tmp_path / "full")


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, mnist_root):
    out = tmp_path / "run"
    assert main(_tiny(out, mnist_root, "--max-epochs", "3", "--checkpoint-every", "2")) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "time": 0.1, "met')  # killed mid-append
    with pytest.warns(UserWarning, match="torn"):
        assert main(_tiny(out, mnist_root, "--max-epochs", "5", "--resume")) == 0
    assert [r["step"] for r in _records(out)] == [0, 1, 2, 3, 4]
    assert main(_tiny(tmp_path / "full", mnist_root, "--max-epochs", "5")) == 0
    _same_run(out, tmp_path / "full")


@pytest.mark.parametrize("seconds,saves", [("60", [4]), ("1e-9", [1, 2, 3, 4])])
def test_checkpoints_follow_the_clock_too(tmp_path, mnist_root, monkeypatch, seconds, saves):
    saved, real_save = [], runner.save_checkpoint
    monkeypatch.setattr(runner, "save_checkpoint", lambda state, path: (saved.append(state["step"]),
                                                                          real_save(state, path)))
    assert main(_tiny(tmp_path, mnist_root, "--max-epochs", "4", "--checkpoint-every", "1000",
                      "--checkpoint-seconds", seconds)) == 0
    assert saved == saves


def test_cartpole_checkpoints_before_it_solves():
    cfg = CartPoleConfig()
    assert cfg.checkpoint_every <= 5 < 15  # the default recipe solves in 15-21 steps
    assert cfg.checkpoint_seconds == 60


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_umask(tmp_path, mnist_root, umask):
    old = os.umask(umask)
    try:
        assert main(_tiny(tmp_path / "run", mnist_root, "--max-epochs", "1")) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl", "summary.json"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}


def test_the_learning_curve_has_a_title_and_units(tmp_path, monkeypatch):
    """With a stand-in matplotlib (the test extra has none): what the plot is told to show."""
    calls = []

    class Axes:
        def plot(self, *args, **kwargs): pass
        def legend(self): pass
        def set(self, **kwargs): calls.append(("axes", kwargs))

    class Figure:
        def __init__(self, figsize): calls.append(("size", figsize))
        def subplots(self, nrows, ncols, squeeze): return [[Axes(), Axes()]]
        def suptitle(self, text): calls.append(("title", text))
        def tight_layout(self): pass
        def savefig(self, path, dpi): calls.append(("saved", path))

    # the Agg canvas and a Figure, no pyplot (which would switch a notebook's backend)
    modules = {"matplotlib": types.SimpleNamespace(), "matplotlib.figure": types.SimpleNamespace(Figure=Figure),
               "matplotlib.backends": types.SimpleNamespace(),
               "matplotlib.backends.backend_agg": types.SimpleNamespace(FigureCanvasAgg=lambda fig: None),
               "matplotlib.pyplot": None}  # importing pyplot would fail
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    records = [{"step": 0, "metric": 2.3}, {"step": 1, "metric": 2.1, "test_acc": 30.0}]
    labels = {"metric": "train loss (cross-entropy, nats)", "test_acc": "test accuracy (%)"}
    assert plot_learning_curve(records, labels, tmp_path / "c.png", "mnist_mlp (completed)") == str(tmp_path / "c.png")
    assert ("title", "mnist_mlp (completed)") in calls and ("size", (11, 4)) in calls
    axes = [kwargs for kind, kwargs in calls if kind == "axes"]
    assert axes[0] == {"xlabel": "ES step (population updates)", "ylabel": "train loss (cross-entropy, nats)"}
    assert axes[1]["ylabel"] == "test accuracy (%)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MnistTask.labels["metric"].endswith("nats)")


def test_the_learning_curve_is_a_png_and_leaves_the_backend_alone(tmp_path):
    """With matplotlib installed: a PNG, drawn without pyplot or a switch of the process's backend."""
    matplotlib = pytest.importorskip("matplotlib")
    backend = matplotlib.get_backend()
    records = [{"step": 0, "metric": 2.3}, {"step": 1, "metric": 2.1, "test_acc": 30.0}]
    path = tmp_path / "c.png"
    assert plot_learning_curve(records, {"metric": "loss"}, path, "mnist_mlp (completed)") == str(path)
    assert path.read_bytes().startswith(b"\x89PNG") and matplotlib.get_backend() == backend

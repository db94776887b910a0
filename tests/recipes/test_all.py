"""``--experiment all``: every experiment runs whatever happens to the others; a table of their
statuses, ``<out>/summary.json``, and a non-zero exit when one failed."""
import json

from cli_helpers import one_line_error, snapshot

from eggroll_optim.recipes import __main__ as cli
from eggroll_optim.recipes.errors import InputError
from eggroll_optim.recipes.runner import Interrupted


def test_all_with_failing_experiments_runs_the_rest(tmp_path, capsys):
    """The real experiments; the MNIST ones fail on a data root without MNIST, the others run."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    code = cli.main(["--experiment", "all", "--quick", "--device", "cpu", "--no-progress", "--out", str(out),
                     "--data-dir", str(tmp_path / "empty"), "--population-size", "8", "--max-epochs", "2",
                     "--env-backend", "torch"])
    result = capsys.readouterr()
    assert code == 1, result.err
    assert "Traceback" not in result.err
    summary = json.loads((out / "summary.json").read_text())
    statuses = {row["experiment"]: row["status"] for row in summary["experiments"]}
    assert statuses == {"cartpole": "completed", "mnist_mlp": "failed", "mnist_cnn": "failed",
                        "hyperscale": "completed"}
    assert summary["status"] == "failed" and summary["failed"] == ["mnist_mlp", "mnist_cnn"]
    assert all("MNIST file(s) missing" in r["detail"] for r in summary["experiments"] if r["status"] == "failed")
    table = result.out[result.out.index("experiment  status"):].splitlines()
    assert [line.split()[:2] for line in table[1:]] == [[n, s] for n, s in statuses.items()]
    assert json.loads((out / "cartpole" / "summary.json").read_text())["steps"] == 2
    assert (out / "hyperscale" / "hyperscale.md").is_file()
    assert not (out / "mnist_mlp").exists() and not (out / "mnist_cnn").exists()


def _fake(outcome):
    def run(cfg, out, checkpoint, progress):
        if isinstance(outcome, BaseException):
            raise outcome
        return {"experiment": "x", "status": outcome, "steps": 1, "metric_name": "m", "final_metric": 0.5}
    return run


def _with_fakes(monkeypatch, outcomes: dict) -> None:
    for name, outcome in outcomes.items():
        cls, defaults, quick, _ = cli.EXPERIMENTS[name]
        monkeypatch.setitem(cli.EXPERIMENTS, name, (cls, defaults, quick, _fake(outcome)))


def test_a_bug_in_one_experiment_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    _with_fakes(monkeypatch, {"cartpole": RuntimeError("boom"), "mnist_mlp": InputError("bad file x"),
                              "mnist_cnn": "solved", "hyperscale": "completed"})
    assert cli.main(["--experiment", "all", "--device", "cpu", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "RuntimeError: boom" in captured.err  # a bug keeps its traceback
    rows = json.loads((tmp_path / "summary.json").read_text())["experiments"]
    assert [(r["status"], r["detail"][:18]) for r in rows] == [
        ("failed", "RuntimeError: boom"), ("failed", "bad file x"), ("solved", "1 steps, m 0.5"),
        ("completed", "1 steps, m 0.5")]


def test_an_interrupted_suite_stops_and_says_what_did_not_run(tmp_path, monkeypatch, capsys):
    stop = Interrupted("mnist_mlp", "SIGINT", 3, tmp_path / "mnist_mlp")
    _with_fakes(monkeypatch, {"cartpole": "completed", "mnist_mlp": stop, "mnist_cnn": "completed",
                              "hyperscale": "completed"})
    assert cli.main(["--experiment", "all", "--device", "cpu", "--out", str(tmp_path)]) == 130
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert [r["status"] for r in summary["experiments"]] == ["completed", "interrupted", "not run", "not run"]


def test_all_refuses_a_folder_holding_a_single_run(tmp_path, capsys):
    (tmp_path / "summary.json").write_text('{"experiment": "cartpole", "status": "completed"}')
    before = snapshot(tmp_path)
    assert cli.main(["--experiment", "all", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "holds a single run" in one_line_error(capsys.readouterr().err)
    assert snapshot(tmp_path) == before

"""The recipes' plumbing: atomic checkpoints, the metrics log, the CLI's config precedence."""
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eggroll_optim.recipes import checkpoint as ckpt_module
from eggroll_optim.recipes.__main__ import build_parser, make_config
from eggroll_optim.recipes.checkpoint import (
    atomic_write_text, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint)
from eggroll_optim.recipes.errors import InputError
from eggroll_optim.recipes.outputs import MetricsLog as _MetricsLog, flush as _flush


def test_checkpoint_roundtrip_loads_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "config": {"lr": 0.1, "chunk_size": None},
             "rng": capture_rng_state()}
    save_checkpoint(state, tmp_path / "ck.pt")
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["step"] == 7 and loaded["config"] == {"lr": 0.1, "chunk_size": None}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    def half_write(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", half_write)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_load_checkpoint_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match="checkpoint.pt"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_rng_state_restores_the_stream():
    state = capture_rng_state()
    first = torch.rand(4)
    restore_rng_state(state)
    assert torch.equal(torch.rand(4), first)


def test_rng_state_of_a_process_without_cuda_leaves_cuda_alone(monkeypatch):
    """A CPU run's checkpoint never starts the CUDA driver for generators it has not used."""
    if torch.cuda.is_initialized():
        pytest.skip("this process has initialized CUDA")

    def fail(*args, **kwargs):
        raise AssertionError("capture_rng_state touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", fail)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", fail)
    state = capture_rng_state()
    assert set(state) == {"cpu"} and not torch.cuda.is_initialized()
    restore_rng_state(state)


def test_metrics_log_truncates_at_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    atomic_write_text("".join(json.dumps({"step": s, "metric": s}) + "\n" for s in range(5)), path)
    log = _MetricsLog(path, resume_step=3)
    assert [r["step"] for r in log.read()] == [0, 1, 2]
    log.append([{"step": 3, "metric": 9.0}])
    assert [r["step"] for r in log.read()] == [0, 1, 2, 3]
    assert _MetricsLog(path, resume_step=None).read() == []  # a fresh run starts a fresh log


def test_flush_syncs_pending_tensors_into_records():
    pending = [(0, 0.5, 0.1, 0.2, {"metric": torch.tensor(1.5), "env_steps": 10.0}),
               (1, 1.0, 0.1, 0.2, {"metric": torch.tensor([2.5])})]
    records = _flush(pending)
    assert records == [{"step": 0, "time": 0.5, "env_steps": 10.0, "metric": 1.5, "lr": 0.1, "sigma": 0.2},
                       {"step": 1, "time": 1.0, "metric": 2.5, "lr": 0.1, "sigma": 0.2}]
    assert pending == []


def test_config_precedence_defaults_quick_then_flags():
    parse = build_parser().parse_args
    cfg = make_config("cartpole", parse(["--device", "cpu"]))
    assert (cfg.population_size, cfg.lr, cfg.env_backend, cfg.max_epochs) == (256, 0.3, "gymnasium", 300)
    cfg = make_config("cartpole", parse(["--quick", "--device", "cpu", "--lr", "0.5", "--env-backend", "torch"]))
    assert (cfg.population_size, cfg.lr, cfg.env_backend, cfg.max_epochs) == (128, 0.5, "torch", 6)
    cnn = make_config("mnist_cnn", parse(["--device", "cpu", "--data-dir", "/d"]))
    assert (cnn.model, cnn.population_size, cnn.batch_size, cnn.data_dir) == ("cnn", 4096, 64, "/d")
    assert make_config("hyperscale", parse(["--populations", "16,2^5", "--device", "cpu"])).populations == [16, 32]


def test_resume_keeps_the_saved_config_and_warns_about_ignored_flags():
    parse = build_parser().parse_args
    saved = vars(make_config("cartpole", parse(["--quick", "--device", "cpu"])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = make_config("cartpole", parse(["--max-epochs", "9", "--device", "cpu"]), saved)
    assert (cfg.max_epochs, cfg.population_size) == (9, 128)
    with pytest.warns(UserWarning, match="sigma"):
        cfg = make_config("cartpole", parse(["--sigma", "0.9"]), saved)
    assert cfg.sigma == saved["sigma"]


def test_unknown_experiment_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--experiment", "pong"])


def _record(calls, name):
    def run(cfg, out, checkpoint, progress):
        calls.append((name, out, cfg.max_epochs))
        return {"experiment": name, "status": "completed"}
    return run


def test_all_runs_every_experiment_into_its_own_folder(tmp_path, monkeypatch):
    from eggroll_optim.recipes import __main__ as cli

    monkeypatch.chdir(tmp_path)
    calls = []
    for name, (cls, defaults, quick, _) in list(cli.EXPERIMENTS.items()):
        fake = _record(calls, name)
        monkeypatch.setitem(cli.EXPERIMENTS, name, (cls, defaults, quick, fake))
    assert cli.main(["--experiment", "all", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    names = ["cartpole", "mnist_mlp", "mnist_cnn", "hyperscale"]
    assert [(n, out) for n, out, _ in calls] == [(n, tmp_path / n) for n in names]
    assert [steps for *_, steps in calls] == [6, 50, 20, 1]
    calls.clear()
    cli.main(["--experiment", "mnist", "--device", "cpu"])
    assert calls == [("mnist_mlp", Path("runs") / "mnist_mlp", 10000)]  # the tuned default (recipes.mnist.MLP)


def test_hidden_with_the_cnn_in_the_suite_fails_before_any_run(tmp_path, monkeypatch):
    """``--hidden`` is mnist_mlp's (and cartpole's) width: ``--experiment all`` with it stops before any run."""
    from eggroll_optim.recipes import __main__ as cli

    calls = []
    for name, (cls, defaults, quick, _) in list(cli.EXPERIMENTS.items()):
        monkeypatch.setitem(cli.EXPERIMENTS, name, (cls, defaults, quick, _record(calls, name)))
    assert cli.main(["--experiment", "all", "--quick", "--hidden", "64", "--device", "cpu",
                     "--out", str(tmp_path / "b")]) == 2
    assert calls == [] and not (tmp_path / "b").exists()


def test_flags_an_experiment_cannot_use_are_reported(tmp_path, monkeypatch):
    from eggroll_optim.recipes import __main__ as cli

    monkeypatch.chdir(tmp_path)
    cls, defaults, quick, _ = cli.EXPERIMENTS["mnist_mlp"]
    monkeypatch.setitem(cli.EXPERIMENTS, "mnist_mlp", (cls, defaults, quick, lambda *a, **k: None))
    with pytest.warns(UserWarning, match="--env-backend"):
        cli.main(["--experiment", "mnist_mlp", "--env-backend", "torch", "--device", "cpu"])


def test_cli_returns_the_status_of_main_and_freezes_the_heap_for_the_exit(monkeypatch):
    from eggroll_optim.recipes import __main__ as cli_module

    frozen = []
    monkeypatch.setattr(cli_module, "main", lambda: 3)
    monkeypatch.setattr(cli_module.gc, "freeze", lambda: frozen.append(True))
    assert cli_module.cli() == 3 and frozen == [True]


def test_tf32_flag_reaches_the_config_and_is_scoped_to_a_cuda_run(tmp_path, monkeypatch):
    """``--tf32``: a config field (saved with the run). ``tf32_scope`` turns torch's process-wide flag on for a
    CUDA config only, and puts it back afterwards, also when the run raises; ``train`` runs inside it."""
    from eggroll_optim.recipes import __main__ as cli
    from eggroll_optim.recipes import runner

    cfg = cli.make_config("cartpole", cli.build_parser().parse_args(["--tf32", "--device", "cpu"]))
    assert cfg.tf32 is True
    assert cli.make_config("cartpole", cli.build_parser().parse_args(["--device", "cpu"])).tf32 is False
    previous = torch.backends.cuda.matmul.allow_tf32  # torch's flag is a property, not an attribute
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with runner.tf32_scope(cfg):
            assert torch.backends.cuda.matmul.allow_tf32 is False  # a CPU run leaves it
        with runner.tf32_scope(replace(cfg, device="cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cuda.matmul.allow_tf32 is False  # as the user left it
        with pytest.raises(RuntimeError), runner.tf32_scope(replace(cfg, device="cuda")):
            raise RuntimeError("a failed run")
        assert torch.backends.cuda.matmul.allow_tf32 is False
        torch.backends.cuda.matmul.allow_tf32 = True
        with runner.tf32_scope(replace(cfg, device="cuda", tf32=False)):
            assert torch.backends.cuda.matmul.allow_tf32 is True  # off by default: torch's flag as the user set it
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

    scoped = []
    real = runner.tf32_scope
    monkeypatch.setattr(runner, "tf32_scope", lambda c: scoped.append(c) or real(c))
    assert cli.main(["--experiment", "cartpole", "--quick", "--max-epochs", "1", "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert [c.max_epochs for c in scoped] == [1]  # the run's config


def _mnist_config(name: str, *flags: str):
    from eggroll_optim.recipes import __main__ as cli

    return cli.make_config(name, cli.build_parser().parse_args(["--device", "cpu", *flags]))


@pytest.mark.parametrize("flags, inner_type, decay", [
    (["--optimizer", "sgd"], torch.optim.SGD, 0.0),  # the seed's update: torch's SGD, no decay
    (["--optimizer", "adamw"], torch.optim.AdamW, 0.05),  # ADAMW_DECAY, not AdamW's own default 0.01
    (["--optimizer", "adamw", "--weight-decay", "0.01"], torch.optim.AdamW, 0.01),
    (["--optimizer", "adam", "--weight-decay", "0.1"], torch.optim.Adam, 0.1),
    (["--optimizer", "sgd", "--weight-decay", "0.2"], torch.optim.SGD, 0.2),
])
def test_make_optimizer_builds_the_inner_optimizer_with_its_weight_decay(flags, inner_type, decay):
    """``--optimizer`` picks the inner ``torch.optim`` class; ``--weight-decay`` reaches every one of its param
    groups (default 0, with adamw ``ADAMW_DECAY``); the inner optimizer steps the model's parameters at ``--lr``."""
    from eggroll_optim.recipes.runner import ADAMW_DECAY, make_optimizer

    assert ADAMW_DECAY == 0.05
    cfg = _mnist_config("mnist_mlp", *flags, "--lr", "0.03")
    model = torch.nn.Linear(3, 2)
    opt, _ = make_optimizer(model, cfg)
    inner = opt.inner
    assert type(inner) is inner_type
    assert inner.param_groups and all(g["weight_decay"] == decay for g in inner.param_groups)
    assert all(g["lr"] == 0.03 for g in inner.param_groups)
    held = [p for g in inner.param_groups for p in g["params"]]
    assert len(held) == 2 and {id(p) for p in held} == {id(p) for p in model.parameters()}


def test_the_seeds_sgd_flags_give_plain_sgd_although_the_mnist_default_is_adamw():
    """The MNIST MLP's default is AdamW with decay; the seed's flag set (README) is plain SGD: no decay, no
    momentum, whatever the default optimizer's decay."""
    from eggroll_optim.recipes import mnist
    from eggroll_optim.recipes.runner import make_optimizer

    default = _mnist_config("mnist_mlp")
    assert (default.optimizer, default.max_epochs, mnist.MLP["optimizer"]) == ("adamw", 10000, "adamw")
    assert type(make_optimizer(torch.nn.Linear(3, 2), default)[0].inner) is torch.optim.AdamW
    cfg = _mnist_config("mnist_mlp", "--optimizer", "sgd", "--lr", "0.1", "--sigma", "0.15", "--sigma-decay", "0.999",
                        "--lr-decay", "1", "--population-size", "4096", "--batch-size", "256", "--max-epochs", "100")
    assert (cfg.optimizer, cfg.lr, cfg.sigma, cfg.sigma_decay, cfg.lr_decay) == ("sgd", 0.1, 0.15, 0.999, 1.0)
    assert (cfg.population_size, cfg.batch_size, cfg.max_epochs) == (4096, 256, 100)
    opt, scheduler = make_optimizer(torch.nn.Linear(3, 2), cfg)
    assert scheduler is None  # --lr-decay 1: a constant lr
    assert type(opt.inner) is torch.optim.SGD
    (group,) = opt.inner.param_groups
    assert (group["weight_decay"], group["momentum"], group["lr"]) == (0.0, 0, 0.1)


def _tiny_mnist(mnist_root, name: str, *flags: str):
    return _mnist_config(name, "--quick", "--data-dir", str(mnist_root), "--population-size", "8",
                         "--batch-size", "4", "--train-subset", "64", *flags)


def test_hidden_sets_the_mnist_mlps_width(mnist_root):
    """``--hidden 64``: a 784-64-10 MLP, evolved whole; without it 784-256-10."""
    from eggroll_optim.recipes.mnist import MnistTask

    def shapes(task):
        return [tuple(p.shape) for p in task.model.parameters()]

    task = MnistTask(_tiny_mnist(mnist_root, "mnist_mlp", "--hidden", "64"))
    assert task.cfg.hidden == 64
    assert shapes(task) == [(64, 784), (64,), (10, 64), (10,)]
    held = [tuple(p.shape) for g in task.optimizer.inner.param_groups for p in g["params"]]
    assert sorted(held) == sorted(shapes(task))
    with torch.no_grad():
        assert task.model(task.train_x[:2]).shape == (2, 10)
    default = MnistTask(_tiny_mnist(mnist_root, "mnist_mlp"))
    assert default.cfg.hidden is None
    assert shapes(default) == [(256, 784), (256,), (10, 256), (10,)]


def test_hidden_with_the_cnn_is_an_input_error(mnist_root):
    from eggroll_optim.recipes.mnist import MnistTask

    with pytest.raises(InputError, match="--hidden"):
        MnistTask(_tiny_mnist(mnist_root, "mnist_cnn", "--hidden", "64"))
    MnistTask(_tiny_mnist(mnist_root, "mnist_cnn"))  # the CNN itself builds


@pytest.mark.parametrize("flags, expected", [
    (["--hidden", "0"], "--hidden 0: expected an integer >= 1"),
    (["--hidden", "-3"], "--hidden -3: expected an integer >= 1"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: expected a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay nan: expected a finite number >= 0"),
    (["--weight-decay", "inf"], "--weight-decay inf: expected a finite number >= 0"),
])
def test_hidden_and_weight_decay_out_of_range_are_input_errors(flags, expected):
    with pytest.raises(InputError) as info:
        _mnist_config("mnist_mlp", *flags)
    assert str(info.value) == expected
    assert _mnist_config("mnist_mlp", "--hidden", "1", "--weight-decay", "0").weight_decay == 0.0  # the edges pass


def test_tf32_is_on_by_default_for_mnist_only():
    """The MNIST recipes default to TF32 (``--no-tf32``: off); the other recipes keep torch's default."""
    for name in ("mnist_mlp", "mnist_cnn"):
        assert _mnist_config(name).tf32 is True
        assert _mnist_config(name, "--quick").tf32 is True
        assert _mnist_config(name, "--no-tf32").tf32 is False
        assert _mnist_config(name, "--tf32").tf32 is True
    assert _mnist_config("cartpole").tf32 is False
    assert _mnist_config("cartpole", "--no-tf32").tf32 is False
    assert _mnist_config("cartpole", "--tf32").tf32 is True

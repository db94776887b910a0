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
    assert (cnn.model, cnn.population_size, cnn.batch_size, cnn.data_dir) == ("cnn", 2048, 64, "/d")
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
    assert calls == [("mnist_mlp", Path("runs") / "mnist_mlp", 3600)]  # the tuned default (recipes.mnist.MLP)


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


def test_tf32_flag_reaches_the_config_and_sets_torch_only_on_cuda():
    """``--tf32``: a config field (saved with the run); ``make_optimizer`` turns torch's TF32 flag on for a CUDA
    device only (a CPU run leaves it as it was)."""
    from eggroll_optim.recipes import __main__ as cli
    from eggroll_optim.recipes.runner import make_optimizer

    cfg = cli.make_config("cartpole", cli.build_parser().parse_args(["--tf32", "--device", "cpu"]))
    assert cfg.tf32 is True
    assert cli.make_config("cartpole", cli.build_parser().parse_args(["--device", "cpu"])).tf32 is False
    previous = torch.backends.cuda.matmul.allow_tf32  # torch's flag is a property, not an attribute
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        make_optimizer(torch.nn.Linear(3, 2), cfg)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        make_optimizer(torch.nn.Linear(3, 2), replace(cfg, device="cuda"))  # (the module itself may stay put)
        assert torch.backends.cuda.matmul.allow_tf32 is True
        make_optimizer(torch.nn.Linear(3, 2), replace(cfg, device="cuda", tf32=False))
        assert torch.backends.cuda.matmul.allow_tf32 is True  # off by default: torch's flag as the user left it
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

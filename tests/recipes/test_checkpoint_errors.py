"""A damaged or foreign checkpoint is named in one line, exit 2, and left exactly as it was."""
import shutil

import pytest
import torch
from cli_helpers import TINY, one_line_error, run_cli

from eggroll_optim.recipes.__main__ import main
from eggroll_optim.recipes.runner import CHECKPOINT


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_root):
    """A finished two-step run of the tiny MNIST MLP."""
    out = tmp_path_factory.mktemp("finished")
    assert main([*TINY, "--data-dir", str(mnist_root), "--out", str(out), "--max-epochs", "2"]) == 0
    return out


def _checkpoint(kind: str, good: bytes, path) -> str:
    """Write a bad checkpoint of ``kind`` at ``path``; returns the text the error must contain."""
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return "is damaged or not a checkpoint"
    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 8)
        return "is damaged or not a checkpoint"
    if kind == "empty":
        path.write_bytes(b"")
        return "is damaged or not a checkpoint"
    if kind == "a tensor":
        torch.save(torch.ones(3), path)
        return "is not an eggroll recipes checkpoint"
    if kind == "no format":
        torch.save({"model": {}, "step": 3}, path)
        return "is not an eggroll recipes checkpoint (no format, experiment"
    state = torch.load(path, weights_only=True)
    if kind == "newer format":
        torch.save({**state, "format": 99}, path)
        return "has checkpoint format 99, newer than this version reads"
    if kind == "other experiment":
        torch.save({**state, "experiment": "mnist_cnn"}, path)
        return "is a checkpoint of experiment 'mnist_cnn', not 'mnist_mlp'"
    if kind == "unknown config field":
        torch.save({**state, "config": {**state["config"], "width_multiplier": 2}}, path)
        return "has fields ['width_multiplier'] that mnist_mlp does not know"
    raise ValueError(kind)


KINDS = ["truncated", "random bytes", "empty", "a tensor", "no format", "newer format", "other experiment",
         "unknown config field"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_checkpoint_is_named_and_kept(kind, finished, mnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    expected = _checkpoint(kind, (out / CHECKPOINT).read_bytes(), out / CHECKPOINT)
    bad = (out / CHECKPOINT).read_bytes()
    argv = [*TINY, "--data-dir", str(mnist_root), "--out", str(out), "--max-epochs", "4"]
    assert main([*argv, "--resume"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert expected in line and (kind == "unknown config field" or str(out / CHECKPOINT) in line)
    assert main(argv) == 2  # nor does a fresh run replace it
    assert "already holds" in one_line_error(capsys.readouterr().err)
    assert (out / CHECKPOINT).read_bytes() == bad


def test_truncated_checkpoint_through_the_console_script(finished, mnist_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    good = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(good[:1000])
    result = run_cli(*TINY, "--data-dir", str(mnist_root), "--out", str(out), "--resume", cwd=tmp_path)
    assert result.returncode == 2
    assert f"{out / CHECKPOINT} is damaged or not a checkpoint" in one_line_error(result.stderr)
    assert (out / CHECKPOINT).read_bytes() == good[:1000]


def test_resume_without_a_checkpoint(mnist_root, tmp_path, capsys):
    assert main([*TINY, "--data-dir", str(mnist_root), "--out", str(tmp_path), "--resume"]) == 2
    assert f"no checkpoint at {tmp_path / CHECKPOINT} to resume" in one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []

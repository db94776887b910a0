"""Every bad input is one line, ``eggroll: error: ...``, exit 2, no traceback, and nothing written.

Most cases call ``main([...])`` in this process (the same code the console script runs, without
a second torch import); one runs the real ``python -m eggroll_optim.recipes`` with ``--debug``.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, one_line_error, run_cli

from eggroll_optim.recipes.__main__ import build_parser, main

BAD_FLAGS = [  # (flags, text the error line must contain)
    (["--lr", "inf"], "--lr inf: expected a finite number >= 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--lr", "abc"], "--lr: invalid float value: 'abc'"),
    (["--lr-decay", "0"], "--lr-decay 0.0: expected a number in (0, 1]"),
    (["--lr-decay", "1.5"], "--lr-decay 1.5"),
    (["--sigma-decay", "0"], "--sigma-decay 0.0"),
    (["--sigma", "-1"], "--sigma -1.0: expected a finite number > 0"),
    (["--sigma", "inf"], "--sigma inf"),
    (["--population-size", "7"], "--population-size 7: expected an even integer >= 2"),
    (["--population-size", "0"], "--population-size 0"),
    (["--rank", "0"], "--rank 0: expected an integer >= 1"),
    (["--max-epochs", "0"], "--max-epochs 0: expected an integer >= 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--checkpoint-seconds", "0"], "--checkpoint-seconds 0.0: expected a finite number > 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--train-subset", "-5"], "--train-subset -5"),
    (["--chunk-size", "3"], "--chunk-size 3: expected an even integer >= 2"),
    (["--seed", "-1"], "--seed -1"),
    (["--device", "tpu"], "--device tpu: unknown device"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--experiment", "pong"], "argument --experiment: invalid choice: 'pong'"),
    (["--experiment", "hyperscale", "--populations", ","], "--populations: ',': expected comma-separated even sizes"),
    (["--experiment", "hyperscale", "--populations", "16,7"], "population size 7 is not an even integer >= 2"),
    (["--experiment", "hyperscale", "--populations", "2^-1"], "--populations"),
    (["--experiment", "hyperscale", "--max-epochs", "0"], "--max-epochs 0"),
    (["--fresh", "--resume"], "--fresh starts a new run and --resume continues one"),
]


def _main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags,expected", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_and_writes_nothing(flags, expected, tmp_path, mnist_root, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, err = _main([*TINY, "--data-dir", str(mnist_root), "--out", str(out), *flags], capsys)
    assert code == 2
    assert expected in one_line_error(err)
    assert list(tmp_path.iterdir()) == []  # no --out folder, no runs/, nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_how_to_run_on_cpu(tmp_path, capsys):
    code, err = _main(["--device", "cuda", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "no CUDA GPU is available" in (line := one_line_error(err)) and "--device cpu" in line
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file(tmp_path, mnist_root, capsys):
    (tmp_path / "results").write_text("mine")
    for out, expected in ((tmp_path / "results", "is a file"), (tmp_path / "results" / "run", "is a file")):
        code, err = _main([*TINY, "--data-dir", str(mnist_root), "--out", str(out)], capsys)
        assert code == 2 and expected in one_line_error(err) and str(tmp_path / "results") in err
    assert [p.name for p in tmp_path.iterdir()] == ["results"] and (tmp_path / "results").read_text() == "mine"


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere but on a read-only file system such as sysfs
        folder.chmod(0o755)
        if sys.platform != "linux" or not Path("/sys").is_dir():
            pytest.skip("running as root without a read-only folder to try")
        return Path("/sys")
    return folder


def test_read_only_out(tmp_path, mnist_root, capsys):
    folder = _read_only_folder(tmp_path)
    before = sorted(folder.iterdir())
    code, err = _main([*TINY, "--data-dir", str(mnist_root), "--out", str(folder / "run")], capsys)
    assert code == 2
    assert f"cannot write in {folder}" in one_line_error(err)
    assert sorted(folder.iterdir()) == before


def test_help_shows_no_internal_names():
    text = build_parser().format_help()
    assert "--populations SIZES" in text and "_populations" not in text and "--out DIR" in text


def test_resume_below_the_checkpoint_step(tmp_path, mnist_root, capsys):
    flags = [*TINY, "--data-dir", str(mnist_root), "--out", str(tmp_path)]
    assert main([*flags, "--max-epochs", "3"]) == 0
    capsys.readouterr()
    code, err = _main([*flags, "--max-epochs", "2", "--resume"], capsys)
    assert code == 2 and "--max-epochs 2: the checkpoint" in one_line_error(err) and "step 3" in err


def test_the_console_script_with_debug_adds_the_traceback(tmp_path):
    """The real CLI (the other subprocess tests check its one-line errors): ``--debug`` adds the traceback."""
    result = run_cli(*TINY, "--lr", "inf", "--debug", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and "InputError" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == "eggroll: error: --lr inf: expected a finite number >= 0"
    assert list(tmp_path.iterdir()) == []

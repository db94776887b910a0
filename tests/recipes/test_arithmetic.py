"""The arithmetic recipe (a transformer fine-tuned by ES on greedy-decoded exact match) and its example.

The problems are checked by hand (sums, reversed digits, the held-out share kept out of training),
the population's greedy decoding against each member's dense weights, the reward against
hand-computed values; the ``--quick`` run and the example's ``--quick`` run must raise the reward,
and a resumed run must end where an uninterrupted one does.
"""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from eggroll_optim import EggrollOptimizer
from eggroll_optim.recipes import arithmetic
from eggroll_optim.recipes.__main__ import main
from eggroll_optim.recipes.arithmetic import (PLUS, EQUALS, QUICK, AdditionTransformer, ArithmeticConfig,
                                              answer_reward, greedy_decode, make_problems)
from eggroll_optim.recipes.runner import CHECKPOINT

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_transformer_reward.py"
TINY = dict(digits=2, d_model=16, heads=2, layers=1, batch_size=4, heldout_size=32, pretrain_steps=5,
            population_size=8, rank=2, max_epochs=6, log_every=1, eval_every=2, checkpoint_every=2, device="cpu")


@pytest.fixture
def one_thread():
    """Tiny models on a small shared CPU run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _number(digits: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` digits, most significant first -> ``(n,)``."""
    return (digits * 10 ** torch.arange(digits.shape[1] - 1, -1, -1)).sum(1)


def test_problems_are_sums_with_reversed_answers():
    prompts, answers = make_problems(500, 3, torch.Generator().manual_seed(0))
    assert prompts.shape == (500, 8) and answers.shape == (500, 4)
    assert (prompts[:, 3] == PLUS).all() and (prompts[:, 7] == EQUALS).all()
    a, b = _number(prompts[:, :3]), _number(prompts[:, 4:7])
    assert torch.equal(_number(answers.flip(1)), a + b)  # least significant digit first
    assert a.unique().numel() > 300  # drawn over the whole range


def test_heldout_share_is_kept_out_of_training():
    train = make_problems(4000, 2, torch.Generator().manual_seed(1))[0]
    held = make_problems(10_000, 2, torch.Generator().manual_seed(2), heldout=True)[0]
    key = lambda p: _number(p[:, :2]) * 100 + _number(p[:, 3:5])  # noqa: E731
    train_keys, held_keys = set(key(train).tolist()), key(held).tolist()
    assert len(held_keys) == len(set(held_keys)) and 200 < len(held_keys) < 420  # all of 1/32 of 10^4, distinct
    assert not train_keys & set(held_keys)
    again = make_problems(10_000, 2, torch.Generator().manual_seed(2), heldout=True)[0]
    assert torch.equal(held, again)  # a fixed set for a fixed seed


def test_answer_reward_by_hand():
    answers = torch.tensor([[1, 2, 3], [4, 5, 6]])
    decoded = torch.tensor([[[1, 2, 3], [4, 5, 0]],   # member 0: one exact, 5 of 6 digits
                            [[0, 0, 0], [4, 5, 6]]])  # member 1: one exact, 3 of 6 digits
    reward, exact = answer_reward(decoded, answers, format_reward=0.5)
    assert torch.allclose(exact, torch.tensor([0.5, 0.5]))
    assert torch.allclose(reward, torch.tensor([0.5 + 0.5 * 5 / 6, 0.5 + 0.5 * 3 / 6]))


@torch.no_grad()
def test_population_decodes_as_each_member_alone():
    """Member i's greedy answers == plain greedy decoding with member i's dense weights."""
    torch.manual_seed(0)
    model = AdditionTransformer(9, d_model=16, heads=2, layers=1)
    opt = EggrollOptimizer(model, sigma=0.5, rank=2, population_size=6, seed=3)
    prompts, _ = make_problems(5, 2, torch.Generator().manual_seed(4))
    with opt.ask() as population:
        decoded = greedy_decode(model, prompts, 3, population)  # (6, 5, 3)
        weights = [population.member_state_dict(i) for i in range(6)]
    opt.discard()
    assert decoded.shape == (6, 5, 3)
    for i, w in enumerate(weights):
        seq = prompts
        for _ in range(3):
            token = torch.func.functional_call(model, w, (seq,))[:, -1].argmax(-1)
            seq = torch.cat((seq, token[:, None]), dim=1)
        assert torch.equal(decoded[i], seq[:, 6:]), i
    assert not all(torch.equal(decoded[0], d) for d in decoded[1:])  # the members differ


@pytest.mark.slow
def test_quick_run_raises_the_reward(tmp_path, one_thread):
    flags = ["--experiment", "arithmetic", "--quick", "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    assert main(flags) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    pretrain = json.loads((tmp_path / "pretrain.json").read_text())
    assert [r["step"] for r in records] == list(range(QUICK["max_epochs"]))
    assert summary["status"] == "completed" and summary["pretrain"] == pretrain
    # the held-out set is fixed, so its reward is the clean signal (a step's 8 problems are noisy)
    assert summary["heldout_reward"] > pretrain["heldout_reward"] + 0.03, (pretrain, summary["heldout_reward"])
    assert summary["heldout_acc"] > pretrain["heldout_acc"], (pretrain, summary["heldout_acc"])
    assert [r["step"] for r in records if "heldout_acc" in r] == [9, 19, 29]
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == QUICK["max_epochs"]
    assert (tmp_path / "learning_curve.png").is_file() or "matplotlib" in summary["plot"]


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    cases = (("--pretrain-steps", "-1", "an integer >= 0"), ("--format-reward", "nan", "a finite number"))
    for flag, value, expected in cases:
        out = tmp_path / flag
        assert main(["--experiment", "arithmetic", "--quick", "--device", "cpu", "--out", str(out), flag, value]) == 2
        assert f"eggroll: error: {flag} {value}: expected {expected}" in capsys.readouterr().err
        assert not out.exists()


def test_resume_ends_where_an_uninterrupted_run_does(tmp_path, one_thread):
    full, part = tmp_path / "full", tmp_path / "part"
    arithmetic.run(ArithmeticConfig(**TINY), full, progress=False)
    arithmetic.run(ArithmeticConfig(**{**TINY, "max_epochs": 4}), part, progress=False)
    pretrain = (part / "pretrain.json").read_text()
    ckpt = torch.load(part / CHECKPOINT, weights_only=True)
    summary = arithmetic.run(ArithmeticConfig(**TINY), part, checkpoint=ckpt, progress=False)
    assert (part / "pretrain.json").read_text() == pretrain  # no second pretraining
    assert summary["resumed_from_step"] == 4 and summary["pretrain"] == json.loads(pretrain)
    a, b = (torch.load(p / CHECKPOINT, weights_only=True)["model"] for p in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [[json.loads(line)["metric"] for line in (p / "metrics.jsonl").read_text().splitlines()]
               for p in (full, part)]
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_example_quick_raises_the_reward(monkeypatch, capsys, one_thread):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--quick", "--check", "--device", "cpu"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")  # --check: SystemExit unless the reward rose
    out = capsys.readouterr().out
    result = next(line for line in out.splitlines() if line.startswith("RESULT"))
    initial, final = (float(part.split("=")[1]) for part in result.split()[1:])
    assert final > initial + 0.1, out


@pytest.mark.slow
def test_bench_transformer_quick(tmp_path, monkeypatch, one_thread):
    """``benchmarks/bench_transformer.py --quick``: both decoders timed, members checked, JSON written."""
    bench = EXAMPLE.parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_transformer.py", "--quick", "--device", "cpu", "--out", str(out)])
    runpy.run_path(str(bench / "bench_transformer.py"), run_name="__main__")
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["plain", "population", "es_step"]
    assert data["rows"][0]["vs_plain"] == 1.0 and all(r["tokens_per_s"] > 0 for r in data["rows"])
    assert data["failures"] == {} and data["checks"] == {"member0.disagreement": 0.0, "member1.disagreement": 0.0}

"""A causal transformer fine-tuned by ``EggrollOptimizer`` on the exact match of its decoded answers.

The task: fixed-width addition, ``"123+456="`` followed by the sum's ``digits + 1`` digits written
**least significant first** (``579`` is answered ``"9750"``). Reversed, each answer digit depends
only on the digits already written and one carry, as in long addition; written the usual way the
first digit needs every carry at once, which a small model learns far more slowly. Problems are
generated on the fly: step ``t``'s batch is a pure function of ``(seed, t)``. A fixed share
(1/32, by a hash of the pair) of all problems is held out: the training batches never contain
one, and the held-out set is ``heldout_size`` distinct ones drawn with ``heldout_seed``.

Two phases, as ES fine-tuning of a language model starts from a pretrained one:

1. ``pretrain_steps`` of backprop (AdamW, next-token cross-entropy on the answer tokens, teacher
   forcing) give a weak model. They run before ES, on a fresh run only (a resumed run loads the
   checkpoint); their result is written to ``pretrain.json``.
2. ES: every member greedy-decodes the answers of the step's batch (argmax, token by token, no
   teacher forcing) and its fitness is the fraction answered exactly, plus ``format_reward`` times
   the fraction of answer digits right. Neither is differentiable; ES needs only their values.

The model, :class:`AdditionTransformer`, is written for ordinary ``(B, T)`` batches; inside a
population the optimizer runs it for every member (``torch.func.vmap``). The first decoding step
reads the prompts, shared by every member; from the second on, each member's sequence holds its
own tokens and is passed as ``population.per_member(seq)`` with ``seq (n, B, t)``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import launch
from .checkpoint import atomic_write_text
from .errors import InputError
from .runner import RunConfig, Task, make_optimizer, step_function, train

__all__ = ["AdditionTransformer", "ArithmeticConfig", "ArithmeticTask", "QUICK", "answer_reward", "greedy_decode",
           "make_problems", "run"]

PLUS, EQUALS, VOCAB = 10, 11, 12  # tokens 0-9 are the digits
HELDOUT_SHARE = 32  # one problem in 32 is held out
PRETRAIN = "pretrain.json"


@dataclass
class ArithmeticConfig(RunConfig):
    """3-digit sums; defaults sized for one GPU (an H200 runs ~2.2 ES steps/s with the held-out evaluations:
    1000 steps in ~7.5 min; +30 points of held-out exact match came at ~2.5 min, run AQ).

    250 pretraining steps stop just after the model starts to get sums right (20-45% held-out exact
    match on an H200; 200 steps give ~5%, 300 ~70%), the weak start ES fine-tuning is meant for.
    """

    digits: int = 3
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    batch_size: int = 128  # problems per ES step, shared by every member
    heldout_size: int = 1000
    heldout_seed: int = 2024
    pretrain_steps: int = 250
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 128
    format_reward: float = 0.5  # weight of the fraction of answer digits right
    population_size: int = 1024
    rank: int = 8
    sigma: float = 0.01
    lr: float = 2e-3
    optimizer: str = "adam"
    sigma_decay: float = 1.0
    max_epochs: int = 1000
    log_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 200


# CPU smoke test (~30 s on two cores): 2-digit sums, pretrained to ~15% held-out exact match, then
# 30 ES steps of 64 members on 8 problems each (the per-step reward is noisy; the held-out set is not)
QUICK = dict(digits=2, d_model=64, batch_size=8, heldout_size=256, pretrain_steps=150, pretrain_lr=3e-3,
             population_size=64, rank=4, sigma=0.01, lr=2e-3, max_epochs=30, log_every=1, eval_every=10,
             checkpoint_every=10)


class AdditionTransformer(nn.Module):
    """Token and position embeddings, a causal pre-norm ``nn.TransformerEncoder``, a linear head."""

    def __init__(self, max_len: int, d_model: int = 128, heads: int = 4, layers: int = 2, vocab: int = VOCAB):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        T = tokens.shape[1]
        h = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))  # (B, T, d)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=h.dtype)
        return self.head(self.encoder(h, mask=mask, is_causal=True))


def _digits(x: torch.Tensor, width: int) -> torch.Tensor:
    """``(n,)`` integers -> ``(n, width)`` decimal digits, least significant first."""
    return x[:, None] // 10 ** torch.arange(width, device=x.device) % 10


def _heldout(pairs: torch.Tensor) -> torch.Tensor:
    """Whether the problems ``pairs = a · 10^digits + b`` are held out (a multiplicative hash)."""
    return pairs * 2654435761 % 2**32 < 2**32 // HELDOUT_SHARE


def _encode(a: torch.Tensor, b: torch.Tensor, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts ``(n, 2·digits + 2)`` ("a+b=", most significant digit first), answers ``(n, digits + 1)``
    (the sum, least significant digit first)."""
    plus = torch.full((a.shape[0], 1), PLUS, dtype=torch.long, device=a.device)
    equals = torch.full_like(plus, EQUALS)
    prompts = torch.cat((_digits(a, digits).flip(1), plus, _digits(b, digits).flip(1), equals), dim=1)
    return prompts, _digits(a + b, digits + 1)


def make_problems(n: int, digits: int, generator: torch.Generator, heldout: bool = False):
    """``n`` problems drawn uniformly from the training share, or (``heldout=True``) ``n`` distinct
    ones from the held-out share (all of it when it has fewer): ``(prompts, answers)`` on the CPU."""
    high, pairs = 10**digits, torch.empty(0, dtype=torch.long)  # a problem is the pair a · high + b
    for _ in range(64):  # rejection sampling: a round keeps 31/32 (held out: 1/32) of its draws
        size = min(HELDOUT_SHARE * n, 4 * high**2) if heldout else 2 * n
        draw = torch.randint(high**2, (size,), generator=generator)
        pairs = torch.cat((pairs, draw[_heldout(draw) == heldout]))
        pairs = torch.unique(pairs) if heldout else pairs
        if len(pairs) >= n:
            break
    if heldout:  # unique() sorted them: shuffle before taking n
        pairs = pairs[torch.randperm(len(pairs), generator=generator)]
    return _encode(pairs[:n] // high, pairs[:n] % high, digits)


def greedy_decode(model: nn.Module, prompts: torch.Tensor, length: int, population=None) -> torch.Tensor:
    """Argmax-decode ``length`` tokens after ``prompts (B, P)``: ``(B, length)``, or ``(n, B, length)``
    for the ``n`` active members of ``population`` (each member continues its own sequence)."""
    seq, tokens = prompts, []
    for i in range(length):
        x = population.per_member(seq) if population is not None and i > 0 else seq
        token = model(x)[..., -1, :].argmax(-1)  # (B,) or (n, B)
        tokens.append(token)
        if i == 0 and population is not None:
            seq = seq.expand(token.shape[0], *seq.shape)  # (n, B, P): from here on one sequence per member
        seq = torch.cat((seq, token[..., None]), dim=-1)
    return torch.stack(tokens, dim=-1)


def answer_reward(decoded: torch.Tensor, answers: torch.Tensor, format_reward: float = 0.0):
    """``(..., B, L)`` decoded against ``(B, L)`` answers -> (reward, exact match), each ``(...)``:
    reward = exact match + ``format_reward`` · fraction of answer digits right."""
    right = decoded == answers
    exact = right.all(-1).float().mean(-1)
    return exact + format_reward * right.float().mean((-2, -1)), exact


def _check(cfg: ArithmeticConfig) -> None:
    """The fields only this recipe has (the CLI checks the shared ones): :class:`InputError` naming the first
    one out of range, its value and what was expected."""
    rules = {  # field: (in range, what was expected)
        "digits": (1 <= cfg.digits <= 9, "an integer in [1, 9]"),
        "heads": (cfg.heads >= 1, "an integer >= 1"),
        "d_model": (cfg.d_model >= 1 and cfg.d_model % max(cfg.heads, 1) == 0, f"a multiple of heads ({cfg.heads})"),
        "layers": (cfg.layers >= 1, "an integer >= 1"),
        "heldout_size": (cfg.heldout_size >= 1, "an integer >= 1"),
        "pretrain_steps": (cfg.pretrain_steps >= 0, "an integer >= 0"),
        "pretrain_lr": (math.isfinite(cfg.pretrain_lr) and cfg.pretrain_lr >= 0, "a finite number >= 0"),
        "pretrain_batch": (cfg.pretrain_batch >= 1, "an integer >= 1"),
        "format_reward": (math.isfinite(cfg.format_reward), "a finite number"),
    }
    for name, (ok, expected) in rules.items():
        if not ok:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected {expected}")


class ArithmeticTask(Task):
    name, metric_name = "arithmetic", "reward"
    labels = {"metric": "population mean reward (exact match + format weight · digits right)",
              "heldout_acc": "held-out exact match (%)"}

    def __init__(self, cfg: ArithmeticConfig, pretrain: bool = True):
        _check(cfg)
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.length = cfg.digits + 1  # answer tokens
        heldout = make_problems(cfg.heldout_size, cfg.digits, torch.Generator().manual_seed(cfg.heldout_seed), True)
        self.heldout = tuple(t.to(self.device) for t in heldout)
        torch.manual_seed(cfg.seed)
        self.model = AdditionTransformer(3 * cfg.digits + 3, cfg.d_model, cfg.heads, cfg.layers).to(self.device)
        self.pretrained = self.pretrain() if pretrain else {}  # a resumed run: run() reads pretrain.json
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg)
        self.step = step_function(self.optimizer, self._rewards, cfg, maximize=True)  # CUDA: one graph a step

    def batch(self, step: int, size: int | None = None, salt: int = 0):
        """Step ``step``'s training problems, keyed by ``(seed, salt, step)``: prompts, answers."""
        gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 2 + salt)
        prompts, answers = make_problems(size or self.cfg.batch_size, self.cfg.digits, gen)
        return prompts.to(self.device), answers.to(self.device)

    def pretrain(self) -> dict:
        """Phase 1: ``pretrain_steps`` of AdamW on the answer tokens' cross-entropy (teacher forcing)."""
        cfg, t0, loss = self.cfg, time.perf_counter(), torch.zeros(())
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.pretrain_lr)
        P = 2 * cfg.digits + 2
        for step in range(cfg.pretrain_steps):
            prompts, answers = self.batch(step, cfg.pretrain_batch, salt=1)
            logits = self.model(torch.cat((prompts, answers[:, :-1]), dim=1))[:, P - 1:]  # (B, L, vocab)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), answers.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.model.zero_grad(set_to_none=True)  # ES writes its own .grad
        acc, reward = self.heldout_scores()
        return {"steps": cfg.pretrain_steps, "loss": loss.item(), "time_s": round(time.perf_counter() - t0, 3),
                "heldout_acc": acc, "heldout_reward": reward}

    def warmup_input(self) -> torch.Tensor:
        return self.batch(0)[0]

    def _rewards(self, prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """The active members' rewards ``(n,)`` of greedy-decoded answers (the step's closure)."""
        decoded = greedy_decode(self.model, prompts, self.length, self.optimizer.population)  # (n, B, L)
        return answer_reward(decoded, answers, self.cfg.format_reward)[0]

    def train_step(self, step: int) -> dict:
        prompts, answers = self.batch(step)  # (B, P), (B, L): shared by every member
        mean = self.step(prompts, answers).clone()  # the members' mean reward (a graph's output: copied)
        if self.scheduler is not None:
            self.scheduler.step()
        n = self.optimizer.local_members.stop - self.optimizer.local_members.start
        return {"metric": launch.mean_over_ranks(mean * n, n)}  # under torchrun: everyone's

    @torch.no_grad()
    def heldout_scores(self) -> tuple[float, float]:
        """The unperturbed model's greedy answers on the held-out set: (exact match %, mean reward)."""
        prompts, answers = self.heldout
        reward = exact = 0.0
        for p, a in zip(prompts.split(4096), answers.split(4096)):
            r, e = answer_reward(greedy_decode(self.model, p, self.length), a, self.cfg.format_reward)
            reward, exact = reward + float(r) * len(a), exact + float(e) * len(a)
        return round(100.0 * exact / len(answers), 3), round(reward / len(answers), 5)

    def evaluate(self) -> dict:
        return {"heldout_acc": self.heldout_scores()[0]}

    def final_evaluation(self) -> dict:
        acc, reward = self.heldout_scores()
        return {"heldout_acc": acc, "heldout_reward": reward, "pretrain": self.pretrained}


def run(cfg: ArithmeticConfig, out: Path, checkpoint: dict | None = None, progress: bool = True) -> dict:
    """Phase 1 (fresh runs only; its result goes to ``out/pretrain.json``), then ES via :func:`train`."""
    path = Path(out) / PRETRAIN
    task = ArithmeticTask(cfg, pretrain=checkpoint is None)
    if checkpoint is None:
        atomic_write_text(json.dumps(task.pretrained, indent=2) + "\n", path)
        print(f"arithmetic: {cfg.pretrain_steps} pretraining steps in {task.pretrained['time_s']:.1f} s: held-out "
              f"exact match {task.pretrained['heldout_acc']:.1f}%, reward {task.pretrained['heldout_reward']:.3f}")
    elif path.is_file():
        task.pretrained = json.loads(path.read_text())
    summary = train(task, cfg, out, checkpoint, progress)
    start = {"heldout_acc": float("nan"), "heldout_reward": float("nan"), **task.pretrained}
    print(f"arithmetic: after {summary['steps']} ES steps ({summary['train_time_s']:.1f} s): held-out exact match "
          f"{start['heldout_acc']:.1f}% -> {summary['heldout_acc']:.1f}%, reward {start['heldout_reward']:.3f} -> "
          f"{summary['heldout_reward']:.3f}")
    return summary

"""MNIST classifiers trained by ``EggrollOptimizer.step(closure)``: an MLP and a CNN.

Every ES step draws one minibatch shared by the whole population (the hooks compute the
unperturbed ``x Wᵀ + b`` once for all members) and minimises the per-member cross-entropy.
The minibatch of step ``t`` is a pure function of ``(seed, t)``, so a resumed run sees the same
batches as an uninterrupted one. Test accuracy on the full 10k test set every ``eval_every`` steps.

Models (the seed's): MLP 784-256(tanh)-10; CNN Conv(1→16, 3×3) - ReLU - MaxPool(2) -
Conv(16→32, 3×3) - ReLU - MaxPool(2) - Flatten - Linear(1568→10), convs without bias. The convs
are perturbed by the optimizer's layer rules (factorised low-rank conv); pooling and Flatten run as
written, on each member's batch (the population runs under vmap). On CUDA each step is one CUDA graph
replay (``EggrollOptimizer.compile_step``, ``--no-cuda-graph`` for eager steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..losses import per_member_cross_entropy
from . import launch
from .checks import check_config
from .data import load_mnist_2d, load_mnist_flat
from .errors import InputError
from .runner import RunConfig, Task, make_optimizer, step_function, train

__all__ = ["CNN", "MLP", "MnistConfig", "MnistTask", "QUICK", "auto_chunk_size", "make_cnn", "make_mlp", "run"]


@dataclass
class MnistConfig(RunConfig):
    model: str = "mlp"  # or "cnn"
    hidden: int | None = None  # the MLP's hidden units (None: 256); the CNN has none to set
    population_size: int = 4096
    sigma: float = 0.15
    lr: float = 0.1
    lr_decay: float = 1.0
    sigma_decay: float = 0.999
    max_epochs: int = 100
    batch_size: int = 256
    train_subset: int | None = None  # train on the first n training images only
    data_dir: str | None = None  # None: $EGGROLL_DATA_DIR, else ./data
    log_every: int = 10
    eval_every: int = 10
    checkpoint_every: int = 25
    tf32: bool = True  # on CUDA (--no-tf32: IEEE float32 matmuls, torch's default)

    def check(self) -> None:
        """Fields that do not go together (``checks.check_config`` calls it)."""
        if self.model == "cnn" and self.hidden is not None:
            raise InputError(f"--hidden {self.hidden}: the width of mnist_mlp's hidden layer; mnist_cnn has none")

    @property
    def mlp_hidden(self) -> int:
        return MLP_HIDDEN if self.hidden is None else self.hidden


# Defaults: the best configurations measured on one H200 (benchmarks/RESULTS.md, section 7).
# MLP: AdamW's weight decay (ADAMW_DECAY), without which every configuration fit its batches (train loss
# ~1e-3) and stopped at 97.5-97.8 % test accuracy; lr 0.01 -> 1e-4. CNN (runs BA-BC): the step count fills
# ~110 s of training (the fused conv windows: ~19 ms a step at N=4096), lr and sigma decay to 5 % and 30 %;
# chunks of 512 keep the captured step's memory pool near 1.2 GB. The seed's recipes stay one flag set
# away, e.g. MLP: --optimizer sgd --lr 0.1 --sigma 0.15 --sigma-decay 0.999 --lr-decay 1
# --population-size 4096 --batch-size 256 --max-epochs 100.
MLP = dict(model="mlp", optimizer="adamw", population_size=16384, batch_size=512, lr=0.01,
           lr_decay=0.99953958, sigma=0.05, sigma_decay=1.0, max_epochs=10000, eval_every=2000)
CNN = dict(model="cnn", optimizer="adam", population_size=4096, batch_size=64, chunk_size=512, lr=0.01,
           lr_decay=0.99948363, sigma=0.05, sigma_decay=0.99979244, max_epochs=5800, eval_every=1450)
QUICK = {  # tiny CPU configurations for smoke tests: Adam, a 10k/5k training subset
    "mlp": dict(population_size=512, batch_size=128, max_epochs=50, train_subset=10_000, optimizer="adam",
                lr=0.02, sigma=0.05, sigma_decay=1.0, eval_every=25, checkpoint_every=25),
    "cnn": dict(population_size=64, batch_size=32, max_epochs=20, train_subset=5_000, optimizer="adam",
                lr=0.02, sigma=0.05, lr_decay=1.0, sigma_decay=1.0, eval_every=10, checkpoint_every=10,
                chunk_size=32),  # two chunks: the chunked path runs in the smoke test too
}
MLP_HIDDEN = 256  # the MLP's hidden units unless --hidden says otherwise
_MODELS = ("mlp", "cnn")
_CNN_ACTIVATION = 16 * 28 * 28  # the CNN's largest activation per member and sample


def make_mlp(hidden: int = MLP_HIDDEN) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.weight, std=0.1)
        nn.init.zeros_(layer.bias)
    return model


def make_cnn() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 14, 14)
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )
    nn.init.normal_(model[0].weight, std=0.1)
    nn.init.normal_(model[3].weight, std=0.1)
    nn.init.normal_(model[7].weight, std=1 / math.sqrt(32 * 7 * 7))
    nn.init.zeros_(model[7].bias)
    return model


def auto_chunk_size(population_size: int, per_member: int, device: torch.device) -> int | None:
    """Largest even chunk whose biggest activation stays under 2^28 elements on CUDA, 2^25 on CPU.

    (On CPU larger chunks run faster: a 2048-member MLP step took 2.1 s in chunks of 64, 0.96 s
    in chunks of 512, 0.83 s unchunked; 2^25 keeps one activation at 128 MiB.)
    """
    budget = 2**28 if device.type == "cuda" else 2**25
    chunk = max(2, budget // max(per_member, 1)) // 2 * 2
    return None if chunk >= population_size else chunk


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class MnistTask(Task):
    metric_name = "train_loss"
    labels = {"metric": "train loss (cross-entropy, nats)", "test_acc": "test accuracy (%)"}

    def __init__(self, cfg: MnistConfig):
        if cfg.model not in _MODELS:
            raise ValueError(f"Invalid model: {cfg.model!r} (expected 'mlp' or 'cnn')")
        check_config(cfg)  # the CLI has checked it; a config built in code is checked here
        self.name, self.cfg, self.device = f"mnist_{cfg.model}", cfg, torch.device(cfg.device)
        load = load_mnist_flat if cfg.model == "mlp" else load_mnist_2d
        self.train_x, self.train_y, self.test_x, self.test_y = load(data_root=cfg.data_dir, device=self.device)
        if cfg.train_subset and cfg.train_subset > len(self.train_y):
            raise InputError(f"--train-subset {cfg.train_subset}: the training set has {len(self.train_y)} images")
        if cfg.train_subset:
            self.train_x, self.train_y = self.train_x[:cfg.train_subset], self.train_y[:cfg.train_subset]
        # on CPU resolved here, so the summary and checkpoint show it; on CUDA None: the optimizer's planner
        # sizes the pieces from measured memory (the fused MLP keeps its hidden layer on chip)
        if cfg.chunk_size is None and self.device.type != "cuda":
            per_member = cfg.batch_size * (cfg.mlp_hidden if cfg.model == "mlp" else _CNN_ACTIVATION)
            cfg = self.cfg = replace(cfg, chunk_size=auto_chunk_size(cfg.population_size, per_member, self.device))
        torch.manual_seed(cfg.seed)
        self.model = (make_mlp(cfg.mlp_hidden) if cfg.model == "mlp" else make_cnn()).to(self.device)
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg)
        self.step = step_function(self.optimizer, lambda x, y: per_member_cross_entropy(self.model(x), y), cfg)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s minibatch (uniform with replacement, keyed by ``(seed, step)``)."""
        gen = _step_generator(self.cfg.seed, step)
        idx = torch.randint(len(self.train_y), (self.cfg.batch_size,), generator=gen)
        if self.device.type == "cuda":  # from pinned memory the copy is queued: no host sync a step
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        else:
            idx = idx.to(self.device)
        return self.train_x[idx], self.train_y[idx]

    def warmup_input(self) -> torch.Tensor:
        return self.batch(0)[0]

    def train_step(self, step: int) -> dict:
        x, y = self.batch(step)  # (B, 784) or (B, 1, 28, 28), shared by all members
        loss = self.step(x, y).clone()  # model(x): (n, B, 10); a compiled step's output is overwritten next step
        if self.scheduler is not None:
            self.scheduler.step()
        members = self.optimizer.local_members  # under torchrun: this rank's share; the metric is everyone's
        return {"metric": launch.mean_over_ranks(loss * (members.stop - members.start), members.stop - members.start)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy (%) of the unperturbed model on the full test set."""
        size = 10_000 if self.cfg.model == "mlp" else 1_000
        batches = zip(self.test_x.split(size), self.test_y.split(size))
        correct = sum((self.model(x).argmax(-1) == y).sum() for x, y in batches)
        return {"test_acc": round(100.0 * float(correct) / len(self.test_y), 3)}


def run(cfg: MnistConfig, out: Path, checkpoint: dict | None = None, progress: bool = True) -> dict:
    task = MnistTask(cfg)
    summary = train(task, task.cfg, out, checkpoint, progress)
    print(f"mnist_{cfg.model}: test accuracy {summary['test_acc']:.2f}% after {summary['steps']} steps "
          f"(train loss {summary['final_metric']:.3f}), {summary['train_time_s']:.1f} s of training")
    return summary

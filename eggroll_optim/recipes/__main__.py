"""``python -m eggroll_optim.recipes --experiment cartpole`` (also the ``eggroll`` console script).

Experiments: ``cartpole``, ``mnist`` (= ``mnist_mlp``), ``mnist_mlp``, ``mnist_cnn``, ``hyperscale``
and ``all`` (the four in turn). Each run writes into ``--out`` (default ``runs/<experiment>``;
with ``all``, ``<out>/<experiment>``): ``metrics.jsonl``, ``summary.json``, ``learning_curve.png``
and ``checkpoint.pt``; ``--resume`` continues from that checkpoint with its saved configuration
(``--max-epochs``, ``--device``, ``--data-dir``, ``--chunk-size`` and the logging intervals may
change on resume; other flags are ignored with a warning). ``--quick`` is a tiny configuration
for smoke tests.
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

from ..core import default_device
from . import cartpole, hyperscale, mnist
from .checkpoint import load_checkpoint
from .runner import CHECKPOINT

__all__ = ["EXPERIMENTS", "build_parser", "make_config", "main"]

# name: (config class, experiment defaults, --quick overrides, run function)
EXPERIMENTS = {
    "cartpole": (cartpole.CartPoleConfig, {}, cartpole.QUICK, cartpole.run),
    "mnist_mlp": (mnist.MnistConfig, mnist.MLP, mnist.QUICK["mlp"], mnist.run),
    "mnist_cnn": (mnist.MnistConfig, mnist.CNN, mnist.QUICK["cnn"], mnist.run),
    "hyperscale": (hyperscale.HyperscaleConfig, {}, hyperscale.QUICK, hyperscale.run),
}
ALIASES = {"mnist": ["mnist_mlp"], "all": ["cartpole", "mnist_mlp", "mnist_cnn", "hyperscale"]}
# flags that may differ from the checkpoint's configuration on --resume
RESUMABLE = {"device", "max_epochs", "data_dir", "chunk_size", "log_every", "eval_every", "checkpoint_every"}


def _populations(text: str) -> list[int]:
    return [int(_size(part)) for part in text.split(",") if part.strip()]


def _size(part: str) -> int:
    """``"4096"`` or ``"2^12"`` -> 4096."""
    base, _, exponent = part.strip().partition("^")
    return int(base) ** int(exponent) if exponent else int(base)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eggroll", description="EGGROLL recipes: ES with low-rank perturbations.")
    p.add_argument("--experiment", default="cartpole", choices=[*EXPERIMENTS, *ALIASES])
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int)
    p.add_argument("--population-size", type=int, help="N (even)")
    p.add_argument("--rank", type=int)
    p.add_argument("--sigma", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay", type=float)
    p.add_argument("--sigma-decay", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adam"], help="inner torch.optim optimizer (sgd = the seed's update)")
    p.add_argument("--max-epochs", type=int, help="ES steps (hyperscale: timed steps per size)")
    p.add_argument("--chunk-size", type=int, help="evaluate the population in chunks of this many (default: automatic)")
    p.add_argument("--batch-size", type=int, help="MNIST minibatch per ES step")
    p.add_argument("--train-subset", type=int, help="MNIST: train on the first n training images")
    p.add_argument("--data-dir", help="MNIST root (default: $EGGROLL_DATA_DIR, else ./data)")
    p.add_argument("--env-backend", choices=["gymnasium", "torch"],
                   help="cartpole: gymnasium's vector env (CPU, the default) or the torch env on --device")
    p.add_argument("--populations", type=_populations, help="hyperscale: comma-separated sizes, e.g. 1024,2^14")
    p.add_argument("--log-every", type=int, help="flush metrics (one host sync) every n steps")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--out", type=Path, help="output folder (default: runs/<experiment>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _given(args: argparse.Namespace, cls) -> dict:
    """The config fields set on the command line (flags left out are None)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if v is not None and k in names}


def make_config(name: str, args: argparse.Namespace, saved: dict | None = None):
    """Experiment defaults <- ``--quick`` <- command line; on resume, the saved config <- resumable flags."""
    cls, defaults, quick, _ = EXPERIMENTS[name]
    given = _given(args, cls)
    device = given.pop("device", None) or str(default_device())
    if saved is None:
        return cls(**{**defaults, **(quick if args.quick else {}), **given, "device": device})
    cfg = cls(**{**saved, "device": device})
    ignored = {k: v for k, v in given.items() if k not in RESUMABLE and v != saved.get(k)}
    if ignored:
        warnings.warn(f"--resume keeps the checkpoint's configuration; ignoring {ignored}", stacklevel=2)
    return replace(cfg, **{k: v for k, v in given.items() if k in RESUMABLE})


_CLI_ONLY = {"experiment", "out", "resume", "quick", "no_progress"}


def _warn_unused(name: str, args: argparse.Namespace) -> None:
    names = {f.name for f in fields(EXPERIMENTS[name][0])}
    unused = sorted(k for k, v in vars(args).items() if v is not None and k not in names | _CLI_ONLY)
    if unused:
        warnings.warn(f"{name} has no use for {['--' + k.replace('_', '-') for k in unused]}", stacklevel=2)


def run_experiment(name: str, args: argparse.Namespace, out: Path) -> dict:
    _, _, _, run = EXPERIMENTS[name]
    saved = None
    if args.resume and name != "hyperscale":
        saved = load_checkpoint(out / CHECKPOINT, map_location="cpu")
    elif args.resume:
        print("hyperscale: a benchmark has no checkpoint; --resume ignored")
    cfg = make_config(name, args, None if saved is None else saved["config"])
    print(f"{name}: {asdict(cfg)} -> {out}")
    return run(cfg, out, saved, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = ALIASES.get(args.experiment, [args.experiment])
    for name in names:
        if len(names) == 1:
            _warn_unused(name, args)
        if args.out is None:
            out = Path("runs") / name
        else:
            out = args.out / name if len(names) > 1 else args.out
        run_experiment(name, args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

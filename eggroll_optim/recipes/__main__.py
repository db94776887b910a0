"""``python -m eggroll_optim.recipes --experiment cartpole`` (also the ``eggroll`` console script).

Experiments: ``cartpole``, ``mnist`` (= ``mnist_mlp``), ``mnist_mlp``, ``mnist_cnn``, ``hyperscale``,
``arithmetic`` and ``all`` (the first four in turn, each into ``<out>/<experiment>``, then a table of
their statuses and ``<out>/summary.json``; exit 1 if any failed). Each run writes into ``--out`` (default
``runs/<experiment>``): ``metrics.jsonl``, ``summary.json``, ``learning_curve.png`` and
``checkpoint.pt``. A folder that already holds a run is never replaced: ``--resume`` continues it
from its checkpoint with its saved configuration (``--max-epochs``, ``--device``, ``--data-dir``,
``--chunk-size`` and the logging/checkpoint intervals may change; other flags are ignored with a
warning), ``--fresh`` starts a new run in the first free ``<out>-2``, ``<out>-3``...

Exit status: 0 done; 2 bad input (a flag, a folder, a data file, a checkpoint), reported as one
line ``eggroll: error: ...`` before anything is written (``--debug`` adds the traceback); 130
stopped by Ctrl-C or SIGTERM (the checkpoint and a summary with status ``"interrupted"`` are
saved first); 1 for ``all`` when an experiment failed. ``--quick`` is a tiny configuration for
smoke tests.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from ..core import default_device
from . import arithmetic, cartpole, hyperscale, launch, mnist
from .checkpoint import load_checkpoint
from .checks import check_config, check_device, parse_populations
from .errors import InputError
from .outdir import choose_out, held_run
from .runner import CHECKPOINT, Interrupted
from .suite import check_suite_out, run_all

__all__ = ["EXPERIMENTS", "Plan", "build_parser", "cli", "make_config", "main", "prepare"]

# name: (config class, experiment defaults, --quick overrides, run function)
EXPERIMENTS = {
    "cartpole": (cartpole.CartPoleConfig, {}, cartpole.QUICK, cartpole.run),
    "mnist_mlp": (mnist.MnistConfig, mnist.MLP, mnist.QUICK["mlp"], mnist.run),
    "mnist_cnn": (mnist.MnistConfig, mnist.CNN, mnist.QUICK["cnn"], mnist.run),
    "hyperscale": (hyperscale.HyperscaleConfig, {}, hyperscale.QUICK, hyperscale.run),
    "arithmetic": (arithmetic.ArithmeticConfig, {}, arithmetic.QUICK, arithmetic.run),
}
ALIASES = {"mnist": ["mnist_mlp"], "all": ["cartpole", "mnist_mlp", "mnist_cnn", "hyperscale"]}
# flags that may differ from the checkpoint's configuration on --resume
RESUMABLE = {"cuda_graph", "device", "max_epochs", "data_dir", "chunk_size", "log_every", "eval_every", "checkpoint_every",
             "checkpoint_seconds"}
_CLI_ONLY = {"experiment", "out", "resume", "fresh", "quick", "no_progress", "debug"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, no usage block: ``eggroll: error: ...``, exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _populations(text: str) -> list[int]:
    try:
        return parse_populations(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eggroll", description="EGGROLL recipes: ES with low-rank perturbations.")
    p.add_argument("--experiment", default="cartpole", choices=[*EXPERIMENTS, *ALIASES])
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    p.add_argument("--seed", type=int)
    p.add_argument("--population-size", type=int, metavar="N", help="population size (even)")
    p.add_argument("--rank", type=int)
    p.add_argument("--sigma", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay", type=float, metavar="GAMMA", help="ExponentialLR factor per step, in (0, 1]")
    p.add_argument("--sigma-decay", type=float, metavar="GAMMA", help="sigma factor per step, in (0, 1]")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                   help="inner torch.optim optimizer (sgd = the seed's update)")
    p.add_argument("--weight-decay", type=float, metavar="W",
                   help="the inner optimizer's weight decay (adamw: decoupled; sgd, adam: L2); default 0, "
                        "with adamw 0.05")
    p.add_argument("--hidden", type=int, metavar="H",
                   help="hidden units: mnist_mlp's (784-H-10) or cartpole's policy (4-H-2); default 256")
    p.add_argument("--max-epochs", type=int, metavar="STEPS", help="ES steps (hyperscale: timed steps per size)")
    p.add_argument("--chunk-size", type=int, metavar="N", help="evaluate the population in chunks of N (even)")
    p.add_argument("--batch-size", type=int, metavar="B", help="MNIST minibatch / arithmetic problems per ES step")
    p.add_argument("--train-subset", type=int, metavar="N", help="MNIST: train on the first N training images")
    p.add_argument("--data-dir", metavar="DIR",
                   help="MNIST root, never downloaded into (default: $EGGROLL_DATA_DIR, else ./data, downloaded)")
    p.add_argument("--env-backend", choices=["gymnasium", "torch"],
                   help="cartpole: gymnasium's vector env (CPU, the default) or the torch env on --device")
    p.add_argument("--pretrain-steps", type=int, metavar="STEPS", help="arithmetic: backprop steps before ES")
    p.add_argument("--format-reward", type=float, metavar="W",
                   help="arithmetic: reward weight of the fraction of answer digits right (default 0.5)")
    p.add_argument("--populations", type=_populations, metavar="SIZES",
                   help="hyperscale: comma-separated even sizes, e.g. 1024,2^14")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_const", const=False,
                   help="on CUDA, run each ES step eagerly instead of replaying it from a CUDA graph")
    p.add_argument("--tf32", action="store_const", const=True,
                   help="on CUDA, float32 matmuls in TF32 (torch.backends.cuda.matmul.allow_tf32): the fused MLP's "
                        "fastest kernels run only then (the MNIST recipes' default)")
    p.add_argument("--no-tf32", dest="tf32", action="store_const", const=False,
                   help="on CUDA, leave torch's TF32 flag as it is (IEEE float32 matmuls by default)")
    p.add_argument("--log-every", type=int, metavar="STEPS", help="flush metrics (one host sync) every STEPS steps")
    p.add_argument("--eval-every", type=int, metavar="STEPS")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    p.add_argument("--checkpoint-seconds", type=float, metavar="S",
                   help="also checkpoint after a step that ends S seconds or more after the last save (default 60)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: runs/<experiment>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--fresh", action="store_true",
                   help="if --out holds a run, start a new one in the first free <out>-2, <out>-3...")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _given(args: argparse.Namespace, cls) -> dict:
    """The config fields set on the command line (flags left out are None)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if v is not None and k in names}


def make_config(name: str, args: argparse.Namespace, saved: dict | None = None):
    """Experiment defaults <- ``--quick`` <- command line; on resume, the saved config <- resumable
    flags. The device and every range are checked (:class:`InputError`)."""
    cls, defaults, quick, _ = EXPERIMENTS[name]
    given = _given(args, cls)
    device = str(check_device(given.pop("device"))) if "device" in given else str(default_device())
    if saved is None:
        cfg = cls(**{**defaults, **(quick if args.quick else {}), **given, "device": device})
    else:
        unknown = sorted(set(saved) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"the checkpoint's configuration has fields {unknown} that {name} does not know")
        ignored = {k: v for k, v in given.items() if k not in RESUMABLE and v != saved.get(k)}
        if ignored:
            warnings.warn(f"--resume keeps the checkpoint's configuration; ignoring {ignored}", stacklevel=2)
        cfg = replace(cls(**{**saved, "device": device}), **{k: v for k, v in given.items() if k in RESUMABLE})
    check_config(cfg)
    return cfg


@dataclass
class Plan:
    """One experiment, checked and ready to run: where, with what, from which checkpoint."""

    name: str
    out: Path
    cfg: object = None
    checkpoint: dict | None = None
    kept: bool = False  # hyperscale --resume over its own result: nothing to run


def prepare(name: str, args: argparse.Namespace, out: Path) -> Plan:
    """Check everything about one experiment's run before any file is written."""
    if name == "hyperscale" and args.resume:  # a benchmark has no checkpoint: keep its result, or measure
        held = held_run(out) if out.is_dir() else None
        if held and held["experiment"] not in ("hyperscale", None):
            raise InputError(f"{out} holds a {held['experiment']} run, not hyperscale: choose another --out")
        if held:
            return Plan(name, out, kept=True)
    out = choose_out(out, resume=args.resume and name != "hyperscale", fresh=args.fresh)
    saved = None
    if args.resume and name != "hyperscale":
        saved = load_checkpoint(out / CHECKPOINT, map_location="cpu", experiment=name)
    cfg = make_config(name, args, None if saved is None else saved["config"])
    if saved is not None and cfg.max_epochs < saved["step"]:
        raise InputError(f"--max-epochs {cfg.max_epochs}: the checkpoint in {out} is at step {saved['step']} "
                         f"(expected >= {saved['step']})")
    return Plan(name, out, cfg, saved)


def run_plan(plan: Plan, args: argparse.Namespace) -> dict:
    if plan.kept:
        print(f"hyperscale: a benchmark has no checkpoint; keeping the result in {plan.out} (--fresh measures again)")
        return {"experiment": "hyperscale", "status": "kept"}
    print(f"{plan.name}: {asdict(plan.cfg)} -> {plan.out}")
    return EXPERIMENTS[plan.name][3](plan.cfg, plan.out, plan.checkpoint, progress=not args.no_progress)


def _warn_unused(name: str, args: argparse.Namespace) -> None:
    names = {f.name for f in fields(EXPERIMENTS[name][0])}
    unused = sorted(k for k, v in vars(args).items() if v is not None and k not in names | _CLI_ONLY)
    if unused:
        warnings.warn(f"{name} has no use for {['--' + k.replace('_', '-') for k in unused]}", stacklevel=2)


def error_exit(error: BaseException, debug: bool) -> int:
    """Print ``eggroll: error: <one line>`` (after the traceback with ``--debug``); returns 2."""
    if debug:
        traceback.print_exception(error)
    print(f"eggroll: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def _distributed(args: argparse.Namespace, names: list[str], root: Path) -> None:
    """Under torchrun: join the group, resume after an elastic restart, keep ranks > 0 quiet."""
    args.device = launch.setup(args.device)
    if launch.restarted() and not args.resume:  # a restarted worker group continues from the checkpoint
        outs = [root / name if len(names) > 1 or args.out is None else args.out for name in names]
        args.resume = any((out / CHECKPOINT).exists() for out in outs)
    if not launch.is_main():
        args.no_progress = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 reports for the group


def _rank_outs(plans: list) -> None:
    """Every rank has checked and loaded what it needs; ranks > 0 then write into private folders."""
    if launch.group() is None:
        return
    torch.distributed.barrier()
    if not launch.is_main():
        for plan in plans:
            plan.out = Path(launch.private_out(plan.name))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = ALIASES.get(args.experiment, [args.experiment])
    root = args.out if args.out is not None else Path("runs")
    try:
        if args.fresh and args.resume:
            raise InputError("--fresh starts a new run and --resume continues one: give one of them")
        if launch.world_size() > 1:
            _distributed(args, names, root)
        if len(names) > 1:
            check_suite_out(root)
        plans = [prepare(name, args, root / name if len(names) > 1 or args.out is None else args.out)
                 for name in names]
        _rank_outs(plans)
    except InputError as e:
        return error_exit(e, args.debug)
    if len(plans) > 1:
        return run_all(plans, lambda plan: run_plan(plan, args), root, args.debug)
    _warn_unused(names[0], args)
    try:
        run_plan(plans[0], args)
    except InputError as e:
        return error_exit(e, args.debug)
    except Interrupted as e:
        print(f"eggroll: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("eggroll: interrupted (the last checkpoint, if any, is as it was)", file=sys.stderr)
        return 130
    return 0


def cli() -> int:
    """:func:`main` for a process that ends with it (``python -m eggroll_optim.recipes``): its objects
    are frozen out of the garbage collector before the interpreter exits.

    At exit, Python clears every module and runs full collections over the objects still alive: a
    run ends with thousands of modules (torch, ``torch._dynamo`` that ``torch.optim`` imports, sympy,
    numpy...) and hundreds of thousands of tracked objects, a sizeable part of a short run's time on a
    small CPU. ``gc.freeze()`` moves those objects to a generation that no collection visits.
    Nothing is skipped that a run needs: every file is written, fsynced and closed before ``main``
    returns, ``atexit`` handlers still run, standard streams are still flushed; only objects in
    reference cycles, which Python does not promise to finalize at exit anyway, are left to the OS.
    Not in :func:`main` itself: a process that calls it and goes on (the tests) keeps collecting.
    """
    status = main()
    gc.freeze()
    return status


if __name__ == "__main__":
    raise SystemExit(cli())

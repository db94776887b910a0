"""What the CLI checks before a run writes anything: every numeric flag's range and the device.

Each rule names the flag, the value received and what was expected, as one line, e.g.
``--lr-decay 0.0: expected a number in (0, 1]``. The rules cover every field of the recipes'
configs that is a flag; a value from the defaults or a checkpoint passes them too.
"""
from __future__ import annotations

import math
from dataclasses import fields

import torch

from .errors import InputError

__all__ = ["RULES", "check_config", "check_device", "parse_populations"]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _int_at_least(low: int):
    return (lambda v: isinstance(v, int) and v >= low), f"an integer >= {low}"


_EVEN = (lambda v: isinstance(v, int) and v >= 2 and v % 2 == 0), "an even integer >= 2"
_POSITIVE = (lambda v: _finite(v) and v > 0), "a finite number > 0"
_DECAY = (lambda v: _finite(v) and 0 < v <= 1), "a number in (0, 1]"

# config field: (test, what was expected); a field that is None (automatic) is not checked
RULES = {
    "seed": ((lambda v: isinstance(v, int) and 0 <= v < 2**63), "an integer in [0, 2^63)"),
    "population_size": _EVEN,
    "rank": _int_at_least(1),
    "sigma": _POSITIVE,
    "lr": ((lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    "weight_decay": ((lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    "hidden": _int_at_least(1),
    "lr_decay": _DECAY,
    "sigma_decay": _DECAY,
    "max_epochs": _int_at_least(1),
    "chunk_size": _EVEN,
    "batch_size": _int_at_least(1),
    "train_subset": _int_at_least(1),
    "log_every": _int_at_least(1),
    "eval_every": _int_at_least(1),
    "checkpoint_every": _int_at_least(1),
    "checkpoint_seconds": _POSITIVE,
    "horizon": _int_at_least(1),
    "populations": ((lambda v: all(_EVEN[0](n) for n in v)), "even population sizes >= 2"),
}


def check_config(cfg) -> None:
    """Raise :class:`InputError` for the first field of ``cfg`` outside its range, then for fields that do
    not go together (the config's own ``check()``, where it has one)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in RULES and value is not None and not RULES[f.name][0](value):
            raise InputError(f"--{f.name.replace('_', '-')} {_show(value)}: expected {RULES[f.name][1]}")
    if hasattr(cfg, "check"):  # what one experiment's fields require of each other
        cfg.check()


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def check_device(text: str) -> torch.device:
    """``torch.device(text)``, if this machine can run on it; else one line saying why and what to do."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {text}: unknown device (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise InputError(f"--device {text}: no CUDA GPU is available to torch {torch.__version__} ({build}); "
                             "run on the CPU with --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {text}: MPS is not available here; run on the CPU with --device cpu")
    elif device.type != "cpu":
        raise InputError(f"--device {text}: the recipes run on cpu, cuda, cuda:N or mps")
    return device


def _size(part: str) -> int:
    """``"4096"`` or ``"2^12"`` -> 4096."""
    base, _, exponent = part.strip().partition("^")
    value = int(base) ** int(exponent) if exponent else int(base)
    if not isinstance(value, int):  # a negative exponent
        raise ValueError(part)
    return value


def parse_populations(text: str) -> list[int]:
    """``"1024,2^14"`` -> ``[1024, 16384]``; raises ``ValueError`` with the expected form."""
    parts = text.split(",")
    try:
        sizes = [_size(part) for part in parts]
    except ValueError:
        raise ValueError(f"{text!r}: expected comma-separated even sizes, e.g. 1024,2^14") from None
    bad = [n for n in sizes if not _EVEN[0](n)]
    if bad:
        raise ValueError(f"{text!r}: population size {bad[0]} is not {_EVEN[1]}")
    return sizes

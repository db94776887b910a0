"""The output folder of a run: writable, and never one that already holds a run (unless resuming).

A folder "holds a run" when it has any of ``RUN_FILES``. A new run into such a folder is refused
with a one-line :class:`~eggroll_optim.recipes.errors.InputError` naming ``--resume`` (continue
it) and ``--fresh`` (start beside it, in the first free ``<out>-2``, ``<out>-3``...): a result is
never replaced. These checks create nothing; a probe file proves the folder writable and is
removed at once.
"""
from __future__ import annotations

import json
import tempfile
from itertools import count
from pathlib import Path

from .errors import InputError

__all__ = ["RUN_FILES", "check_writable", "choose_out", "held_run"]

RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl", "hyperscale.md")


def check_writable(out: Path) -> None:
    """Raise unless ``out`` is a folder (or can be made one) that this process can write in."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, expected a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is a file, expected a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise InputError(f"--out {out}: cannot write in {existing} ({e.strerror or e})") from None


def held_run(out: Path) -> dict | None:
    """``{"files": [...], "experiment": ..., "status": ...}`` when ``out`` holds a run, else None."""
    files = [name for name in RUN_FILES if (out / name).exists()]
    if not files:
        return None
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    summary = summary if isinstance(summary, dict) else {}
    return {"files": files, "experiment": summary.get("experiment"), "status": summary.get("status", "unfinished")}


def _describe(held: dict) -> str:
    what = f"a {held['experiment']} run" if held["experiment"] else "a run"
    return f"{what} ({held['status']}: {', '.join(held['files'])})"


def choose_out(out: Path, resume: bool, fresh: bool) -> Path:
    """The folder a run writes into: ``out`` when resuming or free, the first free ``<out>-k`` with
    ``fresh``; otherwise an error that says how to go on."""
    check_writable(out)
    held = held_run(out) if out.is_dir() else None
    if resume or held is None:
        return out
    if not fresh:
        raise InputError(f"{out} already holds {_describe(held)}: continue it with --resume, start a new run "
                         f"beside it with --fresh, or choose another --out (nothing was changed)")
    out = out if out.name else out.resolve()  # "." has no name to suffix
    for k in count(2):
        candidate = out.with_name(f"{out.name}-{k}")
        if not (candidate.is_dir() and held_run(candidate)) and not candidate.is_file():
            check_writable(candidate)
            return candidate

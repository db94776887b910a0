"""Checkpoints and result files: atomic writes, versioned checkpoints checked on load.

Every file is written to a temp file beside the target, fsynced, given the mode a plain
``open()`` would (``0o666`` less the umask, not ``mkstemp``'s ``0o600``) and moved onto the
target with ``os.replace``: a crash or an exception while saving leaves the previous file
untouched. Checkpoints hold only tensors and plain Python values (they load with
``torch.load(weights_only=True)``) and carry ``FORMAT`` and the experiment's name;
:func:`load_checkpoint` turns a missing, damaged, foreign or newer file into an
:class:`~eggroll_optim.recipes.errors.InputError` naming it, and never touches the file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import InputError

__all__ = ["FORMAT", "atomic_write_bytes", "atomic_write_text", "capture_rng_state", "load_checkpoint",
           "restore_rng_state", "save_checkpoint"]

FORMAT = 1  # the checkpoint layout written by runner.train; bump when it changes
REQUIRED = ("format", "experiment", "step", "elapsed", "status", "config", "model", "optimizer", "rng")


def _file_mode() -> int:
    """``0o666`` less the process umask: what ``open(path, "w")`` would create."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file in ``path``'s folder, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if hasattr(os, "fchmod"):  # POSIX: mkstemp's 0o600 -> what open() would give
                os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (the old file survives any failure)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(text.encode("utf-8"), path)


def load_checkpoint(path: str | os.PathLike, map_location=None, experiment: str | None = None) -> dict:
    """Load a checkpoint written by the recipes (``weights_only=True``) and check its layout.

    Raises :class:`InputError` naming ``path`` when it is missing, unreadable, not a recipes
    checkpoint, of a newer ``FORMAT``, or (given ``experiment``) another experiment's.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path} to resume (start the run without --resume)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises EOFError, KeyError, RuntimeError, UnpicklingError...
        reason = (str(e).splitlines() or [""])[0][:120] or type(e).__name__
        raise InputError(f"{path} is damaged or not a checkpoint ({reason}); it was left as is") from e
    missing = [key for key in REQUIRED if key not in state] if isinstance(state, dict) else REQUIRED
    if missing:
        raise InputError(f"{path} is not an eggroll recipes checkpoint (no {', '.join(missing)}); it was left as is")
    if not isinstance(state["format"], int) or state["format"] > FORMAT:
        raise InputError(f"{path} has checkpoint format {state['format']!r}, newer than this version reads "
                         f"(<= {FORMAT}); upgrade eggroll_optim to resume it")
    if experiment is not None and state["experiment"] != experiment:
        raise InputError(f"{path} is a checkpoint of experiment {state['experiment']!r}, not {experiment!r}")
    return state


def capture_rng_state() -> dict:
    """The global torch RNG states (CPU, and every CUDA device once this process uses CUDA), as tensors.

    A process that has not initialized CUDA (a CPU run, on a machine with GPUs or without) has drawn
    nothing from the CUDA generators: they hold what the last ``torch.manual_seed`` (or torch's
    default seed) gave them, which the same recipe in a resuming process gives them again. So their
    states are left out, and a CPU run never initializes CUDA for them: ``torch.cuda.is_available()``
    and ``get_rng_state_all()`` start the CUDA driver, which a CPU run on a GPU host paid for nothing
    at its first save (inside its training time), and again to tear CUDA down at exit.
    """
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Atomic checkpoints: write a temp file beside the target, fsync, then ``os.replace``.

A crash or an exception while saving leaves the previous checkpoint untouched (``os.replace``
is atomic on POSIX and Windows when both paths are on one filesystem, hence the temp file in
the same folder). Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_write_text", "capture_rng_state", "load_checkpoint", "restore_rng_state", "save_checkpoint"]


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file in ``path``'s folder, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (the old file survives any failure)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path} (run without --resume first)")
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state() -> dict:
    """The global torch RNG states (CPU and every CUDA device), as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Fetch the MNIST files when no data root was given (``data.load_mnist_*`` calls this).

Each file comes from the first of ``MIRRORS`` that answers (torchvision's mirrors); every
connect and every read waits at most ``TIMEOUT_S`` seconds, so a network that accepts and never
answers fails the run with a one-line :class:`~eggroll_optim.recipes.errors.InputError` instead
of hanging it. A file is written atomically, so an interrupted download leaves nothing behind;
its contents are checked by the loader like any other file.
"""
from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .errors import InputError

__all__ = ["MIRRORS", "TIMEOUT_S", "download"]

MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
TIMEOUT_S = 30.0


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None) or error  # urllib wraps socket errors in URLError.reason
    return str(reason) or type(reason).__name__


def download(folder: Path, names: list[str], timeout: float | None = None) -> None:
    """Download ``<name>.gz`` for each of ``names`` into ``folder`` (created if needed)."""
    timeout = TIMEOUT_S if timeout is None else timeout
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        tried = []
        for mirror in MIRRORS:
            url = f"{mirror}{name}.gz"
            print(f"eggroll: downloading {url} into {folder}", file=sys.stderr)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    data = response.read()
            except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, refused connections
                tried.append(f"{url}: {_reason(e)}")
                continue
            atomic_write_bytes(data, folder / f"{name}.gz")
            break
        else:
            raise InputError(f"could not download {name}.gz (timeout {timeout:g} s; {'; '.join(tried)}): "
                             f"put the MNIST files in {folder} or point --data-dir at a folder that holds them")

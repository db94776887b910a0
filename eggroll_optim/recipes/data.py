"""MNIST from a data root: the standard IDX files (gzipped or not), else torchvision's download.

The root is ``data_root``, else ``$EGGROLL_DATA_DIR``, else ``./data``; files are looked up in
``ROOT/MNIST/raw`` (torchvision's layout) and in ``ROOT`` itself.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..core import default_device

__all__ = ["load_mnist_2d", "load_mnist_flat", "mnist_root"]

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dim, images: 3 dims


def mnist_root(data_root: str | os.PathLike | None = None) -> Path:
    return Path(data_root or os.environ.get("EGGROLL_DATA_DIR") or "./data")


def _find(root: Path, name: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic not in _MAGIC:
        raise ValueError(f"{path} is not an MNIST IDX file (magic {magic})")
    ndim = _MAGIC[magic]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {shape}, found {array.size} values")
    return torch.from_numpy(array.copy()).view(*shape)


def _load_raw(data_root) -> dict[str, torch.Tensor]:
    root = mnist_root(data_root)
    paths = {key: _find(root, name) for key, name in _FILES.items()}
    if any(p is None for p in paths.values()):
        from torchvision import datasets  # only when the files are absent: a user online

        datasets.MNIST(str(root), train=True, download=True)
        datasets.MNIST(str(root), train=False, download=True)
        paths = {key: _find(root, name) for key, name in _FILES.items()}
    return {key: _read_idx(path) for key, path in paths.items()}


def _load(dtype, data_root, device, image_shape):
    device = default_device() if device is None else torch.device(device)
    raw = _load_raw(data_root)

    def images(t):
        return (t.to(device=device, dtype=dtype) / 255.0).reshape(t.shape[0], *image_shape)

    return (
        images(raw["train_images"]),
        raw["train_labels"].to(device=device, dtype=torch.long),
        images(raw["test_images"]),
        raw["test_labels"].to(device=device, dtype=torch.long),
    )


def load_mnist_flat(dtype: torch.dtype = torch.float32, data_root=None, device=None):
    """``(train (60000, 784), train_labels, test (10000, 784), test_labels)`` in [0, 1]."""
    return _load(dtype, data_root, device, (784,))


def load_mnist_2d(dtype: torch.dtype = torch.float32, data_root=None, device=None):
    """``(train (60000, 1, 28, 28), train_labels, test (10000, 1, 28, 28), test_labels)`` in [0, 1]."""
    return _load(dtype, data_root, device, (1, 28, 28))

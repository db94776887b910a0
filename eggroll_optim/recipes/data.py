"""MNIST from a data root: the standard IDX files (gzipped or not), checked before any training.

The root is ``data_root`` (``--data-dir``), else ``$EGGROLL_DATA_DIR``, else ``./data``; files are
looked up in ``ROOT/MNIST/raw`` (torchvision's layout) and in ``ROOT`` itself. When a root was
given, nothing is downloaded and nothing is created under it: a missing file is an
:class:`~eggroll_optim.recipes.errors.InputError` naming it and where it was looked for. Only
without a root are missing files downloaded, into ``./data/MNIST/raw`` (with a timeout,
``recipes.download``). Every file is checked as it is read: gzip stream (truncated, bad CRC),
IDX magic, image size, element count, label range; then each split's images against its labels.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..core import default_device
from . import download
from .errors import InputError

__all__ = ["load_mnist_2d", "load_mnist_flat", "mnist_root"]

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dim, images: 3 dims
_KIND = {2049: "labels", 2051: "images"}


def mnist_root(data_root: str | os.PathLike | None = None) -> Path:
    return Path(data_root or os.environ.get("EGGROLL_DATA_DIR") or "./data")


def _find(root: Path, name: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, un-gzipped; a damaged file is named with what is wrong."""
    try:
        if path.suffix != ".gz":
            return path.read_bytes()
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise InputError(f"{path} is truncated: its gzip stream ends early (download it again)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path} is damaged: {e} (download it again)") from None
    except OSError as e:
        raise InputError(f"{path} cannot be read: {e.strerror or e}") from None


def _read_idx(path: Path, key: str | None = None) -> torch.Tensor:
    """An IDX file as a uint8 tensor, checked: magic (and kind, given ``key``), 28x28 images, size."""
    data = _read_bytes(path)
    magic = int.from_bytes(data[:4], "big")
    if magic not in _MAGIC:
        raise InputError(f"{path} is not an MNIST IDX file (magic {magic}, expected 2049 or 2051)")
    kind = _KIND[magic]
    if key is not None and not key.endswith(kind):
        raise InputError(f"{path} holds {kind} (magic {magic}), expected {key.split('_')[1]}")
    ndim = _MAGIC[magic]
    if len(data) < 4 + 4 * ndim:
        raise InputError(f"{path} is truncated: {len(data)} bytes, shorter than its header")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if kind == "images" and shape[1:] != [28, 28]:
        raise InputError(f"{path} holds {shape[1]}x{shape[2]} images, expected 28x28")
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size < int(np.prod(shape)):
        raise InputError(f"{path} is truncated: expected {shape}, found {array.size} values")
    if array.size > int(np.prod(shape)):
        raise InputError(f"{path} has {array.size - int(np.prod(shape))} bytes past the {shape} it declares")
    if kind == "labels" and array.size and array.max() > 9:
        raise InputError(f"{path} holds label {array.max()}, expected labels 0-9")
    return torch.from_numpy(array.copy()).view(*shape)


def _missing_message(root: Path, source: str, missing: list[str]) -> str:
    names = ", ".join(f"{name}[.gz]" for name in missing)
    if not root.is_dir():
        return f"the MNIST data root {root} (from {source}) is not a folder; expected it to hold {names}"
    return (f"MNIST file(s) missing: {names} (looked in {root / 'MNIST' / 'raw'} and {root}, the data root "
            f"from {source}; nothing is downloaded when a data root is given)")


def _paths(data_root) -> dict[str, Path]:
    """Each file's path; downloads the missing ones only when no data root was given."""
    if data_root is not None and not str(data_root):
        raise InputError("--data-dir '': expected the folder that holds MNIST")
    given = data_root or os.environ.get("EGGROLL_DATA_DIR")
    root = mnist_root(data_root)
    paths = {key: _find(root, name) for key, name in _FILES.items()}
    missing = [name for key, name in _FILES.items() if paths[key] is None]
    if missing and given:
        raise InputError(_missing_message(root, "--data-dir" if data_root else "$EGGROLL_DATA_DIR", missing))
    if missing:
        download.download(root / "MNIST" / "raw", missing)
        paths = {key: _find(root, name) for key, name in _FILES.items()}
    return paths


def _load_raw(data_root) -> dict[str, torch.Tensor]:
    paths = _paths(data_root)
    raw = {key: _read_idx(path, key) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
        if len(images) != len(labels):
            raise InputError(f"{paths[f'{split}_labels']} has {len(labels)} labels but "
                             f"{paths[f'{split}_images']} has {len(images)} images")
    return raw


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

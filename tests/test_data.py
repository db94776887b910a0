"""MNIST loading: the IDX parser on synthetic files (gz and not), and the real files when present."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eggroll_optim.recipes import load_mnist_2d, load_mnist_flat
from eggroll_optim.recipes.data import _find, mnist_root

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(folder: Path, name: str, data: bytes, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _synthetic(folder: Path, gz: bool, n_train=5, n_test=3, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train_images"][0, 0, :2] = (0, 255)  # the extremes map to exactly 0 and 1
    for key, name in NAMES.items():
        _write(folder, name, _idx_bytes(arrays[key]), gz)
    return arrays


def _check_against(loaded, arrays, image_shape):
    train, train_labels, test, test_labels = loaded
    for images, key in ((train, "train_images"), (test, "test_images")):
        expected = torch.from_numpy(arrays[key].astype(np.float64) / 255.0).float()
        assert images.shape == (len(arrays[key]), *image_shape) and images.dtype == torch.float32
        torch.testing.assert_close(images.reshape(expected.shape), expected, rtol=0, atol=1e-7)
    for labels, key in ((train_labels, "train_labels"), (test_labels, "test_labels")):
        assert labels.dtype == torch.long and labels.tolist() == arrays[key].tolist()
    assert train[0].flatten()[:2].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_synthetic_idx_files_parse(tmp_path, gz, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = _synthetic(folder, gz)
    _check_against(load_mnist_flat(data_root=tmp_path, device="cpu"), arrays, (784,))
    _check_against(load_mnist_2d(data_root=str(tmp_path), device="cpu"), arrays, (1, 28, 28))


def test_mixed_gz_and_raw_files_and_dtype(tmp_path):
    arrays = _synthetic(tmp_path, gz=True, seed=3)
    for key in ("train_images", "test_labels"):  # replace two of them by uncompressed copies
        (tmp_path / f"{NAMES[key]}.gz").unlink()
        _write(tmp_path, NAMES[key], _idx_bytes(arrays[key]), gz=False)
    train, train_labels, _, _ = load_mnist_flat(torch.float64, data_root=tmp_path, device="cpu")
    assert train.dtype == torch.float64
    torch.testing.assert_close(train, torch.from_numpy(arrays["train_images"].reshape(5, 784) / 255.0))
    assert train_labels.tolist() == arrays["train_labels"].tolist()


def test_data_root_from_environment(tmp_path, monkeypatch):
    arrays = _synthetic(tmp_path, gz=False, seed=1)
    monkeypatch.setenv("EGGROLL_DATA_DIR", str(tmp_path))
    assert mnist_root() == tmp_path and mnist_root("elsewhere") == Path("elsewhere")
    _check_against(load_mnist_flat(device="cpu"), arrays, (784,))
    monkeypatch.delenv("EGGROLL_DATA_DIR")
    assert mnist_root() == Path("./data")
    assert _find(tmp_path, "missing-file") is None  # (the loader would then download)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_file_raises(tmp_path, gz):
    arrays = _synthetic(tmp_path, gz)
    data = _idx_bytes(arrays["test_images"])[:-100]
    path = _write(tmp_path, NAMES["test_images"], data, gz)
    with pytest.raises(ValueError, match=rf"{path.name} is truncated: expected \[3, 28, 28\], found {3 * 784 - 100}"):
        load_mnist_flat(data_root=tmp_path, device="cpu")


def test_wrong_magic_raises(tmp_path):
    arrays = _synthetic(tmp_path, gz=False)
    data = bytearray(_idx_bytes(arrays["train_labels"]))
    data[:4] = (1234).to_bytes(4, "big")
    _write(tmp_path, NAMES["train_labels"], bytes(data), gz=False)
    with pytest.raises(ValueError, match="magic 1234"):
        load_mnist_flat(data_root=tmp_path, device="cpu")


# ---------------------------------------------------------------- the real files

needs_real = pytest.mark.skipif(not (DATA_ROOT / "MNIST" / "raw").is_dir(), reason=f"no MNIST under {DATA_ROOT}")
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def real_flat():
    return load_mnist_flat(data_root=DATA_ROOT, device="cpu")


@needs_real
def test_real_mnist_flat(real_flat):
    train, train_labels, test, test_labels = real_flat
    assert train.shape == (60000, 784) and test.shape == (10000, 784)
    assert train.min() == 0 and train.max() == 1 and test.min() == 0 and test.max() == 1
    assert torch.bincount(train_labels, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(test_labels, minlength=10).tolist() == TEST_COUNTS
    assert (train_labels[0].item(), test_labels[0].item()) == (5, 7)  # the well-known first digits
    assert abs(train.mean().item() - 0.1307) < 1e-4  # the usual normalisation constant


@needs_real
def test_real_mnist_2d_matches_flat(real_flat):
    train, train_labels, test, test_labels = load_mnist_2d(data_root=DATA_ROOT, device="cpu")
    assert train.shape == (60000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert torch.equal(train.flatten(1), real_flat[0]) and torch.equal(test_labels, real_flat[3])


@needs_real
def test_real_mnist_ungzipped_copies(tmp_path, real_flat):
    for name in NAMES.values():
        with gzip.open(DATA_ROOT / "MNIST" / "raw" / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    loaded = load_mnist_flat(data_root=tmp_path, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded, real_flat))

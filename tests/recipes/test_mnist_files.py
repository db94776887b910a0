"""MNIST files through the CLI: a given data root is never downloaded into nor created; a missing
file is named with where it was looked for, a damaged one with what is wrong, before any training;
a download (no data root given) gives up after its timeout."""
import gzip
import shutil
import socket
import time

import numpy as np
import pytest
from cli_helpers import NAMES, TINY, cli_env, idx_bytes, one_line_error, snapshot

from eggroll_optim.recipes import download
from eggroll_optim.recipes.__main__ import main


def _no_download(*args, **kwargs):
    raise AssertionError("tried to download")


def _copy(mnist_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(mnist_root, root)
    return root, root / "MNIST" / "raw"


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    return one_line_error(capsys.readouterr().err)


def test_missing_file_is_named_and_nothing_is_downloaded(mnist_root, tmp_path, monkeypatch, capsys):
    """A download would fail the test, and HTTP(S) proxies point at a closed local port besides."""
    monkeypatch.setattr(download, "download", _no_download)
    for name, value in cli_env().items():
        if name.lower().endswith("_proxy"):
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("EGGROLL_DATA_DIR", raising=False)
    root, raw = _copy(mnist_root, tmp_path)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    before = snapshot(root)
    assert main([*TINY, "--data-dir", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    line = one_line_error(err)
    assert "t10k-labels-idx1-ubyte[.gz]" in line and "train-images" not in line
    assert str(raw) in line and "nothing is downloaded" in line and "downloading" not in err
    assert snapshot(root) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["--data-dir", "$EGGROLL_DATA_DIR"])
def test_mistyped_data_root_creates_nothing(tmp_path, monkeypatch, capsys, source):
    monkeypatch.setattr(download, "download", _no_download)
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "dtaa"
    flags = ["--data-dir", str(typo)] if source == "--data-dir" else []
    if source != "--data-dir":
        monkeypatch.setenv("EGGROLL_DATA_DIR", str(typo))
    line = _fails([*TINY, *flags, "--out", str(tmp_path / "out")], capsys)
    assert f"data root {typo} (from {source}) is not a folder" in line
    assert list(tmp_path.iterdir()) == []


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _damage(raw, kind: str) -> tuple[str, str]:
    """Damage one file of ``raw`` in one way; returns (file name, text the error must contain)."""
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (16, 28, 28)), rng.integers(0, 10, 16)
    test_images, test_labels = raw / f"{NAMES['test_images']}.gz", raw / f"{NAMES['test_labels']}.gz"
    if kind == "truncated gzip":
        test_images.write_bytes(test_images.read_bytes()[:-200])
        return test_images.name, "is truncated: its gzip stream ends early"
    if kind == "bad CRC":
        data = bytearray(_gz(idx_bytes(images)))
        data[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
        test_images.write_bytes(bytes(data))
        return test_images.name, "is damaged: CRC check failed"
    if kind == "not gzip":
        test_images.write_bytes(b"<html>404 Not Found</html>")
        return test_images.name, "is damaged: Not a gzipped file"
    if kind == "wrong magic":
        test_labels.write_bytes(_gz(b"\x00\x00\x04\xd2" + idx_bytes(labels)[4:]))
        return test_labels.name, "is not an MNIST IDX file (magic 1234"
    if kind == "labels for images":
        test_images.write_bytes(_gz(idx_bytes(labels)))
        return test_images.name, "holds labels (magic 2049), expected images"
    if kind == "truncated payload":
        test_images.unlink()
        (raw / NAMES["test_images"]).write_bytes(idx_bytes(images)[:-100])  # an uncompressed copy
        return NAMES["test_images"], f"is truncated: expected [16, 28, 28], found {16 * 784 - 100} values"
    if kind == "wrong count":
        test_labels.write_bytes(_gz(idx_bytes(labels[:9])))
        return test_labels.name, "has 9 labels but"
    raise ValueError(kind)


KINDS = ["truncated gzip", "bad CRC", "not gzip", "wrong magic", "labels for images", "truncated payload",
         "wrong count"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_file_is_named_with_what_is_wrong(mnist_root, tmp_path, monkeypatch, capsys, kind):
    root, raw = _copy(mnist_root, tmp_path)
    name, expected = _damage(raw, kind)
    line = _fails([*TINY, "--data-dir", str(root), "--out", str(tmp_path / "out")], capsys)
    assert name in line and expected in line
    assert not (tmp_path / "out").exists()  # checked before training: no run folder


def test_download_gives_up_after_its_timeout(tmp_path, monkeypatch, capsys):
    """No data root: the download goes to a local server that accepts and never answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # the kernel completes the handshakes; nobody ever reads or writes
    try:
        monkeypatch.setattr(download, "MIRRORS", [f"http://127.0.0.1:{silent.getsockname()[1]}/mnist/"])
        monkeypatch.setattr(download, "TIMEOUT_S", 0.3)
        monkeypatch.delenv("EGGROLL_DATA_DIR", raising=False)
        monkeypatch.chdir(tmp_path)
        t0 = time.monotonic()
        assert main([*TINY, "--out", str(tmp_path / "out")]) == 2
    finally:
        silent.close()
    assert time.monotonic() - t0 < 10
    progress, line = capsys.readouterr().err.splitlines()  # what it tried, then the one-line error
    assert progress.startswith("eggroll: downloading http://127.0.0.1:") and line.startswith("eggroll: error: ")
    assert "could not download train-images-idx3-ubyte.gz (timeout 0.3 s" in line and "timed out" in line
    assert not (tmp_path / "out").exists() and not list((tmp_path / "data" / "MNIST" / "raw").iterdir())

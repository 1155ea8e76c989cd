"""BN's per-channel formulas, written once.

Plain arithmetic, so the same functions run on NumPy arrays (in
:mod:`batchnorm.functional`), on torch tensors (in :mod:`batchnorm.torch.sync`) and on scalars
inside compiled kernels (the Numba backend wraps them with ``numba.njit``; the fused passes
need them between their two sweeps).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def inverse_std(var: Any, eps: float) -> Any:
    """rstd = 1 / sqrt(var + eps)."""
    return 1.0 / np.sqrt(var + eps)


def grad_coefficients(weight: Any, rstd: Any, sum_dy: Any, sum_dy_xmu: Any, count: Any) -> Any:
    """(a, b, c) of ``dx = a*dy + b*(x - mean) + c`` for batch statistics over ``count`` values.

    From ``dx = w*rstd/m * (m*dy - sum(dy) - x_hat*sum(dy*x_hat))`` (docs/derivation.md).
    """
    a = weight * rstd
    return a, -a * rstd * rstd * sum_dy_xmu / count, -a * sum_dy / count


def running_stats(
    running_mean: Any, running_var: Any, mean: Any, m2: Any, count: Any, momentum: float
) -> tuple[Any, Any]:
    """The running (mean, var) after a batch of ``count`` values with ``mean`` and ``m2``.

    ``new = (1 - momentum) * old + momentum * batch`` (PyTorch's convention); the variance
    averaged in is the unbiased ``m2 / (count - 1)``, as PyTorch stores it.
    """
    keep = 1.0 - momentum
    new_mean = keep * running_mean + momentum * mean
    new_var = keep * running_var + (momentum / (count - 1)) * m2
    return new_mean, new_var

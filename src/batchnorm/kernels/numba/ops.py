"""The formulas kernels inline: two elementwise ones and the per-channel arithmetic.

Elementwise ``op(x, dy, mean, p, q, r)``: the rows and segments pass templates take a
``kind`` (NORMALIZE or GRAD_INPUT, a compile-time constant of the generated kernel, so the
branch in :func:`formula` folds away) and each pass reads only what its formula uses (LLVM
drops the unused loads): one template serves both without a cost. ``kind`` is a number,
not the function itself, so that numba's on-disk cache key (which hashes a closure's
contents) is the same in every process. The per-channel
arithmetic calls :mod:`batchnorm.math` (compiled in :mod:`.config`), so a training pass
finishes in the same compiled call that reduced the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from batchnorm import math
from batchnorm.kernels.numba.cache import cached
from batchnorm.kernels.numba.config import FLAGS, inverse_std, jit

running_stats = jit(math.running_stats)
NORMALIZE, GRAD_INPUT = 0, 1


@jit
def normalize(x: Any, dy: Any, mean: Any, scale: Any, shift: Any, unused: Any) -> Any:
    """``y = (x - mean) * scale + shift`` (forward)."""
    return (x - mean) * scale + shift


@jit
def grad_input(x: Any, dy: Any, mean: Any, a: Any, b: Any, c: Any) -> Any:
    """``dx = a * dy + b * (x - mean) + c`` (backward)."""
    return a * dy + b * (x - mean) + c


@njit(**FLAGS, inline="always")
def formula(kind: int, x: Any, dy: Any, mean: Any, p: Any, q: Any, r: Any) -> Any:
    """The elementwise formula ``kind`` stands for."""
    if kind == NORMALIZE:
        return normalize(x, dy, mean, p, q, r)
    return grad_input(x, dy, mean, p, q, r)


@cached  # called from Python as well as from kernels
@jit
def batch_coefficients(
    mean: Any,
    m2: Any,
    count: float,
    eps: float,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    momentum: float,
    rstd: Any,
    scale: Any,
    shift: Any,
) -> bool:
    """rstd, and normalize's scale and shift, from a training batch's (mean, m2).

    The running statistics (empty arrays: none) are updated only when every channel's mean
    is finite, and the result says so: NaN or inf in x makes the mean non-finite, while a
    finite m2 that overflowed (|x| above ~1e154) only gives rstd = 0, as in PyTorch.
    """
    bad = False
    for c in range(mean.shape[0]):  # no early exit: the loop vectorizes (2x on C = 1024)
        # a comparison, not np.isfinite: numba tests ord(x - x), which reassociation may
        # fold to true (it did for a difference, in rows.columns)
        bad |= not abs(mean[c]) < np.inf
        rstd[c] = inverse_std(m2[c] / count, eps)
        scale[c] = weight[c] * rstd[c]
        shift[c] = bias[c]
    ok = not bad
    if ok:
        update_running(mean, m2, count, running_mean, running_var, momentum)
    return ok


@jit
def update_running(
    mean: Any, m2: Any, count: float, running_mean: Any, running_var: Any, momentum: float
) -> None:
    """The running statistics (empty arrays: none) after a batch's (mean, m2), in place."""
    for c in range(running_mean.shape[0]):
        running_mean[c], running_var[c] = running_stats(
            running_mean[c], running_var[c], mean[c], m2[c], count, momentum
        )


@jit
def eval_coefficients(
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    eps: float,
    mean: Any,
    rstd: Any,
    scale: Any,
    shift: Any,
) -> None:
    """mean, rstd, and normalize's scale and shift, from the running statistics (eval)."""
    for c in range(mean.shape[0]):
        mean[c] = running_mean[c]
        rstd[c] = inverse_std(running_var[c], eps)
        scale[c] = weight[c] * rstd[c]
        shift[c] = bias[c]

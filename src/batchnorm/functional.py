"""Batch normalization over any feature axis, with PyTorch's semantics.

This module is the one place for BN's per-channel math: statistics, the running-average
update, the normalizing affine map and the closed-form backward coefficients. The passes
over the data themselves run in a backend (:mod:`batchnorm.kernels`).

Forward (per channel, over the m values that share it):
``mean``, biased ``var``, ``x_hat = (x - mean) * rstd`` with ``rstd = 1 / sqrt(var + eps)``,
``y = weight * x_hat + bias``. Backward in closed form (docs/derivation.md):
``dx = weight * rstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from batchnorm import kernels
from batchnorm.layout import Layout, view
from batchnorm.math import grad_coefficients, inverse_std, running_stats

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

__all__ = [
    "BatchNormCache",
    "NonFiniteBatchError",
    "StatsSync",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
]


class NonFiniteBatchError(ValueError):
    """A training batch held NaN or inf; the running statistics were left unchanged."""


class StatsSync(Protocol):
    """Combines per-channel partial results across processes (SyncBatchNorm).

    ``merge_stats`` turns this process's (count, mean, m2) into the global ones;
    ``sum_grads`` turns the local (sum_dy, sum_dy_xmu) into global sums.
    """

    def merge_stats(
        self, count: int, mean: np.ndarray, m2: np.ndarray
    ) -> tuple[int, np.ndarray, np.ndarray]: ...

    def sum_grads(
        self, sum_dy: np.ndarray, sum_dy_xmu: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class BatchNormCache:
    """What backward needs from forward. ``x3`` is the input itself, not a copy."""

    layout: Layout
    x3: np.ndarray
    mean: np.ndarray  # float64 (C,), the mean that was subtracted
    rstd: np.ndarray  # float64 (C,)
    weight: np.ndarray | None
    has_bias: bool
    batch_stats: bool  # True: mean/rstd came from this batch, so dx has the two extra terms
    count: int  # values per channel behind mean/rstd (global under SyncBatchNorm)
    backend: str
    sync: StatsSync | None = None


def _float_array(value: Any, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32 or float64), "
            f"got dtype {arr.dtype}"
        )
    return arr


def _channel_vector(value: Any, name: str, channels: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = _float_array(value, name)
    if arr.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) to match the input's channels, got {arr.shape}"
        )
    return arr


def batch_norm_forward(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    backend: str = "auto",
    sync: StatsSync | None = None,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch normalization that also returns what :func:`batch_norm_backward` needs.

    Args:
        x: float16, float32 or float64 array with the channels on ``axis``.
        weight, bias: per-channel scale (gamma) and shift (beta), or None for 1 and 0.
        running_mean, running_var: per-channel buffers. In training they are updated in
            place (``new = (1 - momentum) * old + momentum * batch``; running_var gets the
            unbiased variance); in eval they are the statistics used.
        training: normalize with this batch's statistics (True) or the running ones.
        momentum: weight of the new batch in the running average.
        eps: added to the variance for numerical stability.
        axis: the channel (feature) axis: 1 for (N, C, ...), -1 for channels-last.
        backend: "auto", "numpy" or "numba".
        sync: combines statistics across processes (see :mod:`batchnorm.distributed`).

    Returns:
        ``(y, cache)``: y has x's shape, dtype and memory layout.

    Raises:
        TypeError: x or a per-channel array is not floating point.
        ValueError: bad shapes, a training batch with one value per channel, eval without
            running statistics, or a non-finite value in a training batch (the running
            statistics are left as they were).
    """
    x = _float_array(x, "input")
    layout = view(x, axis)
    channels = x.shape[layout.axis]
    weight = _channel_vector(weight, "weight", channels)
    bias = _channel_vector(bias, "bias", channels)
    running_mean = _channel_vector(running_mean, "running_mean", channels)
    running_var = _channel_vector(running_var, "running_var", channels)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    name = kernels.resolve(backend)
    impl = kernels.get(name, x.dtype)
    x3 = layout.to3d(x, x.dtype)

    count = x3.shape[0] * x3.shape[2]
    fused_y3 = None
    if training:
        done = impl.fused_forward(x3, weight, bias, eps) if sync is None and count > 1 else None
        if done is not None:
            fused_y3, mean, m2 = done
        elif count:
            mean, m2 = impl.channel_stats(x3)
        else:
            mean, m2 = np.zeros(channels), np.zeros(channels)
        if sync is not None:
            count, mean, m2 = sync.merge_stats(count, mean, m2)
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.shape}"
            )
        bad = ~(np.isfinite(mean) & np.isfinite(m2))
        if bad.any():
            raise NonFiniteBatchError(
                f"non-finite values (NaN or inf) in the training batch, channels "
                f"{np.flatnonzero(bad)[:10].tolist()}; running statistics were left unchanged"
            )
        var = m2 / count if count else np.ones(channels)
        if running_mean is not None and running_var is not None and count > 0:
            running_mean[...], running_var[...] = running_stats(
                running_mean, running_var, mean, m2, count, momentum
            )
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        mean = running_mean.astype(np.float64)
        var = running_var.astype(np.float64)

    rstd = inverse_std(var, eps)
    scale = rstd if weight is None else rstd * weight
    shift = np.zeros(channels) if bias is None else bias.astype(np.float64)
    y3 = impl.normalize(x3, mean, scale, shift) if fused_y3 is None else fused_y3
    cache = BatchNormCache(
        layout, x3, mean, rstd, weight, bias is not None, bool(training), count, name, sync
    )
    return layout.from3d(y3), cache


def batch_norm_backward(
    dy: Any, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of the loss with respect to x, weight and bias.

    Returns ``(dx, dweight, dbias)``; dweight (dbias) is None when forward had no weight
    (bias). dx has x's shape and dtype; the parameter gradients are float64 sums over
    this process's values only.
    """
    dy = _float_array(dy, "grad_output")
    layout = cache.layout
    if dy.shape != layout.shape:
        raise ValueError(
            f"grad_output has shape {dy.shape}, expected the input's shape {layout.shape}"
        )
    x3 = cache.x3
    dy3 = layout.to3d(dy, x3.dtype)
    impl = kernels.get(cache.backend, x3.dtype)
    channels = x3.shape[1]
    w = np.ones(channels) if cache.weight is None else cache.weight.astype(np.float64)
    dx3 = None
    sum_dy = sum_dy_xmu = np.zeros(channels)
    if cache.batch_stats and cache.sync is None and x3.size:  # one read of dy and x, where it pays
        done = impl.fused_backward(dy3, x3, cache.mean, cache.rstd, cache.weight, cache.count)
        if done is not None:
            dx3, sum_dy, sum_dy_xmu = done
    if (
        dx3 is None
        and x3.size
        and (cache.batch_stats or cache.weight is not None or cache.has_bias)
    ):
        sum_dy, sum_dy_xmu = impl.grad_sums(dy3, x3, cache.mean)
    dweight = sum_dy_xmu * cache.rstd if cache.weight is not None else None
    dbias = sum_dy.copy() if cache.has_bias else None
    if dx3 is None:
        if cache.batch_stats:
            if cache.sync is not None:
                sum_dy, sum_dy_xmu = cache.sync.sum_grads(sum_dy, sum_dy_xmu)
            a, b, c = grad_coefficients(w, cache.rstd, sum_dy, sum_dy_xmu, max(cache.count, 1))
        else:  # running statistics are constants: dx is dy scaled
            a, b, c = w * cache.rstd, np.zeros(channels), np.zeros(channels)
        dx3 = impl.grad_input(dy3, x3, cache.mean, a, b, c) if x3.size else np.empty_like(x3)
    return layout.from3d(dx3), dweight, dbias


def batch_norm(
    x: Any,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    backend: str = "auto",
) -> np.ndarray:
    """Same meaning as ``torch.nn.functional.batch_norm``; running stats update in place.

    See :func:`batch_norm_forward` for the arguments.
    """
    y, _ = batch_norm_forward(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, backend=backend
    )
    return y

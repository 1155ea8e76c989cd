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
    "backward_3d",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "forward_3d",
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
    """What backward needs from forward.

    ``x`` and ``weight`` are the caller's arrays, held by reference (as PyTorch saves
    tensors): backward reads them as they are then, whatever x's memory layout, so change
    neither between a forward and its backward (PyTorch refuses such changes; this API
    does not check).
    """

    layout: Layout
    x: np.ndarray
    mean: np.ndarray  # float64 (C,), the mean that was subtracted
    rstd: np.ndarray  # float64 (C,)
    weight: np.ndarray | None
    has_bias: bool
    batch_stats: bool  # True: mean/rstd came from this batch, so dx has the two extra terms
    count: int  # values per channel behind mean/rstd (global under SyncBatchNorm)
    backend: str
    sync: StatsSync | None = None

    @property
    def x3(self) -> np.ndarray:
        """x as the kernels see it, ``(outer, C, inner)`` (a view unless x is strided)."""
        return self.layout.to3d(self.x, self.x.dtype)


def _float_array(value: Any, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype not in FLOAT_DTYPES:
        if arr.dtype.kind == "f" and not arr.dtype.isnative and arr.dtype.itemsize <= 8:
            return arr.astype(arr.dtype.newbyteorder("="))  # big-endian: native copy
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


def _running_buffer(value: Any, name: str, channels: int, updated: bool) -> np.ndarray | None:
    """A running buffer: a float ndarray of shape (C,), writable when it will be updated."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array (it is read, and in training updated in place), "
            f"got {type(value).__name__}"
        )
    if value.dtype.kind != "f" or value.dtype.itemsize > 8:
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got {value.dtype}")
    if value.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) to match the input's channels, got {value.shape}"
        )
    if updated and not value.flags.writeable:
        raise ValueError(f"{name} is read-only, but training updates it in place")
    return value


def _check_finite(mean: np.ndarray) -> None:
    """NaN or inf anywhere in a channel makes its mean non-finite (m2 may overflow alone)."""
    if not np.isfinite(mean).all():
        bad = np.flatnonzero(~np.isfinite(mean))
        raise NonFiniteBatchError(
            f"non-finite values (NaN or inf) in the training batch, channels "
            f"{bad[:10].tolist()}; running statistics were left unchanged"
        )


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
        x: float16, float32 or float64 array with the channels on ``axis`` (a non-native
            byte order is converted to a native copy).
        weight, bias: per-channel scale (gamma) and shift (beta), or None for 1 and 0.
        running_mean, running_var: per-channel float ndarrays. In training they are updated
            in place, both or neither (``new = (1 - momentum) * old + momentum * batch``;
            running_var gets the unbiased variance); in eval they are the statistics used.
        training: normalize with this batch's statistics (True) or the running ones.
        momentum: weight of the new batch in the running average (a number; the modules
            turn ``momentum=None`` into ``1 / (num_batches_tracked + 1)``).
        eps: added to the variance for numerical stability; positive in training.
        axis: the channel (feature) axis: 1 for (N, C, ...), -1 for channels-last.
        backend: "auto", "numpy" or "numba".
        sync: combines statistics across processes (see :mod:`batchnorm.distributed`).

    Returns:
        ``(y, cache)``: y has x's shape and dtype, and its memory layout when x is
        C-ordered, Fortran-ordered or channels-last (other strides give C order). The
        cache holds x and weight by reference (see :class:`BatchNormCache`).

    Raises:
        TypeError: x or a per-channel array is not floating point, running statistics
            that are not ndarrays, or a momentum that is not a number.
        ValueError: bad shapes, a training batch with one value per channel, eps <= 0 in
            training, eval without running statistics, read-only running statistics in
            training, or a non-finite value in a training batch (NonFiniteBatchError; the
            running statistics are left as they were).
    """
    x = _float_array(x, "input")
    layout = view(x, axis)
    channels = layout.shape[layout.axis]
    weight = _channel_vector(weight, "weight", channels)
    bias = _channel_vector(bias, "bias", channels)
    running_mean = _running_buffer(running_mean, "running_mean", channels, training)
    running_var = _running_buffer(running_var, "running_var", channels, training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if training and running_mean is not None and not isinstance(momentum, (int, float)):
        raise TypeError(
            f"momentum must be a number, got {momentum!r}; the cumulative average "
            "(momentum=None in the modules) is momentum = 1 / (num_batches_tracked + 1)"
        )
    if not eps > 0 and (training or not eps == 0):
        raise ValueError(f"eps must be positive in training (non-negative in eval), got {eps}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    backend = kernels.resolve(backend)
    y3, mean, rstd, count = forward_3d(
        layout.to3d(x, x.dtype), weight, bias, running_mean, running_var, bool(training),
        momentum, eps, backend, sync, x.shape,
    )  # fmt: skip
    cache = BatchNormCache(
        layout, x, mean, rstd, weight, bias is not None, bool(training), count, backend, sync
    )
    return layout.from3d(y3), cache


def forward_3d(
    x3: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    training: bool,
    momentum: float,
    eps: float,
    backend: str,
    sync: StatsSync | None = None,
    shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The forward on the kernels' view, for callers that made the checks (the torch
    drop-in, whose routing admits only what they would pass): ``(y3, mean, rstd, count)``.

    x3 is the C-contiguous ``(outer, C, inner)`` view of the input (:mod:`batchnorm.layout`),
    the per-channel arrays have shape (C,), the running buffers are writable ndarrays (both
    or neither; required in eval), ``backend`` a resolved name; ``shape`` is the input's, for
    the error message. mean and rstd are float64; count is the values per channel behind them.
    """
    impl = kernels.get(backend, x3.dtype)
    channels = x3.shape[1]
    count = x3.shape[0] * x3.shape[2]
    y3 = None
    if training:
        done = None
        if sync is None and count > 1:
            done = impl.fused_forward(x3, weight, bias, eps, running_mean, running_var, momentum)
        if done is not None:
            y3, mean, _, rstd, finite = done
            if not finite:
                _check_finite(mean)  # raises, naming the channels
        else:
            mean, m2 = impl.channel_stats(x3) if count else (np.zeros(channels),) * 2
            if sync is not None:
                count, mean, m2 = sync.merge_stats(count, mean, m2)
            if count == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size "
                    f"{x3.shape if shape is None else shape}"
                )
            _check_finite(mean)
            with np.errstate(over="ignore"):  # m2 of |x| above ~1e154: rstd 0, as PyTorch
                rstd = inverse_std(m2 / count if count else np.ones(channels), eps)
            if running_mean is not None and running_var is not None and count > 0:
                new_mean, new_var = running_stats(
                    running_mean, running_var, mean, m2, count, momentum
                )
                running_mean[...] = new_mean
                running_var[...] = new_var
    else:
        assert running_mean is not None and running_var is not None
        evaluated = x3.size and impl.fused_eval(x3, weight, bias, running_mean, running_var, eps)
        if evaluated:  # one compiled call, the coefficients included
            y3, mean, rstd = evaluated
        else:
            mean = running_mean.astype(np.float64)
            rstd = inverse_std(running_var.astype(np.float64), eps)

    if y3 is None:
        scale = rstd if weight is None else rstd * weight
        shift = np.zeros(channels) if bias is None else bias.astype(np.float64)
        y3 = impl.normalize(x3, mean, scale, shift)
    return y3, mean, rstd, count


def batch_norm_backward(
    dy: Any, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of the loss with respect to x, weight and bias.

    Returns ``(dx, dweight, dbias)``; dweight (dbias) is None when forward had no weight
    (bias). dx has x's shape, dtype and layout (as y); the parameter gradients are float64
    sums over this process's values only.
    """
    dy = _float_array(dy, "grad_output")
    if dy.shape != cache.layout.shape:
        raise ValueError(
            f"grad_output has shape {dy.shape}, expected the input's shape {cache.layout.shape}"
        )
    layout = cache.layout
    x3 = cache.x3
    dx3, dweight, dbias = backward_3d(
        layout.to3d(dy, x3.dtype), x3, cache.mean, cache.rstd, cache.weight, cache.has_bias,
        cache.batch_stats, cache.count, cache.backend, cache.sync,
    )  # fmt: skip
    assert dx3 is not None
    return layout.from3d(dx3), dweight, dbias


def backward_3d(
    dy3: np.ndarray,
    x3: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None,
    has_bias: bool,
    batch_stats: bool,
    count: int,
    backend: str,
    sync: StatsSync | None = None,
    need_input: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The backward on the kernels' view (:func:`forward_3d`'s counterpart): ``(dx3,
    dweight, dbias)``, dy3 of x3's shape. The fields are :class:`BatchNormCache`'s;
    ``need_input=False`` skips dx (None), leaving the sums pass for the parameters."""
    impl = kernels.get(backend, x3.dtype)
    channels = x3.shape[1]
    dx3 = None
    done = None
    if need_input and batch_stats and sync is None and x3.size:  # one compiled call
        done = impl.fused_backward(dy3, x3, mean, rstd, weight, count)
    if done is not None:
        dx3, sum_dy, sum_dy_xmu = done
    elif x3.size and (need_input and batch_stats or weight is not None or has_bias):
        sum_dy, sum_dy_xmu = impl.grad_sums(dy3, x3, mean)
    else:
        sum_dy = sum_dy_xmu = np.zeros(channels)
    dweight = sum_dy_xmu * rstd if weight is not None else None
    dbias = sum_dy.copy() if has_bias else None
    if dx3 is None and need_input:
        w = np.ones(channels) if weight is None else weight.astype(np.float64)
        if batch_stats:
            if sync is not None:
                sum_dy, sum_dy_xmu = sync.sum_grads(sum_dy, sum_dy_xmu)
            a, b, c = grad_coefficients(w, rstd, sum_dy, sum_dy_xmu, max(count, 1))
        else:  # running statistics are constants: dx is dy scaled
            a, b, c = w * rstd, np.zeros(channels), np.zeros(channels)
        dx3 = impl.grad_input(dy3, x3, mean, a, b, c) if x3.size else np.empty_like(x3)
    return dx3, dweight, dbias


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

"""NumPy kernels: always available, vectorized over blocks of the input.

Each pass walks the ``(outer, C, inner)`` array in blocks of at most ``BLOCK`` elements
and computes in float64 inside a block, so temporaries stay small (cache-sized) whatever
the input size, and float16/float32 data get float64 accumulation for free.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
BLOCK = 1 << 16


def _blocks(shape: tuple[int, ...]) -> Iterator[tuple[slice, slice]]:
    """(outer, channel) slices covering an (outer, C, inner) array in small blocks."""
    outer, channels, inner = shape
    per_channel_rows = max(1, BLOCK // max(1, channels * inner))
    channel_step = channels if channels * inner <= BLOCK else max(1, BLOCK // max(1, inner))
    for o in range(0, outer, per_channel_rows):
        for c in range(0, channels, channel_step):
            yield slice(o, o + per_channel_rows), slice(c, c + channel_step)


def _col(v: np.ndarray, cs: slice) -> np.ndarray:
    return v[cs, None]


@np.errstate(invalid="ignore", over="ignore")  # non-finite data is reported by the caller
def channel_stats(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = x3.shape[0] * x3.shape[2]
    mean = x3.sum(axis=(0, 2), dtype=np.float64) / count
    m2 = np.zeros_like(mean)
    for os_, cs in _blocks(x3.shape):
        d = x3[os_, cs].astype(np.float64) - _col(mean, cs)
        m2[cs] += np.einsum("ijk,ijk->j", d, d)
    return mean, m2


def normalize(x3: np.ndarray, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    y3 = np.empty_like(x3)
    for os_, cs in _blocks(x3.shape):
        d = x3[os_, cs].astype(np.float64) - _col(mean, cs)
        d *= _col(scale, cs)
        d += _col(shift, cs)
        y3[os_, cs] = d
    return y3


def grad_sums(dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sum_dy = dy3.sum(axis=(0, 2), dtype=np.float64)
    sum_dy_xmu = np.zeros_like(sum_dy)
    for os_, cs in _blocks(x3.shape):
        d = x3[os_, cs].astype(np.float64) - _col(mean, cs)
        sum_dy_xmu[cs] += np.einsum("ijk,ijk->j", dy3[os_, cs].astype(np.float64), d)
    return sum_dy, sum_dy_xmu


def grad_input(
    dy3: np.ndarray,
    x3: np.ndarray,
    mean: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
) -> np.ndarray:
    dx3 = np.empty_like(x3)
    for os_, cs in _blocks(x3.shape):
        d = x3[os_, cs].astype(np.float64) - _col(mean, cs)
        d *= _col(b, cs)
        d += _col(c, cs)
        d += dy3[os_, cs] * _col(a, cs)
        dx3[os_, cs] = d
    return dx3


def _decline(*_args: object, **_kwargs: object) -> None:
    """The fused passes decline (None): NumPy makes the separate passes anyway."""
    return None


fused_forward = fused_backward = _decline


# --- fused BN + ReLU (+ residual): used by batchnorm.torch.BatchNormReLU* ----------------------
# z = (x - mean) * scale + shift [+ residual], y = max(z, 0). The backward needs ReLU's mask
# z > 0: from y when there is a residual, else recomputed from x (nothing else is saved).
def normalize_relu(
    x3: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    residual3: np.ndarray | None,
) -> np.ndarray:
    y3 = normalize(x3, mean, scale, shift)
    if residual3 is not None:
        y3 += residual3
    return np.maximum(y3, 0, out=y3)


def _relu_blocks(dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                 shift: np.ndarray, y3: np.ndarray | None,
                 ) -> Iterator[tuple[slice, slice, np.ndarray, np.ndarray]]:
    """Per block: its slices, ``d = x - mean`` (float64) and ``dz = dy`` where z > 0, else 0."""
    for os_, cs in _blocks(x3.shape):
        d = x3[os_, cs].astype(np.float64) - _col(mean, cs)
        keep = y3[os_, cs] > 0 if y3 is not None else d * _col(scale, cs) + _col(shift, cs) > 0
        yield os_, cs, d, np.where(keep, dy3[os_, cs], 0)


def relu_grad_sums(
    dy3: np.ndarray,
    x3: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    y3: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``sum(dz)`` and ``sum(dz * (x - mean))`` with ``dz = dy * (z > 0)``."""
    sum_dz = np.zeros(x3.shape[1])
    sum_dz_xmu = np.zeros(x3.shape[1])
    for _, cs, d, dz in _relu_blocks(dy3, x3, mean, scale, shift, y3):
        dz = dz.astype(np.float64)
        sum_dz[cs] += dz.sum(axis=(0, 2))
        sum_dz_xmu[cs] += np.einsum("ijk,ijk->j", dz, d)
    return sum_dz, sum_dz_xmu


def relu_grad_input(
    dy3: np.ndarray,
    x3: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    y3: np.ndarray | None,
    coefficients: tuple[np.ndarray, np.ndarray, np.ndarray],
    want_dz: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``dx = a * dz + b * (x - mean) + c``, and ``dz`` itself (the residual's gradient)."""
    a, b, c = coefficients
    dx3 = np.empty_like(x3)
    dz3 = np.empty_like(dy3) if want_dz else None
    for os_, cs, d, dz in _relu_blocks(dy3, x3, mean, scale, shift, y3):
        if dz3 is not None:
            dz3[os_, cs] = dz
        d *= _col(b, cs)
        d += _col(c, cs)
        d += dz * _col(a, cs)
        dx3[os_, cs] = d
    return dx3, dz3


fused_forward_relu = fused_backward_relu = _decline

"""NumPy kernels: always available, vectorized over blocks of the input.

Each pass walks the ``(outer, C, inner)`` array in blocks of at most ``BLOCK`` elements
and computes in float64 inside a block, so temporaries stay small (cache-sized) whatever
the input size, and float16/float32 data get float64 accumulation for free.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from batchnorm.kernels import buffers
from batchnorm.kernels.relu import Backward, ReLUPasses

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


def _centered(x3: np.ndarray, mean: np.ndarray) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Per block: its (outer, channel) slices and ``x - mean`` there, in float64."""
    for os_, cs in _blocks(x3.shape):
        yield os_, cs, x3[os_, cs].astype(np.float64) - _col(mean, cs)


@np.errstate(invalid="ignore", over="ignore")  # non-finite data is reported by the caller
def channel_stats(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = x3.shape[0] * x3.shape[2]
    mean = x3.sum(axis=(0, 2), dtype=np.float64) / count
    m2 = np.zeros_like(mean)
    for _, cs, d in _centered(x3, mean):
        m2[cs] += np.einsum("ijk,ijk->j", d, d)
    return mean, m2


def normalize(x3: np.ndarray, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    y3 = buffers.empty_like(x3)
    for os_, cs, d in _centered(x3, mean):
        d *= _col(scale, cs)
        d += _col(shift, cs)
        y3[os_, cs] = d
    return y3


def grad_sums(dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sum_dy = dy3.sum(axis=(0, 2), dtype=np.float64)
    sum_dy_xmu = np.zeros_like(sum_dy)
    for os_, cs, d in _centered(x3, mean):
        sum_dy_xmu[cs] += np.einsum("ijk,ijk->j", dy3[os_, cs].astype(np.float64), d)
    return sum_dy, sum_dy_xmu


def _grad_into(blocks: Iterator[tuple[slice, slice, np.ndarray, np.ndarray]], a: np.ndarray,
               b: np.ndarray, c: np.ndarray, dx3: np.ndarray, dz3: np.ndarray | None) -> None:
    """``dx = a * g + b * (x - mean) + c`` over ``(os, cs, x - mean, g)`` blocks; g (dy, or
    ReLU's dz) is also stored in dz3 unless it is None."""
    for os_, cs, d, g in blocks:
        if dz3 is not None:
            dz3[os_, cs] = g
        d *= _col(b, cs)
        d += _col(c, cs)
        d += g * _col(a, cs)
        dx3[os_, cs] = d


def grad_input(dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray, a: np.ndarray, b: np.ndarray,
               c: np.ndarray) -> np.ndarray:
    dx3 = buffers.empty_like(x3)
    blocks = ((os_, cs, d, dy3[os_, cs]) for os_, cs, d in _centered(x3, mean))
    _grad_into(blocks, a, b, c, dx3, None)
    return dx3


def _decline(*_args: object, **_kwargs: object) -> None:
    """The fused passes decline (None): NumPy makes the separate passes anyway."""
    return None


fused_forward = fused_backward = fused_eval = _decline


# --- fused BN + ReLU (+ residual): used by batchnorm.torch.BatchNormReLU* ----------------------
# (batchnorm.kernels.relu: the shared signatures, and where ReLU's mask comes from)
def _relu_forward(x3: np.ndarray, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                  residual3: np.ndarray | None) -> np.ndarray:
    y3 = normalize(x3, mean, scale, shift)
    if residual3 is not None:
        y3 += residual3
    return np.maximum(y3, 0, out=y3)


def _relu_blocks(g: Backward) -> Iterator[tuple[slice, slice, np.ndarray, np.ndarray]]:
    """Per block: its slices, ``d = x - mean`` (float64) and ``dz = dy`` where z > 0, else 0."""
    for os_, cs, d in _centered(g.x3, g.mean):
        if g.y3 is not None:
            keep = g.y3[os_, cs] > 0
        else:
            keep = d * _col(g.scale, cs) + _col(g.shift, cs) > 0
        yield os_, cs, d, np.where(keep, g.dy3[os_, cs], 0)


def _relu_sums(g: Backward) -> tuple[np.ndarray, np.ndarray]:
    sum_dz = np.zeros(g.x3.shape[1])
    sum_dz_xmu = np.zeros(g.x3.shape[1])
    for _, cs, d, dz in _relu_blocks(g):
        dz = dz.astype(np.float64)
        sum_dz[cs] += dz.sum(axis=(0, 2))
        sum_dz_xmu[cs] += np.einsum("ijk,ijk->j", dz, d)
    return sum_dz, sum_dz_xmu


def _relu_grad_input(g: Backward, a: np.ndarray, b: np.ndarray, c: np.ndarray, dx3: np.ndarray,
                     dz3: np.ndarray | None) -> None:
    _grad_into(_relu_blocks(g), a, b, c, dx3, dz3)


_relu = ReLUPasses(_relu_forward, _relu_sums, _relu_grad_input)
normalize_relu, relu_grad_sums, relu_grad_input = (
    _relu.normalize_relu, _relu.relu_grad_sums, _relu.relu_grad_input)
fused_forward_relu = fused_backward_relu = _decline

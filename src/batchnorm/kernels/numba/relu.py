"""Numba kernels for fused BN + ReLU (+ residual): the NumPy module's passes, in parallel,
behind the entry points of :mod:`batchnorm.kernels.relu` (which says what they compute and
where ReLU's mask comes from).

Training passes (:func:`fused_forward_relu`, :func:`fused_backward_relu`) give each thread
whole channels: a channel's values are read from memory once and the next passes over them
(the squared deviations, then the output; the gradient sums, then dx) come from cache. With
BN then a separate ReLU, the ReLU reads and writes the whole activation once more each way.
They decline (None) for short segments (channels-last, small maps), where the per-pass
kernels below, which split the ``outer`` rows among threads, take over.

Everything computes in float64 and rounds once; the formulas are the ones of
:mod:`batchnorm.math`, compiled from there (``inverse_std``, ``grad_coefficients``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from batchnorm.kernels import buffers
from batchnorm.kernels.numba import config
from batchnorm.kernels.numba.config import FLAGS, Parallel, float64s, per_chunk
from batchnorm.kernels.numba.config import grad_coefficients as _grad_coefficients
from batchnorm.kernels.numba.config import inverse_std as _inverse_std
from batchnorm.kernels.relu import Backward, ReLUPasses, given

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FUSE_MIN_INNER = 64  # shorter segments (channels-last, maps under 8x8) use the per-pass kernels


@njit(**FLAGS)
def _keep(x: Any, y: Any, has_y: bool, o: int, c: int, i: int, m: float, s: float,
          t: float) -> bool:
    """ReLU's mask: y > 0, or z > 0 recomputed from x."""
    if has_y:
        return y[o, c, i] > 0.0
    return (x[o, c, i] - m) * s + t > 0.0


# --- one segment x[o, c, :]: what every kernel below does to the segments it owns -------------
@njit(**FLAGS)
def _segment_relu(x: Any, res: Any, has_res: bool, o: int, c: int, m: float, s: float,
                  t: float, y: Any) -> None:
    for i in range(x.shape[2]):
        v = (x[o, c, i] - m) * s + t
        if has_res:
            v += res[o, c, i]
        y[o, c, i] = v if v > 0.0 else 0.0


@njit(**FLAGS)
def _segment_sums(dy: Any, x: Any, y: Any, has_y: bool, o: int, c: int, m: float, s: float,
                  t: float) -> Any:
    a = 0.0
    b = 0.0
    for i in range(x.shape[2]):
        g = dy[o, c, i] if _keep(x, y, has_y, o, c, i, m, s, t) else 0.0
        a += g
        b += g * (x[o, c, i] - m)
    return a, b


@njit(**FLAGS)
def _segment_dx(dy: Any, x: Any, y: Any, has_y: bool, o: int, c: int, m: float, s: float,
                t: float, k: Any, want_dz: bool, dx: Any, dz: Any) -> None:
    ka, kb, kc = k
    for i in range(x.shape[2]):
        g = dy[o, c, i] if _keep(x, y, has_y, o, c, i, m, s, t) else 0.0
        dx[o, c, i] = ka * g + kb * (x[o, c, i] - m) + kc
        if want_dz:
            dz[o, c, i] = g


# --- per-pass kernels: threads split the outer rows -------------------------------------------
@Parallel
def _normalize_relu(x: Any, mean: Any, scale: Any, shift: Any, res: Any, has_res: bool,
                    y: Any) -> None:
    for o in prange(x.shape[0]):
        for c in range(x.shape[1]):
            _segment_relu(x, res, has_res, o, c, mean[c], scale[c], shift[c], y)


@Parallel
def _relu_grad_sums(dy: Any, x: Any, y: Any, has_y: bool, mean: Any, scale: Any, shift: Any,
                    chunks: int) -> Any:
    outer, channels = x.shape[0], x.shape[1]
    s1 = per_chunk(chunks, channels)
    s2 = per_chunk(chunks, channels)
    step = (outer + chunks - 1) // chunks
    for t in prange(chunks):
        for o in range(t * step, min(outer, (t + 1) * step)):
            for c in range(channels):
                a, b = _segment_sums(dy, x, y, has_y, o, c, mean[c], scale[c], shift[c])
                s1[t, c] += a
                s2[t, c] += b
    return s1[:, :channels].sum(axis=0), s2[:, :channels].sum(axis=0)


@Parallel
def _relu_grad_input(dy: Any, x: Any, y: Any, has_y: bool, mean: Any, scale: Any, shift: Any,
                     a: Any, b: Any, c: Any, want_dz: bool, dx: Any, dz: Any) -> None:
    for o in prange(x.shape[0]):
        for ch in range(x.shape[1]):
            _segment_dx(dy, x, y, has_y, o, ch, mean[ch], scale[ch], shift[ch],
                        (a[ch], b[ch], c[ch]), want_dz, dx, dz)


# --- fused training passes: threads take whole channels ---------------------------------------
@Parallel
def _fused_forward(x: Any, weight: Any, bias: Any, eps: float, res: Any, has_res: bool,
                   y: Any, mean: Any, m2: Any) -> None:
    outer, channels, inner = x.shape
    n = outer * inner
    for c in prange(channels):
        total = 0.0
        for o in range(outer):
            for i in range(inner):
                total += x[o, c, i]
        m = total / n
        q = 0.0
        for o in range(outer):
            for i in range(inner):
                d = x[o, c, i] - m
                q += d * d
        mean[c], m2[c] = m, q
        s = weight[c] * _inverse_std(q / n, eps)
        for o in range(outer):
            _segment_relu(x, res, has_res, o, c, m, s, bias[c], y)


@Parallel
def _fused_backward(dy: Any, x: Any, y: Any, has_y: bool, mean: Any, rstd: Any, weight: Any,
                    bias: Any, count: int, want_dz: bool, dx: Any, dz: Any, s1: Any,
                    s2: Any) -> None:
    outer, channels = x.shape[0], x.shape[1]
    for c in prange(channels):
        m, s, t = mean[c], weight[c] * rstd[c], bias[c]
        a = 0.0
        b = 0.0
        for o in range(outer):
            da, db = _segment_sums(dy, x, y, has_y, o, c, m, s, t)
            a += da
            b += db
        s1[c], s2[c] = a, b
        k = _grad_coefficients(weight[c], rstd[c], a, b, count)
        for o in range(outer):
            _segment_dx(dy, x, y, has_y, o, c, m, s, t, k, want_dz, dx, dz)


# --- the interface: batchnorm.kernels.relu.ReLUPasses over these kernels --------------------------

def _relu_forward(x3: np.ndarray, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                  residual3: np.ndarray | None) -> np.ndarray:
    y3 = buffers.empty_like(x3)
    _normalize_relu(x3, float64s(mean), float64s(scale), float64s(shift), *given(residual3, x3),
                    y3)
    return y3


def _relu_sums(g: Backward) -> tuple[np.ndarray, np.ndarray]:
    chunks = max(1, min(config.num_threads(), g.x3.shape[0]))
    s1, s2 = _relu_grad_sums(g.dy3, g.x3, *given(g.y3, g.x3), float64s(g.mean), float64s(g.scale),
                             float64s(g.shift), chunks)
    return s1, s2


def _relu_input(g: Backward, a: np.ndarray, b: np.ndarray, c: np.ndarray, dx3: np.ndarray,
                dz3: np.ndarray | None) -> None:
    dz, want_dz = given(dz3, dx3)  # dx3 stands in, never written
    _relu_grad_input(g.dy3, g.x3, *given(g.y3, g.x3), float64s(g.mean), float64s(g.scale),
                     float64s(g.shift), float64s(a), float64s(b), float64s(c), want_dz, dx3, dz)


_relu = ReLUPasses(_relu_forward, _relu_sums, _relu_input)
normalize_relu, relu_grad_sums, relu_grad_input = (
    _relu.normalize_relu, _relu.relu_grad_sums, _relu.relu_grad_input)


def _fusable(x3: np.ndarray) -> bool:
    return x3.shape[2] >= FUSE_MIN_INNER and x3.shape[1] >= config.num_threads()


def fused_forward_relu(
    x3: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
    residual3: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Training forward reading x from memory once: ``(y3, mean, m2)``, or None."""
    if not _fusable(x3):
        return None
    channels = x3.shape[1]
    y3 = buffers.empty_like(x3)
    mean, m2 = np.empty(channels), np.empty(channels)
    _fused_forward(x3, float64s(weight), float64s(bias), float(eps), *given(residual3, x3), y3,
                   mean, m2)
    return y3, mean, m2


def fused_backward_relu(
    dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray, rstd: np.ndarray, weight: np.ndarray,
    bias: np.ndarray, y3: np.ndarray | None, count: int, want_dz: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray] | None:
    """Training backward reading dy and x (and y) from memory once:
    ``(dx3, dz3 or None, sum_dz, sum_dz_xmu)``, or None."""
    if not _fusable(x3):
        return None
    channels = x3.shape[1]
    dx3 = buffers.empty_like(x3)
    dz3 = buffers.empty_like(dy3) if want_dz else dx3  # dx3 stands in, never written
    s1, s2 = np.empty(channels), np.empty(channels)
    _fused_backward(dy3, x3, *given(y3, x3), float64s(mean), float64s(rstd), float64s(weight),
                    float64s(bias), count, want_dz, dx3, dz3, s1, s2)
    return dx3, (dz3 if want_dz else None), s1, s2

"""The Numba kernels: parallel CPU passes for float32 and float64.

The :class:`batchnorm.kernels.Kernels` interface over a C-contiguous ``(outer, C, inner)``
array; the package is split by what the kernels do:

- :mod:`.config`: every numba flag, the tuning constants, the serial/parallel wrapper;
- :mod:`.rows`: short inner runs (channels-last, 2-D), vectorized along rows;
- :mod:`.segments`: long inner runs (NCHW), one contiguous segment at a time;
- :mod:`.ops`: the two elementwise formulas both families' pass templates inline;
- :mod:`.fused`: training passes in one compiled call (rows; segments: x read once);
- :mod:`.plan`: rows or segments, chunks, and when fusing pays;
- :mod:`.cache`: compiled kernels kept on disk, safe with many processes at once.

Statistics are exact and stable (two-pass blocks merged with Chan's formula); everything
accumulates in float64. The segments passes compute each element in float64 and round once
to x's dtype; the rows passes compute in x's dtype from coefficients rounded once, the
mean's rounding folded into the constant term (:func:`.rows.columns`). Importing this
package without numba raises ImportError, which :func:`batchnorm.kernels.available` reports
as an absent implementation.
"""

from __future__ import annotations

import numpy as np

from batchnorm.kernels import buffers
from batchnorm.kernels.numba import cache, config, fused, plan, rows, segments
from batchnorm.kernels.numba.config import float64s

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_normalize = {True: rows.normalize, False: segments.normalize}
_grad_input = {True: rows.grad_input, False: segments.grad_input}
_NONE = np.empty(0)  # no running buffers


def _same(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous array of ``like``'s dtype (no copy when it already is)."""
    return np.ascontiguousarray(a, dtype=like.dtype)


def channel_stats(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x3 = np.ascontiguousarray(x3)
    outer, channels, inner = x3.shape
    x = x3.reshape(-1)
    if plan.rows_for_stats(x3):
        chunks = plan.chunks(x3, rows=True)
        return rows.stats(x, outer, channels, inner, plan.by_columns(x3, chunks), chunks)  # type: ignore[no-any-return]
    return segments.stats(x, outer, channels, inner, config.BLOCK, plan.chunks(x3))  # type: ignore[no-any-return]


def normalize(x3: np.ndarray, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    x3 = np.ascontiguousarray(x3)
    out = buffers.empty_like(x3)
    x = x3.reshape(-1)
    shift = float64s(shift)
    _normalize[plan.use_rows(x3)](
        x, x, float64s(mean), float64s(scale), shift, shift, out.reshape(-1), *x3.shape,
        plan.chunks(x3),
    )
    return out


def grad_sums(dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x3 = np.ascontiguousarray(x3)
    dy3 = _same(dy3, x3)
    chunks = plan.chunks(x3)
    if plan.use_rows(x3):
        by_columns = plan.by_columns(x3, chunks)
        return rows.grad_sums(  # type: ignore[no-any-return]
            dy3.reshape(-1), x3.reshape(-1), float64s(mean), *x3.shape, by_columns, chunks
        )
    return segments.grad_sums(  # type: ignore[no-any-return]
        dy3.reshape(-1), x3.reshape(-1), float64s(mean), *x3.shape, chunks
    )


def grad_input(
    dy3: np.ndarray,
    x3: np.ndarray,
    mean: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
) -> np.ndarray:
    x3 = np.ascontiguousarray(x3)
    dy3 = _same(dy3, x3)
    out = buffers.empty_like(x3)
    args = (float64s(mean), float64s(a), float64s(b), float64s(c), out.reshape(-1))
    _grad_input[plan.use_rows(x3)](
        x3.reshape(-1), dy3.reshape(-1), *args, *x3.shape, plan.chunks(x3)
    )
    return out


def _running(a: np.ndarray | None) -> np.ndarray:
    """A running buffer the kernels can update in place (a float64 copy where it is not)."""
    if a is None:
        return _NONE
    if a.dtype in DTYPES and a.flags.c_contiguous and a.flags.writeable:
        return a
    return float64s(a)


def fused_forward(
    x3: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    momentum: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool] | None:
    """Training forward in one compiled call: ``(y3, mean, m2, rstd, finite)``, or None to
    decline.

    Rows layouts always; segments where reading x once pays (:func:`.plan.fusable`).
    """
    chunks, group, by_columns, one_region = plan.fused(x3, 1)
    if not chunks:
        return None
    outer, channels, inner = x3.shape
    w = np.ones(channels) if weight is None else float64s(weight)
    b = np.zeros(channels) if bias is None else float64s(bias)
    rm, rv = _running(running_mean), _running(running_var)
    x = np.ascontiguousarray(x3).reshape(-1)
    y3 = buffers.empty_like(x3)
    mean, m2, rstd = np.empty(channels), np.empty(channels), np.empty(channels)
    ok = fused.forward[group == 0](
        x, w, b, float(eps), rm, rv, float(momentum), y3.reshape(-1), mean, m2, rstd,
        outer, channels, inner, group, config.BLOCK, by_columns, one_region, chunks,
    )  # fmt: skip
    if ok:
        for given, used in ((running_mean, rm), (running_var, rv)):
            if given is not None and used is not given:
                given[...] = used
    return y3, mean, m2, rstd, bool(ok)


def fused_backward(
    dy3: np.ndarray,
    x3: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None,
    count: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Training backward in one compiled call: ``(dx3, sum_dy, sum_dy_xmu)``, or None.

    Rows layouts always; segments where reading dy and x once pays.
    """
    chunks, group, by_columns, one_region = plan.fused(x3, 2)
    if not chunks:
        return None
    x = np.ascontiguousarray(x3)
    dy = _same(dy3, x)
    channels = x3.shape[1]
    w = np.ones(channels) if weight is None else float64s(weight)
    dx3 = buffers.empty_like(x)
    sum_dy = np.empty(channels)
    sum_dy_xmu = np.empty(channels)
    args = (
        dy.reshape(-1), x.reshape(-1), float64s(mean), float64s(rstd), w, dx3.reshape(-1),
        sum_dy, sum_dy_xmu, float(max(count, 1)), *x3.shape,
    )  # fmt: skip
    fused.backward[group == 0](*args, group, by_columns, one_region, chunks)
    return dx3, sum_dy, sum_dy_xmu


def fused_eval(
    x3: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eval forward in one compiled call, the coefficients included: ``(y3, mean, rstd)``."""
    x3 = np.ascontiguousarray(x3)
    outer, channels, inner = x3.shape
    w = np.ones(channels) if weight is None else float64s(weight)
    b = np.zeros(channels) if bias is None else float64s(bias)
    y3 = buffers.empty_like(x3)
    mean, rstd = np.empty(channels), np.empty(channels)
    by_rows = plan.rows_for_eval(x3)
    fused.evaluate[by_rows](
        x3.reshape(-1), w, b, float(eps), float64s(running_mean), float64s(running_var),
        y3.reshape(-1), mean, rstd, outer, channels, inner, plan.chunks(x3, by_rows),
    )  # fmt: skip
    return y3, mean, rstd


def warm_up(dtypes: tuple[str, ...] = ("float32", "float64")) -> dict[str, object]:
    """Compile (or load from the cache) every kernel, serial and parallel, for ``dtypes``.

    Tiny arrays through every path: rows and segments, fused and not, one chunk and two.
    Returns :func:`.cache.info` afterwards.
    """
    saved = {k: getattr(config, k) for k in ("CHUNKS", "FUSE_RUN_BYTES", "FUSE_MIN_RUN_BYTES")}
    try:
        config.FUSE_RUN_BYTES, config.FUSE_MIN_RUN_BYTES = 64, 8  # tiny arrays fuse too
        for chunks in (1, 2):
            config.CHUNKS = chunks
            for dtype in dtypes:
                for shape in ((8, 2, 1), (4, 2, 64)):  # rows, segments (eval too)
                    x = np.linspace(0.0, 1.0, int(np.prod(shape)), dtype=dtype).reshape(shape)
                    mean, m2 = channel_stats(x)
                    ones = np.ones(shape[1])
                    normalize(x, mean, ones, ones)
                    grad_sums(x, x, mean)
                    grad_input(x, x, mean, ones, ones, ones)
                    for running in (None, np.ones(shape[1], dtype)):
                        fused_forward(x, None, None, 1e-5, running, running, 0.1)
                    fused_backward(x, x, mean, ones, None, shape[0] * shape[2])
                    fused_eval(x, None, None, mean, ones, 1e-5)
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
    return cache.info()

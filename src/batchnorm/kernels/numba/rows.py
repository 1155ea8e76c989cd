"""Rows kernels: ``inner < ROWS_MAX_INNER`` (channels-last, 2-D ``(N, C)``, 3x3 maps), and
maps up to ``ROWS_FALLBACK_INNER`` values that the fused segments passes decline
(:func:`.plan.use_rows`).

The array is ``outer`` rows of ``W = C * inner`` columns. A thread takes a block of rows and
accumulates per column, vectorized along the row; columns fold into channels and threads
merge their partials at the end. With few rows (:func:`.plan.by_columns`) the reductions
give a thread every row of a block of columns instead (:func:`span`), and nothing is merged
across threads; the elementwise passes always go by rows. Statistics take eight rows at a
time in registers (an exact two-pass over the eight) and merge them, columns and threads
with Chan's formula (:func:`batchnorm.math.chan_merge_step`), reading x from memory once.
The gradient sums take eight rows a sweep too (one load and store of a column's sums per
eight values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from batchnorm.kernels.numba import ops
from batchnorm.kernels.numba.config import (
    FLAGS,
    Kernel,
    U,
    chan_merge_step,
    distinct_name,
    jit,
    per_chunk,
    renamed,
)


@jit
def _merge_into(n_a: Any, mean: Any, m2: Any, n_b: Any, mean_b: Any, m2_b: Any) -> Any:
    """Merge (n_b, mean_b, m2_b) into (n_a, mean, m2) in place, vectors of equal length."""
    if n_b == 0:
        return n_a
    for j in range(mean.shape[0]):
        _, mean[j], m2[j] = chan_merge_step(n_a, mean[j], m2[j], n_b, mean_b[j], m2_b[j])
    return n_a + n_b


@jit
def _fold_columns(n: Any, mean_w: Any, m2_w: Any, channels: int, inner: int) -> Any:
    """Columns c*inner + i (i < inner), each with n values, folded into channel c."""
    if inner == 1:  # 2-D and channels-last: a column is a channel
        return mean_w, m2_w
    mean = np.empty(channels)
    m2 = np.empty(channels)
    for c in range(channels):
        s = 0.0
        for i in range(inner):
            s += mean_w[c * inner + i]
        mc = s / inner
        q = 0.0
        for i in range(inner):
            d = mean_w[c * inner + i] - mc
            q += m2_w[c * inner + i] + n * d * d
        mean[c] = mc
        m2[c] = q
    return mean, m2


@jit
def fold_sums(sums: Any, channels: int, inner: int) -> Any:
    """(T, C*inner) partial sums -> (C,) totals."""
    out = np.zeros(channels)
    for t in range(sums.shape[0]):
        for c in range(channels):
            s = 0.0
            for i in range(inner):
                s += sums[t, c * inner + i]
            out[c] += s
    return out


@jit
def _four_rows(r: int, width: int) -> Any:
    """Flat offsets of rows r .. r+3 (the four-row sweeps below)."""
    b0 = U(r * width)
    b1 = b0 + U(width)
    b2 = b1 + U(width)
    return b0, b1, b2, b2 + U(width)


@jit
def span(t: int, chunks: int, outer: int, width: int, by_columns: bool) -> Any:
    """Chunk t's rows [r0, r1) and columns [j0, j1): a block of rows and every column, or
    (``by_columns``) every row and a block of columns, its edges on multiples of 16 columns
    (a cache line of float32) so that no two threads write one line of the outputs."""
    if not by_columns:
        return outer * t // chunks, outer * (t + 1) // chunks, 0, width
    j0 = 0 if t == 0 else width * t // chunks // 16 * 16
    j1 = width if t == chunks - 1 else width * (t + 1) // chunks // 16 * 16
    return 0, outer, j0, j1


@jit
def chunk_stats(x: Any, r: int, r_end: int, width: int, j0: int, mean: Any, m2: Any) -> Any:
    """Per-column (mean, m2) of rows [r, r_end) of columns j0 .. j0 + len(mean) - 1,
    written into mean/m2; returns the row count.

    Eight rows at a time, held in registers: their exact two-pass (mean, m2) per column,
    merged into the running column statistics by Chan's formula (the weights f and g of
    :func:`batchnorm.math.chan_merge_step`, alike for every column, are computed once per
    sweep). x is read from memory once. Leftover rows merge one at a time.
    """
    n = 0.0
    while r + 8 <= r_end:
        b0, b1, b2, b3 = _four_rows(r, width)
        b4, b5, b6, b7 = _four_rows(r + 4, width)
        f = 8.0 / (n + 8.0)  # the block's weight in the merged mean
        g = n * f  # n * 8 / (n + 8), the weight of the squared mean difference
        for j in range(mean.shape[0]):
            u = U(j0 + j)
            v0, v1 = np.float64(x[b0 + u]), np.float64(x[b1 + u])
            v2, v3 = np.float64(x[b2 + u]), np.float64(x[b3 + u])
            v4, v5 = np.float64(x[b4 + u]), np.float64(x[b5 + u])
            v6, v7 = np.float64(x[b6 + u]), np.float64(x[b7 + u])
            bm = (((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))) * 0.125
            d0, d1, d2, d3 = v0 - bm, v1 - bm, v2 - bm, v3 - bm
            d4, d5, d6, d7 = v4 - bm, v5 - bm, v6 - bm, v7 - bm
            q = ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + (
                (d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)
            )
            if n == 0.0:  # loop-invariant: LLVM unswitches it; 0 * inf would be NaN
                mean[j] = bm
                m2[j] = q
            else:
                delta = bm - mean[j]
                mean[j] += delta * f
                m2[j] += q + delta * delta * g
        n += 8.0
        r += 8
    while r < r_end:
        b0 = U(r * width + j0)
        f = 1.0 / (n + 1.0)
        g = n * f
        for j in range(mean.shape[0]):
            if n == 0.0:
                mean[j] = x[b0 + U(j)]
                m2[j] = 0.0
            else:
                delta = x[b0 + U(j)] - mean[j]
                mean[j] += delta * f
                m2[j] += delta * delta * g
        n += 1.0
        r += 1
    return n


@jit
def merge_chunks(counts: Any, means: Any, m2s: Any, channels: int, inner: int) -> Any:
    """Per-channel (mean, m2) from the chunks' per-column partials."""
    n = counts[0]
    mean_w = means[0].copy()
    m2_w = m2s[0].copy()
    for t in range(1, counts.shape[0]):
        n = _merge_into(n, mean_w, m2_w, counts[t], means[t], m2s[t])
    return _fold_columns(n, mean_w, m2_w, channels, inner)


def _stats(x: Any, outer: int, channels: int, inner: int, by_columns: bool, chunks: int) -> Any:
    width = channels * inner
    if by_columns:  # every thread all rows of its columns: no partials to merge
        mean_w = np.empty(width)
        m2_w = np.empty(width)
        for t in prange(chunks):
            r0, r1, j0, j1 = span(t, chunks, outer, width, True)
            chunk_stats(x, r0, r1, width, j0, mean_w[j0:j1], m2_w[j0:j1])
        return _fold_columns(float(outer), mean_w, m2_w, channels, inner)
    means = per_chunk(chunks, width)
    m2s = per_chunk(chunks, width)
    counts = np.zeros(chunks)
    for t in prange(chunks):
        r0, r1, _, _ = span(t, chunks, outer, width, False)
        counts[t] = chunk_stats(x, r0, r1, width, 0, means[t, :width], m2s[t, :width])
    return merge_chunks(counts, means[:, :width], m2s[:, :width], channels, inner)


@jit
def chunk_grad_sums(
    dy: Any, x: Any, mean_w: Any, r: int, r_end: int, width: int, j0: int, a: Any, b: Any
) -> None:
    """Per-column sum(dy) and sum(dy * (x - mean)) over rows [r, r_end) of columns
    j0 .. j0 + len(a) - 1 (``mean_w`` theirs), added into a and b."""
    while r + 8 <= r_end:  # eight rows per sweep: one load/store of a and b per eight values
        b0, b1, b2, b3 = _four_rows(r, width)
        b4, b5, b6, b7 = _four_rows(r + 4, width)
        for j in range(a.shape[0]):
            u = U(j0 + j)
            m = mean_w[j]
            g0, g1 = np.float64(dy[b0 + u]), np.float64(dy[b1 + u])
            g2, g3 = np.float64(dy[b2 + u]), np.float64(dy[b3 + u])
            g4, g5 = np.float64(dy[b4 + u]), np.float64(dy[b5 + u])
            g6, g7 = np.float64(dy[b6 + u]), np.float64(dy[b7 + u])
            a[j] += ((g0 + g1) + (g2 + g3)) + ((g4 + g5) + (g6 + g7))
            b[j] += (
                (g0 * (x[b0 + u] - m) + g1 * (x[b1 + u] - m))
                + (g2 * (x[b2 + u] - m) + g3 * (x[b3 + u] - m))
            ) + (
                (g4 * (x[b4 + u] - m) + g5 * (x[b5 + u] - m))
                + (g6 * (x[b6 + u] - m) + g7 * (x[b7 + u] - m))
            )
        r += 8
    while r < r_end:
        b0 = U(r * width + j0)
        for j in range(a.shape[0]):
            g = np.float64(dy[b0 + U(j)])
            a[j] += g
            b[j] += g * (x[b0 + U(j)] - mean_w[j])
        r += 1


def _grad_sums(
    dy: Any, x: Any, mean: Any, outer: int, channels: int, inner: int, by_columns: bool,
    chunks: int,
) -> Any:  # fmt: skip
    width = channels * inner
    mean_w = np.repeat(mean, inner)
    rows_of = 1 if by_columns else chunks  # by columns: one row of sums, each thread its part
    sdy = per_chunk(rows_of, width)
    sdx = per_chunk(rows_of, width)
    for t in prange(chunks):
        r0, r1, j0, j1 = span(t, chunks, outer, width, by_columns)
        k = t % rows_of  # the row of sums: 0 by columns, else the chunk's own
        chunk_grad_sums(dy, x, mean_w[j0:j1], r0, r1, width, j0, sdy[k, j0:j1], sdx[k, j0:j1])
    return fold_sums(sdy[:, :width], channels, inner), fold_sums(sdx[:, :width], channels, inner)


@njit(inline="always", **FLAGS)
def block(
    kind: int, x: Any, dy: Any, m: Any, p: Any, q: Any, r: Any, out: Any, first: int, end: int,
    width: int, j0: int,
) -> None:  # fmt: skip
    """``out = formula(x, dy, m, p, q, r)`` over rows [first, end) of columns j0 ..
    j0 + len(m) - 1, rows ``width`` long, per-column vectors. Inlined, so that ``kind``, a
    constant where it is called, folds away."""
    # last row first: the statistics or sums pass before this one went first to last, so the
    # rows it read last are the ones still in cache (pays where a thread's rows outgrow L2;
    # docs/performance.md)
    for k in range(end - first):
        base = U((end - 1 - k) * width + j0)
        for j in range(m.shape[0]):
            i = base + U(j)
            out[i] = ops.formula(kind, x[i], dy[i], m[j], p[j], q[j], r[j])


def apply(kind: int) -> Any:
    """Compiled ``out = formula(x, dy, mean, p, q, r)`` over chunk t's rows, per-column vectors.

    One template for normalize and grad_input (``kind``, see :mod:`.ops`), each compiled as
    if written out. The vectors come from :func:`columns`, in x's dtype.
    """

    def chunk(
        x: Any, dy: Any, m: Any, p: Any, q: Any, r: Any, out: Any, outer: int, t: int, chunks: int
    ) -> None:
        width = m.shape[0]
        first, end, _, _ = span(t, chunks, outer, width, False)  # the reductions' rows
        block(kind, x, dy, m, p, q, r, out, first, end, width, 0)

    return jit(renamed(chunk, distinct_name(chunk)))


@jit
def columns(kind: int, x: Any, mean: Any, p: Any, q: Any, r: Any, inner: int) -> Any:
    """Per-channel float64 (mean, p, q, r) as per-column vectors in x's dtype.

    The rows passes compute in x's dtype: a column's coefficients are loaded once per row,
    and float64 ones (converted, four to a vector) slowed a float32 pass
    (docs/performance.md). The mean is rounded to x's dtype and its rounding folded into
    the constant term (``q`` of normalize, ``r`` of grad_input), so ``x - mean`` keeps its
    digits when the mean is large: the result is within a few of x's ulps of the largest
    term.
    """
    channels = mean.shape[0]
    m = np.empty(channels, x.dtype)
    pw = np.empty(channels, x.dtype)
    qw = np.empty(channels, x.dtype)
    rw = np.empty(channels, x.dtype)
    for c in range(channels):
        m[c] = mean[c]
        # (x - m) = (x - mean) + (m - mean): the constant term pays the rounding back. A mean
        # that is not finite, or overflows x's dtype, has no rounding to pay: inf stays inf
        # (as the float64 formula gives) instead of becoming inf - inf = NaN
        off = m[c] - mean[c]
        if not abs(off) < np.inf:  # not np.isfinite: see ops.batch_coefficients
            off = 0.0
        pw[c] = p[c]
        qw[c] = q[c] + off * p[c] if kind == ops.NORMALIZE else q[c]
        rw[c] = r[c] if kind == ops.NORMALIZE else r[c] + off * q[c]
    if inner == 1:
        return m, pw, qw, rw
    return np.repeat(m, inner), np.repeat(pw, inner), np.repeat(qw, inner), np.repeat(rw, inner)


normalize_chunk = apply(ops.NORMALIZE)
grad_input_chunk = apply(ops.GRAD_INPUT)


def elementwise(kind: int) -> Kernel:
    """The rows pass of formula ``kind`` with per-channel mean, p, q, r."""

    def body(
        x: Any,
        dy: Any,
        mean: Any,
        p: Any,
        q: Any,
        r: Any,
        out: Any,
        outer: int,
        channels: int,
        inner: int,
        chunks: int,
    ) -> None:
        m, pw, qw, rw = columns(kind, x, mean, p, q, r, inner)
        for t in prange(chunks):
            if kind == ops.NORMALIZE:
                normalize_chunk(x, dy, m, pw, qw, rw, out, outer, t, chunks)
            else:
                grad_input_chunk(x, dy, m, pw, qw, rw, out, outer, t, chunks)

    return Kernel(body)


stats = Kernel(_stats)
grad_sums = Kernel(_grad_sums)
# the same bodies inlined into the fused kernels (their prange loops become the caller's)
stats_inline = njit(inline="always", **FLAGS)(_stats)
grad_sums_inline = njit(inline="always", **FLAGS)(_grad_sums)
normalize = elementwise(ops.NORMALIZE)
grad_input = elementwise(ops.GRAD_INPUT)

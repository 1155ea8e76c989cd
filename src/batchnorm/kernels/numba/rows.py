"""Rows kernels: ``inner < ROWS_MAX_INNER`` (channels-last, 2-D ``(N, C)``, 3x3 maps).

The array is ``outer`` rows of ``W = C * inner`` columns. A thread takes a block of rows and
accumulates per column, vectorized along the row; columns fold into channels and threads
merge their partials at the end. Statistics reduce each block of rows in two passes (sum,
then squared deviations from the block's own mean, the second pass reading from cache) and
merge blocks, columns and threads with Chan's formula (:func:`batchnorm.math.chan_merge_step`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from batchnorm.kernels.numba import ops
from batchnorm.kernels.numba.config import FLAGS, Kernel, U, chan_merge_step, jit


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
def _stats_chunk(
    x: Any, width: int, r0: int, r1: int, block: int, mean: Any, m2: Any, s: Any, q: Any
) -> Any:
    """Per-column (mean, m2) of rows r0:r1 into mean/m2 (zeroed); returns the row count."""
    n = 0.0
    r = r0
    while r < r1:
        re = min(r + block, r1)
        nb = float(re - r)
        # four rows per sweep: one load/store of the float64 accumulator per four values
        s[:] = 0.0
        rr = r
        while rr + 4 <= re:
            b0, b1, b2, b3 = _four_rows(rr, width)
            for j in range(width):
                u = U(j)
                s[j] += (np.float64(x[b0 + u]) + x[b1 + u]) + (np.float64(x[b2 + u]) + x[b3 + u])
            rr += 4
        while rr < re:
            b0 = U(rr * width)
            for j in range(width):
                s[j] += x[b0 + U(j)]
            rr += 1
        inv = 1.0 / nb
        for j in range(width):
            s[j] *= inv
        q[:] = 0.0
        rr = r
        while rr + 4 <= re:
            b0, b1, b2, b3 = _four_rows(rr, width)
            for j in range(width):
                u = U(j)
                m = s[j]
                d0 = x[b0 + u] - m
                d1 = x[b1 + u] - m
                d2 = x[b2 + u] - m
                d3 = x[b3 + u] - m
                q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            rr += 4
        while rr < re:
            b0 = U(rr * width)
            for j in range(width):
                d = x[b0 + U(j)] - s[j]
                q[j] += d * d
            rr += 1
        n = _merge_into(n, mean, m2, nb, s, q)
        r = re
    return n


@jit
def chunk_stats(
    x: Any, outer: int, width: int, block: int, t: int, chunks: int, mean: Any, m2: Any
) -> Any:
    """Chunk t's per-column (mean, m2) into mean/m2 (zeroed); returns its row count."""
    s = np.empty(width)
    q = np.empty(width)
    return _stats_chunk(
        x, width, outer * t // chunks, outer * (t + 1) // chunks, block, mean, m2, s, q
    )


@jit
def merge_chunks(counts: Any, means: Any, m2s: Any, channels: int, inner: int) -> Any:
    """Per-channel (mean, m2) from the chunks' per-column partials."""
    width = channels * inner
    n = 0.0
    mean_w = np.zeros(width)
    m2_w = np.zeros(width)
    for t in range(counts.shape[0]):
        n = _merge_into(n, mean_w, m2_w, counts[t], means[t], m2s[t])
    return _fold_columns(n, mean_w, m2_w, channels, inner)


def _stats(x: Any, outer: int, channels: int, inner: int, block: int, chunks: int) -> Any:
    width = channels * inner
    means = np.zeros((chunks, width))
    m2s = np.zeros((chunks, width))
    counts = np.zeros(chunks)
    for t in prange(chunks):
        counts[t] = chunk_stats(x, outer, width, block, t, chunks, means[t], m2s[t])
    return merge_chunks(counts, means, m2s, channels, inner)


@jit
def chunk_grad_sums(
    dy: Any, x: Any, mean_w: Any, outer: int, t: int, chunks: int, a: Any, b: Any
) -> None:
    """Chunk t's per-column sum(dy) and sum(dy * (x - mean)) added into a and b."""
    width = mean_w.shape[0]
    r = outer * t // chunks
    r_end = outer * (t + 1) // chunks
    while r + 4 <= r_end:  # four rows per sweep, as in _stats_chunk
        b0, b1, b2, b3 = _four_rows(r, width)
        for j in range(width):
            u = U(j)
            m = mean_w[j]
            g0 = np.float64(dy[b0 + u])
            g1 = np.float64(dy[b1 + u])
            g2 = np.float64(dy[b2 + u])
            g3 = np.float64(dy[b3 + u])
            a[j] += (g0 + g1) + (g2 + g3)
            b[j] += (g0 * (x[b0 + u] - m) + g1 * (x[b1 + u] - m)) + (
                g2 * (x[b2 + u] - m) + g3 * (x[b3 + u] - m)
            )
        r += 4
    while r < r_end:
        b0 = U(r * width)
        for j in range(width):
            g = np.float64(dy[b0 + U(j)])
            a[j] += g
            b[j] += g * (x[b0 + U(j)] - mean_w[j])
        r += 1


def _grad_sums(
    dy: Any, x: Any, mean: Any, outer: int, channels: int, inner: int, chunks: int
) -> Any:
    width = channels * inner
    mean_w = np.repeat(mean, inner)
    sdy = np.zeros((chunks, width))
    sdx = np.zeros((chunks, width))
    for t in prange(chunks):
        chunk_grad_sums(dy, x, mean_w, outer, t, chunks, sdy[t], sdx[t])
    return fold_sums(sdy, channels, inner), fold_sums(sdx, channels, inner)


def apply(kind: int) -> Any:
    """Compiled ``out = formula(x, dy, mean, p, q, r)`` over chunk t's rows, per-column vectors.

    One template for normalize and grad_input (``kind``, see :mod:`.ops`), each compiled as
    if written out.
    """

    def chunk(
        x: Any, dy: Any, m: Any, p: Any, q: Any, r: Any, out: Any, outer: int, t: int, chunks: int
    ) -> None:
        width = m.shape[0]
        for row in range(outer * t // chunks, outer * (t + 1) // chunks):
            base = U(row * width)
            for j in range(width):
                i = base + U(j)
                out[i] = ops.formula(kind, x[i], dy[i], m[j], p[j], q[j], r[j])

    return jit(chunk)


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
        m = np.repeat(mean, inner)
        pw = np.repeat(p, inner)
        qw = np.repeat(q, inner)
        rw = np.repeat(r, inner)
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

"""Segments kernels: ``inner >= ROWS_MAX_INNER`` (contiguous NCHW, also 7x7 maps) where
:func:`.plan.use_rows` does not choose the rows kernels.

The array is ``outer * C`` contiguous segments ``x3[o, c, :]``. A thread takes a contiguous
range of segments (so channels and batch rows are split alike, which keeps both threads busy
whether C is 3 or 2048) and keeps float64 partials per channel. Statistics reduce each
cache-sized block of a segment in two passes and merge blocks and threads with Chan's
formula (:func:`batchnorm.math.chan_merge_step`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from batchnorm.kernels.numba import ops
from batchnorm.kernels.numba.config import (
    Kernel,
    U,
    chan_merge_step,
    distinct_name,
    jit,
    per_chunk,
    renamed,
)


@jit
def block_stats(x: Any, start: int, size: int) -> Any:
    """(mean, m2) of x[start:start + size] by two passes (the second one reads from cache)."""
    base = U(start)
    s = 0.0
    for i in range(size):
        s += x[base + U(i)]
    bm = s / size
    q = 0.0
    for i in range(size):
        d = x[base + U(i)] - bm
        q += d * d
    return bm, q


@jit
def segment_stats(x: Any, start: int, size: int, block: int) -> Any:
    """(mean, m2) of x[start:start + size]: two-pass blocks merged with Chan's formula."""
    if size <= block:
        return block_stats(x, start, size)
    n = 0.0
    mu = 0.0
    q = 0.0
    for b0 in range(0, size, block):
        nb = min(block, size - b0)
        bm, bq = block_stats(x, start + b0, nb)
        n, mu, q = chan_merge_step(n, mu, q, float(nb), bm, bq)
    return mu, q


def _stats(x: Any, outer: int, channels: int, inner: int, block: int, chunks: int) -> Any:
    segs = outer * channels
    cnts = per_chunk(chunks, channels)
    means = per_chunk(chunks, channels)
    m2s = per_chunk(chunks, channels)
    for t in prange(chunks):
        k0 = segs * t // chunks
        c = k0 % channels  # then counted along (see elementwise)
        for k in range(k0, segs * (t + 1) // chunks):
            bm, q = segment_stats(x, k * inner, inner, block)
            cnts[t, c], means[t, c], m2s[t, c] = chan_merge_step(
                cnts[t, c], means[t, c], m2s[t, c], float(inner), bm, q
            )
            c = 0 if c == channels - 1 else c + 1
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    n = np.zeros(channels)
    for t in range(chunks):
        for c in range(channels):
            if cnts[t, c] > 0:
                n[c], mean[c], m2[c] = chan_merge_step(
                    n[c], mean[c], m2[c], cnts[t, c], means[t, c], m2s[t, c]
                )
    return mean, m2


def _grad_sums(
    dy: Any, x: Any, mean: Any, outer: int, channels: int, inner: int, chunks: int
) -> Any:
    segs = outer * channels
    sdy = per_chunk(chunks, channels)
    sdx = per_chunk(chunks, channels)
    for t in prange(chunks):
        k0 = segs * t // chunks
        c = k0 % channels  # then counted along (see elementwise)
        for k in range(k0, segs * (t + 1) // chunks):
            base = U(k * inner)
            m = mean[c]
            a = 0.0
            b = 0.0
            for i in range(inner):
                g = np.float64(dy[base + U(i)])
                a += g
                b += g * (x[base + U(i)] - m)
            sdy[t, c] += a
            sdx[t, c] += b
            c = 0 if c == channels - 1 else c + 1
    return sdy[:, :channels].sum(axis=0), sdx[:, :channels].sum(axis=0)


def apply(kind: int) -> Any:
    """Compiled ``out = formula(x, dy, mean, p, q, r)`` over chunk t's segments, per-channel
    mean, p, q, r. One template for normalize and grad_input (``kind``, see :mod:`.ops`)."""

    def chunk(
        x: Any, dy: Any, mean: Any, p: Any, q: Any, r: Any, out: Any, outer: int,
        channels: int, inner: int, t: int, chunks: int,
    ) -> None:  # fmt: skip
        segs = outer * channels
        k0 = segs * t // chunks
        c = k0 % channels  # then counted along: a division a segment slowed short ones
        for k in range(k0, segs * (t + 1) // chunks):
            mc = mean[c]
            pc = p[c]
            qc = q[c]
            rc = r[c]
            base = U(k * inner)
            for j in range(inner):
                i = base + U(j)
                out[i] = ops.formula(kind, x[i], dy[i], mc, pc, qc, rc)
            c = 0 if c == channels - 1 else c + 1

    return jit(renamed(chunk, distinct_name(chunk)))


normalize_chunk = apply(ops.NORMALIZE)
grad_input_chunk = apply(ops.GRAD_INPUT)


def elementwise(kind: int) -> Kernel:
    """The segments pass of formula ``kind`` with per-channel mean, p, q, r."""

    def body(
        x: Any, dy: Any, mean: Any, p: Any, q: Any, r: Any, out: Any, outer: int,
        channels: int, inner: int, chunks: int,
    ) -> None:  # fmt: skip
        for t in prange(chunks):
            if kind == ops.NORMALIZE:
                normalize_chunk(x, dy, mean, p, q, r, out, outer, channels, inner, t, chunks)
            else:
                grad_input_chunk(x, dy, mean, p, q, r, out, outer, channels, inner, t, chunks)

    return Kernel(body)


stats = Kernel(_stats)
grad_sums = Kernel(_grad_sums)
normalize = elementwise(ops.NORMALIZE)
grad_input = elementwise(ops.GRAD_INPUT)

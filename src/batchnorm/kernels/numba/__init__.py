"""The Numba backend: parallel CPU kernels for float32 and float64.

Same four functions as every backend (see :mod:`batchnorm.kernels`), over a C-contiguous
``(outer, C, inner)`` array. Two kernel families cover every layout without copying:

*segments* (``inner >= ROWS_MAX_INNER``, e.g. contiguous NCHW, also 7x7 maps)
    The array is ``outer * C`` contiguous segments ``x3[o, c, :]``. A thread takes a
    contiguous range of segments (so channels and batch rows are split alike, which keeps
    both threads busy whether C is 3 or 2048) and keeps float64 partials per channel.
*rows* (``inner < ROWS_MAX_INNER``, e.g. channels-last, 2-D ``(N, C)``, 3x3 maps)
    The array is ``outer`` rows of ``W = C * inner`` columns. A thread takes a block of
    rows and accumulates per column, vectorized along the row; columns fold into channels
    and threads merge their partials at the end.

Statistics are exact and stable: each cache-sized block is reduced in two passes (sum,
then squared deviations from the block's own mean, the second pass reading from cache),
and blocks, columns and threads are merged with Chan's formula. Everything accumulates
in float64; the elementwise kernels compute ``(x - mean) * scale + shift`` in float64 and
round once to x's dtype.

Two private helpers, :func:`fused_forward` and :func:`fused_backward`, do a training pass
with x (and dy) read from memory once: a thread owns a group of neighbouring channels and
makes the second pass from its cache. Groups are walked row by row, so each row of a group
is one contiguous run of about 16 KiB even when segments are short (7x7 maps: 83
channels a group). Segments layout only; they decline (return None) where that would not
pay (channels-last, runs under 4 KiB, too few groups for the threads); callers that have
nothing to do between the two halves (no SyncBatchNorm) may try them first. Segments are
merged exactly in two passes: the mean of their means, then their spread about it.

Flags live in :data:`FLAGS` and :data:`PARALLEL_FLAGS`. ``fastmath`` is restricted to
reassociation (so reductions vectorize), contraction (FMA) and signed-zero freedom: no
``nnan``/``ninf``, so NaN and inf keep their IEEE meaning and reach
:mod:`batchnorm.functional`'s non-finite check. Kernels compile on first use (about a
second each per dtype; serial and parallel builds compile separately) and are not cached
on disk: numba's cache with ``parallel=True`` has a record of crashes and hangs. Open
issues: numba#4807 (segfaults when several processes fill one cache directory, which
``pytest -n 2`` does), numba#9233 (a cached prange function that prints hangs on its second run),
numba#8085 (cached parallel functions load slowly); fixed ones such as numba#7518 (segfault
after NUMBA_NUM_THREADS changed) show how fragile the combination has been.

Threads: numba's OpenMP pool is not PyTorch's (each ships its own libgomp); with the default
OMP wait policy, idle threads of one pool spin on the cores the other needs. Processes that
mix both (``batchnorm bench``, the PyTorch integration) want ``OMP_WAIT_POLICY=PASSIVE``.

Importing this module without numba raises ImportError, which
:func:`batchnorm.backends.available` reports as an absent backend.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import njit, prange

from batchnorm import math

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# --- every numba flag of this package ----------------------------------------------------
FASTMATH = {"reassoc", "contract", "nsz"}  # never nnan/ninf: NaN must propagate
FLAGS: dict[str, Any] = {
    "nogil": True,
    "cache": False,  # see the module docstring: parallel=True + cache is not safe
    "fastmath": FASTMATH,
    "error_model": "numpy",  # no ZeroDivisionError checks inside the loops
    "boundscheck": False,
}
PARALLEL_FLAGS: dict[str, Any] = {**FLAGS, "parallel": True}

# --- tuning (module attributes so tests can force every path) -----------------------------
ROWS_MAX_INNER = 16  # inner below this: rows kernels; else segments kernels
BLOCK = 4096  # elements reduced per two-pass block (a float32 block is 16 KiB: L1)
ROWS_BLOCK_MIN = 32  # rows per two-pass block at least (fewer merges)
# Arrays with fewer elements run as one chunk in the serial build. A parallel region ends
# when its slowest thread does; on a machine shared with other jobs a thread that lost its
# core costs a scheduler slice, which dwarfs a sub-millisecond pass (measured on 2 busy
# cores: (256, 1024) fwd+bwd 0.64-0.90 ms serial vs 1.39-1.42 ms parallel).
PARALLEL_MIN = 1 << 19
# Fused passes (see fused_forward) take channels in groups whose rows of x (and dy) fit in
# FUSE_MAX_BYTES, so that the second pass reads them from cache (L2 is 2 MiB a core here,
# L3 is large); a group's run per row is about FUSE_RUN_BYTES where that fits. Measured
# (2 threads, contenders in shuffled order, against the unfused kernels): 7x7 maps gain
# about 20% on forward and on fwd+bwd with runs of 8, 16 or 32 KiB alike (a lone 196-byte
# segment lost 1.5x); (8, 3, 224, 224) gains 20-25%, and its backward's 3.2 MiB channels
# still gain 7% over not fusing them, part of the second pass coming from L3.
FUSE_MAX_BYTES = 4 << 20
FUSE_RUN_BYTES = 16384
FUSE_MAX_IMBALANCE = 1.4  # the busiest thread's groups over an even share, at most
FUSE_MIN_RUN_BYTES = 4096  # shorter runs are not fused (a lone 7x7 segment is 196 bytes)
CHUNKS: int | None = None  # force the number of chunks (tests); None: numba's thread count


# --- helpers ------------------------------------------------------------------------------
_inverse_std = njit(**FLAGS)(math.inverse_std)
_grad_coefficients = njit(**FLAGS)(math.grad_coefficients)


@njit(**FLAGS)
def _chan_merge_into(n_a: Any, mean: Any, m2: Any, n_b: Any, mean_b: Any, m2_b: Any) -> Any:
    """Merge (n_b, mean_b, m2_b) into (n_a, mean, m2) in place, vectors of equal length."""
    if n_b == 0:
        return n_a
    n = n_a + n_b
    f = n_b / n
    g = n_a * f
    for j in range(mean.shape[0]):
        delta = mean_b[j] - mean[j]
        mean[j] += delta * f
        m2[j] += m2_b[j] + delta * delta * g
    return n


@njit(**FLAGS)
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


@njit(**FLAGS)
def _fold_sums(sums: Any, channels: int, inner: int) -> Any:
    """(T, C*inner) partial sums -> (C,) totals."""
    out = np.zeros(channels)
    for t in range(sums.shape[0]):
        for c in range(channels):
            s = 0.0
            for i in range(inner):
                s += sums[t, c * inner + i]
            out[c] += s
    return out


# --- the kernels ----------------------------------------------------------------------------
# Every kernel takes flat 1-D arrays and the (outer, C, inner) sizes and indexes them by
# arithmetic, with unsigned (_U) indices: a signed index that LLVM cannot prove
# non-negative gets numba's negative-index wraparound per element, which blocks
# vectorization (measured: 5x slower sums). ``chunks`` comes last: chunk t of ``chunks``
# covers units [units * t // chunks, units * (t + 1) // chunks).
_U = np.uintp


@njit(**FLAGS)
def _rows_stats_chunk(
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
            b0 = _U(rr * width)
            b1 = b0 + _U(width)
            b2 = b1 + _U(width)
            b3 = b2 + _U(width)
            for j in range(width):
                u = _U(j)
                s[j] += (np.float64(x[b0 + u]) + x[b1 + u]) + (np.float64(x[b2 + u]) + x[b3 + u])
            rr += 4
        while rr < re:
            b0 = _U(rr * width)
            for j in range(width):
                s[j] += x[b0 + _U(j)]
            rr += 1
        inv = 1.0 / nb
        for j in range(width):
            s[j] *= inv
        q[:] = 0.0
        rr = r
        while rr + 4 <= re:
            b0 = _U(rr * width)
            b1 = b0 + _U(width)
            b2 = b1 + _U(width)
            b3 = b2 + _U(width)
            for j in range(width):
                u = _U(j)
                m = s[j]
                d0 = x[b0 + u] - m
                d1 = x[b1 + u] - m
                d2 = x[b2 + u] - m
                d3 = x[b3 + u] - m
                q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            rr += 4
        while rr < re:
            b0 = _U(rr * width)
            for j in range(width):
                d = x[b0 + _U(j)] - s[j]
                q[j] += d * d
            rr += 1
        n = _chan_merge_into(n, mean, m2, nb, s, q)
        r = re
    return n


def _rows_stats(x: Any, outer: int, channels: int, inner: int, block: int, chunks: int) -> Any:
    width = channels * inner
    means = np.zeros((chunks, width))
    m2s = np.zeros((chunks, width))
    counts = np.zeros(chunks)
    for t in prange(chunks):
        s = np.empty(width)
        q = np.empty(width)
        r0 = outer * t // chunks
        r1 = outer * (t + 1) // chunks
        counts[t] = _rows_stats_chunk(x, width, r0, r1, block, means[t], m2s[t], s, q)
    n = 0.0
    mean_w = np.zeros(width)
    m2_w = np.zeros(width)
    for t in range(chunks):
        n = _chan_merge_into(n, mean_w, m2_w, counts[t], means[t], m2s[t])
    return _fold_columns(n, mean_w, m2_w, channels, inner)


@njit(**FLAGS)
def _seg_block_stats(x: Any, start: int, size: int) -> Any:
    """(mean, m2) of x[start:start + size] by two passes (the second one reads from cache)."""
    base = _U(start)
    s = 0.0
    for i in range(size):
        s += x[base + _U(i)]
    bm = s / size
    q = 0.0
    for i in range(size):
        d = x[base + _U(i)] - bm
        q += d * d
    return bm, q


def _segs_stats(x: Any, outer: int, channels: int, inner: int, block: int, chunks: int) -> Any:
    segs = outer * channels
    cnts = np.zeros((chunks, channels))
    means = np.zeros((chunks, channels))
    m2s = np.zeros((chunks, channels))
    for t in prange(chunks):
        for k in range(segs * t // chunks, segs * (t + 1) // chunks):
            c = k % channels
            base = k * inner
            for b0 in range(0, inner, block):
                b1 = min(b0 + block, inner)
                bm, q = _seg_block_stats(x, base + b0, b1 - b0)
                nb = float(b1 - b0)
                na = cnts[t, c]
                n = na + nb
                delta = bm - means[t, c]
                means[t, c] += delta * (nb / n)
                m2s[t, c] += q + delta * delta * (na * nb / n)
                cnts[t, c] = n
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    n = np.zeros(channels)
    for t in range(chunks):
        for c in range(channels):
            nb = cnts[t, c]
            if nb == 0:
                continue
            na = n[c]
            tot = na + nb
            delta = means[t, c] - mean[c]
            mean[c] += delta * (nb / tot)
            m2[c] += m2s[t, c] + delta * delta * (na * nb / tot)
            n[c] = tot
    return mean, m2


def _rows_grad_sums(
    dy: Any, x: Any, mean: Any, outer: int, channels: int, inner: int, chunks: int
) -> Any:
    width = channels * inner
    mean_w = np.repeat(mean, inner)
    sdy = np.zeros((chunks, width))
    sdx = np.zeros((chunks, width))
    for t in prange(chunks):
        a = sdy[t]
        b = sdx[t]
        r = outer * t // chunks
        r_end = outer * (t + 1) // chunks
        while r + 4 <= r_end:  # four rows per sweep, as in _rows_stats_chunk
            b0 = _U(r * width)
            b1 = b0 + _U(width)
            b2 = b1 + _U(width)
            b3 = b2 + _U(width)
            for j in range(width):
                u = _U(j)
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
            b0 = _U(r * width)
            for j in range(width):
                g = np.float64(dy[b0 + _U(j)])
                a[j] += g
                b[j] += g * (x[b0 + _U(j)] - mean_w[j])
            r += 1
    return _fold_sums(sdy, channels, inner), _fold_sums(sdx, channels, inner)


def _segs_grad_sums(
    dy: Any, x: Any, mean: Any, outer: int, channels: int, inner: int, chunks: int
) -> Any:
    segs = outer * channels
    sdy = np.zeros((chunks, channels))
    sdx = np.zeros((chunks, channels))
    for t in prange(chunks):
        for k in range(segs * t // chunks, segs * (t + 1) // chunks):
            c = k % channels
            base = _U(k * inner)
            m = mean[c]
            a = 0.0
            b = 0.0
            for i in range(inner):
                g = np.float64(dy[base + _U(i)])
                a += g
                b += g * (x[base + _U(i)] - m)
            sdy[t, c] += a
            sdx[t, c] += b
    return sdy.sum(axis=0), sdx.sum(axis=0)


# elementwise: y = (x - mean) * scale + shift;  dx = a * dy + b * (x - mean) + c
def _rows_normalize(
    x: Any,
    mean: Any,
    scale: Any,
    shift: Any,
    y: Any,
    outer: int,
    channels: int,
    inner: int,
    chunks: int,
) -> None:
    width = channels * inner
    m = np.repeat(mean, inner)
    s = np.repeat(scale, inner)
    b = np.repeat(shift, inner)
    for t in prange(chunks):
        for r in range(outer * t // chunks, outer * (t + 1) // chunks):
            base = _U(r * width)
            for j in range(width):
                y[base + _U(j)] = (x[base + _U(j)] - m[j]) * s[j] + b[j]


def _segs_normalize(
    x: Any,
    mean: Any,
    scale: Any,
    shift: Any,
    y: Any,
    outer: int,
    channels: int,
    inner: int,
    chunks: int,
) -> None:
    segs = outer * channels
    for t in prange(chunks):
        for k in range(segs * t // chunks, segs * (t + 1) // chunks):
            c = k % channels
            m = mean[c]
            s = scale[c]
            b = shift[c]
            base = _U(k * inner)
            for i in range(inner):
                y[base + _U(i)] = (x[base + _U(i)] - m) * s + b


def _rows_grad_input(
    dy: Any,
    x: Any,
    mean: Any,
    a: Any,
    b: Any,
    c: Any,
    dx: Any,
    outer: int,
    channels: int,
    inner: int,
    chunks: int,
) -> None:
    width = channels * inner
    m = np.repeat(mean, inner)
    aw = np.repeat(a, inner)
    bw = np.repeat(b, inner)
    cw = np.repeat(c, inner)
    for t in prange(chunks):
        for r in range(outer * t // chunks, outer * (t + 1) // chunks):
            base = _U(r * width)
            for j in range(width):
                i = base + _U(j)
                dx[i] = aw[j] * dy[i] + bw[j] * (x[i] - m[j]) + cw[j]


def _segs_grad_input(
    dy: Any,
    x: Any,
    mean: Any,
    a: Any,
    b: Any,
    c: Any,
    dx: Any,
    outer: int,
    channels: int,
    inner: int,
    chunks: int,
) -> None:
    segs = outer * channels
    for t in prange(chunks):
        for k in range(segs * t // chunks, segs * (t + 1) // chunks):
            ch = k % channels
            m = mean[ch]
            ac = a[ch]
            bc = b[ch]
            cc = c[ch]
            base = _U(k * inner)
            for j in range(inner):
                i = base + _U(j)
                dx[i] = ac * dy[i] + bc * (x[i] - m) + cc


# --- fused, channel-parallel training passes (private helpers) ------------------------------
# A thread owns whole channels: it reduces their segments (bringing them into its L2 cache),
# then makes the elementwise pass over the same segments from cache, so x (and dy) are read
# from memory once instead of twice. Channels go in groups of ``group`` neighbours, walked
# row by row (o outer, the group's channels inner), so that each row of a group is one
# contiguous run long enough to stream even when segments are short (7x7 maps: 49 values).
# Segments layout only, and only when a group's data fits FUSE_MAX_BYTES and the groups
# share out among the threads within FUSE_MAX_IMBALANCE. The elementwise loops are written
# out in the kernels: through helpers (and with _seg_stats called for every segment) the
# 7x7 forward ran 35% slower from cache, single-threaded.
@njit(**FLAGS)
def _seg_stats(x: Any, start: int, size: int, block: int) -> Any:
    """(mean, m2) of x[start:start + size]: two-pass blocks merged with Chan's formula."""
    if size <= block:
        return _seg_block_stats(x, start, size)
    n = 0.0
    mu = 0.0
    q = 0.0
    for b0 in range(0, size, block):
        nb = min(block, size - b0)
        bm, bq = _seg_block_stats(x, start + b0, nb)
        tot = n + nb
        delta = bm - mu
        mu += delta * (nb / tot)
        q += bq + delta * delta * (n * nb / tot)
        n = tot
    return mu, q


def _fused_forward(
    x: Any,
    weight: Any,
    bias: Any,
    eps: float,
    y: Any,
    mean: Any,
    m2: Any,
    outer: int,
    channels: int,
    inner: int,
    group: int,
    block: int,
    chunks: int,
) -> None:
    count = float(outer * inner)
    groups = (channels + group - 1) // group
    for t in prange(chunks):
        seg_mean = np.empty((outer, group))  # every segment has `inner` values: equal weights
        q = np.empty(group)
        scale = np.empty(group)
        for g in range(groups * t // chunks, groups * (t + 1) // chunks):
            c0 = g * group
            width = min(group, channels - c0)
            q[:] = 0.0
            for o in range(outer):
                base = (o * channels + c0) * inner
                for j in range(width):
                    if inner <= block:  # one block (7x7, 56x56): this one inlines
                        bm, bq = _seg_block_stats(x, base + j * inner, inner)
                    else:
                        bm, bq = _seg_stats(x, base + j * inner, inner, block)
                    seg_mean[o, j] = bm
                    q[j] += bq
            # segments merged in two passes: mean of their means, then their spread about it
            for j in range(width):
                s = 0.0
                for o in range(outer):
                    s += seg_mean[o, j]
                mu = s / outer
                d2 = 0.0
                for o in range(outer):
                    d = seg_mean[o, j] - mu
                    d2 += d * d
                c = c0 + j
                mean[c] = mu
                m2[c] = q[j] + inner * d2
                scale[j] = weight[c] * _inverse_std(m2[c] / count, eps)
            for o in range(outer):
                base = (o * channels + c0) * inner
                for j in range(width):
                    c = c0 + j
                    mc = mean[c]
                    sc = scale[j]
                    bc = bias[c]
                    start = _U(base + j * inner)
                    for i in range(inner):
                        u = start + _U(i)
                        y[u] = (x[u] - mc) * sc + bc


def _fused_backward(
    dy: Any,
    x: Any,
    mean: Any,
    rstd: Any,
    weight: Any,
    dx: Any,
    sum_dy: Any,
    sum_dy_xmu: Any,
    count: float,
    outer: int,
    channels: int,
    inner: int,
    group: int,
    chunks: int,
) -> None:
    groups = (channels + group - 1) // group
    for t in prange(chunks):
        ca = np.empty(group)
        cb = np.empty(group)
        cc = np.empty(group)
        for g in range(groups * t // chunks, groups * (t + 1) // chunks):
            c0 = g * group
            width = min(group, channels - c0)
            for j in range(width):
                sum_dy[c0 + j] = 0.0
                sum_dy_xmu[c0 + j] = 0.0
            for o in range(outer):
                base = (o * channels + c0) * inner
                for j in range(width):
                    c = c0 + j
                    mc = mean[c]
                    start = _U(base + j * inner)
                    ga = 0.0
                    gb = 0.0
                    for i in range(inner):
                        u = start + _U(i)
                        gd = np.float64(dy[u])
                        ga += gd
                        gb += gd * (x[u] - mc)
                    sum_dy[c] += ga
                    sum_dy_xmu[c] += gb
            for j in range(width):
                c = c0 + j
                ca[j], cb[j], cc[j] = _grad_coefficients(
                    weight[c], rstd[c], sum_dy[c], sum_dy_xmu[c], count
                )
            for o in range(outer):
                base = (o * channels + c0) * inner
                for j in range(width):
                    mc = mean[c0 + j]
                    aj = ca[j]
                    bj = cb[j]
                    cj = cc[j]
                    start = _U(base + j * inner)
                    for i in range(inner):
                        u = start + _U(i)
                        dx[u] = aj * dy[u] + bj * (x[u] - mc) + cj


# --- each kernel twice: serial (small arrays: no thread launch) and parallel -------------
class _Kernel:
    """One kernel body compiled on first use as serial and as parallel (prange) code."""

    def __init__(self, body: Any) -> None:
        self.serial = njit(**FLAGS)(body)
        self.parallel = njit(**PARALLEL_FLAGS)(body)

    def __call__(self, *args: Any) -> Any:
        """Run with ``args[-1]`` chunks: one chunk runs the serial build."""
        return (self.serial if args[-1] == 1 else self.parallel)(*args)


rows_stats = _Kernel(_rows_stats)
segs_stats = _Kernel(_segs_stats)
rows_grad_sums = _Kernel(_rows_grad_sums)
segs_grad_sums = _Kernel(_segs_grad_sums)
rows_normalize = _Kernel(_rows_normalize)
segs_normalize = _Kernel(_segs_normalize)
rows_grad_input = _Kernel(_rows_grad_input)
segs_grad_input = _Kernel(_segs_grad_input)
fused_forward_kernel = _Kernel(_fused_forward)
fused_backward_kernel = _Kernel(_fused_backward)


# --- the backend interface ----------------------------------------------------------------
def _chunks(size: int, units: int) -> int:
    """How many chunks to split ``units`` work units (rows or segments) into."""
    if CHUNKS is not None:
        return max(1, min(CHUNKS, units))
    if size < PARALLEL_MIN:
        return 1
    return max(1, min(numba.get_num_threads(), units))


def _rows(x3: np.ndarray) -> bool:
    return bool(x3.shape[2] < ROWS_MAX_INNER)


def _vec(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=np.float64)


def _same(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous array of ``like``'s dtype (no copy when it already is)."""
    return np.ascontiguousarray(a, dtype=like.dtype)


def channel_stats(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x3 = np.ascontiguousarray(x3)
    outer, channels, inner = x3.shape
    x = x3.reshape(-1)
    if _rows(x3):
        block = max(ROWS_BLOCK_MIN, BLOCK // max(1, channels * inner))
        mean, m2 = rows_stats(x, outer, channels, inner, block, _chunks(x.size, outer))
    else:
        chunks = _chunks(x.size, outer * channels)
        mean, m2 = segs_stats(x, outer, channels, inner, BLOCK, chunks)
    return mean, m2


def normalize(x3: np.ndarray, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    x3 = np.ascontiguousarray(x3)
    out = np.empty_like(x3)
    outer, channels, inner = x3.shape
    args = (x3.reshape(-1), _vec(mean), _vec(scale), _vec(shift), out.reshape(-1))
    if _rows(x3):
        rows_normalize(*args, outer, channels, inner, _chunks(x3.size, outer))
    else:
        segs_normalize(*args, outer, channels, inner, _chunks(x3.size, outer * channels))
    return out


def grad_sums(dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x3 = np.ascontiguousarray(x3)
    dy3 = _same(dy3, x3)
    outer, channels, inner = x3.shape
    args = (dy3.reshape(-1), x3.reshape(-1), _vec(mean), outer, channels, inner)
    if _rows(x3):
        sum_dy, sum_dy_xmu = rows_grad_sums(*args, _chunks(x3.size, outer))
    else:
        sum_dy, sum_dy_xmu = segs_grad_sums(*args, _chunks(x3.size, outer * channels))
    return sum_dy, sum_dy_xmu


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
    out = np.empty_like(x3)
    outer, channels, inner = x3.shape
    args = (dy3.reshape(-1), x3.reshape(-1), _vec(mean), _vec(a), _vec(b), _vec(c))
    if _rows(x3):
        rows_grad_input(*args, out.reshape(-1), outer, channels, inner, _chunks(x3.size, outer))
    else:
        chunks = _chunks(x3.size, outer * channels)
        segs_grad_input(*args, out.reshape(-1), outer, channels, inner, chunks)
    return out


# --- fused training passes (private helpers, not part of the backend interface) -----------
def _fusable(x3: np.ndarray, arrays: int) -> tuple[int, int]:
    """``(chunks, group)`` for a channel-parallel fused pass over ``x3``; (0, 0): no gain."""
    outer, channels, inner = x3.shape
    if _rows(x3) or x3.size == 0 or not x3.flags.c_contiguous:
        return 0, 0
    segment = inner * x3.itemsize
    # neighbouring channels in one group make each row's run long enough to stream, as
    # long as the group's rows (of x, and dy) stay in cache between the two passes
    group = min(channels, max(1, FUSE_RUN_BYTES // segment))
    group = min(group, FUSE_MAX_BYTES // (outer * segment * arrays))
    if group < 1:
        return 0, 0  # one channel would not stay in cache
    if group * segment < FUSE_MIN_RUN_BYTES:
        return 0, 0  # short runs strided by C * inner defeat the prefetchers (measured 1.5x)
    groups = -(-channels // group)
    threads = _chunks(x3.size, outer * channels)  # what the unfused kernels would use
    chunks = min(threads, groups)
    if -(-groups // threads) * threads > FUSE_MAX_IMBALANCE * groups:
        # too few groups for the threads (C = 1 on two threads): the unfused kernels split
        # rows. Some imbalance pays: 3 groups on 2 threads still beat moving x once more.
        return 0, 0
    return chunks, group


def fused_forward(
    x3: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Training forward reading x from memory once: ``(y3, mean, m2)``, or None to decline.

    The same numbers as ``channel_stats`` then ``normalize`` with
    ``scale = weight / sqrt(m2 / count + eps)`` and ``shift = bias``. None when the layout
    or sizes would not gain (the caller then runs the two public functions).
    """
    chunks, group = _fusable(x3, 1)
    if not chunks:
        return None
    outer, channels, inner = x3.shape
    w = np.ones(channels) if weight is None else _vec(weight)
    b = np.zeros(channels) if bias is None else _vec(bias)
    y3 = np.empty_like(x3)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    fused_forward_kernel(
        x3.reshape(-1),
        w,
        b,
        float(eps),
        y3.reshape(-1),
        mean,
        m2,
        outer,
        channels,
        inner,
        group,
        BLOCK,
        chunks,
    )
    return y3, mean, m2


def fused_backward(
    dy3: np.ndarray,
    x3: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None,
    count: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Training backward (batch statistics) reading dy and x once: ``(dx3, sum_dy, sum_dy_xmu)``.

    The same numbers as ``grad_sums`` then ``grad_input`` with ``a = weight * rstd``,
    ``b = -a * rstd**2 * sum_dy_xmu / count``, ``c = -a * sum_dy / count``. None when it
    would not gain.
    """
    chunks, group = _fusable(x3, 2)
    if not chunks:
        return None
    dy3 = _same(dy3, x3)
    outer, channels, inner = x3.shape
    w = np.ones(channels) if weight is None else _vec(weight)
    dx3 = np.empty_like(x3)
    sum_dy = np.empty(channels)
    sum_dy_xmu = np.empty(channels)
    fused_backward_kernel(
        dy3.reshape(-1),
        x3.reshape(-1),
        _vec(mean),
        _vec(rstd),
        w,
        dx3.reshape(-1),
        sum_dy,
        sum_dy_xmu,
        float(max(count, 1)),
        outer,
        channels,
        inner,
        group,
        chunks,
    )
    return dx3, sum_dy, sum_dy_xmu

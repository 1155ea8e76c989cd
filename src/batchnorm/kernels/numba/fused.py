"""Forward and backward passes in one compiled call each: statistics, the per-channel
arithmetic, output.

:data:`forward` and :data:`backward` hold a kernel per layout (:func:`training_passes`;
:func:`.plan.fused` decides) and finish with the per-channel arithmetic
(:func:`.ops.batch_coefficients`, :func:`batchnorm.math.grad_coefficients`), so a training
pass costs one dispatch; :data:`evaluate` (:func:`eval_pass`) does the same for eval, its
coefficients from the running statistics (:func:`.ops.eval_coefficients`).

*rows* (2-D, channels-last): the rows kernels' chunks, then the elementwise pass; with few
rows and long enough ones, both by columns in one parallel region (:func:`_columns_forward`).

*segments*: channel-parallel, x (and dy) read from memory once. A thread owns whole
channels: it reduces their segments (bringing them into its L2 cache), then makes the
elementwise pass over the same segments from cache. Channels go in groups of ``group``
neighbours, walked row by row (o outer, the group's channels inner), so that each row of a
group is one contiguous run long enough to stream even when segments are short (7x7 maps:
49 values); :func:`.plan.fusable` decides when it pays. Segments are merged exactly in
two passes: the mean of their means, then their spread about it. The reductions are
written out here: with ``segment_stats`` called for every segment the 7x7 forward ran 35%
slower from cache, single-threaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from batchnorm.kernels.numba import ops, rows, segments
from batchnorm.kernels.numba.config import (
    FLAGS,
    Kernel,
    U,
    grad_coefficients,
    inverse_std,
    jit,
    per_chunk,
)
from batchnorm.kernels.numba.segments import block_stats, segment_stats


@njit(inline="always", **FLAGS)
def _group_pass(
    kind: int, x: Any, dy: Any, mean: Any, p: Any, q: Any, r: Any, out: Any, outer: int,
    channels: int, inner: int, c0: int, width: int,
) -> None:  # fmt: skip
    """The elementwise pass ``kind`` over the group of channels c0 .. c0 + width - 1, row
    by row (mean per channel; p, q, r per channel of the group)."""
    for k in range(outer):
        o = outer - 1 - k  # last row first: what the reducing pass read last is in cache
        base = (o * channels + c0) * inner
        for j in range(width):
            mc = mean[c0 + j]
            pj = p[j]
            qj = q[j]
            rj = r[j]
            start = U(base + j * inner)
            for i in range(inner):
                u = start + U(i)
                out[u] = ops.formula(kind, x[u], dy[u], mc, pj, qj, rj)


@njit(inline="always", **FLAGS)
def _segments_forward(
    x: Any, weight: Any, bias: Any, eps: float, y: Any, mean: Any, m2: Any, outer: int,
    channels: int, inner: int, group: int, block: int, chunks: int,
) -> None:  # fmt: skip
    count = float(outer * inner)
    groups = (channels + group - 1) // group
    for t in prange(chunks):
        seg_mean = np.empty((outer, group))  # every segment has `inner` values: equal weights
        q = np.empty(group)
        scale = np.empty(group)
        shift = np.empty(group)
        for g in range(groups * t // chunks, groups * (t + 1) // chunks):
            c0 = g * group
            width = min(group, channels - c0)
            q[:] = 0.0
            for o in range(outer):
                base = (o * channels + c0) * inner
                for j in range(width):
                    if inner <= block:  # one block (7x7, 56x56): this one inlines
                        bm, bq = block_stats(x, base + j * inner, inner)
                    else:
                        bm, bq = segment_stats(x, base + j * inner, inner, block)
                    seg_mean[o, j] = bm
                    q[j] += bq
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
                scale[j] = weight[c] * inverse_std(m2[c] / count, eps)
                shift[j] = bias[c]
            _group_pass(ops.NORMALIZE, x, x, mean, scale, shift, shift, y, outer, channels,
                        inner, c0, width)  # fmt: skip


@njit(inline="always", **FLAGS)
def _segments_backward(
    dy: Any, x: Any, mean: Any, rstd: Any, weight: Any, dx: Any, sum_dy: Any, sum_dy_xmu: Any,
    count: float, outer: int, channels: int, inner: int, group: int, chunks: int,
) -> None:  # fmt: skip
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
                    start = U(base + j * inner)
                    ga = 0.0
                    gb = 0.0
                    for i in range(inner):
                        u = start + U(i)
                        gd = np.float64(dy[u])
                        ga += gd
                        gb += gd * (x[u] - mc)
                    sum_dy[c] += ga
                    sum_dy_xmu[c] += gb
            for j in range(width):
                c = c0 + j
                ca[j], cb[j], cc[j] = grad_coefficients(
                    weight[c], rstd[c], sum_dy[c], sum_dy_xmu[c], count
                )
            _group_pass(ops.GRAD_INPUT, x, dy, mean, ca, cb, cc, dx, outer, channels, inner, c0,
                        width)  # fmt: skip


@jit
def _grad_coefficient_vectors(
    weight: Any, rstd: Any, sum_dy: Any, sum_dy_xmu: Any, count: float
) -> Any:
    """Per-channel (a, b, c) of the dx formula (:func:`batchnorm.math.grad_coefficients`)."""
    channels = rstd.shape[0]
    a, b, c = np.empty(channels), np.empty(channels), np.empty(channels)
    for k in range(channels):  # per channel: no temporaries, one loop
        a[k], b[k], c[k] = grad_coefficients(weight[k], rstd[k], sum_dy[k], sum_dy_xmu[k], count)
    return a, b, c


@njit(inline="always", **FLAGS)
def _columns_forward(
    x: Any, weight: Any, bias: Any, eps: float, running_mean: Any, running_var: Any,
    momentum: float, y: Any, mean: Any, m2: Any, rstd: Any, outer: int, channels: int,
    chunks: int,
) -> bool:  # fmt: skip
    """The rows forward by columns in one parallel region (2-D and channels-last inputs with
    few rows: :func:`.plan.one_region`): a thread reduces every row of its block of channels,
    computes their coefficients and normalizes the block from its cache; nothing is merged
    across threads and no per-channel work is left serial but the running statistics' update
    (it needs every channel's mean finite)."""
    count = float(outer)
    bad = per_chunk(chunks, 1)
    none = np.empty(0)
    for t in prange(chunks):
        _, _, j0, j1 = rows.span(t, chunks, outer, channels, True)
        rows.chunk_stats(x, 0, outer, channels, j0, mean[j0:j1], m2[j0:j1])
        scale = np.empty(j1 - j0)
        shift = np.empty(j1 - j0)
        ok = ops.batch_coefficients(
            mean[j0:j1], m2[j0:j1], count, eps, weight[j0:j1], bias[j0:j1], none, none, 0.0,
            rstd[j0:j1], scale, shift,
        )  # fmt: skip
        bad[t, 0] = 0.0 if ok else 1.0
        m, s, b, _ = rows.columns(ops.NORMALIZE, x, mean[j0:j1], scale, shift, shift, 1)
        rows.block(ops.NORMALIZE, x, x, m, s, b, b, y, 0, outer, channels, j0)
    finite = bad[:, 0].sum() == 0.0
    if finite:
        ops.update_running(mean, m2, count, running_mean, running_var, momentum)
    return finite


@njit(inline="always", **FLAGS)
def _columns_backward(
    dy: Any, x: Any, mean: Any, rstd: Any, weight: Any, dx: Any, sum_dy: Any, sum_dy_xmu: Any,
    count: float, outer: int, channels: int, chunks: int,
) -> None:  # fmt: skip
    """The rows backward by columns, in one parallel region (see :func:`_columns_forward`)."""
    for t in prange(chunks):
        _, _, j0, j1 = rows.span(t, chunks, outer, channels, True)
        sum_dy[j0:j1] = 0.0
        sum_dy_xmu[j0:j1] = 0.0
        rows.chunk_grad_sums(dy, x, mean[j0:j1], 0, outer, channels, j0, sum_dy[j0:j1],
                             sum_dy_xmu[j0:j1])  # fmt: skip
        a, b, c = _grad_coefficient_vectors(weight[j0:j1], rstd[j0:j1], sum_dy[j0:j1],
                                            sum_dy_xmu[j0:j1], count)  # fmt: skip
        m, aw, bw, cw = rows.columns(ops.GRAD_INPUT, x, mean[j0:j1], a, b, c, 1)
        rows.block(ops.GRAD_INPUT, x, dy, m, aw, bw, cw, dx, 0, outer, channels, j0)


@njit(inline="always", **FLAGS)
def _rows_backward(
    dy: Any, x: Any, mean: Any, rstd: Any, weight: Any, dx: Any, sum_dy: Any, sum_dy_xmu: Any,
    count: float, outer: int, channels: int, inner: int, by_columns: bool, chunks: int,
) -> None:  # fmt: skip
    s1, s2 = rows.grad_sums_inline(dy, x, mean, outer, channels, inner, by_columns, chunks)
    sum_dy[:] = s1
    sum_dy_xmu[:] = s2
    a, b, c = _grad_coefficient_vectors(weight, rstd, sum_dy, sum_dy_xmu, count)
    mean_w, aw, bw, cw = rows.columns(ops.GRAD_INPUT, x, mean, a, b, c, inner)
    for t in prange(chunks):
        rows.grad_input_chunk(x, dy, mean_w, aw, bw, cw, dx, outer, t, chunks)


def training_passes(rows_layout: bool) -> tuple[Kernel, Kernel]:
    """The (forward, backward) kernels of one layout: rows, or channel groups of segments.

    One template for both layouts, with ``rows_layout`` a compile-time constant (numba
    prunes the other branch before compiling), so a call compiles only its own layout.
    """

    def forward(
        x: Any, weight: Any, bias: Any, eps: float, running_mean: Any, running_var: Any,
        momentum: float, y: Any, mean: Any, m2: Any, rstd: Any, outer: int, channels: int,
        inner: int, group: int, block: int, by_columns: bool, one_region: bool, chunks: int,
    ) -> bool:  # fmt: skip
        # segments: channel groups of ``group``, two-pass blocks of ``block`` values; rows:
        # statistics by chunks of rows or of columns (``by_columns``, rows.span), the
        # output by rows, or everything by columns in one region (``one_region``). Returns
        # whether the running statistics were updated (every mean finite).
        if rows_layout and one_region:
            return _columns_forward(x, weight, bias, eps, running_mean, running_var, momentum,
                                    y, mean, m2, rstd, outer, channels, chunks)  # fmt: skip
        scale = np.empty(channels)
        shift = np.empty(channels)
        if rows_layout:  # statistics first; the output once scale and shift are known
            mean[:], m2[:] = rows.stats_inline(x, outer, channels, inner, by_columns, chunks)
        else:  # normalizes as it goes, each group from cache
            _segments_forward(x, weight, bias, eps, y, mean, m2, outer, channels, inner,
                              group, block, chunks)  # fmt: skip
        ok = ops.batch_coefficients(
            mean, m2, float(outer * inner), eps, weight, bias, running_mean, running_var,
            momentum, rstd, scale, shift,
        )  # fmt: skip
        if rows_layout:
            m, s, b, _ = rows.columns(ops.NORMALIZE, x, mean, scale, shift, shift, inner)
            for t in prange(chunks):
                rows.normalize_chunk(x, x, m, s, b, b, y, outer, t, chunks)
        return ok

    def backward(
        dy: Any, x: Any, mean: Any, rstd: Any, weight: Any, dx: Any, sum_dy: Any,
        sum_dy_xmu: Any, count: float, outer: int, channels: int, inner: int, group: int,
        by_columns: bool, one_region: bool, chunks: int,
    ) -> None:  # fmt: skip
        if rows_layout and one_region:
            _columns_backward(dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xmu, count, outer,
                              channels, chunks)  # fmt: skip
        elif rows_layout:
            _rows_backward(dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xmu, count, outer,
                           channels, inner, by_columns, chunks)  # fmt: skip
        else:
            _segments_backward(dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xmu, count,
                               outer, channels, inner, group, chunks)  # fmt: skip

    return Kernel(forward), Kernel(backward)


def eval_pass(rows_layout: bool) -> Kernel:
    """The eval forward of one layout: the coefficients from the running statistics, then
    the normalize pass (rows, or segments one at a time)."""

    def evaluate(
        x: Any, weight: Any, bias: Any, eps: float, running_mean: Any, running_var: Any,
        y: Any, mean: Any, rstd: Any, outer: int, channels: int, inner: int, chunks: int,
    ) -> None:  # fmt: skip
        scale = np.empty(channels)
        shift = np.empty(channels)
        ops.eval_coefficients(running_mean, running_var, weight, bias, eps, mean, rstd, scale,
                              shift)  # fmt: skip
        if rows_layout:
            m, s, b, _ = rows.columns(ops.NORMALIZE, x, mean, scale, shift, shift, inner)
            for t in prange(chunks):
                rows.normalize_chunk(x, x, m, s, b, b, y, outer, t, chunks)
        else:
            for t in prange(chunks):
                segments.normalize_chunk(x, x, mean, scale, shift, shift, y, outer, channels,
                                         inner, t, chunks)  # fmt: skip

    return Kernel(evaluate)


_ROWS, _SEGMENTS = training_passes(True), training_passes(False)
forward = {True: _ROWS[0], False: _SEGMENTS[0]}  # by layout: True for rows
backward = {True: _ROWS[1], False: _SEGMENTS[1]}
evaluate = {True: eval_pass(True), False: eval_pass(False)}

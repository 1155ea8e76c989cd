"""Which kernels a call runs: rows or segments, how many chunks, fused or not."""

from __future__ import annotations

import numpy as np

from batchnorm.kernels.numba import config


def use_rows(x3: np.ndarray) -> bool:
    """Rows kernels for short inner runs (channels-last, 2-D, maps under 4x4), and for maps
    up to :data:`~.config.ROWS_FALLBACK_INNER` values whose segments the fused passes would
    not take (few channels: short runs); segments kernels otherwise."""
    inner = x3.shape[2]
    if inner < config.ROWS_MAX_INNER:
        return True
    return inner <= config.ROWS_FALLBACK_INNER and _segments_fusion(x3, 2) == (0, 0)


def rows_for_stats(x3: np.ndarray) -> bool:
    """Rows kernels for the unfused statistics: where :func:`use_rows` says, and for maps up
    to :data:`~.config.ROWS_FALLBACK_INNER` values (faster there than segments' statistics,
    which merge every segment; the fused passes choose apart) with rows enough to pay for
    their per-column partials (:data:`~.config.STATS_ROWS_PER_INNER`)."""
    outer, _, inner = x3.shape
    return use_rows(x3) or (
        inner <= config.ROWS_FALLBACK_INNER and outer * config.STATS_ROWS_PER_INNER >= inner
    )


def rows_for_eval(x3: np.ndarray) -> bool:
    """Rows kernels for the eval pass: where :func:`use_rows` says, and for maps up to
    :data:`~.config.EVAL_ROWS_MAX_INNER` values, whose segments are too short to stream, with
    :data:`~.config.EVAL_ROWS_MIN_OUTER` rows at least (the rows pass first spreads the
    coefficients over all C * inner columns)."""
    outer, _, inner = x3.shape
    return use_rows(x3) or (
        inner <= config.EVAL_ROWS_MAX_INNER and outer >= config.EVAL_ROWS_MIN_OUTER
    )


def by_columns(x3: np.ndarray, chunks: int) -> bool:
    """Whether the rows kernels give each thread a block of columns over every row (few
    rows: no per-thread partials to merge) rather than a block of rows."""
    return chunks > 1 and x3.shape[0] <= config.COLUMNS_MAX_ROWS


def one_region(x3: np.ndarray) -> int:
    """Chunks for the fused rows passes by columns in one parallel region, 0 where they do not
    apply: 2-D and channels-last inputs of up to :data:`~.config.COLUMNS_MAX_ROWS` rows, from
    :data:`~.config.COLUMNS_PARALLEL_MIN` values, whose threads' blocks of a row are
    :data:`~.config.COLUMNS_MIN_RUN_BYTES` at least. A thread reduces every row of its block of
    channels, computes their coefficients and writes their output: no partials merged, no
    per-channel work left serial."""
    outer, channels, inner = x3.shape
    if inner != 1 or outer > config.COLUMNS_MAX_ROWS:
        return 0
    chunks = config.chunks(x3.size, max(1, channels // 16), config.COLUMNS_PARALLEL_MIN)
    if chunks > 1 and channels * x3.itemsize >= chunks * config.COLUMNS_MIN_RUN_BYTES:
        return chunks
    return 0


def chunks(x3: np.ndarray, rows: bool | None = None) -> int:
    """Chunks for the unfused kernels: rows split by rows, segments by segments; ``rows``
    names the family that runs (default: :func:`use_rows`)."""
    outer, channels, _ = x3.shape
    by_rows = use_rows(x3) if rows is None else rows
    return config.chunks(x3.size, outer if by_rows else outer * channels)


def fusable(x3: np.ndarray, arrays: int) -> tuple[int, int]:
    """``(chunks, group)`` for a channel-parallel fused pass over ``x3``; (0, 0): no gain."""
    if use_rows(x3):
        return 0, 0
    return _segments_fusion(x3, arrays)


def _segments_fusion(x3: np.ndarray, arrays: int) -> tuple[int, int]:
    """:func:`fusable` for the segments kernels (whatever :func:`use_rows` says)."""
    outer, channels, inner = x3.shape
    if x3.size == 0 or not x3.flags.c_contiguous:
        return 0, 0
    segment = inner * x3.itemsize
    # neighbouring channels in one group make each row's run long enough to stream, as
    # long as the group's rows (of x, and dy) stay in cache between the two passes
    group = min(channels, max(1, config.FUSE_RUN_BYTES // segment))
    group = min(group, config.FUSE_MAX_BYTES // (outer * segment * arrays))
    if group < 1:
        return 0, 0  # one channel would not stay in cache
    if group * segment < config.FUSE_MIN_RUN_BYTES and (
        group < channels or inner <= config.ROWS_FALLBACK_INNER
    ):
        # short runs strided by C * inner defeat the prefetchers (measured 1.5x). A group of
        # every channel is x itself, one run: fused where the rows kernels (faster on short
        # segments) do not take it ((8, 1, 28, 28); docs/performance.md)
        return 0, 0
    groups = -(-channels // group)
    threads = config.chunks(x3.size, outer * channels, config.FUSED_PARALLEL_MIN)
    if groups < threads:  # a group a thread, where its runs stay long enough ((N, 64, 8, 8))
        even = -(-channels // threads)
        if even * segment >= config.FUSE_MIN_RUN_BYTES:
            group, groups = even, -(-channels // even)
    if -(-groups // threads) * threads > config.FUSE_MAX_IMBALANCE * groups:
        # too few groups for the threads (C = 1 on two threads): the unfused kernels split
        # rows. Some imbalance pays: 3 groups on 2 threads still beat moving x once more.
        if config.chunks(x3.size, outer * channels) > 1:  # the unfused segments kernels'
            return 0, 0
        threads = 1  # the unfused kernels would run serially too: fuse on one thread
    return min(threads, groups), group


def fused(x3: np.ndarray, arrays: int) -> tuple[int, int, bool, bool]:
    """``(chunks, group, by_columns, one_region)`` for a one-call training pass reading
    ``arrays`` arrays: rows layouts always (group 0; :func:`one_region`, else
    :func:`by_columns` for the reductions alone), segments where :func:`fusable` finds a
    gain; chunks 0: decline."""
    if use_rows(x3):
        columns = one_region(x3)
        if columns:
            return columns, 0, True, True
        chunks = config.chunks(x3.size, x3.shape[0])
        return chunks, 0, by_columns(x3, chunks), False
    chunks, group = _segments_fusion(x3, arrays)
    return chunks, group, False, False

"""Chan's pairwise merge of per-process (count, mean, M2): the one place for this math.

Each process summarizes its slice of the batch, per channel, as the number of values
``n``, their ``mean`` and ``M2`` (the sum of squared deviations from that mean). Two
summaries combine exactly (Chan, Golub and LeVeque, 1979)::

    n    = n_a + n_b
    d    = mean_b - mean_a
    mean = mean_a + d * n_b / n
    M2   = M2_a + M2_b + d**2 * n_a * n_b / n

Summaries with ``n = 0`` (a process holding an empty batch) are skipped, so uneven and
empty slices give the statistics of the whole batch. Merging in a balanced tree (pairs,
then pairs of pairs) keeps the rounding error growing with ``log2(P)``, not ``P``.

The functions use only ``+ - * /`` between arrays and Python floats, so the same code
serves NumPy arrays (:mod:`batchnorm.distributed`) and torch tensors on any device
(:mod:`batchnorm.torch.sync`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T", bound=Any)

__all__ = ["chan_merge", "merge_all"]


def chan_merge(a: tuple[float, T, T], b: tuple[float, T, T]) -> tuple[float, T, T]:
    """Merge two ``(count, mean, m2)`` summaries; either count may be zero."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    if n_b == 0:
        return a
    if n_a == 0:
        return b
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


def merge_all(counts: Sequence[float], means: Sequence[T], m2s: Sequence[T]) -> tuple[float, T, T]:
    """Merge P per-process summaries in a balanced tree.

    Args:
        counts: values per channel on each process (Python numbers, any may be zero).
        means, m2s: per-channel mean and M2 of each process (arrays of one shape).

    Returns:
        ``(count, mean, m2)`` of all values together. When every count is zero the first
        process's (zero) mean and m2 come back with count 0.
    """
    if not (len(counts) == len(means) == len(m2s)) or not counts:
        raise ValueError(
            f"merge_all needs one (count, mean, m2) per process, got {len(counts)} counts, "
            f"{len(means)} means and {len(m2s)} m2s"
        )
    parts = [(float(n), mean, m2) for n, mean, m2 in zip(counts, means, m2s, strict=True)]
    if any(n < 0 for n, _, _ in parts):
        raise ValueError(f"counts must be non-negative, got {list(counts)}")
    while len(parts) > 1:
        merged = [chan_merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0]

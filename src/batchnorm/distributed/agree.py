"""Before a synchronized forward, the ranks agree on what they are about to exchange.

Each rank describes its layer and input in a fixed-size header (:func:`header`); one small
all-gather gives every rank every header, and :func:`check` raises the same error on every
rank when they disagree or when one rank's input is invalid. The statistics collective that
follows is sized from the agreed channel count, so ranks that disagree never reach a
collective whose buffers differ in size (gloo aborts the process then; MPI may corrupt
memory or hang). Memory layout need not agree: statistics are per channel in any order.

Plain Python: the NumPy module and the torch module both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["DTYPE_CODES", "HEADER_SIZE", "DisagreementError", "check", "header"]

DTYPE_CODES = {"float16": 1, "float32": 2, "float64": 3, "bfloat16": 4}  # 0: anything else
_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
HEADER_SIZE = 4  # num_features, channels of the input (-1: none), ndim, dtype code


class DisagreementError(ValueError):
    """The ranks of a SyncBatchNorm disagree, or one rank's input is invalid; every rank of
    the group raises this same error at the same step."""


def header(num_features: int, shape: Sequence[int], axis: int, dtype_name: str) -> list[float]:
    """This rank's header: ``[num_features, channels, ndim, dtype code]``."""
    ndim = len(shape)
    channels = shape[axis] if ndim >= 2 and -ndim <= axis < ndim else -1
    return [
        float(num_features),
        float(channels),
        float(ndim),
        float(DTYPE_CODES.get(dtype_name, 0)),
    ]


def _dtype(code: Any) -> str:
    return _DTYPE_NAMES.get(int(code), "not floating point")


def check(table: Sequence[Sequence[float]], axis: int = 1) -> None:
    """Raise :class:`DisagreementError` unless every rank's header (row r: rank r; the first
    HEADER_SIZE values) agrees and describes a valid input."""
    rows = [[int(v) for v in row[:HEADER_SIZE]] for row in table]  # past it: the caller's
    problems = []
    features = {row[0] for row in rows}
    if len(features) > 1:
        each = ", ".join(f"rank {r}: {row[0]}" for r, row in enumerate(rows))
        problems.append(f"num_features differ ({each})")
    for r, (want, channels, ndim, code) in enumerate(rows):
        if ndim < 2:
            problems.append(f"rank {r}: input has {ndim} dimension(s), expected at least 2")
        elif channels < 0:
            problems.append(f"rank {r}: axis {axis} is out of range for a {ndim}-d input")
        elif channels != want:
            problems.append(f"rank {r}: input has {channels} channels on axis {axis}, "
                            f"expected {want}")  # fmt: skip
        if code == 0:
            problems.append(f"rank {r}: input dtype is not floating point")
    codes = {row[3] for row in rows if row[3]}
    if len(codes) > 1:
        each = ", ".join(f"rank {r}: {_dtype(row[3])}" for r, row in enumerate(rows))
        problems.append(f"input dtypes differ ({each})")
    if problems:
        raise DisagreementError(
            "SyncBatchNorm: the ranks cannot synchronize this forward: "
            + "; ".join(problems)
            + ". Every rank of the group raises this error; nothing was updated."
        )

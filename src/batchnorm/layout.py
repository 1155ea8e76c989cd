"""Every input seen as a C-contiguous ``(outer, C, inner)`` array: one view for all kernels.

Channels are the middle axis. ``(N, C, H, W)`` is ``(N, C, H*W)``; an input whose channel axis
is densest in memory (channels-last, ``axis=-1`` or a ``channels_last`` tensor) is
``(N*H*W, C, 1)``; a 2-D ``(N, C)`` input is ``(N, C, 1)``; a Fortran-ordered input is
seen through its transpose (C-ordered, axes reversed). Kernels see only this view, and
outputs come back in the input's layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """How an N-d array is seen as a C-contiguous (outer, C, inner) array, and back."""

    shape: tuple[int, ...]
    axis: int
    channels_last: bool  # True: the channel axis was moved to the end of memory order
    fortran: bool = False  # True: seen through the transpose (Fortran order)

    def _transposed(self) -> Layout:
        return Layout(self.shape[::-1], len(self.shape) - 1 - self.axis, False)

    def to3d(self, a: np.ndarray, dtype: np.dtype) -> np.ndarray:
        if self.fortran:
            return self._transposed().to3d(a.T, dtype)
        channels = self.shape[self.axis]
        if self.channels_last:
            moved = np.moveaxis(a, self.axis, -1)
            return np.ascontiguousarray(moved, dtype=dtype).reshape(
                moved.size // channels, channels, 1
            )
        outer = math.prod(self.shape[: self.axis])
        inner = math.prod(self.shape[self.axis + 1 :])
        return np.ascontiguousarray(a, dtype=dtype).reshape(outer, channels, inner)

    def from3d(self, a3: np.ndarray) -> np.ndarray:
        if self.fortran:
            return self._transposed().from3d(a3).T  # type: ignore[no-any-return]
        if self.channels_last:
            rest = self.shape[: self.axis] + self.shape[self.axis + 1 :]
            moved_shape = rest + (self.shape[self.axis],)
            return np.moveaxis(a3.reshape(moved_shape), -1, self.axis)
        return a3.reshape(self.shape)


def view(x: np.ndarray, axis: int) -> Layout:
    """The layout of ``x`` with channels on ``axis``; raises ValueError for shapes BN refuses."""
    if x.ndim < 2:
        raise ValueError(
            f"batch_norm expects at least 2 dimensions (N, C, ...), got shape {x.shape}"
        )
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {x.ndim} dimensions")
    axis %= x.ndim
    if x.shape[axis] == 0:
        raise ValueError(f"input of shape {x.shape} has no channels on axis {axis}")
    if x.flags.c_contiguous:
        return Layout(x.shape, axis, False)
    if np.moveaxis(x, axis, -1).flags.c_contiguous:
        return Layout(x.shape, axis, True)
    return Layout(x.shape, axis, False, fortran=x.flags.f_contiguous)

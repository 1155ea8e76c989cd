"""Every input seen as a C-contiguous ``(outer, C, inner)`` array: one view for all kernels.

Channels are the middle axis. ``(N, C, H, W)`` is ``(N, C, H*W)``; an input whose channel axis
is densest in memory (channels-last, ``axis=-1`` or a ``channels_last`` tensor) is
``(N*H*W, C, 1)``; a 2-D ``(N, C)`` input is ``(N, C, 1)``; a Fortran-ordered array is
seen through its transpose (C-ordered, axes reversed). Kernels see only this view: NumPy arrays
through :class:`Layout` (a C-contiguous array, copied when the strides are none of these, and
outputs come back in the input's layout), torch tensors through :func:`tensor_view` (a strided
view, never a copy).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np


class Layout(NamedTuple):
    """How an N-d array is seen as a C-contiguous (outer, C, inner) array, and back.

    A named tuple: made on every call, and a frozen dataclass cost 0.6 us more to make."""

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


# --- torch tensors: the same (outer, C, inner) picture as a strided view, never a copy ---------
# Duck-typed (``shape``, ``stride()``, ``as_strided``): this module does not import torch.


def tensor_channels_last(t: Any) -> bool | None:
    """False for a contiguous (N, C, ...) tensor, True for channels-last (the channel axis
    densest, the rest contiguous), None for any other strides (a view would need a copy)."""
    if t.is_contiguous():
        return False
    if t.movedim(1, -1).is_contiguous():
        return True
    return None


def _merged_stride(dims: list[tuple[int, int]]) -> int | None:
    """The stride of ``dims`` ((size, stride) pairs, outer first) merged into one, or None."""
    dims = [(n, st) for n, st in dims if n != 1]
    for (_, outer_stride), (n, st) in zip(dims, dims[1:], strict=False):
        if outer_stride != st * n:
            return None
    return dims[-1][1] if dims else 1


def tensor_strides3d(t: Any, channels_last: bool) -> tuple[int, int, int] | None:
    """Strides of ``t`` seen as (outer, C, inner), or None when that view needs a copy."""
    sizes, strides = t.shape, t.stride()
    spatial = list(zip(sizes[2:], strides[2:], strict=True))
    if channels_last:  # outer = (N, spatial...), inner = ()
        so = _merged_stride([(sizes[0], strides[0]), *spatial])
        return None if so is None else (so, strides[1], 0)
    si = _merged_stride(spatial)
    return None if si is None else (strides[0], strides[1], si)


def tensor_view(t: Any, channels_last: bool | None = None) -> Any | None:
    """``t`` (N, C, ...) as an (outer, C, inner) view of the same memory, or None.

    ``channels_last`` None: decided from ``t`` (:func:`tensor_channels_last`); given: the
    layout to see ``t`` in (a gradient seen in its input's layout), None when ``t``'s strides
    do not allow it.
    """
    if t.dim() < 2:
        return None
    if channels_last is None:
        channels_last = tensor_channels_last(t)
        if channels_last is None:
            return None
    strides = tensor_strides3d(t, channels_last)
    if strides is None:
        return None
    inner = math.prod(t.shape[2:])
    n, c = t.shape[0], t.shape[1]
    sizes = (n * inner, c, 1) if channels_last else (n, c, inner)
    return t.as_strided(sizes, strides)

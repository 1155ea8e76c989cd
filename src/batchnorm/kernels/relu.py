"""Fused BN + ReLU (+ residual): the entry points both CPU backends share, over their own loops.

``z = (x - mean) * scale + shift [+ residual]``, ``y = max(z, 0)``. The backward needs ReLU's
mask ``z > 0``: read from ``y`` when there is a residual, else recomputed from ``x`` (which BN
keeps anyway), so no pre-activation is ever stored.

:class:`ReLUPasses` gives :mod:`batchnorm.kernels.numpy` and ``batchnorm.kernels.numba.relu``
the one signature of the passes :mod:`batchnorm.torch.fused` calls: it allocates the outputs
and hands a backend's loops the backward's inputs as one :class:`Backward`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from batchnorm.kernels import buffers

Array = np.ndarray
T = TypeVar("T")


def given(a: T | None, stand_in: T) -> tuple[T, bool]:
    """``(a, True)``, or ``(stand_in, False)`` when ``a`` is None: for compiled kernels, which
    take an array and a flag for an optional one (the residual, y as ReLU's mask, dz)."""
    return (stand_in, False) if a is None else (a, True)


@dataclass(frozen=True)
class Backward:
    """What the backward passes read: dy and x, the forward's per-channel vectors, and y when
    a residual was added (ReLU's mask is then ``y > 0``; None: recomputed from x)."""

    dy3: Array
    x3: Array
    mean: Array
    scale: Array
    shift: Array
    y3: Array | None


@dataclass(frozen=True)
class ReLUPasses:
    """One backend's BN + ReLU passes: its loops behind the shared signatures.

    ``forward(x3, mean, scale, shift, residual3) -> y3``; ``sums(backward) -> (sum_dz,
    sum_dz_xmu)``; ``grad_input(backward, a, b, c, dx3, dz3)`` fills dx3, and dz3 unless None.
    """

    forward: Callable[[Array, Array, Array, Array, Array | None], Array]
    sums: Callable[[Backward], tuple[Array, Array]]
    grad_input: Callable[[Backward, Array, Array, Array, Array, Array | None], None]

    def normalize_relu(self, x3: Array, mean: Array, scale: Array, shift: Array,
                       residual3: Array | None) -> Array:
        """``y = max((x - mean) * scale + shift [+ residual], 0)`` in x's dtype."""
        return self.forward(x3, mean, scale, shift, residual3)

    def relu_grad_sums(self, dy3: Array, x3: Array, mean: Array, scale: Array, shift: Array,
                       y3: Array | None) -> tuple[Array, Array]:
        """Per-channel ``sum(dz)`` and ``sum(dz * (x - mean))`` with ``dz = dy * (z > 0)``."""
        return self.sums(Backward(dy3, x3, mean, scale, shift, y3))

    def relu_grad_input(self, dy3: Array, x3: Array, mean: Array, scale: Array, shift: Array,
                        y3: Array | None, coefficients: tuple[Array, Array, Array],
                        want_dz: bool) -> tuple[Array, Array | None]:
        """``dx = a * dz + b * (x - mean) + c``, and ``dz`` itself (the residual's gradient)
        when ``want_dz``, else None."""
        dx3 = buffers.empty_like(x3)
        dz3 = buffers.empty_like(dy3) if want_dz else None
        self.grad_input(Backward(dy3, x3, mean, scale, shift, y3), *coefficients, dx3, dz3)
        return dx3, dz3

"""The two elementwise formulas, as scalar functions the pass templates inline.

``op(x, dy, mean, p, q, r)``; each pass reads only what its formula uses (LLVM drops the
unused loads), so one template serves both without a cost.
"""

from __future__ import annotations

from typing import Any

from batchnorm.kernels.numba.config import jit


@jit
def normalize(x: Any, dy: Any, mean: Any, scale: Any, shift: Any, unused: Any) -> Any:
    """``y = (x - mean) * scale + shift`` (forward)."""
    return (x - mean) * scale + shift


@jit
def grad_input(x: Any, dy: Any, mean: Any, a: Any, b: Any, c: Any) -> Any:
    """``dx = a * dy + b * (x - mean) + c`` (backward)."""
    return a * dy + b * (x - mean) + c

"""Backends: the passes over the data, behind one signature.

Every backend module provides the same four functions over a C-contiguous array viewed
as ``(outer, C, inner)`` (channels are the middle axis; ``inner == 1`` is channels-last):

``channel_stats(x3) -> (mean, m2)``
    per-channel mean and sum of squared deviations, float64, shape (C,).
``normalize(x3, mean, scale, shift) -> y3``
    ``y = (x - mean) * scale + shift``, in x's dtype (training and eval forward).
``grad_sums(dy3, x3, mean) -> (sum_dy, sum_dy_xmu)``
    per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``, float64.
``grad_input(dy3, x3, mean, a, b, c) -> dx3``
    ``dx = a * dy + b * (x - mean) + c``, in x's dtype.

The per-channel coefficients (mean, scale, a, b, c) are float64 arrays of shape (C,),
computed once in :mod:`batchnorm.functional`; backends hold no BN formulas of their own.
Each module also has ``DTYPES``, the dtypes it computes; others go to numpy.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import numpy as np

NAMES = ("numpy", "numba")
_MODULES = {name: f"batchnorm.backends.{name}_backend" for name in NAMES}
_loaded: dict[str, ModuleType] = {}


def _load(name: str) -> ModuleType:
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


def available() -> list[str]:
    """Names of the backends that import on this machine."""
    names = []
    for name in NAMES:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def resolve(name: str = "auto") -> str:
    """The backend name that ``name`` stands for.

    ``"auto"`` means ``$BATCHNORM_BACKEND`` when set, else the fastest one installed.
    An explicit name is taken as it is and must be installed.
    """
    if name == "auto":
        forced = os.environ.get("BATCHNORM_BACKEND", "").strip().lower()
        if forced and forced != "auto":
            name = forced
        else:
            return "numba" if "numba" in available() else "numpy"
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {NAMES}")
    try:
        _load(name)
    except ImportError as exc:
        raise ImportError(
            f"backend {name!r} is not installed ({exc}); install the 'fast' extra "
            "(pip install 'batchnorm[fast]') or use backend='numpy'"
        ) from exc
    return name


def get(name: str = "auto", dtype: np.dtype | None = None) -> ModuleType:
    """The backend module for ``name``; numpy when that backend cannot compute ``dtype``."""
    module = _load(resolve(name))
    if dtype is not None and np.dtype(dtype) not in module.DTYPES:
        module = _load("numpy")
    return module

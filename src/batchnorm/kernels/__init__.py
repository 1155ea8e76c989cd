"""The kernel layer: the passes over the data, behind one interface.

Every implementation (``numpy``, ``numba``; ``triton`` for torch tensors on the GPU) is a
module providing :class:`Kernels` over a C-contiguous array viewed as ``(outer, C, inner)``
(:mod:`batchnorm.layout`; channels are the middle axis, ``inner == 1`` is channels-last).
The per-channel vectors (mean, scale, a, b, c) are float64 arrays of shape (C,), computed by
:mod:`batchnorm.functional` from :mod:`batchnorm.math`; kernels hold no BN formula of their
own except where they call, or name, the one in :mod:`batchnorm.math`.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Protocol, cast

import numpy as np

NAMES = ("numpy", "numba")
_loaded: dict[str, Kernels] = {}
_fastest: list[str] = []


class Kernels(Protocol):
    """The passes one implementation provides; the fused ones may decline with None."""

    DTYPES: tuple[np.dtype, ...]  # the dtypes it computes; others go to numpy

    def channel_stats(self, x3: Any) -> tuple[Any, Any]:
        """Per-channel ``(mean, m2)``: the mean and the sum of squared deviations, float64."""

    def normalize(self, x3: Any, mean: Any, scale: Any, shift: Any) -> Any:
        """``y = (x - mean) * scale + shift`` in x's dtype (training and eval forward)."""

    def grad_sums(self, dy3: Any, x3: Any, mean: Any) -> tuple[Any, Any]:
        """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``, float64."""

    def grad_input(self, dy3: Any, x3: Any, mean: Any, a: Any, b: Any, c: Any) -> Any:
        """``dx = a * dy + b * (x - mean) + c`` in x's dtype."""

    def fused_forward(
        self,
        x3: Any,
        weight: Any | None,
        bias: Any | None,
        eps: float,
        running_mean: Any | None = None,
        running_var: Any | None = None,
        momentum: float = 0.0,
    ) -> tuple[Any, Any, Any, Any, bool] | None:
        """Training forward in one call: ``(y3, mean, m2, rstd, finite)``, or None where it
        would not pay.

        The same numbers as ``channel_stats`` then ``normalize`` with
        ``rstd = inverse_std(m2 / count, eps)``, ``scale = weight * rstd``, ``shift = bias``.
        ``finite`` says whether every channel's mean is finite; the running buffers, when
        given, get :func:`batchnorm.math.running_stats` in place only then (otherwise the
        caller reports the batch).
        """

    def fused_backward(
        self, dy3: Any, x3: Any, mean: Any, rstd: Any, weight: Any | None, count: int
    ) -> tuple[Any, Any, Any] | None:
        """Training backward reading dy and x once: ``(dx3, sum_dy, sum_dy_xmu)``, or None.

        The same numbers as ``grad_sums`` then ``grad_input`` with the coefficients of
        :func:`batchnorm.math.grad_coefficients` (batch statistics over ``count`` values).
        """

    def fused_eval(
        self,
        x3: Any,
        weight: Any | None,
        bias: Any | None,
        running_mean: Any,
        running_var: Any,
        eps: float,
    ) -> tuple[Any, Any, Any] | None:
        """Eval forward in one call: ``(y3, mean, rstd)``, or None.

        The same numbers as ``normalize`` with ``mean = running_mean``,
        ``rstd = inverse_std(running_var, eps)``, ``scale = weight * rstd``, ``shift = bias``.
        """


def _load(name: str) -> Kernels:
    if name not in _loaded:
        _loaded[name] = cast(Kernels, importlib.import_module(f"batchnorm.kernels.{name}"))
    return _loaded[name]


def available() -> list[str]:
    """Names of the implementations that import on this machine."""
    names = []
    for name in NAMES:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def resolve(name: str = "auto") -> str:
    """The implementation that ``name`` stands for.

    ``"auto"`` means ``$BATCHNORM_BACKEND`` when set, else the fastest one installed.
    An explicit name is taken as it is and must be installed.
    """
    if name == "auto":
        forced = os.environ.get("BATCHNORM_BACKEND", "").strip().lower()
        if forced and forced != "auto":
            name = forced
        else:
            if not _fastest:  # found once: what is installed does not change in a process
                _fastest.append("numba" if "numba" in available() else "numpy")
            return _fastest[0]
    elif name in _loaded:
        return name  # already imported: nothing to check
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


def cache_info() -> dict[str, Any]:
    """The compiled-kernel cache: directory, whether it exists and is writable, the kernels
    and compiled entries in it, its size in bytes, and this process's loads and compilations.

    ``{"implementation": "numba", ...}``; without numba ``{"implementation": None}``.
    """
    try:
        from batchnorm.kernels.numba import cache
    except ImportError:
        return {"implementation": None}
    return {"implementation": "numba", **cache.info()}


def warm_up(dtypes: tuple[str, ...] = ("float32", "float64")) -> dict[str, Any]:
    """Compile every kernel now (or load it from the cache), so no later call waits.

    The first time on a machine this takes about a minute (every kernel, serial and
    parallel, per dtype); afterwards, in any process, a second or so. Returns
    :func:`cache_info`.
    """
    try:
        from batchnorm.kernels import numba
    except ImportError:
        return cache_info()
    numba.warm_up(tuple(dtypes))
    return cache_info()


class threads:
    """Run the parallel kernels on ``n`` threads, from now on or inside a ``with`` block.

    ``threads(4)`` sets the count (for the calling thread, as numba counts them; at most
    numba's pool size); ``with threads(1): ...`` restores the previous count on exit. The
    PyTorch drop-in calls it with ``torch.get_num_threads()``. Without numba it does
    nothing.
    """

    def __init__(self, n: int) -> None:
        self.previous = set_threads(n)

    def __enter__(self) -> threads:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            set_threads(self.previous)


@functools.cache
def _numba_config() -> Any:
    """numba's config module, imported once; None without numba."""
    try:
        from batchnorm.kernels.numba import config
    except ImportError:
        return None
    return config


def set_threads(n: int) -> int | None:
    """:class:`threads` as a call, for hot paths (the drop-in's every call): sets the count,
    returns the previous one (None without numba)."""
    if int(n) < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    config = _numba_config()
    return None if config is None else config.set_threads(n)  # type: ignore[no-any-return]


def get(name: str = "auto", dtype: Any = None) -> Kernels:
    """The kernels for ``name``; numpy's when that implementation cannot compute ``dtype``."""
    module = _loaded.get(name) or _load(resolve(name))  # a loaded name needs no resolving
    if dtype is not None and dtype not in module.DTYPES:
        module = _load("numpy")
    return module

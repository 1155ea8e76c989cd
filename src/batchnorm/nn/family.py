"""Batch Renormalization and Ghost Batch Normalization for NumPy arrays.

Both are batch norm over groups of rows with a per-group correction, so one small engine
serves both, over the kernel layer (:mod:`batchnorm.kernels`) and the one copy of the math
(:mod:`batchnorm.math`):

- Batch Renorm (Ioffe 2017) normalizes the whole batch, then applies ``r`` and ``d``
  (:func:`batchnorm.math.renorm_correction`): ``y = w * (x_hat * r + d) + b``.
- Ghost BN (Hoffer et al. 2017) normalizes each chunk of ``virtual_batch_size`` samples with
  its own statistics. Small chunks are laid side by side as extra channels
  (``(rows, G*C, inner)``, one copy) so each pass is one kernel call for all of them; large
  chunks are contiguous slices, passed one by one without a copy.

With r and d held constant in the backward, each group's dx is BN's with weight ``w * r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from batchnorm import functional as F
from batchnorm import kernels
from batchnorm.layout import Layout, view
from batchnorm.math import (
    grad_coefficients,
    inverse_std,
    module_call,
    module_call_of,
    renorm_correction,
    running_stats,
)
from batchnorm.nn.batchnorm import _BatchNorm

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
]

GROUP_BELOW = 1 << 16  # chunks of fewer elements than this are normalized in one kernel call


@dataclass
class _Part:
    """Rows of the (outer, C, inner) input holding ``groups`` chunks side by side."""

    x3: np.ndarray  # (rows, groups * C, inner), C-contiguous
    groups: int


def split(a3: np.ndarray, rows: int, grouped: bool) -> list[_Part]:
    """Chunks of ``rows`` rows (the last may be shorter), full ones side by side if grouped."""
    outer, channels, inner = a3.shape
    full = outer // rows
    parts = []
    if grouped and full > 1:
        side = a3[: full * rows].reshape(full, rows, channels, inner).transpose(1, 0, 2, 3)
        parts.append(_Part(np.ascontiguousarray(side).reshape(rows, full * channels, inner), full))
    else:
        parts += [_Part(a3[i * rows : (i + 1) * rows], 1) for i in range(full)]
    if outer % rows:
        parts.append(_Part(a3[full * rows :], 1))
    return parts


def join(arrays: list[np.ndarray], parts: list[_Part], shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`split`: per-part arrays back into one (outer, C, inner) array."""
    if len(arrays) == 1 and parts[0].groups == 1:
        return arrays[0]
    _, channels, inner = shape
    out = np.empty(shape, arrays[0].dtype)
    start = 0
    for a, part in zip(arrays, parts, strict=True):
        rows, g = a.shape[0], part.groups
        back = a.reshape(rows, g, channels, inner).transpose(1, 0, 2, 3)
        out[start : start + rows * g] = back.reshape(-1, channels, inner)
        start += rows * g
    return out


@dataclass
class _Cache:
    layout: Layout
    parts: list[_Part]
    mean: list[np.ndarray]  # per part, float64 (groups * C,)
    rstd: list[np.ndarray]
    r: list[np.ndarray]
    d: list[np.ndarray]
    counts: list[int]
    backend: str


class _GroupedNorm(_BatchNorm):
    """Training-mode engine shared by Batch Renorm and Ghost BN; eval is BN's eval."""

    _family_cache: _Cache | None = None

    def _chunk_samples(self, batch: int) -> int:
        """Samples (along the first axis) per normalized chunk."""
        return batch

    def _check_settings(self) -> None:
        """Raise ValueError for settings changed to bad values since construction."""

    def _correct(
        self, mean: np.ndarray, var: np.ndarray
    ) -> tuple[np.ndarray | float, np.ndarray | float]:
        """(r, d) for these statistics, before the running ones are updated."""
        return 1.0, 0.0

    def forward(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        self._check_input(x)
        self._check_settings()
        tracked = self.num_batches_tracked
        call = module_call_of(self)
        self._family_cache = None
        if not call.batch_stats:
            return super().forward(x)
        self._cache = None
        if x.dtype not in F.FLOAT_DTYPES:
            raise TypeError(f"input must be float16, float32 or float64, got dtype {x.dtype}")
        layout = view(x, self.axis)
        if layout.axis == 0:
            raise ValueError("the channel axis cannot be the batch axis (axis 0)")
        name = kernels.resolve(self.backend)
        impl = kernels.get(name, x.dtype)
        x3 = layout.to3d(x, x.dtype)
        batch = x.shape[0]
        per_sample = x3.shape[0] // batch if batch else 1
        samples = max(1, self._chunk_samples(batch))
        chunk_elements = samples * per_sample * x3.shape[1] * x3.shape[2]
        parts = split(x3, samples * per_sample, grouped=chunk_elements < GROUP_BELOW)
        channels = self.num_features
        stats = [impl.channel_stats(p.x3) for p in parts]
        counts = [p.x3.shape[0] * p.x3.shape[2] for p in parts]
        if not parts or min(counts) <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{x.shape} (chunks of {samples} samples)"
            )
        means = np.concatenate([m for m, _ in stats]).reshape(-1, channels)
        m2s = np.concatenate([m2 for _, m2 in stats]).reshape(-1, channels)
        chunk_counts = np.repeat(counts, [p.groups for p in parts])
        bad = ~(np.isfinite(means) & np.isfinite(m2s)).all(axis=0)
        if bad.any():
            raise F.NonFiniteBatchError(
                f"non-finite values (NaN or inf) in the training batch, channels "
                f"{np.flatnonzero(bad)[:10].tolist()}; running statistics were left unchanged"
            )
        var = m2s / chunk_counts[:, None]
        r, d = self._correct(means, var)  # (chunks, C) or scalars
        r = np.broadcast_to(r, means.shape)
        d = np.broadcast_to(d, means.shape)
        rm, rv = self.running_mean, self.running_var
        if call.count_batch and rm is not None and rv is not None and tracked is not None:
            before = int(tracked)
            for i in range(len(means)):  # in order, as BN called on each chunk in turn
                step = module_call(True, True, True, self.momentum, partial(int, before + i))
                rm[...], rv[...] = running_stats(rm, rv, means[i], m2s[i], chunk_counts[i],
                                                 step.momentum)
                tracked[...] += 1
        w = np.ones(channels) if self.weight is None else self.weight.data.astype(np.float64)
        b = np.zeros(channels) if self.bias is None else self.bias.data.astype(np.float64)
        rstd = inverse_std(var, self.eps)
        scale, shift = w * r * rstd, b + w * d
        cache = _Cache(layout, parts, [], [], [], [], counts, name)
        ys, start = [], 0
        for p in parts:
            rows = slice(start, start + p.groups)
            start += p.groups
            cache.mean.append(means[rows].ravel())
            cache.rstd.append(rstd[rows].ravel())
            cache.r.append(r[rows].ravel())
            cache.d.append(d[rows].ravel())
            ys.append(impl.normalize(p.x3, cache.mean[-1], scale[rows].ravel(),
                                     shift[rows].ravel()))
        self._family_cache = cache
        return layout.from3d(join(ys, parts, x3.shape))

    def backward(self, dy: Any) -> np.ndarray:
        cache = self._family_cache
        if cache is None:
            return super().backward(dy)
        self._family_cache = None
        dy = np.asarray(dy)
        layout = cache.layout
        if dy.shape != layout.shape:
            raise ValueError(
                f"grad_output has shape {dy.shape}, expected the input's shape {layout.shape}"
            )
        x3_dtype = cache.parts[0].x3.dtype
        dy3 = layout.to3d(dy, x3_dtype)
        rows = cache.parts[0].x3.shape[0]
        dparts = split(dy3, rows, grouped=cache.parts[0].groups > 1)
        impl = kernels.get(cache.backend, x3_dtype)
        channels = self.num_features
        w = np.ones(channels) if self.weight is None else self.weight.data.astype(np.float64)
        dweight, dbias, dxs = np.zeros(channels), np.zeros(channels), []
        for i, (p, dp) in enumerate(zip(cache.parts, dparts, strict=True)):
            mean, rstd, r, d = cache.mean[i], cache.rstd[i], cache.r[i], cache.d[i]
            sum_dy, sum_dy_xmu = impl.grad_sums(dp.x3, p.x3, mean)
            gain = np.tile(w, p.groups) * r
            a, b, c = grad_coefficients(gain, rstd, sum_dy, sum_dy_xmu, cache.counts[i])
            dxs.append(impl.grad_input(dp.x3, p.x3, mean, a, b, c))
            dweight += (r * rstd * sum_dy_xmu + d * sum_dy).reshape(-1, channels).sum(axis=0)
            dbias += sum_dy.reshape(-1, channels).sum(axis=0)
        if self.weight is not None:
            self.weight.accumulate(dweight)
        if self.bias is not None:
            self.bias.accumulate(dbias)
        return layout.from3d(join(dxs, cache.parts, dy3.shape))


def check_renorm_limits(rmax: float, dmax: float) -> None:
    """ValueError unless ``rmax >= 1`` and ``dmax >= 0`` (finite numbers)."""
    if not (isinstance(rmax, (int, float)) and 1.0 <= rmax < float("inf")):
        raise ValueError(f"rmax must be a finite number >= 1, got {rmax!r}")
    if not (isinstance(dmax, (int, float)) and 0.0 <= dmax < float("inf")):
        raise ValueError(f"dmax must be a finite number >= 0, got {dmax!r}")


def check_virtual_batch_size(virtual_batch_size: Any) -> int:
    """The size as an int; ValueError unless it is a positive integer."""
    if isinstance(virtual_batch_size, bool) or int(virtual_batch_size) != virtual_batch_size \
            or virtual_batch_size < 1:
        raise ValueError(
            f"virtual_batch_size must be a positive integer, got {virtual_batch_size!r}"
        )
    return int(virtual_batch_size)


class RenormSettings:
    """Batch Renorm's settings for the NumPy and the torch classes (before the BN base in the
    MRO): BN's constructor plus ``rmax`` and ``dmax``, checked when built and at each forward
    (a training loop may change them every step)."""

    rmax: float
    dmax: float
    track_running_stats: bool

    def __init__(self, num_features: int, *args: Any, rmax: float = 3.0, dmax: float = 5.0,
                 **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        if not self.track_running_stats:
            raise ValueError("Batch Renorm needs running statistics: track_running_stats=True")
        self.rmax, self.dmax = rmax, dmax
        self._check_settings()

    def _check_settings(self) -> None:
        check_renorm_limits(self.rmax, self.dmax)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}"  # type: ignore[misc]


class GhostSettings:
    """Ghost BN's settings for the NumPy and the torch classes (before the BN base in the
    MRO): ``(num_features, virtual_batch_size, ...BN's arguments)``; chunks of
    ``virtual_batch_size`` samples."""

    virtual_batch_size: int

    def __init__(self, num_features: int, virtual_batch_size: int, *args: Any,
                 **kwargs: Any) -> None:
        size = check_virtual_batch_size(virtual_batch_size)
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        self.virtual_batch_size = size

    def _check_settings(self) -> None:
        check_virtual_batch_size(self.virtual_batch_size)

    def _chunk_samples(self, batch: int) -> int:
        return int(self.virtual_batch_size)

    def extra_repr(self) -> str:
        s = super().extra_repr()  # type: ignore[misc]
        return f"{s}, virtual_batch_size={self.virtual_batch_size}"


class _BatchRenorm(RenormSettings, _GroupedNorm):
    r"""Batch Renormalization (Ioffe 2017): BN whose training output is corrected toward the
    running statistics.

    .. math:: y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta

    with ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B - running_mean) /
    sigma, -dmax, dmax)`` from the running statistics before this batch
    (:func:`batchnorm.math.renorm_correction`), held constant in the backward. The running
    statistics update as BN's; eval is BN's eval, and ``rmax=1, dmax=0`` is BN. ``rmax`` and
    ``dmax`` are attributes a training loop may change every step (the paper's schedule).

    Args: BN's (:class:`batchnorm.BatchNorm2d`) plus ``rmax >= 1`` and ``dmax >= 0``;
    ``track_running_stats`` must stay True.
    """

    def _correct(
        self, mean: np.ndarray, var: np.ndarray
    ) -> tuple[np.ndarray | float, np.ndarray | float]:
        assert self.running_mean is not None and self.running_var is not None
        return renorm_correction(mean, var, self.running_mean.astype(np.float64),
                                 self.running_var.astype(np.float64), self.eps, self.rmax,
                                 self.dmax)


class _GhostBatchNorm(GhostSettings, _GroupedNorm):
    """Ghost Batch Normalization (Hoffer et al. 2017): BN over chunks of the batch.

    The batch is split along its first axis into chunks of ``virtual_batch_size`` samples
    (the last may be smaller), each normalized with its own statistics; the running
    statistics update once per chunk, in order, exactly as BN called on each chunk in turn
    (``num_batches_tracked`` counts chunks). Eval is BN's eval.

    Args: ``num_features``, ``virtual_batch_size`` (a positive integer), then BN's.
    """



class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm of (N, C) or (N, C, L) input. See :class:`_BatchRenorm`."""

    _expected_ndim = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm of (N, C, H, W) input. See :class:`_BatchRenorm`."""

    _expected_ndim = (4,)


class BatchRenorm3d(_BatchRenorm):
    """Batch Renorm of (N, C, D, H, W) input. See :class:`_BatchRenorm`."""

    _expected_ndim = (5,)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BN of (N, C) or (N, C, L) input. See :class:`_GhostBatchNorm`."""

    _expected_ndim = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BN of (N, C, H, W) input. See :class:`_GhostBatchNorm`."""

    _expected_ndim = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost BN of (N, C, D, H, W) input. See :class:`_GhostBatchNorm`."""

    _expected_ndim = (5,)

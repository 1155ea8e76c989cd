"""BatchNorm1d/2d/3d for NumPy arrays, with PyTorch's constructor and semantics."""

from __future__ import annotations

from typing import Any

import numpy as np

from batchnorm import functional as F
from batchnorm import kernels
from batchnorm.math import module_call_of
from batchnorm.nn.module import Module, Parameter


class _BatchNorm(Module):
    r"""Batch normalization over the channel axis of a mini-batch.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    In training the mean and biased variance come from the batch, per channel, and the
    running estimates are updated with ``new = (1 - momentum) * old + momentum * batch``
    (running_var gets the unbiased variance). ``momentum=None`` makes them cumulative
    averages over ``num_batches_tracked``. In eval the running estimates are used, unless
    ``track_running_stats=False``, which always uses batch statistics.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default 1e-5.
        momentum: weight of each new batch in the running averages, or None. Default 0.1.
        affine: learn a per-channel scale ``weight`` (gamma) and shift ``bias`` (beta).
        track_running_stats: keep running_mean, running_var and num_batches_tracked.
        dtype: dtype of parameters and buffers. Default float32.
        axis: channel axis of the input: 1 for (N, C, ...), -1 for channels-last.
        backend: "auto", "numpy" or "numba" (see :mod:`batchnorm.kernels`).
        bias: with ``affine``, whether to learn the shift (keyword only, as in PyTorch).

    Inputs of another float dtype are accepted; the output keeps the input's dtype.
    """

    _expected_ndim: tuple[int, ...] = ()
    _optional_state = ("num_batches_tracked",)  # PyTorch loads checkpoints from before it
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    num_batches_tracked: np.ndarray | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: Any = np.float32,
        axis: int = 1,
        backend: str = "auto",
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if int(num_features) != num_features or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if backend != "auto":
            kernels.resolve(backend)  # a misspelled or missing backend fails here, not later
        dtype = np.dtype(dtype)
        if dtype not in F.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.dtype = dtype
        self.axis = axis
        self.backend = backend
        self.weight = Parameter(np.ones(num_features, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype))
            self.register_buffer("running_var", np.ones(num_features, dtype))
            self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._cache: F.BatchNormCache | None = None

    def reset_running_stats(self) -> None:
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean[...] = 0
            self.running_var[...] = 1
        if self.num_batches_tracked is not None:
            self.num_batches_tracked[...] = 0

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            self.weight.data[...] = 1
        if self.bias is not None:
            self.bias.data[...] = 0

    def _check_ndim(self, ndim: int) -> None:
        if ndim not in self._expected_ndim:
            dims = " or ".join(f"{d}D" for d in self._expected_ndim)
            raise ValueError(f"expected {dims} input (got {ndim}D input)")

    def _check_input(self, x: np.ndarray) -> None:
        self._check_ndim(x.ndim)
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"axis {self.axis} is out of range for {x.ndim}D input")
        if x.shape[self.axis] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis {self.axis}, "
                f"got input of shape {x.shape}"
            )

    def _sync(self) -> F.StatsSync | None:
        return None  # SyncBatchNorm combines statistics across processes here

    def forward(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        self._check_input(x)
        tracked = self.num_batches_tracked
        call = module_call_of(self)
        y, self._cache = F.batch_norm_forward(
            x,
            None if self.weight is None else self.weight.data,
            None if self.bias is None else self.bias.data,
            self.running_mean if call.pass_buffers else None,
            self.running_var if call.pass_buffers else None,
            training=call.batch_stats,
            momentum=call.momentum,
            eps=self.eps,
            axis=self.axis,
            backend=self.backend,
            sync=self._sync() if call.batch_stats else None,
        )
        if call.count_batch and tracked is not None:  # after: a rejected batch changes nothing
            tracked += 1
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """dL/dx for the last forward; adds dL/dweight and dL/dbias into their ``.grad``."""
        if self._cache is None:
            raise RuntimeError(
                "backward() called before forward(), or twice for one forward: "
                "call the layer on a batch first"
            )
        dx, dweight, dbias = F.batch_norm_backward(dy, self._cache)
        self._cache = None
        if self.weight is not None and dweight is not None:
            self.weight.accumulate(dweight)
        if self.bias is not None and dbias is not None:
            self.bias.accumulate(dbias)
        return dx

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) input. See :class:`_BatchNorm`."""

    _expected_ndim = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization of (N, C, H, W) input. See :class:`_BatchNorm`."""

    _expected_ndim = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch normalization of (N, C, D, H, W) input. See :class:`_BatchNorm`."""

    _expected_ndim = (5,)

"""Batch Renormalization and Ghost Batch Normalization for PyTorch.

Subclasses of ``torch.nn.BatchNorm1d/2d/3d`` (state_dict, ``.to()``, optimizers, folding and
freezing treat them as BN) whose training forward is written in plain torch ops over the one
copy of the math (:mod:`batchnorm.math`), so autograd differentiates it exactly; eval is
PyTorch's BN eval. The NumPy versions, and the definitions, are in :mod:`batchnorm.nn.family`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.math import (
    inverse_std,
    module_call,
    module_call_of,
    renorm_correction,
    running_stats,
)
from batchnorm.nn import family as numpy_family
from batchnorm.nn.family import GhostSettings, RenormSettings
from batchnorm.torch.glue import too_few_values

__all__ = list(numpy_family.__all__)  # the same six classes as the NumPy family


class _GroupedNorm(_BatchNorm):
    """Training forward over chunks of the batch, each with its own statistics."""

    def _chunk_samples(self, batch: int) -> int:
        return batch

    def _check_settings(self) -> None:
        pass

    def _correct(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[Any, Any]:
        return 1.0, 0.0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_settings()
        call = module_call_of(self)
        if not call.batch_stats:
            return super().forward(input)
        batch = input.shape[0]
        size = max(1, min(self._chunk_samples(batch), batch))
        full = batch // size
        per_sample = input[:1].numel() // self.num_features
        if (batch % size or size) * per_sample <= 1:  # checked before any state changes
            raise too_few_values(list(input.shape), f" (chunks of {size} samples)")
        chunks = [input[: full * size].reshape((full, size) + input.shape[1:])]
        if batch % size:
            chunks.append(input[full * size :].unsqueeze(0))
        outs = [self._normalize(c, call.count_batch) for c in chunks]
        return torch.cat([o.reshape((-1,) + input.shape[1:]) for o in outs])

    def _normalize(self, chunks: torch.Tensor, update: bool) -> torch.Tensor:
        """(G, n, C, ...) -> each of the G chunks normalized with its own statistics."""
        dims = [1] + list(range(3, chunks.dim()))
        count = chunks.numel() // (chunks.shape[0] * chunks.shape[2])
        var, mean = torch.var_mean(chunks, dim=dims, unbiased=False)  # (G, C)
        with torch.no_grad():
            r, d = self._correct(mean, var)
            rm, rv, tracked = self.running_mean, self.running_var, self.num_batches_tracked
            if update and rm is not None and rv is not None and tracked is not None:
                for i in range(len(mean)):  # in order, as BN called on each chunk in turn
                    step = module_call(True, True, True, self.momentum, lambda: int(tracked))
                    new_mean, new_var = running_stats(rm, rv, mean[i], var[i] * count, count,
                                                      step.momentum)
                    rm.copy_(new_mean)
                    rv.copy_(new_var)
                    tracked.add_(1)
        scale = inverse_std(var, self.eps) * r
        shift = torch.zeros_like(mean) + d
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight
        if self.bias is not None:
            shift = shift + self.bias
        n = chunks.dim()
        return (chunks - self._per_channel(mean, n)) * self._per_channel(scale, n) + (
            self._per_channel(shift, n)
        )

    @staticmethod
    def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
        """(G, C) -> (G, 1, C, 1, ...), broadcastable against the (G, n, C, ...) chunks."""
        return v.reshape((v.shape[0], 1, v.shape[1]) + (1,) * (ndim - 3))


class _BatchRenorm(RenormSettings, _GroupedNorm):
    """Batch Renormalization (Ioffe 2017); see :class:`batchnorm.nn.family._BatchRenorm`.

    BN's constructor plus ``rmax=3.0, dmax=5.0`` (attributes a training loop may change).
    """

    def _correct(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[Any, Any]:
        assert self.running_mean is not None and self.running_var is not None
        return renorm_correction(mean, var, self.running_mean, self.running_var, self.eps,
                                 self.rmax, self.dmax)


class _GhostBatchNorm(GhostSettings, _GroupedNorm):
    """Ghost BN (Hoffer et al. 2017); see :class:`batchnorm.nn.family._GhostBatchNorm`.

    ``(num_features, virtual_batch_size, ...BN's arguments)``.
    """



class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    """Batch Renorm of (N, C) or (N, C, L) input."""


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    """Batch Renorm of (N, C, H, W) input."""


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    """Batch Renorm of (N, C, D, H, W) input."""


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Ghost BN of (N, C) or (N, C, L) input."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Ghost BN of (N, C, H, W) input."""


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """Ghost BN of (N, C, D, H, W) input."""

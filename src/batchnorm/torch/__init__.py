"""PyTorch drop-in batch normalization: our CPU kernels and Triton GPU kernels.

Change one line::

    model = batchnorm.torch.convert_model(model)      # every nn.BatchNorm*d becomes ours

or build with :class:`BatchNorm1d` / :class:`BatchNorm2d` / :class:`BatchNorm3d` (subclasses of
PyTorch's, same constructor). Needs the ``torch`` extra; the GPU kernels need ``triton``, and
this package imports without it. Dispatch rules: :mod:`batchnorm.torch.routing`.
"""

from batchnorm.torch.function import BatchNormFunction, batch_norm
from batchnorm.torch.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    convert_model,
    revert_model,
)
from batchnorm.torch.routing import route
from batchnorm.torch.sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "SyncBatchNorm",
    "batch_norm",
    "convert_model",
    "convert_sync_batchnorm",
    "revert_model",
    "route",
]

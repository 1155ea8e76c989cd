"""PyTorch drop-in batch normalization: our CPU kernels and Triton GPU kernels.

Change one line::

    model = batchnorm.torch.convert_model(model)      # every nn.BatchNorm*d becomes ours

or build with :class:`BatchNorm1d` / :class:`BatchNorm2d` / :class:`BatchNorm3d` (subclasses of
PyTorch's, same constructor). Needs the ``torch`` extra; the GPU kernels need ``triton``, and
this package imports without it. Dispatch rules: :mod:`batchnorm.torch.routing`.
"""

from batchnorm.torch import family
from batchnorm.torch.family import *  # noqa: F403  (Batch Renorm, Ghost BN)
from batchnorm.torch.fold import fold_batchnorm
from batchnorm.torch.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batchnorm,
)
from batchnorm.torch.function import BatchNormFunction, batch_norm
from batchnorm.torch.fused import (
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    bn_relu,
    fuse_bn_relu,
)
from batchnorm.torch.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    convert_model,
    revert_model,
)
from batchnorm.torch.population import update_bn_stats
from batchnorm.torch.routing import route
from batchnorm.torch.sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "bn_relu",
    "convert_model",
    "convert_sync_batchnorm",
    "fold_batchnorm",
    "freeze_batchnorm",
    "fuse_bn_relu",
    "revert_model",
    "route",
    "update_bn_stats",
    *family.__all__,
]

"""Layers for NumPy networks, each with forward and backward."""

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.family import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)
from batchnorm.nn.fold import fold_batchnorm
from batchnorm.nn.layers import Linear, ReLU, Sequential, Sigmoid, Tanh, mlp
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.module import Module, Parameter, load, save
from batchnorm.nn.optim import SGD
from batchnorm.nn.population import update_bn_stats

__all__ = [
    "SGD",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CrossEntropyLoss",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "Linear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "fold_batchnorm",
    "load",
    "mlp",
    "save",
    "update_bn_stats",
]

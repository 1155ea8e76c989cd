"""Layers for NumPy networks, each with forward and backward."""

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.layers import Linear, ReLU, Sequential, Sigmoid, Tanh, mlp
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.module import Module, Parameter, load, save
from batchnorm.nn.optim import SGD

__all__ = [
    "SGD",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CrossEntropyLoss",
    "Linear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "load",
    "mlp",
    "save",
]

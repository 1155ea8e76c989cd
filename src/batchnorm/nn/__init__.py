"""Layers for NumPy networks, each with forward and backward."""

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.module import Module, Parameter, load, save

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Module", "Parameter", "load", "save"]

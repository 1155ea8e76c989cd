"""batchnorm: exact, complete, fast and understandable Batch Normalization."""

from batchnorm import functional, reference
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, Module, Parameter, load, save

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Module",
    "Parameter",
    "__version__",
    "functional",
    "load",
    "reference",
    "save",
]

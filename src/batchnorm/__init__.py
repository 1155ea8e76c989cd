"""batchnorm: exact, complete, fast and understandable Batch Normalization."""

from batchnorm import functional, reference
from batchnorm.nn import (
    SGD,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    CrossEntropyLoss,
    Linear,
    Module,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    load,
    save,
)

__version__ = "0.1.0"

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
    "__version__",
    "functional",
    "load",
    "reference",
    "save",
]

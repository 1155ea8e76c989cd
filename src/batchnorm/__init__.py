"""batchnorm: exact, complete, fast and understandable Batch Normalization."""

from batchnorm import functional, nn, reference
from batchnorm.nn import *  # noqa: F403  (the NumPy layers, listed in nn.__all__)

__version__ = "0.1.0"

__all__ = [*nn.__all__, "__version__", "functional", "reference"]

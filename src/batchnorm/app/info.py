"""Versions, backends and devices that batchnorm sees on this machine."""

from __future__ import annotations

import argparse
import importlib
import platform


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    import batchnorm
    from batchnorm import kernels as backends

    print(f"batchnorm {batchnorm.__version__}, Python {platform.python_version()}")
    for name in ("numpy", "numba", "torch", "triton", "mpi4py", "matplotlib", "rich"):
        try:
            module = importlib.import_module(name)
            print(f"  {name:<11} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"  {name:<11} not installed")
    print(f"backends installed: {', '.join(backends.available())}; auto -> {backends.resolve()}")
    return 0

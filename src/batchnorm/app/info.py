"""Versions, backends and devices that batchnorm sees on this machine, and the compiled-kernel
cache (``--warm-up`` compiles or loads every kernel now, so that no later process waits)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warm-up", action="store_true",
                        help="compile (or load from the cache) every kernel now")


def run(args: argparse.Namespace) -> int:
    import batchnorm
    from batchnorm import kernels as backends

    print(f"batchnorm {batchnorm.__version__}, Python {platform.python_version()}")
    for name in ("numpy", "numba", "torch", "triton", "mpi4py", "matplotlib", "rich"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            print(f"  {name:<11} not installed")
            continue
        version = getattr(module, "__version__", None) or importlib.metadata.version(name)
        print(f"  {name:<11} {version}")
    print(f"backends installed: {', '.join(backends.available())}; auto -> {backends.resolve()}")
    if "numba" in backends.available():
        import numba

        threads = numba.get_num_threads()  # starts numba's pool: its layer is known from then
        layer = numba.threading_layer()
        shared = " (the OpenMP runtime PyTorch loads: one thread pool for both)"
        note = shared if layer == "omp" else ""
        print(f"numba threads: {threads}, threading layer {layer}{note}")
    from batchnorm.kernels import buffers

    print(f"output buffers: outputs of {buffers.MIN_BYTES // 1024} KiB and more reuse kept "
          f"memory, up to {buffers.LIMIT >> 20} MiB (kept now: {buffers.kept_bytes()} bytes)")
    if args.warm_up:
        print("warming up the kernels (about a minute the first time on a machine)...")
    cache = backends.warm_up() if args.warm_up else backends.cache_info()
    if cache.get("implementation") is None:
        print("compiled-kernel cache: none (numba is not installed)")
    else:
        print("compiled-kernel cache:")
        for key, value in cache.items():
            if key != "implementation":
                print(f"  {key:<11} {value}")
    return 0

"""Every numba flag, tuning constant and the serial/parallel kernel wrapper of this package.

``fastmath`` is restricted to reassociation (so reductions vectorize), contraction (FMA) and
signed-zero freedom: no ``nnan``/``ninf``, so NaN and inf keep their IEEE meaning and reach
:mod:`batchnorm.functional`'s non-finite check. ``error_model="numpy"`` drops the
ZeroDivisionError checks from the loops.

Tuning constants are module attributes read at call time, so tests can force every path
(``monkeypatch.setattr(config, "CHUNKS", 3)``).

Threads: unless the user chose a layer (``NUMBA_THREADING_LAYER``), this package puts
numba's OpenMP layer first. Its parallel regions then run on the process's one libgomp
runtime: with PyTorch imported, numba's ``GOMP_parallel`` binds to the libgomp PyTorch loaded
first (``LD_DEBUG=bindings`` shows it), so both libraries share one pool of threads instead
of two pools spinning against each other, and a launch costs about 2 us. The ``workqueue``
layer (the fallback) sleeps between launches, costs about 0.1 ms a launch and, after a
PyTorch call, waits for PyTorch's spinning threads (benchmarks/threads.py; docs/performance.md).
It refuses concurrent launches, so under it parallel kernels run under one lock.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import types
from typing import Any

import numba
import numpy as np
from numba import njit

from batchnorm import math
from batchnorm.kernels.numba.cache import cached

if "NUMBA_THREADING_LAYER" not in os.environ and not getattr(
    numba.np.ufunc.parallel, "_is_initialized", True
):
    # numba's default order is tbb, omp, workqueue: a tbb pool would be a second pool
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]  # type: ignore[attr-defined]
_POOL: list[Any] = []  # [launch guard, thread-count getter] once numba's pool runs
_STARTING = threading.Lock()


class _Fork:
    """``child``: this process was forked from one that may have run OpenMP parallel regions
    (ours or PyTorch's, on the one libgomp). GNU OpenMP cannot run one in such a child (numba
    terminates it), so a forked child runs the serial builds, as PyTorch runs its forked
    workers single-threaded."""

    child = False


def _forked() -> None:
    _Fork.child = True


os.register_at_fork(after_in_child=_forked)


def _start_pool() -> list[Any]:
    """Start numba's pool once: ``[launch guard, thread-count getter]``. The guard is a lock
    under workqueue (not re-entrant), else nothing; the getter is numba's own, without
    ``get_num_threads``' per-call check that the pool runs (0.8 us a call, against 0.1).
    A build loaded from the cache does not start the pool."""
    if not _POOL:
        with _STARTING:
            if not _POOL:
                numba.get_num_threads()  # starts the pool
                workqueue = numba.threading_layer() == "workqueue"
                guard = threading.Lock() if workqueue else contextlib.nullcontext()
                get = getattr(numba.np.ufunc.parallel, "_get_num_threads", None)
                _POOL[:] = [guard, get or numba.get_num_threads]  # one store: thread-safe
    return _POOL


def _launch_guard() -> Any:
    """What a parallel launch holds (see :func:`_start_pool`)."""
    return (_POOL or _start_pool())[0]


FASTMATH = {"reassoc", "contract", "nsz"}  # never nnan/ninf: NaN must propagate
FLAGS: dict[str, Any] = {
    "nogil": True,
    "fastmath": FASTMATH,
    "error_model": "numpy",  # no ZeroDivisionError checks inside the loops
    "boundscheck": False,
}
PARALLEL_FLAGS: dict[str, Any] = {**FLAGS, "parallel": True}

# --- tuning -------------------------------------------------------------------------------
ROWS_MAX_INNER = 16  # inner below this: rows kernels; else segments kernels
# ...and rows kernels up to this inner where the fused segments passes decline (few channels
# of short segments): the unfused segments passes merge every segment's statistics, 2-3x
# slower there ((256, 8, 7, 7), (128, 16, 4, 4); kernels-small-maps-before-after.txt). The
# unfused statistics (SyncBatchNorm, the family modules) take the rows kernels up to it
# given rows enough (STATS_ROWS_PER_INNER): 1.1-9.7x faster there but on (8, 3, 16, 16)
# (3.7 against 4.1 us); beyond it mixed, 0.75x on 224x224 maps (benchmarks/stats_family.py,
# results/stats_family-round6.json).
ROWS_FALLBACK_INNER = 256
# ...as long as there are rows enough to pay for their per-column partials (two float64
# values per column of C * inner, per thread, allocated and merged every call): outer * this
# >= inner. With two rows of 7x7 or 14x14 maps the partials were four times x and the rows
# statistics 5-12x slower than the segments' ((2, 256, 14, 14) 563 against 46 us); 4x4 maps
# keep the rows kernels even at two rows ((2, 2048, 4, 4) 81 against 159 us;
# benchmarks/stats_family.py, results/stats_family.json).
STATS_ROWS_PER_INNER = 8
# The rows kernels' reductions (statistics, gradient sums) split up to this many rows by
# columns (each thread every row of a block of columns) instead of by rows: with few rows
# the threads' per-column partials were as large as their share of x, and merging them
# crossed cores. Fused forward + backward, 2 threads, by rows / by columns (medians,
# benchmarks/rows_split.py, results/rows_split.json): (16, 8192) 1.26, (32, 4096) 1.22,
# (64, 2048) 1.16, (128, 1024) 1.09, (128, 2048) 0.99; (256, 1024) 0.94, (1024, 512) 0.80.
# The elementwise passes stay by rows (by columns they ran up to 2x slower: short strided
# runs; docs/performance.md).
COLUMNS_MAX_ROWS = 128
# ...and their fused training passes (2-D, channels-last) run by columns in one parallel
# region, reduction to output, from this many values, where each thread's block of a row is
# COLUMNS_MIN_RUN_BYTES at least. Fused forward + backward, 2 threads, medians in us
# (benchmarks/columns_region.py, results/columns_region-first.json; columns_region.json is a
# later run with the same picture), serial / two regions / one:
# (64, 1000) 115 / 116 / 94, (32, 1024) 78 / 93 / 66, (16, 4096) 162 / 167 / 100,
# (64, 1024) 117 / 117 / 96, (32, 4096) 252 / 213 / 153, (128, 1024) 208 / 172 / 159.
# Blocks of 1 KiB tie there ((64, 512) 72 / 87 / 71, (128, 512) 107 / 111 / 102) and lost
# 20% on the forward timed alone (kernels-columns-region-before-after.txt); 512-byte blocks
# lose ((128, 256) 69 / 85 / 74), as do 16K values ((32, 512) 52 / 73 / 54).
COLUMNS_PARALLEL_MIN = 1 << 15
COLUMNS_MIN_RUN_BYTES = 1536
# The eval pass (normalize alone) takes the rows kernels up to this inner too, given
# EVAL_ROWS_MIN_OUTER rows: rows/segments 0.57-0.67 on 4x4 and 5x5 maps with 64 rows or more
# ((32, 256, 4, 4) 0.72 and 1.06 in two runs), about 1 on 6x6 and 7x7, 1.6-2.0 from 8x8 on
# (the rows pass loads per-column coefficients, C * inner of them); with 2-8 rows 1.2-2.6
# ((2, 2048, 4, 4) 67 against 25 us), at 16 rows 0.98 (benchmarks/eval_layout.py,
# results/eval_layout.json).
EVAL_ROWS_MAX_INNER = 32
EVAL_ROWS_MIN_OUTER = 16
BLOCK = 4096  # segment elements per two-pass block (a float32 block is 16 KiB: L1)
# Arrays with fewer elements run as one chunk in the serial build: below it a parallel
# region's launch and its slowest thread cost more than the second thread saves (2-D
# fwd+bwd, 2 threads, omp layer, quiet machine: serial/parallel 0.7 at 2**15 elements,
# 0.9 at 2**16, 1.0 at 2**17, 1.3 at 2**18, 1.55 at 2**19).
PARALLEL_MIN = 1 << 17
# The channel-parallel fused passes (segments) pay from smaller arrays: a thread takes whole
# channel groups, no rows to merge, and short segments cost more compute per byte (fwd+bwd,
# 2 threads, serial/parallel: 1.04 at 18,816 elements, 1.15 at 25K, 1.23 at 50K, 1.36-1.49
# at 100K on 7x7 to 28x28 maps; benchmarks/parallel_min.py).
FUSED_PARALLEL_MIN = 1 << 14
# Fused passes (fused.py) take channels in groups whose rows of x (and dy) fit in
# FUSE_MAX_BYTES, so that the second pass reads them from cache (L2 is 2 MiB a core here,
# L3 is large); a group's run per row is about FUSE_RUN_BYTES where that fits. Measured
# (2 threads, contenders in shuffled order, against the unfused kernels): 7x7 maps gain
# about 20% on forward and on fwd+bwd with runs of 8, 16 or 32 KiB alike (a lone 196-byte
# segment lost 1.5x); (8, 3, 224, 224) gains 20-25%, and its backward's 3.2 MiB channels
# still gain 7% over not fusing them, part of the second pass coming from L3.
FUSE_MAX_BYTES = 4 << 20
FUSE_RUN_BYTES = 16384
FUSE_MAX_IMBALANCE = 1.4  # the busiest thread's groups over an even share, at most
FUSE_MIN_RUN_BYTES = 4096  # shorter runs are not fused (a lone 7x7 segment is 196 bytes)
CHUNKS: int | None = None  # force the number of chunks (tests); None: numba's thread count

# Kernels index flat arrays with unsigned indices: a signed index that LLVM cannot prove
# non-negative gets numba's negative-index wraparound per element, which blocks
# vectorization (measured: 5x slower sums).
U = np.uintp


def float64s(v: Any) -> np.ndarray:
    """``v`` as the C-contiguous float64 vector the kernels take (no copy when it is one)."""
    return np.ascontiguousarray(v, dtype=np.float64)


def distinct_name(fn: Any) -> str:
    """``fn``'s qualified name, with its closure's values when it has one.

    A template's functions (one per closure value, e.g. normalize and grad_input) share a
    qualified name, and numba's symbol for a compiled function is that name, a counter of
    the process and the argument types. Kernels compiled in different processes and loaded
    from the cache into one could then define one symbol twice with different code, and
    calls bind to whichever came first: an eval backward ran the normalize pass that way.
    """
    cells = fn.__closure__ or ()
    return "_".join([fn.__qualname__, *(str(c.cell_contents) for c in cells)])


def renamed(fn: Any, qualname: str) -> Any:
    """A copy of function ``fn`` under ``qualname`` (same code, globals and closure)."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)  # fmt: skip
    copy.__qualname__ = qualname
    return copy


def jit(fn: Any) -> Any:
    """``fn`` compiled with this package's serial flags (helpers called from kernels)."""
    return njit(**FLAGS)(fn)


@jit
def per_chunk(chunks: int, width: int) -> Any:
    """Zeroed float64 partials, a row of ``width`` for each of ``chunks`` threads: use
    ``[t, :width]`` (and ``[:, :width]``). Rows are padded apart by a cache line at least,
    so that no two threads write one line (with rows of 16 values, 2-D (16384, 16) ran its
    statistics no faster on two threads than on one; benchmarks/results/
    kernels-16384x16-threads.txt)."""
    return np.zeros((chunks, (width + 7) // 8 * 8 + 8))


# the one copy of the math (batchnorm.math), compiled for use inside kernels
chan_merge_step = jit(math.chan_merge_step)
inverse_std = jit(math.inverse_std)
grad_coefficients = jit(math.grad_coefficients)


class Kernel:
    """One kernel body compiled on first use as serial and as parallel (prange) code.

    Both builds are kept in the on-disk cache (:mod:`.cache`), per signature. The body
    takes an argument named ``chunks``: chunk t of ``chunks`` covers work units
    ``[units * t // chunks, units * (t + 1) // chunks)``; one chunk runs the serial build.
    """

    def __init__(self, body: Any) -> None:
        self.__name__ = body.__name__
        self.chunks_at = list(inspect.signature(body).parameters).index("chunks")
        name = distinct_name(body)
        self.serial = cached(njit(**FLAGS)(renamed(body, name)))
        # numba keys cache entries by name and bytecode, not by flags: the parallel build
        # gets a copy of the body under its own name, or the two builds overwrite each other
        self.parallel = cached(njit(**PARALLEL_FLAGS)(renamed(body, f"{name}_parallel")))

    def __call__(self, *args: Any) -> Any:
        if args[self.chunks_at] == 1 or _Fork.child:
            return self.serial(*args)
        with _launch_guard():
            return self.parallel(*args)


class Parallel:
    """A kernel whose prange loops need no chunk count: compiled as parallel code, and as
    serial code for forked children (see :class:`_Fork`). Not kept in the on-disk cache."""

    def __init__(self, fn: Any) -> None:
        self.__name__ = fn.__name__
        self.parallel = njit(**PARALLEL_FLAGS)(fn)
        self.serial = njit(**FLAGS)(fn)

    def __call__(self, *args: Any) -> Any:
        if _Fork.child:
            return self.serial(*args)
        with _launch_guard():
            return self.parallel(*args)


def num_threads() -> int:
    """``numba.get_num_threads()`` (the calling thread's count), cheaply."""
    return int((_POOL or _start_pool())[1]())


def set_threads(n: int) -> int:
    """Use ``n`` threads (clamped to numba's pool) in this thread; returns the previous count.
    Numba's count is per calling thread; setting it is skipped when unchanged (7 us a call)."""
    previous = num_threads()
    want = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if want != previous:
        numba.set_num_threads(want)
    return int(previous)


def chunks(size: int, units: int, minimum: int | None = None) -> int:
    """How many chunks to split ``units`` work units (rows, segments or channel groups) of
    ``size`` values into; one below ``minimum`` values (default :data:`PARALLEL_MIN`)."""
    if _Fork.child:
        return 1
    if CHUNKS is not None:
        return max(1, min(CHUNKS, units))
    if size < (PARALLEL_MIN if minimum is None else minimum):
        return 1
    return max(1, min(num_threads(), units))

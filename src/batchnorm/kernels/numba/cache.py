"""The kernels' on-disk cache: compiled once per machine, safe with many processes at once.

Numba compiles a kernel in about a second per signature and build (serial, parallel); a new
process would pay it again for every kernel it calls. Each kernel here keeps numba's cache
(the object code, loaded in milliseconds) with three changes, because numba's own cache is
keyed on the kernel's file alone and is fragile when processes share it:

- one directory per version of this package's kernel sources and numba, and per threading
  layer: the sources of ``batchnorm.math`` and ``batchnorm.kernels.numba.*`` are hashed
  together, since a kernel inlines helpers from other files that numba's per-file stamp
  does not see; the layer is in the name as a precaution (parallel code calls the layer's
  scheduler). The directory is ``$BATCHNORM_CACHE_DIR`` or ``~/.cache/batchnorm``
  (``$XDG_CACHE_HOME``), then ``numba-<hash>-<layer>``;
- an exclusive file lock around every compilation (``fcntl.flock`` on ``.lock`` there):
  numba rewrites a kernel's index by read-modify-write and numbers its data files, so two
  processes compiling different signatures at once could pair an index entry with the
  other's code. With the lock the second process waits, then loads what the first saved;
- an entry that cannot be read (truncated, corrupt, from another numba) is dropped and
  compiled again, and a cache that cannot be written (read-only home) is skipped: the
  cache only ever saves time, it never fails a call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numba
from numba.core.caching import CompileResultCacheImpl, FunctionCache, _CacheLocator

try:
    import fcntl
except ImportError:  # Windows: no lock; numba's writes are atomic renames still
    fcntl = None  # type: ignore[assignment]

_SOURCES = [Path(__file__).parent.parent.parent / "math.py", *Path(__file__).parent.glob("*.py")]
# this process's lookups: found on disk, compiled (a miss, or a dropped entry), dropped as
# unreadable, not saved (unwritable directory)
STATS = {"loaded": 0, "compiled": 0, "dropped": 0, "unwritable": 0}


def _stamp() -> str:
    h = hashlib.sha256(f"{numba.__version__} {sys.version_info[:2]}".encode())
    for path in sorted(_SOURCES):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


STAMP = _stamp()


def _layer() -> str:
    """numba's threading layer, started or chosen (its name is part of the cache key)."""
    if getattr(numba.np.ufunc.parallel, "_is_initialized", False):
        return str(numba.threading_layer())
    return str(numba.config.THREADING_LAYER)  # type: ignore[attr-defined]


@functools.cache
def directory() -> Path:
    """Where compiled kernels are kept: fixed at the first kernel's creation in a process."""
    root = os.environ.get("BATCHNORM_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "batchnorm")
    return Path(root) / f"numba-{STAMP}-{_layer()}"


class _Locator(_CacheLocator):
    """Every kernel of this package in :func:`directory`, fresh while the sources are."""

    def __init__(self, py_func: Any, py_file: str) -> None:
        self._path = str(directory())
        self._lineno = py_func.__code__.co_firstlineno

    def get_cache_path(self) -> str:
        return self._path

    def get_source_stamp(self) -> str:
        return STAMP

    def get_disambiguator(self) -> str:
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> _Locator:
        return cls(py_func, py_file)


class _Impl(CompileResultCacheImpl):
    _locator_classes = [_Locator]


class _SafeCache(FunctionCache):
    """numba's per-function cache, where a bad entry is compiled again instead of raising."""

    _impl_class = _Impl

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            data = super().load_overload(sig, target_context)
        except Exception:  # corrupt or foreign entry: start this kernel's index afresh
            STATS["dropped"] += 1
            STATS["compiled"] += 1
            with contextlib.suppress(Exception):
                self.flush()
            return None
        STATS["loaded" if data is not None else "compiled"] += 1
        return data

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            super().save_overload(sig, data)
        except Exception:  # unwritable directory, full disk: run without the cache
            STATS["unwritable"] += 1


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    path = directory()
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / ".lock", "a+b")  # noqa: SIM115 (closed below)
    except OSError:
        yield  # no directory: nothing to share, nothing to lock
        return
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def cached(dispatcher: Any) -> Any:
    """``dispatcher`` (a numba function) with the cache above and compilations locked."""
    dispatcher._cache = _SafeCache(dispatcher.py_func)
    compile_for_args = dispatcher._compile_for_args

    def locked_compile(*args: Any, **kwargs: Any) -> Any:
        with _locked():  # a miss in this process: load from disk or compile, one at a time
            return compile_for_args(*args, **kwargs)

    # numba's dispatcher looks this method up on the instance on every miss (never on a hit)
    dispatcher._compile_for_args = locked_compile
    return dispatcher


def info() -> dict[str, Any]:
    """The cache's directory, size on disk and what this process did with it."""
    path = directory()
    files = list(path.glob("*.nb[ic]")) if path.is_dir() else []
    return {
        "directory": str(path),
        "exists": path.is_dir(),
        "writable": path.is_dir() and os.access(path, os.W_OK),
        "kernels": sum(p.suffix == ".nbi" for p in files),
        "entries": sum(p.suffix == ".nbc" for p in files),
        "bytes": sum(p.stat().st_size for p in files),
        "this_process": dict(STATS),
    }

"""Checkpoints of long runs (one atomic .npz of arrays and JSON metadata) and Ctrl-C held
until a training step is complete, so that a checkpoint always lies on a step boundary."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_NAME = "checkpoint.npz"
_META_KEY = "__meta__"


# -- checkpoints ------------------------------------------------------------------------
def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write arrays and JSON metadata to one .npz, atomically (temporary file, then rename).

    A run killed at any moment leaves either the previous checkpoint or the new one.
    """
    path = Path(path)
    for key, value in arrays.items():
        if np.asarray(value).dtype.hasobject:
            raise TypeError(f"checkpoint array {key!r} holds Python objects, not numbers")
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_META_KEY: blob}, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) from :func:`save_checkpoint`'s file; nothing is unpickled.

    A damaged file raises ValueError saying what is wrong with it: empty, not a checkpoint,
    truncated, or altered (a checksum or the metadata does not check out).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): the run cannot be resumed")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a batchnorm checkpoint (not an .npz archive, or "
                         "truncated): the run cannot be resumed")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        if _META_KEY not in arrays:
            raise ValueError("no metadata")
        meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, UnicodeDecodeError,
            zlib.error) as exc:
        raise ValueError(f"checkpoint {path} is damaged or not a batchnorm checkpoint "
                         f"({type(exc).__name__}: {exc}): the run cannot be resumed") from None
    return arrays, meta


class Checkpoint:
    """Where a run keeps its checkpoint, how often, and what it resumes from.

    ``every`` is in the experiment's own unit (steps for fig1, finished cases for the
    sweeps). ``resume`` holds the loaded (arrays, meta) when continuing a run.
    """

    def __init__(self, path: str | Path, every: int = 0, resume: bool = False):
        self.path = Path(path)
        self.every = every
        self.state: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
        if resume:
            self.state = load_checkpoint(self.path)

    def due(self, done: int) -> bool:
        return self.every > 0 and done % self.every == 0

    def save(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        save_checkpoint(self.path, arrays, meta)


def prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


def unprefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    head = prefix + "/"
    return {k[len(head) :]: v for k, v in arrays.items() if k.startswith(head)}


# -- Ctrl-C at a step boundary ------------------------------------------------------------
class _Stop:
    active = False
    requested = False


def interrupt_requested() -> bool:
    """True once Ctrl-C was pressed inside :func:`interrupt_at_step_boundaries`."""
    return _Stop.requested


def check_interrupt() -> None:
    """Raise KeyboardInterrupt when Ctrl-C was pressed: call it where a step is complete."""
    if _Stop.requested:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_at_step_boundaries() -> Iterator[None]:
    """Within: the first Ctrl-C (SIGINT) only sets a flag, which the training loops check
    where a step is complete, so the checkpoint written then is a state the uninterrupted
    run passes through too. A second Ctrl-C stops at once (the last checkpoint stays)."""
    if _Stop.active or threading.current_thread() is not threading.main_thread():
        yield  # already installed (or signals cannot be handled here)
        return

    def handler(signum: int, frame: Any) -> None:
        if _Stop.requested:
            raise KeyboardInterrupt
        _Stop.requested = True
        print("\nCtrl-C: stopping after this step (press again to stop at once)",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    _Stop.active = True
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _Stop.active = _Stop.requested = False

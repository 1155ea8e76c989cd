"""What the experiments share: results, sweeps, batches, evaluation, checkpoints, progress and
thread limits."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from batchnorm.data import Dataset
from batchnorm.nn.layers import Sequential
from batchnorm.nn.module import Module

# progress(done, total, description): called now and then by long runs
Progress = Callable[[int, int, str], None]

CHECKPOINT_NAME = "checkpoint.npz"
_META_KEY = "__meta__"


def no_progress(done: int, total: int, description: str) -> None:
    pass


def jsonable(value: Any) -> Any:
    """Plain JSON data (tuples become lists), so results compare equal after a round trip."""
    return json.loads(json.dumps(value))


# -- results ----------------------------------------------------------------------------
ResultsT = TypeVar("ResultsT", bound="JsonResults")
SweepT = TypeVar("SweepT", bound="SweepResults")


class JsonResults:
    """``to_dict`` / ``from_dict`` for a results dataclass whose fields are JSON data."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    @classmethod
    def from_dict(cls: type[ResultsT], d: dict[str, Any]) -> ResultsT:
        return cls(**d)


@dataclass
class SweepResults(JsonResults):
    """A sweep's results: one dict per trained net, named by the values of its ``KEY`` fields."""

    KEY: ClassVar[tuple[str, ...]] = ()
    config: dict[str, Any]
    dataset: str
    cases: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    completed: bool = False

    def find(self, *key: Any) -> dict[str, Any] | None:
        """The case whose ``KEY`` fields equal ``key``, or None when it has not run."""
        for case in self.cases:
            if tuple(case[k] for k in self.KEY) == key:
                return case
        return None


def sweep(
    name: str,
    results_type: type[SweepT],
    config: Any,
    data: Dataset,
    cases: list[tuple[Any, ...]],
    train: Callable[..., dict[str, Any]],
    label: Callable[..., str],
    *,
    weights: list[int] | None = None,
    progress: Progress,
    checkpoint: Checkpoint | None,
) -> SweepT:
    """Train ``train(config, data, *case)`` for every case not in the results yet, in order.

    Resumes from ``checkpoint.state``, saves after every ``checkpoint.every`` finished cases
    and on KeyboardInterrupt. ``weights`` (one per case, default 1) make progress fair to
    cases of unequal cost.
    """
    results = results_type(config=jsonable(dataclasses.asdict(config)), dataset=data.describe())
    if checkpoint is not None and checkpoint.state is not None:
        results = results_type.from_dict(checkpoint.state[1]["results"])
    weights = weights or [1] * len(cases)
    total = sum(weights)
    started = time.perf_counter() - results.seconds

    def save() -> None:
        if checkpoint is not None:
            results.seconds = time.perf_counter() - started
            checkpoint.save({}, {"experiment": name, "config": dataclasses.asdict(config),
                                 "results": results.to_dict()})

    with training(config.threads):
        try:
            for i, case in enumerate(cases):
                if results.find(*case) is not None:
                    continue
                progress(sum(weights[:i]), total, label(*case))
                results.cases.append(train(config, data, *case))
                if checkpoint is not None and checkpoint.due(len(results.cases)):
                    save()
        except KeyboardInterrupt:
            save()
            raise
    progress(total, total, f"{name} done")
    results.seconds = time.perf_counter() - started
    results.completed = True
    save()
    return results


# -- random state -----------------------------------------------------------------------
def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The generator's state as plain JSON data (PCG64's big integers are JSON integers)."""
    return dict(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


class BatchSampler:
    """Mini-batches drawn without replacement, a fresh permutation each epoch (drop last).

    Batches are gathered into arrays the sampler owns and refills every call, so a
    training step allocates nothing here. The position in the epoch and the generator's
    state go into checkpoints.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator):
        if not 1 <= batch_size <= len(y):
            raise ValueError(f"batch size must be in [1, {len(y)}], got {batch_size}")
        self.x, self.y, self.batch_size, self.rng = x, y, batch_size, rng
        self.perm = rng.permutation(len(y))
        self.pos = 0
        self.xb = np.empty((batch_size,) + x.shape[1:], x.dtype)
        self.yb = np.empty(batch_size, y.dtype)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pos + self.batch_size > len(self.perm):
            self.perm = self.rng.permutation(len(self.y))
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        np.take(self.x, idx, axis=0, out=self.xb)
        np.take(self.y, idx, out=self.yb)
        return self.xb, self.yb

    def state(self) -> tuple[dict[str, Any], np.ndarray]:
        return {"pos": self.pos, "rng": rng_state(self.rng)}, self.perm.copy()

    def load(self, meta: dict[str, Any], perm: np.ndarray) -> None:
        self.pos = int(meta["pos"])
        set_rng_state(self.rng, meta["rng"])
        self.perm = np.asarray(perm, dtype=np.int64).copy()


# -- evaluation -------------------------------------------------------------------------
def predict(model: Module, x: np.ndarray, batch: int = 2000) -> np.ndarray:
    """Class predictions in eval mode (BN uses its running statistics); mode restored."""
    was_training = model.training
    model.eval()
    try:
        return np.concatenate(
            [model.forward(x[i : i + batch]).argmax(axis=1) for i in range(0, len(x), batch)]
        )
    finally:
        model.train(was_training)


def accuracy(model: Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x) == y).mean())


def forward_capture(model: Sequential, x: np.ndarray, index: int) -> np.ndarray:
    """The input that layer ``index`` of ``model`` receives for x (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        for layer in model.layers[:index]:
            x = layer.forward(x)
        return x
    finally:
        model.train(was_training)


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
    """(arrays, meta) from :func:`save_checkpoint`'s file; nothing is unpickled."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    if _META_KEY not in arrays:
        raise ValueError(f"{path} is not a batchnorm checkpoint (no metadata)")
    meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
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


# -- threads ----------------------------------------------------------------------------
@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Limit BLAS threads (via threadpoolctl when installed). The matrices here are small:
    one thread is faster than several, and far faster on a busy machine."""
    if not n:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


@contextlib.contextmanager
def training(threads: int | None) -> Iterator[None]:
    """The context of a training loop: BLAS threads limited, and no overflow warnings (a
    diverging net is detected from its non-finite loss and reported as diverged)."""
    with blas_threads(threads), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        yield


# -- training ---------------------------------------------------------------------------
def train_step(model: Any, loss_fn: Any, optimizer: Any, x: np.ndarray, y: np.ndarray) -> float:
    """One step of training: zero_grad, forward, loss, backward, step; returns the loss."""
    optimizer.zero_grad()
    loss = float(loss_fn.forward(model.forward(x), y))
    model.backward(loss_fn.backward())
    optimizer.step()
    return loss

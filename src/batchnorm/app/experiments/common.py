"""What the experiments share: settings and ``run``, the training step, results, sweeps,
batches, evaluation, progress and thread limits (checkpoints and Ctrl-C: ``checkpoints``,
re-exported here)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.data import Dataset
from batchnorm.app.experiments.checkpoints import (  # noqa: F401  (re-exported)
    CHECKPOINT_NAME,
    Checkpoint,
    check_interrupt,
    interrupt_at_step_boundaries,
    interrupt_requested,
    load_checkpoint,
    prefixed,
    save_checkpoint,
    unprefixed,
)
from batchnorm.nn.layers import Sequential
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.module import Module

# progress(done, total, description): called now and then by long runs
Progress = Callable[[int, int, str], None]



def no_progress(done: int, total: int, description: str) -> None:
    pass


def jsonable(value: Any) -> Any:
    """Plain JSON data (tuples become lists), so results compare equal after a round trip."""
    return json.loads(json.dumps(value))


# -- settings and the run() every experiment has --------------------------------------
@dataclass
class Settings:
    """The fields every experiment's Config has. The CLI's --seed --data --mnist-dir set
    the same names."""

    seed: int = 0
    mnist_dir: str | None = None
    data: str | None = None  # mnist, mnist5k or idx; None: idx with mnist_dir, else mnist5k

    def load(self) -> Dataset:
        return data_mod.load(self.mnist_dir, self.seed, self.data)


@dataclass
class TrainSettings(Settings):
    """Settings of an experiment that trains in this process."""

    checkpoint_every: int = 1  # finished nets (sweeps) or steps between checkpoints; 0: off
    threads: int = 1  # BLAS threads (small matrices: 1 is fastest)


ConfigT = TypeVar("ConfigT", bound=Settings)
ResultT = TypeVar("ResultT")


class Experiment(Generic[ConfigT, ResultT]):
    """An experiment's ``run(config=None, *, data=None, progress=no_progress,
    checkpoint=None)``: the default Config when none is given, ``check(config)`` (raises
    ValueError on bad settings), the dataset loaded from the config when none is given
    (unless ``load`` is False), then ``body(config, data, progress, checkpoint)``."""

    def __init__(self, config_type: Callable[[], ConfigT],
                 body: Callable[[ConfigT, Any, Progress, Checkpoint | None], ResultT], *,
                 check: Callable[[ConfigT], None] | None = None, load: bool = True) -> None:
        self.config_type, self.body, self.check, self.load = config_type, body, check, load
        self.__doc__ = body.__doc__

    def __call__(self, config: ConfigT | None = None, *, data: Dataset | None = None,
                 progress: Progress = no_progress, checkpoint: Checkpoint | None = None
                 ) -> ResultT:
        config = config or self.config_type()
        if self.check is not None:
            self.check(config)
        if data is None and self.load:
            data = config.load()
        return self.body(config, data, progress, checkpoint)


def check_schedule(steps: int, every: int, name: str) -> None:
    """Raise ValueError unless ``steps`` >= 0 and the period ``every`` (named ``name``) >= 1."""
    if steps < 0 or every < 1:
        raise ValueError(f"steps must be >= 0 and {name} >= 1")


def check_unit(unit: int, hidden: tuple[int, ...]) -> None:
    """Raise ValueError unless ``unit`` is a unit of the last hidden layer."""
    if not 0 <= unit < hidden[-1]:
        raise ValueError(f"unit must be in [0, {hidden[-1]}), got {unit}")


# -- the training step ------------------------------------------------------------------
def train_step(model: Any, loss_fn: Any, optimizer: Any, x: np.ndarray, y: np.ndarray) -> float:
    """One step of SGD training: zero the gradients, forward, loss, backward, update.

    Returns the loss. A non-finite loss is the caller's to act on (the experiments stop
    training a diverged net); its update has then already been applied.
    """
    optimizer.zero_grad()
    loss = loss_fn.forward(model.forward(x), y)
    model.backward_params(loss_fn.backward())
    optimizer.step()
    return float(loss)


def train_net(net: Any, optimizer: Any, draw: Callable[[], tuple[np.ndarray, np.ndarray]],
              steps: int, *, every: int = 0, measure: Callable[[int], None] | None = None,
              before: Callable[[int], None] | None = None, stop_on_divergence: bool = True
              ) -> tuple[list[float], bool]:
    """Train one net of a sweep for ``steps`` steps on batches from ``draw()``.

    ``before(step)`` runs before step ``step`` (1-based); ``measure(step)`` after every
    ``every``-th step and the last. Returns (the losses, diverged): with
    ``stop_on_divergence`` training stops at the first non-finite loss, which is not listed.
    """
    loss_fn = CrossEntropyLoss()
    losses: list[float] = []
    for step in range(1, steps + 1):
        check_interrupt()  # Ctrl-C: this net is dropped, the sweep saves the others
        if before is not None:
            before(step)
        loss = train_step(net, loss_fn, optimizer, *draw())
        if stop_on_divergence and not np.isfinite(loss):
            return losses, True
        losses.append(loss)
        if measure is not None and (step % every == 0 or step == steps):
            measure(step)
    return losses, False


class AveragedGradients:
    """An optimizer whose ``step`` first averages the gradients over processes (one
    all-reduce of all of them): data-parallel training through :func:`train_step`."""

    def __init__(self, optimizer: Any, comm: Any, size: int) -> None:
        self.optimizer, self.comm, self.size = optimizer, comm, size
        self.seconds = 0.0  # spent in the all-reduce

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        grads = [p.grad for p in self.optimizer.params if p.grad is not None]
        started = time.perf_counter()
        # float64 sums: the average does not depend on how many processes add up
        flat = self.comm.allreduce_sum(np.concatenate([g.ravel() for g in grads],
                                                      dtype=np.float64))
        self.seconds += time.perf_counter() - started
        flat /= self.size
        offset = 0
        for g in grads:
            g[...] = flat[offset : offset + g.size].reshape(g.shape)
            offset += g.size
        self.optimizer.step()


# -- results ----------------------------------------------------------------------------
ResultsT = TypeVar("ResultsT", bound="JsonResults")
SweepT = TypeVar("SweepT", bound="SweepResults")
RunT = TypeVar("RunT", bound="RunResults")


class JsonResults:
    """``to_dict`` / ``from_dict`` for a results dataclass whose fields are JSON data."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    @classmethod
    def from_dict(cls: type[ResultsT], d: dict[str, Any]) -> ResultsT:
        return cls(**d)


@dataclass
class RunResults(JsonResults):
    """What every experiment's results hold: its config, the dataset, the time it took and
    whether it ran to the end."""

    config: dict[str, Any]
    dataset: str
    seconds: float = 0.0
    completed: bool = False

    def time_row(self, label: str, detail: str) -> tuple[str, str]:
        """The summary's row of how long the run took; ``detail`` says what ran."""
        return label, f"{self.seconds:.1f} s {detail}"


def per_net(labels: dict[str, str], values: dict[str, float], spec: str) -> str:
    """``"label value  |  label value ..."``: a value per net (or arm), formatted by ``spec``."""
    return "  |  ".join(f"{labels[n]} {v:{spec}}" for n, v in values.items())


def new_results(results_type: type[RunT], config: Any, data: Dataset, names: Iterable[str],
                *histories: str) -> RunT:
    """Empty results of a run of ``config`` on ``data``: for each field in ``histories``, an
    empty list per name (net or arm)."""
    names = tuple(names)
    empty: dict[str, Any] = {k: {n: [] for n in names} for k in histories}
    return results_type(config=jsonable(dataclasses.asdict(config)), dataset=data.describe(),
                        **empty)


@dataclass
class StepResults(RunResults):
    """Results taken along training: test accuracy per net (or arm) at ``steps``."""

    steps: list[int] = field(default_factory=list)
    accuracy: dict[str, list[float]] = field(default_factory=dict)

    @property
    def last_step(self) -> int:
        """The last evaluated step (0 before the first evaluation)."""
        return self.steps[-1] if self.steps else 0

    def final(self, name: str) -> float:
        """The last test accuracy of net (or arm) ``name``; NaN before the first evaluation."""
        return self.accuracy[name][-1] if self.accuracy.get(name) else float("nan")

    def accuracy_row(self, label: str, labels: dict[str, str], detail: str = "") -> tuple[str, str]:
        """The summary's row of the last test accuracy of each net in ``labels`` (name: label)."""
        return (f"{label} at step {self.last_step:,}{detail}",
                per_net(labels, {n: self.final(n) for n in labels}, ".4f"))


@dataclass
class SweepResults(RunResults):
    """A sweep's results: one dict per trained net, named by the values of its ``KEY`` fields."""

    KEY: ClassVar[tuple[str, ...]] = ()
    cases: list[dict[str, Any]] = field(default_factory=list)

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
                check_interrupt()
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


def sweep_experiment(
    name: str,
    config_type: Callable[[], ConfigT],
    results_type: type[SweepT],
    cases: Callable[[ConfigT], list[tuple[Any, ...]]],
    train: Callable[..., dict[str, Any]],
    label: Callable[..., str],
    *,
    weights: Callable[[list[tuple[Any, ...]]], list[int]] | None = None,
    check: Callable[[ConfigT], None] | None = None,
) -> Experiment[ConfigT, SweepT]:
    """The ``run`` of a sweep: :func:`sweep` over ``cases(config)``."""

    def body(config: ConfigT, data: Dataset, progress: Progress, checkpoint: Checkpoint | None
             ) -> SweepT:
        listed = cases(config)
        return sweep(name, results_type, config, data, listed, train, label,
                     weights=weights(listed) if weights else None, progress=progress,
                     checkpoint=checkpoint)

    body.__doc__ = (f"Train every net of the {name} sweep in turn; checkpoints after finished "
                    "nets, and ``checkpoint.state`` (when set) resumes.")
    return Experiment(config_type, body, check=check)


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

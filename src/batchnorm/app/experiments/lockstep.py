"""Several nets trained side by side on the same batches, measured now and then: the loop
that the noisy-bn, ics and landscape experiments share.

Every net starts from its own seeded weights, gets its own SGD and sees the same batches in
the same order. ``measure(step)`` runs at step 0, every ``every`` steps and at the end;
``before_step(step, xb, yb)`` runs before each training step (probes that need the batch
the nets are about to learn from). A checkpoint holds the nets, optimizers, sampler, the
extra generators and the results; Ctrl-C is held until the step in flight ends, so a
checkpoint always lies on a step boundary and ``--resume`` ends with the same numbers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from batchnorm.app.data import Dataset
from batchnorm.app.experiments import common
from batchnorm.nn.layers import Linear, Sequential
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.optim import SGD

ResultsT = TypeVar("ResultsT", bound=common.RunResults)


@dataclass
class TrainConfig(common.TrainSettings):
    """The settings of the Figure 1 network and its training, which fig1 and every lockstep
    experiment have. The CLI's --steps --lr --init-std set the same names."""

    steps: int = 10_000
    batch_size: int = 60
    lr: float = 1.0
    init_std: float = 0.01
    hidden: tuple[int, ...] = (100, 100, 100)
    checkpoint_every: int = 2_500  # steps; 0 turns periodic checkpoints off


class Lockstep:
    """The nets, their optimizers and the shared batch sampler of one experiment."""

    def __init__(self, name: str, config: Any, data: Dataset, nets: dict[str, Sequential],
                 rngs: dict[str, np.random.Generator] | None = None,
                 lrs: dict[str, float] | None = None) -> None:
        self.name, self.config, self.data, self.nets = name, config, data, nets
        self.lrs = {n: (lrs or {}).get(n, config.lr) for n in nets}  # default: config.lr
        self.opts = {n: SGD(net.parameters(), lr=self.lrs[n]) for n, net in nets.items()}
        self.loss_fns = {n: CrossEntropyLoss() for n in nets}
        self.sampler = common.BatchSampler(data.x_train, data.y_train, config.batch_size,
                                           np.random.default_rng([config.seed, 1]))
        self.rngs = rngs or {}
        self.alive = {n: True for n in nets}
        self.step = 0

    # -- checkpoints --------------------------------------------------------------------
    def save(self, checkpoint: common.Checkpoint | None, results: common.JsonResults) -> None:
        if checkpoint is None:
            return
        arrays: dict[str, np.ndarray] = {}
        for n, net in self.nets.items():
            arrays.update(common.prefixed(n, net.state_dict()))
            arrays.update(common.prefixed(f"opt_{n}", self.opts[n].state_dict()))
        sampler_meta, arrays["sampler_perm"] = self.sampler.state()
        meta = {"experiment": self.name, "config": common.jsonable(dataclasses.asdict(self.config)),
                "step": self.step, "alive": self.alive, "sampler": sampler_meta,
                "rngs": {k: common.rng_state(g) for k, g in self.rngs.items()},
                "results": results.to_dict()}
        checkpoint.save(arrays, meta)

    def start(self, results_type: type[ResultsT], checkpoint: common.Checkpoint | None,
              *histories: str) -> ResultsT:
        """The run's results: from the checkpoint (whose state the nets then hold) when it
        has one, else new and empty, with a list per net for each field in ``histories``."""
        saved = self.restore(checkpoint)
        if saved is not None:
            return results_type.from_dict(saved)
        return common.new_results(results_type, self.config, self.data, self.nets, *histories)

    def restore(self, checkpoint: common.Checkpoint | None) -> dict[str, Any] | None:
        """Load the checkpoint's state into the nets; returns the saved results (or None)."""
        if checkpoint is None or checkpoint.state is None:
            return None
        arrays, meta = checkpoint.state
        for n, net in self.nets.items():
            net.load_state_dict(common.unprefixed(n, arrays))
            self.opts[n].load_state_dict(common.unprefixed(f"opt_{n}", arrays))
        self.sampler.load(meta["sampler"], arrays["sampler_perm"])
        for k, g in self.rngs.items():
            common.set_rng_state(g, meta["rngs"][k])
        self.alive, self.step = dict(meta["alive"]), int(meta["step"])
        return dict(meta["results"])

    # -- the loop -----------------------------------------------------------------------
    def run(self, results: Any, measure: Callable[[int], None], *, every: int,
            before_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
            progress: common.Progress = common.no_progress,
            checkpoint: common.Checkpoint | None = None) -> None:
        """Train until ``config.steps``; ``results`` needs ``steps``, ``seconds`` and
        ``completed`` (set here). Nets whose loss turns non-finite stop training."""
        steps = self.config.steps
        started = time.perf_counter() - results.seconds
        with common.training(self.config.threads), common.interrupt_at_step_boundaries():
            if self.step == 0 and not results.steps:
                measure(0)
            try:
                while self.step < steps:
                    self._one_step(measure, every, before_step)
                    results.seconds = time.perf_counter() - started
                    if self.step % 100 == 0 or self.step == steps:
                        progress(self.step, steps, f"{self.name}  step {self.step:,}")
                    common.check_interrupt()
                    if checkpoint is not None and checkpoint.due(self.step):
                        self.save(checkpoint, results)
            except KeyboardInterrupt:  # from the signal above or from progress(): a boundary
                self.save(checkpoint, results)
                raise
        results.seconds = time.perf_counter() - started
        results.completed = True
        self.save(checkpoint, results)

    def run_probed(self, results: Any, every: int,
                   probe: Callable[[str, Sequential, np.ndarray, np.ndarray], dict[str, Any]],
                   dead: Callable[[str], dict[str, Any]], *,
                   progress: common.Progress = common.no_progress,
                   checkpoint: common.Checkpoint | None = None) -> None:
        """:meth:`run`, recording before every ``every``-th step (the step 0 included) the
        step, each net's test accuracy and the fields ``probe(name, net, xb, yb)`` returns
        for the batch the nets are about to learn from; a diverged net gets NaN accuracy
        and ``dead(name)``."""

        def before_step(step: int, xb: np.ndarray, yb: np.ndarray) -> None:
            if step % every:
                return
            results.steps.append(step)
            for n, net in self.nets.items():
                alive = self.alive[n]
                results.accuracy[n].append(common.accuracy(net, self.data.x_test,
                                                           self.data.y_test)
                                           if alive else float("nan"))
                for key, value in (probe(n, net, xb, yb) if alive else dead(n)).items():
                    getattr(results, key)[n].append(value)

        self.run(results, lambda step: None, every=every, before_step=before_step,
                 progress=progress, checkpoint=checkpoint)

    def _one_step(self, measure: Callable[[int], None], every: int,
                  before_step: Callable[[int, np.ndarray, np.ndarray], None] | None
                  ) -> None:
        xb, yb = self.sampler.next()
        if before_step is not None:
            before_step(self.step, xb, yb)
        for n, net in self.nets.items():
            if self.alive[n]:
                loss = common.train_step(net, self.loss_fns[n], self.opts[n], xb, yb)
                self.alive[n] = bool(np.isfinite(loss))
        self.step += 1
        if self.step % every == 0 or self.step == self.config.steps:
            measure(self.step)


# -- gradients without side effects ------------------------------------------------------
def gradients(net: Sequential, x: np.ndarray, y: np.ndarray, copy: bool = True
              ) -> tuple[float, list[np.ndarray]]:
    """Loss and copies of every parameter's gradient on (x, y), in training mode. With
    ``copy`` they are computed on a copy of ``net``, so that nothing of it changes (BN's
    running statistics included); without, ``net`` is a throwaway."""
    probe = deepcopy(net) if copy else net
    loss_fn = CrossEntropyLoss()
    probe.zero_grad()
    loss = float(loss_fn.forward(probe.forward(x), y))
    probe.backward(loss_fn.backward())
    return loss, [np.zeros_like(p.data) if p.grad is None else p.grad.copy()
                  for p in probe.parameters()]


def stepped(net: Sequential, grads: list[np.ndarray], size: float,
            first: int | None = None) -> Sequential:
    """A copy of ``net`` whose parameters (the ``first`` ones, default all) moved by
    ``-size * grad``: an SGD step of size ``size``."""
    moved = deepcopy(net)
    params = list(moved.parameters())
    for p, g in list(zip(params, grads, strict=True))[:first]:
        p.data -= np.asarray(size * g, dtype=p.data.dtype)
    return moved


def linear_layers(net: Sequential) -> list[int]:
    """Indices in ``net.layers`` of its Linear layers: the "layers" of the measurements."""
    return [i for i, layer in enumerate(net.layers) if isinstance(layer, Linear)]


def params_before(net: Sequential, index: int) -> int:
    """How many parameters the layers before ``net.layers[index]`` hold (they come first in
    ``net.parameters()``)."""
    return sum(len(list(layer.parameters())) for layer in net.layers[:index])


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])


# -- verdicts and figures ---------------------------------------------------------------
def judge(measured: str, agrees: list[bool], agree: str, disagree: str, mixed: str) -> str:
    """``measured`` followed by what this run says of the paper's claim: ``agree`` when every
    comparison in ``agrees`` goes the paper's way, ``disagree`` when none does, else ``mixed``."""
    if all(agrees):
        return f"{measured}This run agrees with Santurkar et al.: {agree}"
    if not any(agrees):
        return f"{measured}This run disagrees with Santurkar et al.: {disagree}"
    return f"{measured}This run is mixed: {mixed}"


COLORS = {"plain": "#d62728", "bn": "#1f77b4", "noisy": "#2ca02c",
          "deep-plain": "#ff7f0e", "deep-bn": "#6a3d9a"}

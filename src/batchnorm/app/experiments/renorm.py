"""Batch Renorm against BN where BN is weak: small and non-i.i.d. minibatches.

An MLP (784-100-100-100-10, ReLU, He init, each hidden Linear followed by BN or Batch Renorm)
is trained on MNIST with minibatches of ``small_batch`` examples drawn at random, and with
minibatches of ``batch`` examples drawn from only ``classes_per_batch`` classes (and, for
reference, with random minibatches of ``batch``). Test
accuracy is measured at inference, where both layers use their running (population)
statistics. Batch Renorm's ``rmax``/``dmax`` follow the paper's schedule shape: ``rmax = 1``,
``dmax = 0`` (plain BN) for a warm-up, then relaxed linearly to 3 and 5 (Ioffe 2017, §4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common
from batchnorm.nn import BatchNorm1d, BatchRenorm1d, Linear, ReLU, Sequential
from batchnorm.nn.optim import SGD

NAME = "renorm"
CLAIM = ("With small or non-i.i.d. minibatches BN's training-time normalization differs from "
         "the population statistics used at inference and its test accuracy drops; Batch "
         "Renorm, which corrects each batch toward the running statistics, keeps most of "
         "the accuracy (Ioffe 2017, Figures 2-3).")
SETTINGS = ("iid", "small", "non-iid")  # iid: the reference, where BN is at home
COMPARED = ("small", "non-iid")
LAYERS = ("bn", "renorm")


@dataclass
class NetSettings(common.TrainSettings):
    """The ReLU network of :func:`network` and its training, which renorm and population
    share: SGD with momentum on batches of ``batch``, test accuracy measured ``evals`` times."""

    batch: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    evals: int = 10
    hidden: tuple[int, ...] = (100, 100, 100)


@dataclass
class Config(NetSettings):
    steps: int = 4000
    small_batch: int = 4
    classes_per_batch: int = 2
    bn_momentum: float = 0.01
    rmax: float = 3.0
    dmax: float = 5.0
    warmup: float = 0.1  # fraction of steps with rmax=1, dmax=0
    relax_r: float = 0.5  # fraction of steps at which rmax reaches its limit
    relax_d: float = 0.35  # ... and dmax


class Results(common.SweepResults):
    """One dict per net: setting, layer, steps, accuracy (final), curve ([step, accuracy])."""

    KEY = ("setting", "layer")


def schedule(config: Config, step: int) -> tuple[float, float]:
    """(rmax, dmax) at ``step``: 1 and 0 during the warm-up, then linear to their limits."""
    def ramp(end: float, top: float, bottom: float) -> float:
        start, stop = config.warmup * config.steps, end * config.steps
        t = min(1.0, max(0.0, (step - start) / max(1.0, stop - start)))
        return bottom + t * (top - bottom)

    return ramp(config.relax_r, config.rmax, 1.0), ramp(config.relax_d, config.dmax, 0.0)


def network(sizes: list[int], layer: str, momentum: float, rng: np.random.Generator
            ) -> Sequential:
    """Linear (no bias) -> BN or Batch Renorm -> ReLU per hidden layer, then a Linear."""
    net = Sequential()
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        net.append(Linear(n_in, n_out, bias=False, init="he", rng=rng))
        norm = BatchRenorm1d if layer == "renorm" else BatchNorm1d
        net.append(norm(n_out, momentum=momentum))
        net.append(ReLU())
    net.append(Linear(sizes[-2], sizes[-1], init="he", rng=rng))
    return net


def net_and_optimizer(config: NetSettings, data: data_mod.Dataset, layer: str,
                      bn_momentum: float) -> tuple[Sequential, SGD]:
    """The network for ``data`` (weights seeded by ``config.seed``) and its SGD."""
    sizes = [data.num_features, *config.hidden, data.num_classes]
    net = network(sizes, layer, bn_momentum, np.random.default_rng([config.seed, 0]))
    return net, SGD(net.parameters(), lr=config.lr, momentum=config.momentum)


class ClassSampler:
    """Minibatches of ``batch`` examples from ``k`` random classes, ``batch // k`` each."""

    def __init__(self, y: np.ndarray, batch: int, k: int, rng: np.random.Generator) -> None:
        if batch % k:
            raise ValueError(f"batch ({batch}) must be a multiple of classes_per_batch ({k})")
        self.by_class = [np.flatnonzero(y == c) for c in range(int(y.max()) + 1)]
        self.batch, self.k, self.rng = batch, k, rng

    def indices(self) -> np.ndarray:
        classes = self.rng.choice(len(self.by_class), self.k, replace=False)
        return np.concatenate([self.rng.choice(self.by_class[c], self.batch // self.k,
                                               replace=False) for c in classes])


def train_case(config: Config, data: data_mod.Dataset, setting: str, layer: str
               ) -> dict[str, Any]:
    started = time.perf_counter()
    net, opt = net_and_optimizer(config, data, layer, config.bn_momentum)
    rng = np.random.default_rng([config.seed, 1])
    if setting != "non-iid":
        size = config.small_batch if setting == "small" else config.batch
        draw = common.BatchSampler(data.x_train, data.y_train, size, rng).next
    else:
        classes = ClassSampler(data.y_train, config.batch, config.classes_per_batch, rng)

        def draw() -> tuple[np.ndarray, np.ndarray]:
            idx = classes.indices()
            return data.x_train[idx], data.y_train[idx]

    renorms = [m for m in net.modules() if isinstance(m, BatchRenorm1d)]
    curve: list[list[float]] = []

    def relax(step: int) -> None:
        rmax, dmax = schedule(config, step)
        for m in renorms:
            m.rmax, m.dmax = rmax, dmax

    def measure(step: int) -> None:
        curve.append([step, common.accuracy(net, data.x_test, data.y_test)])

    losses, _ = common.train_net(net, opt, draw, config.steps,
                                 every=max(1, config.steps // config.evals), measure=measure,
                                 before=relax, stop_on_divergence=False)
    return {"setting": setting, "layer": layer, "steps": config.steps,
            "accuracy": curve[-1][1], "curve": curve, "final_loss": float(losses[-1]),
            "seconds": time.perf_counter() - started}


run = common.sweep_experiment(
    NAME, Config, Results, lambda config: [(s, n) for s in SETTINGS for n in LAYERS],
    train_case, lambda s, n: f"renorm {s} {'Batch Renorm' if n == 'renorm' else 'BN'}")


def _describe(config: dict[str, Any], setting: str) -> str:
    if setting == "small":
        return f"batches of {config['small_batch']}"
    if setting == "iid":
        return f"batches of {config['batch']}"
    return f"batches of {config['batch']} from {config['classes_per_batch']} classes"


def summary(results: Results) -> list[tuple[str, str]]:
    rows = []
    for s in SETTINGS:
        bn, rn = results.find(s, "bn"), results.find(s, "renorm")
        if bn is not None and rn is not None:
            rows.append((f"renorm {_describe(results.config, s)}",
                         f"BN {bn['accuracy']:.4f}  |  Batch Renorm {rn['accuracy']:.4f}"))
    rows.append(("renorm verdict", verdict(results)))
    rows.append(results.time_row("renorm time", f"({len(results.cases)} nets)"))
    return rows


def verdict(results: Results) -> str:
    """Whether the measurement agrees with the paper's claim, with the numbers."""
    parts, agree = [], True
    for s in COMPARED:
        bn, rn = results.find(s, "bn"), results.find(s, "renorm")
        if bn is None or rn is None:
            return "incomplete run"
        gain = rn["accuracy"] - bn["accuracy"]
        agree &= gain > 0
        parts.append(f"{_describe(results.config, s)}: {gain * 100:+.1f} points")
    word = "agrees with" if agree else "does not (fully) agree with"
    return f"Batch Renorm minus BN test accuracy, {'; '.join(parts)}: {word} the paper."


def figures(results: Results) -> list[Any]:
    from batchnorm.app import report

    fig, axes = report.subplots(1, len(SETTINGS), figsize=(15, 4), sharey=True)
    for ax, s in zip(axes, SETTINGS, strict=True):
        for layer, color, label in (("bn", "#1f77b4", "BN"), ("renorm", "#2ca02c",
                                                              "Batch Renorm")):
            case = results.find(s, layer)
            if case is not None:
                steps, acc = zip(*case["curve"], strict=True)
                ax.plot(steps, acc, "o-", color=color, label=label, markersize=3)
        ax.set(title=_describe(results.config, s), xlabel="training step",
               ylabel="test accuracy (running statistics)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return [report.Figure("renorm", fig, "Batch Renorm vs BN", verdict(results), CLAIM)]

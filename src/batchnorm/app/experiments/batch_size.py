"""BN's weakness at small batches: test accuracy against batch size.

The Figure 1 architecture (784-100-100-100-10, sigmoid, Xavier init unless ``init_std``) is
trained with and without BN for the same number of epochs at batch sizes 2 to 64, with the
learning rate scaled linearly by batch size (``lr * batch / base_batch``). Test accuracy is
measured at inference, where BN uses its population (running) statistics. With tiny batches
the per-batch mean and variance are noisy and differ from the population ones, so BN's
advantage shrinks or reverses (as Ioffe 2017, "Batch Renormalization", and Wu & He 2018,
"Group Normalization", report).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common
from batchnorm.nn.layers import mlp
from batchnorm.nn.optim import SGD

NAME = "batch-size"
QUESTION = "Does BN still help when the batches are tiny?"
CLAIM = ("BN estimates its statistics from the batch: with very small batches they are noisy "
         "and unlike the population statistics used at inference, so BN's advantage shrinks "
         "or reverses (Ioffe 2017, Batch Renormalization; Wu & He 2018, Group Normalization).")


@dataclass
class Config(common.TrainSettings):
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    epochs: float = 5.0
    steps: int | None = None  # when set: steps at the largest batch size, instead of epochs
    lr: float = 0.5  # at base_batch; lr scales linearly with the batch size
    base_batch: int = 64
    momentum: float = 0.0
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float | None = None  # None: Xavier


class Results(common.SweepResults):
    """One dict per net: batch_size, bn, lr, steps, accuracy, diverged, seconds."""

    KEY = ("batch_size", "bn")


def samples(config: Config, n_train: int) -> int:
    """Training examples every net sees (the same for all batch sizes)."""
    if config.steps is not None:
        return config.steps * max(config.batch_sizes)
    return int(config.epochs * n_train)


def train_case(config: Config, data: data_mod.Dataset, batch: int, bn: bool) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = [data.num_features, *config.hidden, data.num_classes]
    init = "normal" if config.init_std is not None else "xavier"
    net = mlp(sizes, "sigmoid", batch_norm=bn, init=init, std=config.init_std,
              rng=np.random.default_rng([config.seed, 0]))
    lr = config.lr * batch / config.base_batch
    opt = SGD(net.parameters(), lr=lr, momentum=config.momentum)
    sampler = common.BatchSampler(data.x_train, data.y_train, batch,
                                  np.random.default_rng([config.seed, 1, batch]))
    steps = max(1, samples(config, len(data.y_train)) // batch)
    _, diverged = common.train_net(net, opt, sampler.next, steps)
    acc = 0.0 if diverged else common.accuracy(net, data.x_test, data.y_test)
    return {"batch_size": batch, "bn": bn, "lr": lr, "steps": steps, "accuracy": acc,
            "diverged": diverged, "seconds": time.perf_counter() - started}


def _check(config: Config) -> None:
    if min(config.batch_sizes) < 2:
        raise ValueError("BN needs batches of at least 2 examples")


run = common.sweep_experiment(
    NAME, Config, Results,
    lambda config: [(b, bn) for b in config.batch_sizes for bn in (False, True)], train_case,
    lambda batch, bn: f"batch-size {batch} {'BN' if bn else 'plain'}", check=_check)


def summary(results: Results) -> list[tuple[str, str]]:
    rows = []
    for b in results.config["batch_sizes"]:
        plain, bn = results.find(b, False), results.find(b, True)
        if plain is None or bn is None:
            continue
        rows.append((f"batch-size {b} (lr {bn['lr']:.4g}, {bn['steps']:,} steps)",
                     f"without BN {_acc(plain)}  |  with BN {_acc(bn)}"))
    rows.append(results.time_row("batch-size time", f"({len(results.cases)} nets)"))
    return rows


def verdict(results: Results) -> str:
    """Whether this run agrees with the claim, in words."""
    gaps = {}
    for b in results.config["batch_sizes"]:
        plain, bn = results.find(b, False), results.find(b, True)
        if plain is not None and bn is not None:
            gaps[b] = bn["accuracy"] - plain["accuracy"]
    if len(gaps) < 2:
        return "Not enough batch sizes ran to tell."
    small, large = min(gaps), max(gaps)
    agrees = gaps[small] < gaps[large]
    return (f"{'Yes' if agrees else 'No'}: BN's gain in test accuracy over the same net "
            f"without BN is {gaps[small]:+.3f} at batch {small} and {gaps[large]:+.3f} at "
            f"batch {large}" + (", smaller with tiny batches." if agrees
                                else "; tiny batches did not hurt BN more here."))


def _acc(case: dict[str, Any]) -> str:
    return "diverged" if case["diverged"] else f"{case['accuracy']:.4f}"


def figures(results: Results) -> list[Any]:
    """The report's figures (report.Figure), drawn with matplotlib."""
    from batchnorm.app import report

    plt = report.plt()
    sizes = list(results.config["batch_sizes"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for bn, n in ((False, "plain"), (True, "bn")):
        cases = [results.find(b, bn) for b in sizes]
        xs = [b for b, c in zip(sizes, cases, strict=True) if c is not None]
        ax.plot(xs, [c["accuracy"] for c in cases if c is not None], "o-", color=report.COLORS[n],
                label=report.LABELS[n])
    ax.set_xscale("log", base=2)
    ax.set(title="test accuracy (population statistics) vs batch size", xlabel="batch size",
           ylabel="accuracy")
    report.legend_below(ax)
    report.tidy(ax)
    fig.tight_layout()
    parts = []
    for b in sizes:
        p, q = results.find(b, False), results.find(b, True)
        if p is not None and q is not None:
            parts.append(f"batch {b}: {p['accuracy']:.3f} / {q['accuracy']:.3f}")
    shows = ("Same number of training examples for every batch size, learning rate "
             f"{results.config['lr']} x batch / {results.config['base_batch']}. Test accuracy "
             "without / with BN: " + "; ".join(parts) + ".")
    claim = ("BN's statistics are estimated per batch: with very small batches they are noisy "
             "and unlike the population statistics used at inference, so BN degrades "
             "(Ioffe 2017, Batch Renormalization; Wu & He 2018, Group Normalization).")
    return [report.Figure("batch_size", fig, "Batch size", shows, claim)]

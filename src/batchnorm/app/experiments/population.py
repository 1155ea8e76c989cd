"""Population statistics at inference: EMA running averages against exact ones.

An MLP with BN (784-100-100-100-10, ReLU, He init) is trained on MNIST once per BN momentum;
the momentum changes only the running averages, so every net follows the same weights. Every
few steps the test accuracy is measured twice: with the running averages (EMA), and with the
exact population statistics of the current weights (:func:`batchnorm.nn.update_bn_stats` over
``population_batches`` training minibatches, on a copy of the net), as Wu & Johnson (2021,
"Rethinking 'Batch' in BatchNorm", §3) compare EMA with PreciseBN.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common
from batchnorm.app.experiments.renorm import NetSettings, net_and_optimizer
from batchnorm.nn import update_bn_stats

NAME = "population"
CLAIM = ("EMA running statistics lag behind weights that change quickly (most with a small "
         "momentum, i.e. a long average), so test accuracy measured with them is lower and "
         "less stable than with exact population statistics of the current weights "
         "(PreciseBN), above all early in training (Wu & Johnson 2021, §3).")


@dataclass
class Config(NetSettings):
    momenta: tuple[float, ...] = (0.1, 0.01, 0.001)
    steps: int = 3000
    lr: float = 0.1
    evals: int = 15
    population_batches: int = 100


class Results(common.SweepResults):
    """One dict per net: bn_momentum, curve ([step, EMA accuracy, exact accuracy])."""

    KEY = ("bn_momentum",)


def train_case(config: Config, data: data_mod.Dataset, bn_momentum: float) -> dict[str, Any]:
    started = time.perf_counter()
    net, opt = net_and_optimizer(config, data, "bn", bn_momentum)
    sampler = common.BatchSampler(data.x_train, data.y_train, config.batch,
                                  np.random.default_rng([config.seed, 1]))
    curve: list[list[float]] = []

    def measure(step: int) -> None:
        ema = common.accuracy(net, data.x_test, data.y_test)
        population = common.BatchSampler(data.x_train, data.y_train, config.batch,
                                          np.random.default_rng([config.seed, 2, step]))
        exact = update_bn_stats(copy.deepcopy(net),
                                (population.next() for _ in range(config.population_batches)))
        curve.append([step, ema, common.accuracy(exact, data.x_test, data.y_test)])

    common.train_net(net, opt, sampler.next, config.steps,
                     every=max(1, config.steps // config.evals), measure=measure,
                     stop_on_divergence=False)
    return {"bn_momentum": bn_momentum, "steps": config.steps, "curve": curve,
            "seconds": time.perf_counter() - started}


run = common.sweep_experiment(NAME, Config, Results,
                              lambda config: [(m,) for m in config.momenta], train_case,
                              lambda m: f"population momentum {m:g}")


def _gaps(case: dict[str, Any]) -> tuple[float, float, float]:
    """(mean over evaluations, first half's mean, final) of exact minus EMA accuracy."""
    gaps = [exact - ema for _, ema, exact in case["curve"]]
    half = gaps[: max(1, len(gaps) // 2)]
    return float(np.mean(gaps)), float(np.mean(half)), gaps[-1]


def summary(results: Results) -> list[tuple[str, str]]:
    rows = []
    for m in results.config["momenta"]:
        case = results.find(m)
        if case is None:
            continue
        _, ema, exact = case["curve"][-1]
        mean, early, _ = _gaps(case)
        rows.append((f"population momentum {m:g}",
                     f"final EMA {ema:.4f} | exact {exact:.4f}; exact - EMA: mean "
                     f"{mean * 100:+.1f} points, first half {early * 100:+.1f}"))
    rows.append(("population verdict", verdict(results)))
    rows.append(results.time_row("population time", f"({len(results.cases)} nets)"))
    return rows


def verdict(results: Results) -> str:
    """Whether the measurement agrees with the paper's claim, with the numbers."""
    cases = [results.find(m) for m in results.config["momenta"]]
    if any(c is None for c in cases):
        return "incomplete run"
    gaps = {c["bn_momentum"]: _gaps(c) for c in cases if c is not None}
    smallest = min(gaps)
    agree = all(g[0] >= -0.002 for g in gaps.values()) and gaps[smallest][1] > 0.005
    word = "agrees with" if agree else "does not (fully) agree with"
    listed = "; ".join(f"momentum {m:g}: {g[0] * 100:+.1f} (first half {g[1] * 100:+.1f})"
                       for m, g in gaps.items())
    return (f"exact minus EMA test accuracy, mean over the evaluations in points, {listed}: "
            f"{word} the paper.")


def figures(results: Results) -> list[Any]:
    from batchnorm.app import report

    fig, ax = report.subplots(1, 1, figsize=(7, 4.5))
    colors = ["#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b"]
    exact_drawn = False
    for i, m in enumerate(results.config["momenta"]):
        case = results.find(m)
        if case is None:
            continue
        steps, ema, exact = zip(*case["curve"], strict=True)
        ax.plot(steps, ema, "o-", color=colors[i % len(colors)], markersize=3,
                label=f"EMA, momentum {m:g}")
        if not exact_drawn:  # the nets share their weights, so the exact curve is one
            ax.plot(steps, exact, "k--", label="exact population statistics")
            exact_drawn = True
    ax.set(title="test accuracy over training", xlabel="training step", ylabel="test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return [report.Figure("population", fig, "EMA vs exact population statistics", verdict(results),
                   CLAIM)]

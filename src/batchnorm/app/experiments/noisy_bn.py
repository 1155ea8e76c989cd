"""Does BN work by keeping layer inputs steady? Santurkar et al. (2018), section 2.1, Fig. 2.

Three copies of the Figure 1 network (784-100-100-100-10, sigmoids, weights from N(0, 0.01^2),
SGD on batches of 60) start from the same weights and see the same batches: without BN, with
BN, and with BN followed by noise that shifts and widens every BN output. At each step and for
each unit j the noise draws a mean m_j ~ U(-noise_mean, noise_mean) and a standard deviation
s_j ~ U(noise_std[0], noise_std[1]); every example in the batch then gets its own additive
N(m_j, s_j^2) value. The noise is on in training only. We record test accuracy and, on a fixed
batch of training digits in training mode (what the layer sees while it learns), the
percentiles of one unit's sigmoid input in the last hidden layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common, lockstep
from batchnorm.nn.layers import ACTIVATIONS, Sequential, mlp
from batchnorm.nn.module import Module

NAME = "noisy-bn"
NETS = ("plain", "bn", "noisy")
LABELS = {"plain": "without BN", "bn": "with BN", "noisy": "with BN + moving noise"}
PERCENTILES = (5.0, 15.0, 50.0, 85.0, 95.0)
CLAIM = (
    "The seed, after Ioffe & Szegedy (2015), says BN helps because it keeps the distribution "
    "of each layer's input steady while the layers below it learn (less 'internal covariate "
    "shift'). Santurkar et al. (2018, section 2.1, Fig. 2) test this directly: they add noise "
    "after every BN layer, with a mean and a variance that change at every step, so that the "
    "inputs of the next layer drift more than in a network without BN. Their finding: the "
    "noisy-BN network still trains about as well as the BN network and better than the one "
    "without BN, so steadier input distributions cannot be what makes BN work."
)


@dataclass
class Config(lockstep.TrainConfig):
    steps: int = 10_000
    noise_mean: float = 0.5  # m_j ~ U(-noise_mean, noise_mean), fresh each step
    noise_std: tuple[float, float] = (1.0, 1.25)  # s_j ~ U(noise_std), fresh each step
    eval_every: int = 250
    unit: int = 0  # the last hidden layer's sigmoid whose input is followed
    probe_size: int = 1000  # training digits on which the unit's distribution is taken


@dataclass
class Results(common.StepResults):
    # [eval][percentile]: the followed unit's sigmoid input on the probe batch, in training
    percentiles: dict[str, list[list[float]]] = field(default_factory=dict)

    def drift(self, net: str) -> dict[str, float]:
        """How much the unit's input distribution moved from one evaluation to the next,
        past the first 10% of training (the initial transient): the mean absolute change of
        its median and of its 15-85 spread, and the median's range."""
        steps = np.asarray(self.steps)
        p = np.asarray(self.percentiles[net], dtype=np.float64)[steps >= 0.1 * steps[-1]]
        if len(p) < 2:
            return {"from_step": 0, "median_step": float("nan"),
                    "spread_step": float("nan"), "median_range": float("nan")}
        median, spread = p[:, 2], p[:, 3] - p[:, 1]
        return {"from_step": int(steps[steps >= 0.1 * steps[-1]][0]),
                "median_step": round(float(np.abs(np.diff(median)).mean()), 4),
                "spread_step": round(float(np.abs(np.diff(spread)).mean()), 4),
                "median_range": round(float(median.max() - median.min()), 4)}


class ShiftNoise(Module):
    """Adds N(m_j, s_j^2) to every example's unit j in training, with (m_j, s_j) drawn
    afresh at every forward: m_j ~ U(-mean, mean), s_j ~ U(std). A no-op in eval, and with
    ``mean == 0`` and ``std == (0, 0)`` (the output is then the input array itself)."""

    def __init__(self, mean: float, std: tuple[float, float], rng: np.random.Generator) -> None:
        super().__init__()
        if mean < 0 or not 0 <= std[0] <= std[1]:
            raise ValueError(f"noise needs mean >= 0 and 0 <= std[0] <= std[1], got {mean}, "
                             f"{std}")
        self.mean, self.std, self.rng = float(mean), (float(std[0]), float(std[1])), rng

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training or (self.mean == 0 and self.std[1] == 0):
            return x
        units = x.shape[1]
        m = self.rng.uniform(-self.mean, self.mean, units)
        s = self.rng.uniform(self.std[0], self.std[1], units)
        return x + (m + s * self.rng.standard_normal(x.shape)).astype(x.dtype)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dy  # additive noise: dL/dx = dL/dy

    def extra_repr(self) -> str:
        return f"mean=U(-{self.mean}, {self.mean}), std=U{self.std}"


def with_noise(net: Sequential, mean: float, std: tuple[float, float],
               rng: np.random.Generator) -> Sequential:
    """``net`` with a :class:`ShiftNoise` in front of every activation (after its BN)."""
    acts = tuple(ACTIVATIONS.values())
    out = Sequential()
    for layer in net.layers:
        if isinstance(layer, acts):
            out.append(ShiftNoise(mean, std, rng))
        out.append(layer)
    return out


def build_nets(config: Config, num_features: int, num_classes: int,
               noise_rng: np.random.Generator) -> dict[str, Sequential]:
    sizes = [num_features, *config.hidden, num_classes]
    nets = {n: mlp(sizes, "sigmoid", batch_norm=(n != "plain"), init="normal",
                   std=config.init_std, rng=np.random.default_rng([config.seed, 0]))
            for n in NETS}
    nets["noisy"] = with_noise(nets["noisy"], config.noise_mean, config.noise_std, noise_rng)
    return nets


def _sigmoid_input(net: Sequential, x: np.ndarray, unit: int) -> np.ndarray:
    """The input of the last hidden layer's sigmoid ``unit`` for batch x, in training mode,
    on a copy of ``net`` (nothing of ``net`` changes, its noise generator included)."""
    probe = copy.deepcopy(net)
    probe.train()
    last = max(i for i, layer in enumerate(probe.layers)
               if isinstance(layer, tuple(ACTIVATIONS.values())))
    for layer in probe.layers[:last]:
        x = layer.forward(x)
    return x[:, unit]


def _check(config: Config) -> None:
    common.check_schedule(config.steps, config.eval_every, "eval_every")
    common.check_unit(config.unit, config.hidden)


def _run(config: Config, data: data_mod.Dataset, progress: common.Progress,
         checkpoint: common.Checkpoint | None) -> Results:
    noise_rng = np.random.default_rng([config.seed, 2])
    nets = build_nets(config, data.num_features, data.num_classes, noise_rng)
    trainer = lockstep.Lockstep(NAME, config, data, nets, rngs={"noise": noise_rng})
    results = trainer.start(Results, checkpoint, "accuracy", "percentiles")
    probe_x = data.x_train[: config.probe_size]

    def measure(step: int) -> None:
        results.steps.append(step)
        for n, net in nets.items():
            alive = trainer.alive[n]
            results.accuracy[n].append(
                common.accuracy(net, data.x_test, data.y_test) if alive else float("nan"))
            h = _sigmoid_input(net, probe_x, config.unit) if alive else np.full(1, np.nan)
            results.percentiles[n].append(np.percentile(h, PERCENTILES).round(5).tolist())

    trainer.run(results, measure, every=config.eval_every, progress=progress,
                checkpoint=checkpoint)
    return results


run = common.Experiment(Config, _run, check=_check)


def summary(results: Results) -> list[tuple[str, str]]:
    rows = [results.accuracy_row("test accuracy", LABELS)]
    for n in NETS:
        d = results.drift(n)
        rows.append((f"unit {results.config['unit']}'s sigmoid input from step "
                     f"{d['from_step']:,}, {LABELS[n]}",
                     f"median moves {d['median_step']:.3f} and 15-85 spread "
                     f"{d['spread_step']:.3f} per evaluation; median range "
                     f"{d['median_range']:.3f}"))
    rows.append(results.time_row("time", f"for {results.last_step:,} steps (three nets)"))
    return rows


def verdict(results: Results) -> str:
    acc = {n: results.accuracy[n][-1] for n in NETS}
    drift = {n: results.drift(n)["median_step"] for n in NETS}
    drifts_more = drift["noisy"] > max(drift["plain"], drift["bn"])
    trains = acc["noisy"] >= acc["plain"] and acc["noisy"] >= acc["bn"] - 0.02
    said = (f"With the moving noise the unit's input median moved {drift['noisy']:.3f} per "
            f"evaluation against {drift['plain']:.3f} without BN and {drift['bn']:.3f} with BN; "
            f"test accuracy ended at {acc['noisy']:.4f} (noisy BN), {acc['bn']:.4f} (BN) and "
            f"{acc['plain']:.4f} (no BN). ")
    if drifts_more and trains:
        return said + ("This run agrees with Santurkar et al.: the inputs drift more than "
                       "without BN, yet the network trains about as well as with plain BN.")
    if not drifts_more:
        return said + "This run is inconclusive: the noise did not make the inputs drift most."
    return said + ("This run disagrees with Santurkar et al.: the noisy-BN network trains "
                   "clearly worse than the BN network or than the one without BN.")


def figures(results: Results) -> list[Any]:
    from batchnorm.app import report

    steps = np.asarray(results.steps)
    fig, axes = report.subplots(1, 4, figsize=(16, 3.8))
    for n in NETS:
        axes[0].plot(steps, results.accuracy[n], color=lockstep.COLORS[n], label=LABELS[n])
    axes[0].set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    for ax, n, tag in zip(axes[1:], NETS, "bcd", strict=True):
        p = np.asarray(results.percentiles[n])
        ax.fill_between(steps, p[:, 0], p[:, 4], color=lockstep.COLORS[n], alpha=0.15,
                        label="5th-95th percentile")
        ax.fill_between(steps, p[:, 1], p[:, 3], color=lockstep.COLORS[n], alpha=0.35,
                        label="15th-85th")
        ax.plot(steps, p[:, 2], color=lockstep.COLORS[n], label="median")
        ax.set(title=f"({tag}) sigmoid input, {LABELS[n]}", xlabel="training step")
    lo = min(ax.get_ylim()[0] for ax in axes[1:])
    hi = max(ax.get_ylim()[1] for ax in axes[1:])
    report.tidy(*axes)
    for ax in axes[1:]:
        ax.set_ylim(lo, hi)
    # one legend for (b)-(d), below the panels, so that it covers no data
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8,
               bbox_to_anchor=(0.62, 0.0))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    shows = " ".join(f"{k}: {v}." for k, v in summary(results)[:-1])
    return [report.Figure("noisy-bn", fig, "Does BN work by keeping layer inputs steady?",
                   shows + " " + verdict(results), CLAIM)]

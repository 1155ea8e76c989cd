"""Does BN make the loss landscape smoother? Santurkar et al. (2018), section 3.1, Fig. 4.

The Figure 1 network without and with BN sees the same batches. Every ``probe_every`` steps,
on the batch it is about to learn from, we take the gradient g, then move the weights along
-g by each step size in ``step_sizes`` (multiples of the learning rate) and record, at each
point, the loss and the gradient g' on the same batch. Three measures per probe:

* loss range: the smallest and largest loss along the way (how much the loss changes when
  one follows the gradient; a smooth landscape changes little and predictably);
* gradient predictiveness: the largest ||g' - g|| (how far the gradient one steps with is
  from the one found there);
* effective beta-smoothness: the largest ||g' - g|| / ||step||, the gradient's Lipschitz
  constant along the path.

Probes work on copies of the nets: training goes on exactly as without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common, lockstep
from batchnorm.nn.layers import Sequential, mlp

NAME = "landscape"
NETS = ("plain", "bn")
PROBES = ("loss", "grad_norm", "path_loss", "grad_change")  # the fields of probe()'s values
LABELS = {"plain": "without BN", "bn": "with BN"}
CLAIM = (
    "Santurkar et al. (2018, section 3.1, Fig. 4) propose what BN really changes: it makes the "
    "loss landscape smoother. Along the gradient the loss of a network with BN varies less, "
    "the gradient stays closer to the one measured at the start (it is more 'predictive'), and "
    "the effective beta-smoothness, how fast the gradient changes per unit of distance, is "
    "smaller. A smoother landscape lets SGD take larger steps safely, which is why BN trains "
    "faster. The seed's explanation (steadier layer inputs) does not predict this."
)


@dataclass
class Config(lockstep.TrainConfig):
    steps: int = 10_000
    step_sizes: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # times lr
    probe_every: int = 250


@dataclass
class Results(common.StepResults):
    """``steps``: where the probes were taken; ``loss`` and ``grad_norm``: at the probe's
    start; [probe][step size]: the loss and ||g' - g|| at each point along -g."""

    loss: dict[str, list[float]] = field(default_factory=dict)
    path_loss: dict[str, list[list[float]]] = field(default_factory=dict)
    grad_change: dict[str, list[list[float]]] = field(default_factory=dict)
    grad_norm: dict[str, list[float]] = field(default_factory=dict)

    def measures(self, net: str) -> dict[str, np.ndarray]:
        """Per probe: loss range (min, max, including the start), largest gradient change,
        and effective beta-smoothness (largest ||g' - g|| / (eta ||g||) over eta > 0)."""
        losses = np.asarray(self.path_loss[net], dtype=np.float64)
        start = np.asarray(self.loss[net], dtype=np.float64)[:, None]
        change = np.asarray(self.grad_change[net], dtype=np.float64)
        etas = np.asarray(self.config["step_sizes"]) * self.config["lr"]
        with np.errstate(divide="ignore", invalid="ignore"):
            beta = change / (etas[None, :] * np.asarray(self.grad_norm[net])[:, None])
        beta = np.where(etas[None, :] > 0, beta, np.nan)
        all_losses = np.concatenate([start, losses], axis=1)
        return {"loss_min": all_losses.min(axis=1), "loss_max": all_losses.max(axis=1),
                "grad_change": change.max(axis=1),
                "beta": np.nanmax(beta, axis=1) if (etas > 0).any() else change.max(axis=1)}


def probe(net: Sequential, x: np.ndarray, y: np.ndarray, step_sizes: list[float]
          ) -> tuple[float, float, list[float], list[float]]:
    """(loss, ||g||, losses along -g, ||g' - g|| along -g) on a copy of ``net``."""
    loss, grads = lockstep.gradients(net, x, y)
    g = lockstep.flat(grads)
    losses, changes = [], []
    for eta in step_sizes:
        moved_loss, moved = lockstep.gradients(lockstep.stepped(net, grads, eta), x, y,
                                               copy=False)
        losses.append(moved_loss)
        changes.append(float(np.linalg.norm(lockstep.flat(moved) - g)))
    return loss, float(np.linalg.norm(g)), losses, changes


def build_nets(config: Config, num_features: int, num_classes: int) -> dict[str, Sequential]:
    sizes = [num_features, *config.hidden, num_classes]
    return {n: mlp(sizes, "sigmoid", batch_norm=(n == "bn"), init="normal",
                   std=config.init_std, rng=np.random.default_rng([config.seed, 0]))
            for n in NETS}


def _check(config: Config) -> None:
    common.check_schedule(config.steps, config.probe_every, "probe_every")
    if min(config.step_sizes, default=0.0) < 0:
        raise ValueError(f"step sizes must be >= 0, got {config.step_sizes}")


def _run(config: Config, data: data_mod.Dataset, progress: common.Progress,
         checkpoint: common.Checkpoint | None) -> Results:
    nets = build_nets(config, data.num_features, data.num_classes)
    trainer = lockstep.Lockstep(NAME, config, data, nets)
    results = trainer.start(Results, checkpoint, "accuracy", *PROBES)
    etas = [s * config.lr for s in config.step_sizes]

    def measure(n: str, net: Sequential, xb: np.ndarray, yb: np.ndarray) -> dict[str, Any]:
        return dict(zip(PROBES, probe(net, xb, yb, etas), strict=True))

    def dead(n: str) -> dict[str, Any]:
        nan = float("nan")
        return dict(zip(PROBES, (nan, nan, [nan] * len(etas), [nan] * len(etas)), strict=True))

    trainer.run_probed(results, config.probe_every, measure, dead, progress=progress,
                       checkpoint=checkpoint)
    return results


run = common.Experiment(Config, _run, check=_check)


def _late(results: Results, net: str) -> dict[str, float]:
    """Medians over the probes past the first 10% of training (the initial transient)."""
    m = results.measures(net)
    keep = np.asarray(results.steps) >= 0.1 * results.config["steps"]
    return {"loss_range": float(np.median((m["loss_max"] - m["loss_min"])[keep])),
            "grad_change": float(np.median(m["grad_change"][keep])),
            "beta": float(np.median(m["beta"][keep]))}


def summary(results: Results) -> list[tuple[str, str]]:
    late = {n: _late(results, n) for n in NETS}
    start = int(0.1 * results.config["steps"])
    rows = []
    for key, label in (("loss_range", "range of the loss along the gradient"),
                       ("grad_change", "largest change of the gradient, ||g' - g||"),
                       ("beta", "effective beta-smoothness")):
        rows.append((f"{label} (median over probes from step {start:,})",
                     common.per_net(LABELS, {n: late[n][key] for n in NETS}, ".4g")))
    rows.append(results.accuracy_row("test accuracy", LABELS))
    rows.append(results.time_row("time", f"for {results.config['steps']:,} steps"))
    return rows


def verdict(results: Results) -> str:
    late = {n: _late(results, n) for n in NETS}
    smoother = [late["bn"][k] < late["plain"][k] for k in ("loss_range", "grad_change", "beta")]
    said = (f"Past the first 10% of training, with BN the loss varied over "
            f"{late['bn']['loss_range']:.3g} along the gradient (without BN "
            f"{late['plain']['loss_range']:.3g}), the gradient changed by "
            f"{late['bn']['grad_change']:.3g} ({late['plain']['grad_change']:.3g}) and "
            f"the effective beta-smoothness was {late['bn']['beta']:.3g} "
            f"({late['plain']['beta']:.3g}). ")
    return lockstep.judge(said, smoother, "with BN the landscape is smoother.",
                          "without BN the landscape is smoother on all three measures.",
                          "BN is smoother on some measures and not on others.")


def figures(results: Results) -> list[Any]:
    from batchnorm.app import report

    steps = np.asarray(results.steps)
    fig, axes = report.subplots(1, 3, figsize=(15, 4))
    for n in NETS:
        m, color = results.measures(n), lockstep.COLORS[n]
        axes[0].fill_between(steps, m["loss_min"], m["loss_max"], color=color, alpha=0.4,
                             label=LABELS[n])
        axes[1].plot(steps, m["grad_change"], color=color, label=LABELS[n])
        axes[2].plot(steps, m["beta"], color=color, label=LABELS[n])
    axes[0].set(title="(a) loss along the gradient: min to max", xlabel="training step",
                ylabel="loss", yscale="log")
    axes[1].set(title="(b) gradient predictiveness: max ||g' - g||", xlabel="training step",
                yscale="log")
    axes[2].set(title="(c) effective beta-smoothness", xlabel="training step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8, loc="best")
    report.tidy(*axes)
    fig.tight_layout()
    sizes = ", ".join(f"{s:g}" for s in results.config["step_sizes"])
    shows = (f"On {results.dataset}; every {results.config['probe_every']} steps, steps of "
             f"{sizes} times the learning rate along the gradient. " + verdict(results))
    return [report.Figure("landscape", fig, "Does BN make the loss landscape smoother?", shows,
                   CLAIM)]

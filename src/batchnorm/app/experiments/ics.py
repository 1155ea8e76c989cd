"""Does BN reduce internal covariate shift? Measured as Santurkar et al. (2018), section 2.2,
Fig. 3, define it.

For layer i at step t, G is the gradient of the loss with respect to layer i's weights, and G'
the same gradient after the layers below i have taken their step of SGD (layer i and those
above it unchanged), on the same batch. If a layer's learning problem did not change when the
layers below it moved, G' would equal G: ||G - G'|| (absolute and relative to ||G||) and the
cosine of the angle between them measure how much it changes. Four nets see the same batches:
the Figure 1 network (three hidden layers of 100 sigmoids) without and with BN, and a deeper
one (``deep_hidden``; ReLU, since sigmoids that deep do not train at all without BN) without
and with BN. A "layer" is a Linear with its BN; layer 1 has nothing below it and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common, lockstep
from batchnorm.nn.layers import Sequential, mlp

NAME = "ics"
NETS = ("plain", "bn", "deep-plain", "deep-bn")
SHIFTS = ("l2", "relative", "cosine")  # the fields of shift()'s measures
LABELS = {"plain": "3 hidden layers, without BN", "bn": "3 hidden layers, with BN",
          "deep-plain": "deeper ReLU net, without BN", "deep-bn": "deeper ReLU net, with BN"}
CLAIM = (
    "The seed's explanation, after Ioffe & Szegedy (2015): without BN each layer must keep "
    "adapting to inputs that shift whenever the layers below it learn (internal covariate "
    "shift), and BN reduces that shift. Santurkar et al. (2018, section 2.2, Fig. 3) measure the "
    "shift by what matters for optimization: how much a layer's gradient changes when the "
    "layers below it take their step. They find that networks with BN show as much of this "
    "shift as networks without it, often more (cosines near zero), while still training better."
)


@dataclass
class Config(lockstep.TrainConfig):
    steps: int = 5_000
    deep_hidden: tuple[int, ...] = (100,) * 8
    # sigmoids this deep do not train without BN at all (their gradients vanish), so the
    # deeper pair uses ReLU, He's initialisation and its own learning rate
    deep_activation: str = "relu"
    deep_lr: float = 0.1
    measure_every: int = 250
    checkpoint_every: int = 1_000


@dataclass
class Results(common.StepResults):
    """``steps``: where accuracy and the shift were taken. Per net, per measure, one value
    per layer 2..L of ||G - G'||, ||G - G'|| / ||G|| and cos(G, G')."""

    l2: dict[str, list[list[float]]] = field(default_factory=dict)
    relative: dict[str, list[list[float]]] = field(default_factory=dict)
    cosine: dict[str, list[list[float]]] = field(default_factory=dict)

    def mean_over_training(self, key: str, net: str) -> list[float]:
        """Per layer, the mean of ``key`` ("l2", "relative", "cosine") over the measures."""
        values = np.asarray(getattr(self, key)[net], dtype=np.float64)
        return np.nanmean(values, axis=0).round(4).tolist() if len(values) else []


def build_nets(config: Config, num_features: int, num_classes: int) -> dict[str, Sequential]:
    nets = {}
    for n in NETS:
        rng = np.random.default_rng([config.seed, 0, int(n.startswith("deep"))])
        if n.startswith("deep"):
            nets[n] = mlp([num_features, *config.deep_hidden, num_classes],
                          config.deep_activation, batch_norm=n.endswith("bn"), init="he",
                          rng=rng)
        else:
            nets[n] = mlp([num_features, *config.hidden, num_classes], "sigmoid",
                          batch_norm=n.endswith("bn"), init="normal", std=config.init_std,
                          rng=rng)
    return nets


def shift(net: Sequential, x: np.ndarray, y: np.ndarray, lr: float
          ) -> tuple[list[float], list[float], list[float]]:
    """(||G - G'||, ||G - G'|| / ||G||, cos(G, G')) for each Linear after the first."""
    _, grads = lockstep.gradients(net, x, y)
    l2, rel, cos = [], [], []
    for index in lockstep.linear_layers(net)[1:]:
        k = lockstep.params_before(net, index)  # the Linear's weight is parameter k
        _, moved = lockstep.gradients(lockstep.stepped(net, grads, lr, first=k), x, y,
                                      copy=False)
        g, g2 = grads[k].astype(np.float64).ravel(), moved[k].astype(np.float64).ravel()
        norm, norm2, diff = np.linalg.norm(g), np.linalg.norm(g2), np.linalg.norm(g - g2)
        l2.append(float(diff))
        rel.append(float(diff / norm) if norm > 0 else float("nan"))
        cos.append(float(g @ g2 / (norm * norm2)) if norm * norm2 > 0 else float("nan"))
    return l2, rel, cos


def _check(config: Config) -> None:
    common.check_schedule(config.steps, config.measure_every, "measure_every")


def _run(config: Config, data: data_mod.Dataset, progress: common.Progress,
         checkpoint: common.Checkpoint | None) -> Results:
    nets = build_nets(config, data.num_features, data.num_classes)
    trainer = lockstep.Lockstep(NAME, config, data, nets,
                                lrs={"deep-plain": config.deep_lr, "deep-bn": config.deep_lr})
    results = trainer.start(Results, checkpoint, "accuracy", *SHIFTS)

    def probe(n: str, net: Sequential, xb: np.ndarray, yb: np.ndarray) -> dict[str, Any]:
        return dict(zip(SHIFTS, shift(net, xb, yb, trainer.lrs[n]), strict=True))

    def dead(n: str) -> dict[str, Any]:
        return dict.fromkeys(SHIFTS, [float("nan")] * (len(lockstep.linear_layers(nets[n])) - 1))

    trainer.run_probed(results, config.measure_every, probe, dead, progress=progress,
                       checkpoint=checkpoint)
    return results


run = common.Experiment(Config, _run, check=_check)


def summary(results: Results) -> list[tuple[str, str]]:
    rows = []
    last = results.config["steps"]
    for n in NETS:
        cos = results.mean_over_training("cosine", n)
        rel = results.mean_over_training("relative", n)
        rows.append((f"{LABELS[n]}: mean cosine(G, G') for layers 2..{len(cos) + 1}",
                     " ".join(f"{c:.2f}" for c in cos)))
        rows.append((f"{LABELS[n]}: mean ||G - G'|| / ||G||, layers 2..{len(rel) + 1}",
                     " ".join(f"{r:.3f}" for r in rel)))
        rows.append((f"{LABELS[n]}: test accuracy at the last measure",
                     f"{results.final(n):.4f} (step {results.last_step:,})"))
    rows.append(results.time_row("time", f"for {last:,} steps (four nets)"))
    return rows


def _mean_cosine(results: Results, net: str) -> float:
    return float(np.nanmean(results.mean_over_training("cosine", net)))


def verdict(results: Results) -> str:
    parts, reduced = [], []
    for plain, bn in (("plain", "bn"), ("deep-plain", "deep-bn")):
        cp, cb = _mean_cosine(results, plain), _mean_cosine(results, bn)
        # a difference under 0.05 in mean cosine is called "about the same"
        effect = ("less shift with BN" if cb > cp + 0.05 else
                  "more shift with BN" if cb < cp - 0.05 else "about the same shift")
        parts.append(f"{LABELS[plain].split(',')[0]}: mean cosine {cp:.2f} without BN and "
                     f"{cb:.2f} with BN ({effect})")
        reduced.append(cb > cp + 0.05)
    said = "; ".join(parts) + ". A cosine of 1 would mean no shift at all. "
    return lockstep.judge(
        said, [not r for r in reduced],
        "BN does not reduce internal covariate shift measured this way, yet the BN networks "
        "train better.",
        "here BN does reduce the shift, in line with the seed's explanation.",
        "BN reduces the shift in one network and not the other.")


def figures(results: Results) -> list[Any]:
    from batchnorm.app import report

    steps = np.asarray(results.steps)
    fig, axes = report.subplots(2, 3, figsize=(15, 7.5))
    for row, (plain, bn) in enumerate((("plain", "bn"), ("deep-plain", "deep-bn"))):
        for n, style in ((plain, "-"), (bn, "-")):
            axes[row][0].plot(steps, results.accuracy[n], style, color=lockstep.COLORS[n],
                              label=LABELS[n])
            for col, key in ((1, "relative"), (2, "cosine")):
                values = np.asarray(getattr(results, key)[n], dtype=np.float64)
                layers = values.shape[1] if values.ndim == 2 else 0
                for j in range(layers):
                    shade = 0.35 + 0.65 * (j + 1) / layers
                    axes[row][col].plot(steps, values[:, j], color=lockstep.COLORS[n],
                                        alpha=shade, lw=1,
                                        label=f"{'BN' if n == bn else 'no BN'}, layer {j + 2}"
                                        if j in (0, layers - 1) else None)
        axes[row][0].set(title=f"({'ad'[row]}) test accuracy", xlabel="training step")
        axes[row][1].set(title=f"({'be'[row]}) ||G - G'|| / ||G||", xlabel="training step",
                         yscale="log")
        axes[row][2].set(title=f"({'cf'[row]}) cosine(G, G')", xlabel="training step",
                         ylim=(-1.05, 1.05))
        axes[row][0].legend(fontsize=7, loc="lower right")
        # the per-layer legend goes right of the row, where it covers no data
        axes[row][2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        report.tidy(*axes[row])
    fig.tight_layout()
    shows = (f"On {results.dataset}, measured every {results.config['measure_every']} steps. "
             "Top row: the Figure 1 network; bottom row: the deeper one. Lines from light to "
             "dark go from layer 2 to the last layer. " + verdict(results))
    return [report.Figure("ics", fig, "Does BN reduce internal covariate shift?", shows, CLAIM)]

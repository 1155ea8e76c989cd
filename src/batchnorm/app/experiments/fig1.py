"""Figure 1 of Ioffe & Szegedy (2015): the same MNIST network trained with and without BN.

The network is 784-100-100-100-10 with sigmoids, weights drawn from N(0, 0.01^2), trained by
SGD on batches of 60 (50,000 steps as in the paper; the demo runs 15,000). The BN variant
puts BatchNorm1d before each sigmoid (its hidden Linears have no bias: BN's shift replaces
it). Both nets start from the same
weights and see the same batches. Along training we record each net's test accuracy
(inference: BN uses its running statistics) and the 15th, 50th and 85th percentiles, over
the test digits, of the input to the sigmoids of the last hidden layer.

The paper's claim (Fig. 1): the BN net reaches higher test accuracy sooner, and the
distribution of a sigmoid's input is stable with BN while without it the distribution's
mean and spread drift over training ("internal covariate shift").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common, lockstep
from batchnorm.nn.layers import Sequential, mlp
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.optim import SGD

NAME = "fig1"
QUESTION = ("Does BN make a network train faster, and keep the distribution of a layer's "
            "input steady?")
CLAIM = ("Ioffe & Szegedy (2015), Figure 1: on MNIST the network with BN reaches higher test "
         "accuracy sooner, and the input to a sigmoid keeps a steady distribution, while "
         "without BN its mean and spread drift over training ('internal covariate shift').")
NETS = ("plain", "bn")
PERCENTILES = (15.0, 50.0, 85.0)


@dataclass
class Config(lockstep.TrainConfig):
    """Settings; the CLI's --steps --seed --lr --init-std --mnist-dir set the same names."""

    steps: int = 50_000
    momentum: float = 0.0
    eval_every: int = 500
    unit: int = 0  # the sigmoid of the last hidden layer whose input Fig. 1(b, c) follows
    checkpoint_every: int = 5_000  # steps; 0 turns periodic checkpoints off


@dataclass
class Results(common.StepResults):
    """Histories at the evaluated steps, per net ("plain", "bn")."""

    train_loss: dict[str, list[float]] = field(default_factory=dict)  # mean since last eval
    # [eval][percentile][unit]: percentiles of every last-layer sigmoid input over test digits
    percentiles: dict[str, list[list[list[float]]]] = field(default_factory=dict)

    def unit_percentiles(self, net: str, unit: int | None = None) -> np.ndarray:
        """(evals, 3) array of the 15/50/85th percentiles of one unit's input."""
        u = self.config["unit"] if unit is None else unit
        return np.asarray(self.percentiles[net])[:, :, u]

    def accuracy_at(self, net: str, step: int) -> float | None:
        """Test accuracy at the last evaluation at or before ``step``."""
        best = None
        for s, a in zip(self.steps, self.accuracy[net], strict=True):
            if s <= step:
                best = a
        return best

    def drift(self, net: str) -> dict[str, Any]:
        """How far the sigmoid input's percentiles moved. For the followed unit: each
        percentile at the first evaluation, at the first one past 10% of training (after the
        initial transient), at the last, and its range over training. Over all units of the
        layer: the mean range of the median and of the 15-85 spread, and the mean absolute
        change of the median from 10% of training to the end ("late drift")."""
        p = np.asarray(self.percentiles[net])  # (evals, 3, units)
        unit = p[:, :, self.config["unit"]]
        spread = p[:, 2, :] - p[:, 0, :]
        steps = np.asarray(self.steps)
        k = int(np.searchsorted(steps, 0.1 * steps[-1])) if len(steps) else 0
        k = min(max(k, 1), len(steps) - 1) if len(steps) > 1 else 0
        return {
            "unit": self.config["unit"],
            "start": unit[0].round(4).tolist(),
            "at_10pct_step": int(steps[k]) if len(steps) else 0,
            "at_10pct": unit[k].round(4).tolist(),
            "end": unit[-1].round(4).tolist(),
            "range": (unit.max(axis=0) - unit.min(axis=0)).round(4).tolist(),
            "all_units_late_median_drift": round(float(np.abs(p[-1, 1] - p[k, 1]).mean()), 4),
            "all_units_median_range": round(float((p[:, 1].max(0) - p[:, 1].min(0)).mean()), 4),
            "all_units_spread_range": round(float((spread.max(0) - spread.min(0)).mean()), 4),
        }


def build_nets(config: Config, num_features: int, num_classes: int) -> dict[str, Sequential]:
    """The two nets, from the same initial weights."""
    sizes = [num_features, *config.hidden, num_classes]
    return {
        net: mlp(sizes, "sigmoid", batch_norm=(net == "bn"), init="normal",
                 std=config.init_std, rng=np.random.default_rng([config.seed, 0]))
        for net in NETS
    }


def _last_activation(net: Sequential) -> int:
    return len(net.layers) - 2  # layers end with [..., activation, Linear]


def _check(config: Config) -> None:
    common.check_schedule(config.steps, config.eval_every, "eval_every")
    common.check_unit(config.unit, config.hidden)


def _run(config: Config, data: data_mod.Dataset, progress: common.Progress,
         checkpoint: common.Checkpoint | None) -> Results:
    """Train both nets; return their histories. ``checkpoint.state`` (when set) resumes."""
    nets = build_nets(config, data.num_features, data.num_classes)
    opts = {n: SGD(nets[n].parameters(), lr=config.lr, momentum=config.momentum) for n in NETS}
    losses = {n: CrossEntropyLoss() for n in NETS}
    sampler = common.BatchSampler(data.x_train, data.y_train, config.batch_size,
                                  np.random.default_rng([config.seed, 1]))
    results = common.new_results(Results, config, data, NETS, "accuracy", "train_loss",
                                 "percentiles")
    loss_sum = {n: 0.0 for n in NETS}
    alive = {n: True for n in NETS}
    step = 0
    if checkpoint is not None and checkpoint.state is not None:
        arrays, meta = checkpoint.state
        try:
            for n in NETS:
                nets[n].load_state_dict(common.unprefixed(n, arrays))
                opts[n].load_state_dict(common.unprefixed(f"opt_{n}", arrays))
            sampler.load(meta["sampler"], arrays["sampler_perm"])
            results = Results.from_dict(meta["results"])
            loss_sum, alive, step = meta["loss_sum"], meta["alive"], int(meta["step"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint {checkpoint.path} does not fit this run "
                             f"({type(exc).__name__}: {exc})") from None

    def evaluate() -> None:
        results.steps.append(step)
        since = step - (results.steps[-2] if len(results.steps) > 1 else 0)
        for n in NETS:
            net = nets[n]
            if alive[n]:
                results.accuracy[n].append(common.accuracy(net, data.x_test, data.y_test))
                h = common.forward_capture(net, data.x_test, _last_activation(net))
                pct = np.percentile(h, PERCENTILES, axis=0)
                results.percentiles[n].append(pct.round(5).tolist())
            else:
                results.accuracy[n].append(float("nan"))
                results.percentiles[n].append(np.full((3, config.hidden[-1]), np.nan).tolist())
            results.train_loss[n].append(loss_sum[n] / since if since else float("nan"))
            loss_sum[n] = 0.0

    def save() -> None:
        if checkpoint is None:
            return
        arrays: dict[str, np.ndarray] = {}
        for n in NETS:
            arrays.update(common.prefixed(n, nets[n].state_dict()))
            arrays.update(common.prefixed(f"opt_{n}", opts[n].state_dict()))
        sampler_meta, arrays["sampler_perm"] = sampler.state()
        meta = {"experiment": NAME, "config": dataclasses.asdict(config), "step": step,
                "results": results.to_dict(), "sampler": sampler_meta,
                "loss_sum": loss_sum, "alive": alive}
        checkpoint.save(arrays, meta)

    started = time.perf_counter() - results.seconds
    # True while the state is between step boundaries: a checkpoint then would record the
    # middle of a step, so an interrupt there saves nothing (the last checkpoint stays)
    in_step = True
    with common.training(config.threads):
        try:
            if step == 0 and not results.steps:
                evaluate()
            in_step = False
            while step < config.steps:
                common.check_interrupt()  # Ctrl-C pressed during the last step
                in_step = True
                xb, yb = sampler.next()
                for n in NETS:
                    if not alive[n]:
                        continue
                    loss = common.train_step(nets[n], losses[n], opts[n], xb, yb)
                    if not np.isfinite(loss):
                        alive[n] = False  # diverged: stop training it, record NaN from now on
                        continue
                    loss_sum[n] += loss
                step += 1
                evaluated = step % config.eval_every == 0 or step == config.steps
                if evaluated:
                    evaluate()
                in_step = False
                if evaluated or step % 100 == 0:
                    progress(step, config.steps, f"fig1  acc {_accs(results)}")
                if checkpoint is not None and checkpoint.due(step):
                    results.seconds = time.perf_counter() - started
                    save()
        except KeyboardInterrupt:
            if not in_step:
                results.seconds = time.perf_counter() - started
                save()
            raise
    results.seconds = time.perf_counter() - started
    results.completed = True
    save()
    return results


run = common.Experiment(Config, _run, check=_check)


def verdict(results: Results) -> str:
    """Whether this run agrees with the claim, in words."""
    if not results.steps:
        return "Nothing ran."
    early = results.steps[max(1, len(results.steps) // 10)] if len(results.steps) > 1 else 0
    acc = {n: _or_nan(results.accuracy_at(n, early)) for n in NETS}
    end = {n: results.accuracy[n][-1] for n in NETS}
    drift = {n: results.drift(n)["all_units_late_median_drift"] for n in NETS}
    faster = acc["bn"] > acc["plain"]
    steadier = drift["bn"] < drift["plain"]
    return (f"On speed, {'yes' if faster else 'no'}: at step {early:,} the net with BN "
            f"reaches {acc['bn']:.3f} test accuracy against {acc['plain']:.3f} without; at the "
            f"end {end['bn']:.3f} against {end['plain']:.3f}. On steadiness, "
            f"{'yes' if steadier else 'no'}: after the first tenth of training the median "
            f"sigmoid input moved by {drift['bn']:.2f} with BN and {drift['plain']:.2f} "
            "without (mean over the layer's units).")


def _accs(results: Results) -> str:
    return " / ".join(f"{n} {results.accuracy[n][-1]:.3f}" for n in NETS)


def summary(results: Results) -> list[tuple[str, str]]:
    """(label, value) rows for the printed table."""
    rows = []
    last = results.last_step
    marks = sorted({s for s in (5_000, 50_000) if s < last} | {last})
    for s in marks:
        plain, bn = (_or_nan(results.accuracy_at(n, s)) for n in NETS)
        rows.append((f"fig1 test accuracy at step {s:,}",
                     f"without BN {plain:.4f}  |  with BN {bn:.4f}"))
    for n, label in (("plain", "without BN"), ("bn", "with BN")):
        d = results.drift(n)
        rows.append((f"fig1 sigmoid input p15/p50/p85 {label} (unit {d['unit']})",
                     f"start {_trip(d['start'])}, step {d['at_10pct_step']:,} "
                     f"{_trip(d['at_10pct'])}, end {_trip(d['end'])}"))
    dp, db = results.drift("plain"), results.drift("bn")
    rows.append(("fig1 median's range over training, mean of 100 units",
                 f"without BN {dp['all_units_median_range']:.3f}  |  "
                 f"with BN {db['all_units_median_range']:.3f}"))
    rows.append((f"fig1 median's drift from step {dp['at_10pct_step']:,} to the end, "
                 "mean of 100 units",
                 f"without BN {dp['all_units_late_median_drift']:.3f}  |  "
                 f"with BN {db['all_units_late_median_drift']:.3f}"))
    rows.append(results.time_row("fig1 time", f"for {last:,} steps (both nets)"))
    return rows


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _trip(v: list[float]) -> str:
    return "/".join(f"{x:+.2f}" for x in v)


def figures(results: Results) -> list[Any]:
    """The report's figures (report.Figure), drawn with matplotlib."""
    from batchnorm.app import report

    steps = np.asarray(results.steps)
    unit = results.config["unit"]
    fig, axes = report.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for n in ("plain", "bn"):
        ax.plot(steps, results.accuracy[n], color=report.COLORS[n], label=report.LABELS[n])
    ax.set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy")
    report.legend_below(ax)
    report.tidy(ax)
    lims = []
    for ax, n, tag in ((axes[1], "plain", "(b)"), (axes[2], "bn", "(c)")):
        p = results.unit_percentiles(n)
        for k, style in zip(range(3), (":", "-", "--"), strict=True):
            ax.plot(steps, p[:, k], style, color=report.COLORS[n],
                    label=f"{int((15, 50, 85)[k])}th percentile")
        ax.set(title=f"{tag} sigmoid input, {report.LABELS[n]} (unit {unit})",
               xlabel="training step")
        lims.append(ax.get_ylim())
        report.legend_below(ax, ncol=3, fontsize=7)
        report.tidy(ax)
    lo, hi = min(x[0] for x in lims), max(x[1] for x in lims)
    for ax in axes[1:]:
        ax.set_ylim(lo, hi)  # same scale, so the drift is comparable at a glance
    fig.tight_layout()
    last = int(steps[-1]) if len(steps) else 0
    acc = {n: results.accuracy[n][-1] if results.accuracy[n] else float("nan")
           for n in ("plain", "bn")}
    d = {n: results.drift(n) for n in ("plain", "bn")}
    shows = (
        f"After {last:,} steps on {results.dataset}: test accuracy {acc['plain']:.4f} without BN "
        f"and {acc['bn']:.4f} with BN. Over training the median of unit {unit}'s sigmoid input "
        f"moved over a range of {d['plain']['range'][1]:.2f} without BN and "
        f"{d['bn']['range'][1]:.2f} with BN (mean over all 100 units: "
        f"{d['plain']['all_units_median_range']:.2f} vs {d['bn']['all_units_median_range']:.2f}). "
        f"From step {d['plain']['at_10pct_step']:,} to the end, past the first transient, the "
        f"median moved by {d['plain']['all_units_late_median_drift']:.2f} without BN and "
        f"{d['bn']['all_units_late_median_drift']:.2f} with BN (mean over units). Percentiles "
        "are over the test digits at inference."
    )
    claim = (
        "Ioffe & Szegedy (2015), Fig. 1: (a) the network with BN trains faster and reaches "
        "higher test accuracy; (b, c) without BN the distribution of a sigmoid's input changes "
        "significantly over training, in mean and variance; with BN it is much more stable."
    )
    return [report.Figure("fig1", fig, "MNIST, with and without BN (the paper's Figure 1)", shows,
                          claim)]

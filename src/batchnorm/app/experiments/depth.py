"""The seed notebook's claim: deeper plain networks train worse, and BN fixes it.

MLPs of ``depth`` Linear layers (``depth - 1`` hidden layers of ``width`` units, then the
10-way output) with sigmoid, tanh or ReLU, each with and without BatchNorm1d before the
activations. For every net we record, at initialization, the gradient norm of each
Linear's weight on one batch (vanishing or exploding gradients show as a falling or rising
curve over layers), then train it for a fixed budget and record its test accuracy.

Weights start from the init suited to the activation (Xavier for sigmoid and tanh, He for
ReLU) unless ``init_std`` asks for N(0, std^2) everywhere. Both variants of a case start from
the same weights and see the same batches. A net "trains" when its test accuracy after the
budget reaches ``train_threshold``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common
from batchnorm.nn.layers import Sequential, linears, mlp
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.optim import SGD

NAME = "depth"
QUESTION = "Do deeper networks train worse without BN, and does BN let them train?"
CLAIM = ("The seed notebook: the deeper a plain network, the worse it trains, because the "
         "distribution of each layer's input drifts as the layers below it learn; BN keeps "
         "those distributions fixed and lets deep networks train.")
AUTO_INIT = {"sigmoid": "xavier", "tanh": "xavier", "relu": "he"}


@dataclass
class Config(common.TrainSettings):
    depths: tuple[int, ...] = (2, 5, 10, 20, 30, 50)
    activations: tuple[str, ...] = ("sigmoid", "tanh", "relu")
    width: int = 100
    steps: int = 1_000  # training steps per net
    batch_size: int = 60
    lr: float = 0.02
    momentum: float = 0.9
    init_std: float | None = None  # None: Xavier (sigmoid, tanh) or He (ReLU)
    grad_batch: int = 500  # examples behind the gradient norms at initialization
    train_threshold: float = 0.5  # test accuracy that counts as "trains"


class Results(common.SweepResults):
    """One dict per net: activation, depth, bn, grad_norms (per Linear, input side first),
    accuracy, final_loss (mean over the last 10% of steps), diverged, seconds."""

    KEY = ("activation", "depth", "bn")

    def first_failure(self, activation: str, bn: bool) -> int | None:
        """The smallest depth whose net did not reach the threshold (None: all trained)."""
        threshold = self.config["train_threshold"]
        for depth in sorted(self.config["depths"]):
            case = self.find(activation, depth, bn)
            if case is not None and not case["accuracy"] >= threshold:
                return depth
        return None


def case_list(config: Config) -> list[tuple[str, int, bool]]:
    return [(a, d, bn) for a in config.activations for d in config.depths for bn in (False, True)]


def build_net(config: Config, activation: str, depth: int, bn: bool, n_in: int, n_out: int
              ) -> Sequential:
    if depth < 2:
        raise ValueError(f"depth counts Linear layers and must be >= 2, got {depth}")
    sizes = [n_in] + [config.width] * (depth - 1) + [n_out]
    init = "normal" if config.init_std is not None else AUTO_INIT[activation]
    seed = [config.seed, depth, config.activations.index(activation)]
    return mlp(sizes, activation, batch_norm=bn, init=init, std=config.init_std,
               rng=np.random.default_rng(seed))


def gradient_norms(net: Sequential, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Frobenius norm of dL/dW for each Linear, input side first, on one batch."""
    loss_fn = CrossEntropyLoss()
    net.zero_grad()
    loss_fn.forward(net.forward(x), y)
    net.backward_params(loss_fn.backward())
    norms = [float(np.linalg.norm(layer.weight.grad)) for layer in linears(net)]  # type: ignore[arg-type]
    net.zero_grad()
    return norms


def train_case(config: Config, data: data_mod.Dataset, activation: str, depth: int, bn: bool
               ) -> dict[str, Any]:
    started = time.perf_counter()
    n_in, n_out = data.num_features, data.num_classes
    probe = build_net(config, activation, depth, bn, n_in, n_out)
    k = min(config.grad_batch, len(data.y_train))
    norms = gradient_norms(probe, data.x_train[:k], data.y_train[:k])
    net = build_net(config, activation, depth, bn, n_in, n_out)
    opt = SGD(net.parameters(), lr=config.lr, momentum=config.momentum)
    sampler = common.BatchSampler(data.x_train, data.y_train, config.batch_size,
                                  np.random.default_rng([config.seed, depth, 1]))
    losses, diverged = common.train_net(net, opt, sampler.next, config.steps)
    tail_losses = losses[config.steps - max(1, config.steps // 10) :]  # the last 10% of steps
    acc = 0.0 if diverged else common.accuracy(net, data.x_test, data.y_test)
    if not np.isfinite(acc):
        acc = 0.0
    return {
        "activation": activation, "depth": depth, "bn": bn, "grad_norms": norms,
        "accuracy": acc,
        "final_loss": float(np.mean(tail_losses)) if tail_losses else float("nan"),
        "diverged": diverged, "seconds": time.perf_counter() - started,
    }


def _check(config: Config) -> None:
    for a in config.activations:
        if a not in AUTO_INIT:
            raise ValueError(f"unknown activation {a!r}; expected one of {list(AUTO_INIT)}")


run = common.sweep_experiment(
    NAME, Config, Results, case_list, train_case,
    lambda a, d, bn: f"depth {a} {d} {'BN' if bn else 'plain'}",
    weights=lambda cases: [d for _, d, _ in cases],  # layers: a fair proxy for time
    check=_check)


def summary(results: Results) -> list[tuple[str, str]]:
    rows = []
    depths = sorted(results.config["depths"])
    thr = results.config["train_threshold"]
    for a in results.config["activations"]:
        for bn in (False, True):
            accs = []
            for d in depths:
                case = results.find(a, d, bn)
                accs.append("-" if case is None else "div" if case["diverged"]
                            else f"{case['accuracy']:.2f}")
            fail = results.first_failure(a, bn)
            verdict = f"trains at every depth (acc >= {thr})" if fail is None else (
                f"first fails at depth {fail}")
            if any(c["diverged"] for c in results.cases if (c["activation"], c["bn"]) == (a, bn)):
                verdict += " (div: loss diverged)"
            rows.append((f"depth {a} {'with BN' if bn else 'without BN'}: test accuracy at "
                         "depths " + ",".join(map(str, depths)),
                         " ".join(accs) + f"; {verdict}"))
    steps = results.config["steps"]
    rows.append(results.time_row("depth time",
                                 f"({len(results.cases)} nets, {steps:,} steps each)"))
    return rows


def figures(results: Results) -> list[Any]:
    """The report's figures (report.Figure), drawn with matplotlib."""
    from batchnorm.app import report

    plt = report.plt()
    cfg = results.config
    acts = list(cfg["activations"])
    depths = sorted(cfg["depths"])
    shown = sorted({depths[0], depths[len(depths) // 2], depths[-1]})
    fig, axes = plt.subplots(2, len(acts), figsize=(4.6 * len(acts), 7.5), squeeze=False)
    for j, a in enumerate(acts):
        for row, bn in enumerate((False, True)):
            ax = axes[row][j]
            for k, d in enumerate(shown):
                case = results.find(a, d, bn)
                if case is None:
                    continue
                g = np.maximum(np.asarray(case["grad_norms"]), 1e-30)
                ax.semilogy(np.arange(1, len(g) + 1), g, "o-", ms=2,
                            color=plt.cm.viridis(0.85 * k / max(1, len(shown) - 1)),
                            label=f"depth {d}")
            ax.set(title=f"{a}, {'with BN' if bn else 'without BN'}",
                   xlabel="layer (1 = input side)", ylabel="||dL/dW|| at init")
            report.legend_below(ax, ncol=3)
            report.tidy(ax)
    fig.tight_layout()
    shows_g = "; ".join(
        f"{a} depth {depths[-1]}: first/last-layer ratio "
        f"{_ratio(results.find(a, depths[-1], False))} without BN, "
        f"{_ratio(results.find(a, depths[-1], True))} with BN" for a in acts
    )
    exploding = [a for a in acts if _ratio_value(results.find(a, depths[-1], True)) > 10]
    if exploding:
        shows_g += (f". With BN the gradients of deep {' and '.join(exploding)} nets grow "
                    "toward the input: BN does not prevent exploding gradients at initialization "
                    "(as Yang et al. 2019, 'A Mean Field Theory of Batch Normalization', predict)")
    if any(results.find(a, depths[-1], True) is not None for a in acts):
        shows_g += (". The last point of each with-BN curve stands apart because the last "
                    "Linear feeds the loss with no BN after it: its gradient skips BN's "
                    "backward, which takes out of every other layer's gradient the parts along "
                    "the batch mean and along the normalized input")
    grad_fig = report.Figure(
        "depth_gradients", fig, "Gradient norm by layer at initialization",
        "Norm of each Linear's weight gradient on one batch of training digits, before any "
        f"training. {shows_g}.",
        "The seed notebook: through many layers, gradients vanish or explode (values are "
        "multiplied by W at every layer); BN keeps each layer's input distribution fixed. "
        "Ioffe & Szegedy (2015), sec. 3.3: BN makes back-propagation through a layer "
        "unaffected by the scale of its parameters.",
    )

    fig2, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"sigmoid": "o", "tanh": "s", "relu": "^"}
    for a in acts:
        for bn in (False, True):
            cases = [results.find(a, d, bn) for d in depths]
            xs = [d for d, c in zip(depths, cases, strict=True) if c is not None]
            cs = [c for c in cases if c is not None]
            color = report.COLORS["bn" if bn else "plain"]
            ls = "-" if bn else "--"
            lab = f"{a}, {'BN' if bn else 'no BN'}"
            ax1.plot(xs, [c["accuracy"] for c in cs], ls, marker=styles.get(a, "o"),
                     color=color, label=lab)
            ax2.semilogy(xs, [max(_ratio_value(c), 1e-30) for c in cs], ls,
                         marker=styles.get(a, "o"), color=color, label=lab)
    ax1.axhline(cfg["train_threshold"], color="gray", lw=0.8, ls=":")
    ax1.set(title=f"test accuracy after {cfg['steps']:,} steps", xlabel="depth (Linear layers)",
            ylabel="accuracy")
    ax2.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax2.set(title="first-layer / last-layer gradient norm at init", xlabel="depth",
            ylabel="ratio")
    for ax in (ax1, ax2):
        report.legend_below(ax, ncol=3, fontsize=7)
        report.tidy(ax)
    fig2.tight_layout()
    fails = "; ".join(f"{a}: without BN {_fails(results, a, False)}, with BN "
                      f"{_fails(results, a, True)}" for a in acts)
    acc_fig = report.Figure(
        "depth_accuracy", fig2, "Accuracy and gradient ratio against depth",
        f"Test accuracy after a fixed budget of {cfg['steps']:,} steps (batch "
        f"{cfg['batch_size']}, lr {cfg['lr']}, momentum {cfg['momentum']}); a net 'trains' "
        f"when it reaches {cfg['train_threshold']} (dotted line). {fails}.",
        "The seed notebook: deeper plain networks train worse or not at all, because the "
        "distribution of each layer's input drifts; BN lets deep networks train.",
    )
    return [grad_fig, acc_fig]


def _fails(results: Results, activation: str, bn: bool) -> str:
    depth = results.first_failure(activation, bn)
    return "trains at every depth tried" if depth is None else f"stops training at depth {depth}"


def verdict(results: Results) -> str:
    """Whether this run agrees with the claim, in words, per activation."""
    parts = []
    for a in results.config["activations"]:
        plain, bn = results.first_failure(a, False), results.first_failure(a, True)
        deepest = max(results.config["depths"]) + 1
        helped = (bn or deepest) > (plain or deepest)
        parts.append(f"{a}: without BN the net {_fails(results, a, False)}, with BN it "
                     f"{_fails(results, a, True)}"
                     + (" (BN lets deeper nets train)" if helped else
                        " (no difference in depth here)" if (bn or deepest) == (plain or deepest)
                        else " (BN did worse here)"))
    return "; ".join(parts) + "."


def _ratio_value(case: dict[str, Any] | None) -> float:
    if case is None:
        return float("nan")
    g = case["grad_norms"]
    return float(g[0] / g[-1]) if g[-1] else float("inf")


def _ratio(case: dict[str, Any] | None) -> str:
    return f"{_ratio_value(case):.2g}"

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

from batchnorm import data as data_mod
from batchnorm.experiments import common
from batchnorm.nn.layers import Sequential, linears, mlp
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.optim import SGD

NAME = "depth"
AUTO_INIT = {"sigmoid": "xavier", "tanh": "xavier", "relu": "he"}


@dataclass
class Config:
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
    seed: int = 0
    mnist_dir: str | None = None
    data: str | None = None  # mnist, mnist5k or idx; None: idx with mnist_dir, else mnist5k
    checkpoint_every: int = 1  # finished nets between checkpoints
    threads: int = 1


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
    loss_fn = CrossEntropyLoss()
    sampler = common.BatchSampler(data.x_train, data.y_train, config.batch_size,
                                  np.random.default_rng([config.seed, depth, 1]))
    tail = max(1, config.steps // 10)
    tail_losses: list[float] = []
    diverged = False
    for step in range(config.steps):
        xb, yb = sampler.next()
        opt.zero_grad()
        loss = loss_fn.forward(net.forward(xb), yb)
        if not np.isfinite(loss):
            diverged = True
            break
        if step >= config.steps - tail:
            tail_losses.append(loss)
        net.backward_params(loss_fn.backward())
        opt.step()
    acc = 0.0 if diverged else common.accuracy(net, data.x_test, data.y_test)
    if not np.isfinite(acc):
        acc = 0.0
    return {
        "activation": activation, "depth": depth, "bn": bn, "grad_norms": norms,
        "accuracy": acc,
        "final_loss": float(np.mean(tail_losses)) if tail_losses else float("nan"),
        "diverged": diverged, "seconds": time.perf_counter() - started,
    }


def run(
    config: Config | None = None,
    *,
    data: data_mod.Dataset | None = None,
    progress: common.Progress = common.no_progress,
    checkpoint: common.Checkpoint | None = None,
) -> Results:
    """Every (activation, depth, BN or not) net in turn; checkpoints after finished nets."""
    config = config or Config()
    for a in config.activations:
        if a not in AUTO_INIT:
            raise ValueError(f"unknown activation {a!r}; expected one of {list(AUTO_INIT)}")
    if data is None:
        data = data_mod.load(config.mnist_dir, config.seed, config.data)
    cases = case_list(config)
    return common.sweep(NAME, Results, config, data, cases, train_case,
                        lambda a, d, bn: f"depth {a} {d} {'BN' if bn else 'plain'}",
                        weights=[d for _, d, _ in cases],  # layers: a fair proxy for time
                        progress=progress, checkpoint=checkpoint)


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
            rows.append((f"depth {a} {'with BN' if bn else 'without BN'}: acc at "
                         + ",".join(map(str, depths)), " ".join(accs) + f"; {verdict}"))
    steps = results.config["steps"]
    rows.append(("depth time", f"{results.seconds:.1f} s ({len(results.cases)} nets, "
                               f"{steps:,} steps each)"))
    return rows


def figures(results: Results) -> list[Any]:
    from batchnorm import report

    return report.depth_figures(results)

"""Why SyncBatchNorm: data-parallel training of the Fig. 1 network with tiny per-process batches.

W processes (real ones, on MPI or gloo; :mod:`batchnorm.distributed.launch`) each hold B
examples of every global batch of W*B and average their gradients after each step
(data parallel). Three arms see the same batches and start from the same weights:

* ``plain``: BatchNorm1d per process, normalizing with the statistics of B examples (with
  B = 4 these are noisy, and training and inference statistics disagree); evaluated with
  rank 0's running statistics (as DDP broadcasts rank 0's buffers);
* ``sync``: :class:`batchnorm.distributed.SyncBatchNorm`, statistics over all W*B;
* ``single``: one process with batch W*B and plain BN.

``sync`` and ``single`` compute the same function and the same gradients (the mean loss
over W*B examples), so their curves agree up to float32 rounding; ``plain`` is what users
get without synchronization. The results give test accuracy along training for each arm,
the largest parameter difference between ``sync`` and ``single``, and the time spent in
SyncBatchNorm's collectives.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common
from batchnorm.nn.layers import Sequential, mlp
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.optim import SGD

NAME = "sync"
QUESTION = ("Does SyncBatchNorm make tiny per-process batches train like one process with "
            "the whole batch?")
CLAIM = ("SyncBatchNorm computes BN's statistics over every process's examples, so "
         "data-parallel training with small per-process batches computes what one process "
         "with the whole batch computes; BN per process normalizes with the noisy statistics "
         "of a few examples and trains worse.")
ARMS = ("plain", "sync", "single")
LABELS = {"plain": "BN per process", "sync": "SyncBN", "single": "one process, whole batch"}
COLORS = {"plain": "#c0392b", "sync": "#1f5fa8", "single": "#2e7d32"}


@dataclass
class Config(common.Settings):
    """Settings; the CLI's --world-size --steps --seed --lr ... set the same names."""

    world_size: int = 4
    batch_per_process: int = 4
    steps: int = 2_000
    lr: float = 0.5
    momentum: float = 0.0
    init_std: float = 0.01
    hidden: tuple[int, ...] = (100, 100, 100)
    eval_every: int = 200
    engine: str = "mpi"  # "mpi" (mpiexec + mpi4py) or "gloo" (torch.distributed)
    backend: str = "numpy"  # BN backend in the workers (numba would JIT in every process)
    timeout: float = 1800.0  # seconds before the launch is killed


@dataclass
class Results(common.StepResults):
    """Histories at the evaluated steps, per arm ("plain", "sync", "single")."""

    train_loss: dict[str, list[float]] = field(default_factory=dict)  # mean since last eval
    max_param_diff_sync_vs_single: float = float("nan")
    collective: dict[str, float] = field(default_factory=dict)


def _net(config: Config, sizes: list[int]) -> Sequential:
    return mlp(sizes, "sigmoid", batch_norm=True, init="normal", std=config.init_std,
               rng=np.random.default_rng([config.seed, 0]), backend=config.backend)


def worker(ctx: Any, payload: dict[str, Any]) -> dict[str, Any] | None:
    """One process of the experiment (run by :func:`batchnorm.distributed.launch.launch`)."""
    from batchnorm.distributed import TimedComm, convert_sync_batchnorm
    from batchnorm.distributed.launch import report_progress

    config = Config(**{**payload, "hidden": tuple(payload["hidden"])})
    data = config.load()
    world, b, rank = ctx.size, config.batch_per_process, ctx.rank
    sizes = [data.num_features, *config.hidden, data.num_classes]
    timed = TimedComm(ctx.comm)
    nets = {"plain": _net(config, sizes), "sync": _net(config, sizes)}
    convert_sync_batchnorm(nets["sync"], timed)
    if rank == 0:
        nets["single"] = _net(config, sizes)
    opts: dict[str, Any] = {a: SGD(n.parameters(), lr=config.lr, momentum=config.momentum)
                            for a, n in nets.items()}
    for a in ("plain", "sync"):  # data parallel: gradients averaged over the processes
        opts[a] = common.AveragedGradients(opts[a], ctx.comm, world)
    losses = {a: CrossEntropyLoss() for a in nets}
    sampler = common.BatchSampler(data.x_train, data.y_train, world * b,
                                  np.random.default_rng([config.seed, 1]))
    results = common.new_results(Results, config, data, ARMS, "accuracy", "train_loss")
    loss_sum = dict.fromkeys(ARMS, 0.0)
    started = time.perf_counter()

    def evaluate(step: int) -> None:
        # every process's loss since the last point, averaged (the one collective here)
        local = np.array([loss_sum["plain"], loss_sum["sync"]])
        loss_sum["plain"], loss_sum["sync"] = ctx.comm.allreduce_sum(local) / world
        if rank != 0:
            loss_sum["plain"] = loss_sum["sync"] = 0.0
            return  # accuracy makes no collective call, so rank 0 may evaluate alone
        since = step - results.last_step
        results.steps.append(step)
        for a in ARMS:
            results.accuracy[a].append(common.accuracy(nets[a], data.x_test, data.y_test))
            results.train_loss[a].append(loss_sum[a] / since if since else float("nan"))
            loss_sum[a] = 0.0

    with common.blas_threads(1):
        evaluate(0)
        for step in range(1, config.steps + 1):
            xb, yb = sampler.next()
            xs, ys = xb[rank * b : (rank + 1) * b], yb[rank * b : (rank + 1) * b]
            for a in ("plain", "sync"):
                loss_sum[a] += common.train_step(nets[a], losses[a], opts[a], xs, ys)
            if rank == 0:
                loss_sum["single"] += common.train_step(nets["single"], losses["single"],
                                                        opts["single"], xb, yb)
            if step % config.eval_every == 0 or step == config.steps:
                evaluate(step)
                if rank == 0:
                    report_progress(ctx, step, config.steps, f"sync  acc {_accs(results)}")
    if rank != 0:
        return None
    diffs = [np.max(np.abs(p.data.astype(np.float64) - q.data))
             for p, q in zip(nets["sync"].parameters(), nets["single"].parameters(), strict=True)]
    results.max_param_diff_sync_vs_single = float(max(diffs))
    steps = max(config.steps, 1)
    results.collective = {
        "syncbn_calls_per_step": timed.calls / steps,
        "syncbn_ms_per_step": 1e3 * timed.seconds / steps,
        "grad_allreduce_ms_per_step": 1e3 * (opts["plain"].seconds + opts["sync"].seconds)
        / steps,
        "syncbn_float64_per_step": sum(op.elements for op in timed.stats.values()) / steps,
    }
    results.seconds = time.perf_counter() - started
    results.completed = True
    return results.to_dict()


def _check(config: Config) -> None:
    if config.world_size < 1 or config.batch_per_process < 1 or config.steps < 0:
        raise ValueError("world_size and batch_per_process must be >= 1 and steps >= 0")
    if config.batch_per_process == 1:
        raise ValueError("batch_per_process must be >= 2: plain BN needs 2 values per channel")


def _run(config: Config, data: data_mod.Dataset | None, progress: common.Progress,
         checkpoint: common.Checkpoint | None) -> Results:
    """Launch ``config.world_size`` processes, train the three arms, return rank 0's results.

    ``data`` must be None (each process loads the dataset itself from ``config``);
    ``checkpoint`` is accepted for the experiments' common signature and not used (the run
    is short). Raises :class:`batchnorm.distributed.launch.LaunchError` when a process
    fails or the run exceeds ``config.timeout``.
    """
    from batchnorm.distributed.launch import launch

    if data is not None:
        raise ValueError("the sync experiment loads data in each process: pass mnist_dir")
    progress(0, config.steps, f"sync  {config.world_size} processes ({config.engine})")
    payload = dataclasses.asdict(config)
    out = launch(config.world_size, "batchnorm.app.experiments.sync:worker", payload,
                 engine=config.engine, timeout=config.timeout,
                 env={"BATCHNORM_BACKEND": config.backend}, progress=progress)
    results = Results.from_dict(out[0])
    progress(config.steps, config.steps, f"sync  acc {_accs(results)}")
    return results


run = common.Experiment(Config, _run, check=_check, load=False)


def _accs(results: Results) -> str:
    return " / ".join(f"{a} {results.final(a):.3f}" for a in ARMS)


def summary(results: Results) -> list[tuple[str, str]]:
    """(label, value) rows for the printed table."""
    cfg = results.config
    w, b = cfg["world_size"], cfg["batch_per_process"]
    rows = [results.accuracy_row("sync test accuracy", LABELS, f" ({w} processes x batch {b})")]
    best = {a: max(results.accuracy[a]) for a in ARMS if results.accuracy.get(a)}
    rows.append(("sync best test accuracy", common.per_net(LABELS, best, ".4f")))
    rows.append(("sync largest parameter difference SyncBN vs one process",
                 f"{results.max_param_diff_sync_vs_single:.2e}"))
    c = results.collective
    if c:
        rows.append(("sync collectives per step",
                     f"SyncBN {c['syncbn_calls_per_step']:.0f} calls, "
                     f"{c['syncbn_ms_per_step']:.3f} ms; gradient all-reduce "
                     f"{c['grad_allreduce_ms_per_step']:.3f} ms (rank 0)"))
    rows.append(results.time_row("sync time", f"for {results.last_step:,} steps ({cfg['engine']})"))
    return rows


def verdict(results: Results) -> str:
    """Whether this run agrees with the claim, in words."""
    diff = results.max_param_diff_sync_vs_single
    same = diff < 1e-4
    plain, sync = results.final("plain"), results.final("sync")
    return (f"{'Yes' if same else 'No'}: SyncBN and one process with the whole batch end "
            f"within {diff:.1e} of each other in every parameter "
            f"({'float32 rounding' if same else 'more than rounding explains'}); BN per "
            f"process ends at test accuracy {plain:.3f} against {sync:.3f} with SyncBN, "
            f"{'worse, as claimed' if plain < sync else 'not worse here'}.")


def figures(results: Results) -> list[Any]:
    """Test accuracy and training loss along training, one line per arm (report.Figure)."""
    from batchnorm.app import report

    fig, (ax_acc, ax_loss) = report.subplots(1, 2, figsize=(11, 4))
    for a in ARMS:
        style = {"linestyle": "--" if a == "single" else "-", "color": COLORS[a]}
        ax_acc.plot(results.steps, results.accuracy[a], label=LABELS[a], **style)
        ax_loss.plot(results.steps[1:], results.train_loss[a][1:], label=LABELS[a], **style)
    w, b = results.config["world_size"], results.config["batch_per_process"]
    ax_acc.set(xlabel="training step", ylabel="test accuracy",
               title=f"(a) test accuracy, {w} processes x batch {b}")
    ax_loss.set(xlabel="training step", ylabel="training loss (mean since last point)",
                yscale="log", title="(b) training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(True, alpha=0.3)
        report.legend_below(ax, ncol=3)
    fig.tight_layout()
    last = results.steps[-1] if results.steps else 0
    shows = (
        f"After {last:,} steps on {results.dataset}, {w} real processes "
        f"({results.config['engine']}) with {b} examples each: test accuracy "
        f"{results.final('plain'):.4f} with BN per "
        f"process, {results.final('sync'):.4f} with SyncBN, {results.final('single'):.4f} for "
        f"one process with batch {w * b}. SyncBN and the single process differ by at most "
        f"{results.max_param_diff_sync_vs_single:.1e} in any parameter (float32 rounding), "
        "so their curves coincide: the dashed line of the one process lies on SyncBN's."
    )
    claim = (
        "SyncBatchNorm makes data-parallel training with small per-process batches compute "
        "what one process with the whole batch computes; BN per process normalizes with the "
        "noisy statistics of a few examples, and trains worse."
    )
    return [report.Figure("sync", fig, "SyncBN: data parallel with tiny per-process batches",
                          shows, claim)]

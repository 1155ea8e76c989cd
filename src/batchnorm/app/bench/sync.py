"""``batchnorm bench --level sync``: what SyncBatchNorm's collectives cost in a training step.

For P = 1, 2 and 4 real processes (MPI by default, or gloo), each process trains the
Fig. 1 network (784-100-100-100-10, BatchNorm1d before each sigmoid) on its own batch of
``--sync-batch`` examples (weak scaling) with SGD and data-parallel gradient averaging
(one all-reduce). Two variants alternate step by step (A B A B, after a warm-up): plain BN
(per-process statistics) and SyncBN. Reported per P: the median step time (the slowest
process of each step), and, for SyncBN, the time spent in its collectives (one all-gather
per forward and one all-reduce per backward per BN layer, one buffer each) and in the
gradient all-reduce. Collective time includes waiting for the slowest process.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

DEFAULT_WORLDS = (1, 2, 4)
SIZES = (784, 100, 100, 100, 10)


def worker(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """One process: alternate plain and SyncBN steps; per-step timings of this process."""
    from batchnorm.app.experiments.common import AveragedGradients, blas_threads, train_step
    from batchnorm.distributed import TimedComm, convert_sync_batchnorm
    from batchnorm.nn.layers import mlp
    from batchnorm.nn.losses import CrossEntropyLoss
    from batchnorm.nn.optim import SGD

    if payload["backend"] == "numba":
        import numba

        numba.set_num_threads(min(payload["threads"], numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    dtype = np.dtype(payload["dtype"])
    batch = int(payload["batch"])
    rng = np.random.default_rng([7, ctx.rank])
    x = rng.random((batch, SIZES[0])).astype(dtype)
    y = rng.integers(0, SIZES[-1], batch)
    timed = TimedComm(ctx.comm)
    nets = {v: mlp(SIZES, "sigmoid", batch_norm=True, init="normal", std=0.01, dtype=dtype,
                   rng=0, backend=payload["backend"]) for v in ("plain", "sync")}
    convert_sync_batchnorm(nets["sync"], timed)
    opts = {v: AveragedGradients(SGD(n.parameters(), lr=0.1), ctx.comm, ctx.size)
            for v, n in nets.items()}
    loss = CrossEntropyLoss()
    out: dict[str, list[float]] = {"plain": [], "sync": [], "syncbn_comm": [],
                                   "grad_comm": [], "calls": []}

    barrier = np.zeros(1)
    with blas_threads(payload["threads"]):
        for i in range(payload["warmup"] + payload["rounds"]):
            for v in ("plain", "sync"):
                ctx.comm.allreduce_sum(barrier)  # start together
                calls, seconds, grad_s = timed.calls, timed.seconds, opts[v].seconds
                t0 = time.perf_counter()
                train_step(nets[v], loss, opts[v], x, y)
                elapsed = time.perf_counter() - t0
                if i < payload["warmup"]:
                    continue
                out[v].append(elapsed)
                if v == "sync":
                    out["syncbn_comm"].append(timed.seconds - seconds)
                    out["grad_comm"].append(opts[v].seconds - grad_s)
                    out["calls"].append(timed.calls - calls)
    elements = {name: op.elements // max(op.calls, 1) for name, op in timed.stats.items()}
    # the same two collectives alone, back to back: their cost without the step's skew
    bare: dict[str, list[float]] = {"allgather": [], "allreduce_sum": []}
    for name in bare:
        buf = np.ones(elements[name])
        fn = getattr(ctx.comm, name)
        for i in range(payload["warmup"] + 10 * payload["rounds"]):
            t0 = time.perf_counter()
            fn(buf)
            if i >= payload["warmup"]:
                bare[name].append(time.perf_counter() - t0)
    return {**out, "elements_per_call": elements, "bare_allgather": bare["allgather"],
            "bare_allreduce": bare["allreduce_sum"]}


def _ms(per_rank: list[dict[str, Any]], key: str, over_ranks: Any) -> float:
    """Median over steps of (max or mean over processes) of one timing, in ms."""
    return float(np.median(over_ranks([r[key] for r in per_rank], axis=0))) * 1e3


def measure(worlds: tuple[int, ...] = DEFAULT_WORLDS, *, batch: int = 64,
            dtype: str = "float32", rounds: int = 30, warmup: int = 5, engine: str = "mpi",
            backend: str = "numpy", threads: int = 1, timeout: float = 600.0
            ) -> list[dict[str, Any]]:
    """Run the benchmark for each world size; one summary dict per size."""
    from batchnorm.distributed.launch import launch

    rows = []
    for p in worlds:
        payload = {"batch": batch, "dtype": dtype, "rounds": rounds, "warmup": warmup,
                   "backend": backend, "threads": threads}
        per_rank = launch(p, "batchnorm.app.bench.sync:worker", payload, engine=engine,
                          timeout=timeout, env={"BATCHNORM_BACKEND": backend})

        rows.append({
            "processes": p,
            "step_plain_ms": _ms(per_rank, "plain", np.max),
            "step_sync_ms": _ms(per_rank, "sync", np.max),
            "syncbn_collectives_ms": _ms(per_rank, "syncbn_comm", np.mean),
            "grad_allreduce_ms": _ms(per_rank, "grad_comm", np.mean),
            "syncbn_calls_per_step": float(np.median(per_rank[0]["calls"])),
            "bare_allgather_us": 1e3 * _ms(per_rank, "bare_allgather", np.mean),
            "bare_allreduce_us": 1e3 * _ms(per_rank, "bare_allreduce", np.mean),
            "elements_per_call": per_rank[0]["elements_per_call"],
        })
    return rows


def _table(rows: list[dict[str, Any]], title: str) -> str:
    head = (f"{'P':>2}  {'step, BN':>10}  {'step, SyncBN':>12}  {'SyncBN collectives':>18}  "
            f"{'share':>5}  {'calls':>5}  {'grad all-reduce':>15}  {'bare gather/reduce':>18}")
    lines = [title, head, "-" * len(head)]
    for r in rows:
        share = r["syncbn_collectives_ms"] / r["step_sync_ms"] if r["step_sync_ms"] else 0.0
        lines.append(
            f"{r['processes']:>2}  {r['step_plain_ms']:>7.3f} ms  {r['step_sync_ms']:>9.3f} ms  "
            f"{r['syncbn_collectives_ms']:>15.3f} ms  {share:>5.0%}  "
            f"{r['syncbn_calls_per_step']:>5.0f}  {r['grad_allreduce_ms']:>12.3f} ms  "
            f"{r['bare_allgather_us']:>7.1f}/{r['bare_allreduce_us']:.1f} us")
    if rows:
        e = rows[0]["elements_per_call"]
        lines.append(
            f"per BN layer and step: one all-gather of {e['allgather']} float64 per process "
            f"(count, mean, M2 of 100 channels) and one all-reduce of {e['allreduce_sum']} "
            "(sum dy, sum dy*(x-mean)); times are medians over steps, collectives averaged "
            "over processes and including the wait for the slowest one; 'bare' times one "
            "such collective alone, back to back")
    return "\n".join(lines)


def run(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    """``batchnorm bench --level sync``: the bench's shared options (threads per process,
    the first of --backends, --repeats steps, --dtype, --json) and the --sync-* ones."""
    import os

    worlds = tuple(args.sync_worlds or DEFAULT_WORLDS)
    engine = args.engine or os.environ.get("BATCHNORM_SYNC_ENGINE", "mpi")
    backend, threads = opts["backends"][0], opts["threads"]
    os.environ.update(opts["env"])  # the processes launched inherit the bench's settings
    rows = measure(worlds, batch=args.sync_batch, dtype=args.dtype, rounds=args.repeats,
                   engine=engine, backend=backend, threads=threads)
    title = (f"SyncBatchNorm training step: Fig. 1 MLP {'-'.join(map(str, SIZES))}, batch "
             f"{args.sync_batch} per process, {args.dtype}, {engine}, {backend} backend, "
             f"{threads} thread(s) per process, {os.cpu_count()} cores, OMP_WAIT_POLICY "
             f"{opts['omp_wait_policy']}, malloc: {opts['malloc']}")
    print(_table(rows, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=2)
    return 0

"""What SyncBatchNorm's agreement all-gather costs: per layer and step, 2 local processes.

Times, in each process, the three collectives of one training step of one SyncBatchNorm
layer (the 4-value agreement all-gather, the statistics all-gather of 1 + 2C values, the
gradient all-reduce of 2C values) alone, alternated, and a whole forward + backward of the
NumPy SyncBatchNorm on a (32, C, 8, 8) float32 slice; medians of rank 0.

    .venv/bin/python benchmarks/sync_agreement.py [--engine mpi|gloo] [--channels 64]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np

from batchnorm.app.bench.timing import alternated
from batchnorm.distributed import SyncBatchNorm
from batchnorm.distributed.launch import Context, launch


def measure(ctx: Context, payload: dict[str, Any]) -> dict[str, float]:
    c, rounds = payload["channels"], payload["rounds"]
    bufs = {
        "agreement all-gather": (ctx.comm.allgather, np.ones(4)),
        "statistics all-gather": (ctx.comm.allgather, np.ones(1 + 2 * c)),
        "gradient all-reduce": (ctx.comm.allreduce_sum, np.ones(2 * c)),
    }
    layer = SyncBatchNorm(c, process_group=ctx.comm)
    x = np.random.default_rng(ctx.rank).normal(size=(32, c, 8, 8)).astype(np.float32)
    dy = np.ones_like(x)

    def step() -> None:
        layer(x)
        layer.backward(dy)

    fns = {name: (lambda f=f, b=b: f(b)) for name, (f, b) in bufs.items()}
    fns["SyncBatchNorm fwd+bwd"] = step
    # shuffled the same way on every rank (seeded): whichever comes first in a round
    # absorbs the ranks' skew, and that is a different one from round to round
    times = alternated(fns, rounds, warmup=20)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("mpi", "gloo"), default="mpi")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    payload = {"channels": args.channels, "rounds": args.rounds}
    env = {"PYTHONPATH": __file__.rsplit("/", 1)[0], "BATCHNORM_BACKEND": "numpy"}
    rank0 = launch(2, "sync_agreement:measure", payload, engine=args.engine, env=env)[0]
    print(f"{args.engine}, 2 processes, C={args.channels}: median microseconds on rank 0")
    for name, us in rank0.items():
        print(f"  {name:<24} {us:>9.1f} us")


if __name__ == "__main__":
    main()

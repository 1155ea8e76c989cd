"""Where the rows kernels' reductions pay split by columns: ``config.COLUMNS_MAX_ROWS``.

2-D float32 inputs, the fused training passes (forward, then backward) at numba's thread
count, with the statistics and gradient sums split by rows (each thread a block of rows,
per-column partials merged afterwards) and by columns (each thread every row of a block of
columns), alternated in shuffled rounds, medians and minima in ms.

    .venv/bin/python benchmarks/rows_split.py [--rounds 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import numpy as np

from batchnorm.app.bench.timing import alternated
from batchnorm.kernels import numba as nb
from batchnorm.kernels.numba import config

SHAPES = [(16, 8192), (32, 4096), (64, 2048), (64, 4096), (128, 1024), (128, 2048),
          (256, 512), (256, 1024), (512, 2048), (1024, 512)]  # fmt: skip


def training_step(n: int, c: int) -> Callable[[], None]:
    """The fused forward, then backward, on a float32 (n, c) input (also columns_region.py)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, 1), dtype=np.float32)
    dy = rng.standard_normal((n, c, 1), dtype=np.float32)
    w, b = np.ones(c), np.zeros(c)

    def step() -> None:
        done = nb.fused_forward(x, w, b, 1e-5)
        assert done is not None
        nb.fused_backward(dy, x, done[1], done[3], w, n)

    return step


def split(max_rows: int, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        config.COLUMNS_MAX_ROWS = max_rows
        step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    default = config.COLUMNS_MAX_ROWS
    one_region = config.COLUMNS_MIN_RUN_BYTES
    config.COLUMNS_MIN_RUN_BYTES = 1 << 30  # the reductions' split alone, never one region
    rows = []
    try:
        for n, c in SHAPES:
            step = training_step(n, c)
            times = alternated({"rows": split(0, step), "columns": split(1 << 30, step)},
                               args.rounds, warmup=5)  # fmt: skip
            row = {"shape": [n, c], "default_by_columns": n <= default}
            for name, ts in times.items():
                row[f"{name}_median_ms"] = statistics.median(ts) * 1e3
                row[f"{name}_min_ms"] = min(ts) * 1e3
            row["rows_over_columns"] = row["rows_median_ms"] / row["columns_median_ms"]
            rows.append(row)
            print(f"{str((n, c)):>14s}  by rows {row['rows_median_ms']:.4f} ms  by columns "
                  f"{row['columns_median_ms']:.4f} ms  rows/columns "
                  f"{row['rows_over_columns']:.2f}  (default: "
                  f"{'columns' if row['default_by_columns'] else 'rows'})", flush=True)
    finally:
        config.COLUMNS_MAX_ROWS = default
        config.COLUMNS_MIN_RUN_BYTES = one_region
    if args.json:
        meta = {"threads": nb.config.num_threads(), "dtype": "float32",
                "columns_max_rows": default, "rounds": args.rounds}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

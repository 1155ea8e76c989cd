"""Which kernel family runs the eval forward faster on short NCHW segments: the rule that
sends maps up to ``config.EVAL_ROWS_MAX_INNER`` values to the rows kernels.

The eval pass is one compiled call (:data:`batchnorm.kernels.numba.fused.evaluate`): the
coefficients from the running statistics, then normalize. Float32 (N, C, H*W) arrays, the
segments pass (one segment at a time) against the rows pass (each row of C * H*W columns,
per-column coefficients), both at the unfused passes' chunks, alternated in shuffled
rounds, medians in µs.

    .venv/bin/python benchmarks/eval_layout.py [--rounds 300] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import numpy as np

from batchnorm.app.bench.timing import alternated
from batchnorm.kernels.numba import config, fused, plan

SHAPES = [(64, 128, 16), (128, 16, 16), (32, 256, 16), (256, 8, 25), (64, 64, 25),
          (64, 64, 36), (32, 64, 49), (256, 8, 49), (32, 64, 64), (32, 256, 64),
          (32, 128, 100), (16, 128, 196),
          # few rows: the rows pass spreads its coefficients over C * inner columns first
          (2, 2048, 16), (4, 1024, 16), (2, 512, 25), (4, 512, 25), (2, 256, 16),
          (8, 512, 25), (16, 256, 16)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = []
    for outer, channels, inner in SHAPES:
        x3 = np.random.default_rng(0).standard_normal((outer, channels, inner), np.float32)
        ones = np.ones(channels)
        ys = {name: np.empty_like(x3) for name in ("rows", "segments")}
        fns = {  # bound now: the loop's variables change
            name: partial(fused.evaluate[name == "rows"], x3.reshape(-1), ones, ones, 1e-5,
                          ones, ones, ys[name].reshape(-1), np.empty(channels),
                          np.empty(channels), outer, channels, inner, plan.chunks(x3))
            for name in ys
        }  # fmt: skip
        for fn in fns.values():
            fn()
        np.testing.assert_allclose(ys["rows"], ys["segments"], rtol=1e-6, atol=1e-6)
        times = alternated(fns, args.rounds, warmup=5)
        row = {"shape": [outer, channels, inner],
               "default": "rows" if plan.rows_for_eval(x3) else "segments"}
        for name, ts in times.items():
            row[f"{name}_us"] = statistics.median(ts) * 1e6
        row["rows_over_segments"] = row["rows_us"] / row["segments_us"]
        out.append(row)
        print(f"{str((outer, channels, inner)):>16s}  segments {row['segments_us']:7.1f} us  "
              f"rows {row['rows_us']:7.1f} us  rows/segments {row['rows_over_segments']:.2f}"
              f"  (default: {row['default']})", flush=True)
    if args.json:
        meta = {"threads": config.num_threads(), "dtype": "float32", "rounds": args.rounds,
                "eval_rows_max_inner": config.EVAL_ROWS_MAX_INNER,
                "eval_rows_min_outer": config.EVAL_ROWS_MIN_OUTER}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cases": out}, f, indent=1)


if __name__ == "__main__":
    main()

"""Which kernel family computes the unfused statistics of NCHW segments faster: the rule
that sends segments up to ``config.ROWS_FALLBACK_INNER`` values to the rows kernels.

``channel_stats`` serves SyncBatchNorm, the family modules and population statistics, which
do not take the fused training passes. Float32 (N, C, H*W) arrays, the segments kernels
(a two-pass block a segment, merged by Chan's formula) against the rows kernels (each row of
C * H*W columns, folded into channels), each at the chunks its family would use, alternated
in shuffled rounds, medians in µs.

    .venv/bin/python benchmarks/stats_family.py [--rounds 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import numpy as np

from batchnorm.app.bench.timing import alternated
from batchnorm.kernels.numba import config, plan, rows, segments

SHAPES = [(64, 128, 16), (32, 256, 16), (256, 16, 16), (32, 64, 64), (128, 64, 64),
          (32, 2048, 49), (16, 128, 196), (128, 64, 256), (8, 3, 256), (64, 32, 289),
          (32, 64, 784), (16, 128, 784), (32, 64, 3136), (8, 3, 50176),
          # few rows (batch 2-8): the rows kernels' per-column partials outweigh x
          (2, 512, 49), (4, 512, 49), (8, 512, 49), (2, 256, 196), (4, 256, 196),
          (8, 256, 196), (2, 2048, 16), (4, 1024, 16), (8, 512, 16), (2, 64, 49),
          (4, 128, 49)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = []
    for outer, channels, inner in SHAPES:
        x3 = np.random.default_rng(0).standard_normal((outer, channels, inner), np.float32)
        x = x3.reshape(-1)
        seg_chunks = config.chunks(x3.size, outer * channels)
        row_chunks = config.chunks(x3.size, outer)
        split = plan.by_columns(x3, row_chunks)
        fns = {  # bound now: the loop's variables change
            "segments": partial(segments.stats, x, outer, channels, inner, config.BLOCK,
                                seg_chunks),
            "rows": partial(rows.stats, x, outer, channels, inner, split, row_chunks),
        }  # fmt: skip
        (m1, q1), (m2, q2) = fns["segments"](), fns["rows"]()
        assert np.allclose(m1, m2) and np.allclose(q1, q2, rtol=1e-9)
        times = alternated(fns, args.rounds, warmup=5)
        row = {"shape": [outer, channels, inner],
               "default": "rows" if plan.rows_for_stats(x3) else "segments"}
        for name, ts in times.items():
            row[f"{name}_us"] = statistics.median(ts) * 1e6
        out.append(row)
        print(f"{str((outer, channels, inner)):>16s}  segments {row['segments_us']:7.1f} us  "
              f"rows {row['rows_us']:7.1f} us  (default: {row['default']})", flush=True)
    if args.json:
        meta = {"threads": config.num_threads(), "dtype": "float32", "rounds": args.rounds,
                "rows_fallback_inner": config.ROWS_FALLBACK_INNER,
                "stats_rows_per_inner": config.STATS_ROWS_PER_INNER}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

"""When 2-D inputs with few rows pay their fused passes in one region, and from what size
they pay two threads: ``plan.one_region`` and the parallel threshold of those passes.

2-D float32 inputs of up to ``config.COLUMNS_MAX_ROWS`` rows, the fused training passes
(forward, then backward) run three ways: serially (one chunk), on numba's threads in two
regions (reductions by columns, then the elementwise pass by rows) and in one region (a
thread's block of columns from reduction to output), alternated in shuffled rounds, medians
in µs. Each thread's block of a row is ``C * 4 / threads`` bytes.

    .venv/bin/python benchmarks/columns_region.py [--rounds 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

from rows_split import training_step  # this directory's script

from batchnorm.app.bench.timing import alternated
from batchnorm.kernels import numba as nb
from batchnorm.kernels.numba import config

SHAPES = [(16, 1024), (32, 512), (32, 1024), (64, 512), (64, 1000), (128, 256), (16, 4096),
          (32, 2048), (64, 1024), (128, 512), (64, 2048), (128, 1024), (32, 4096),
          (128, 2048), (64, 4096)]  # fmt: skip
MODES = {  # (CHUNKS, PARALLEL_MIN, COLUMNS_PARALLEL_MIN, COLUMNS_MIN_RUN_BYTES); None: as set
    "serial": (1, None, None, None),
    "two_regions": (None, 0, None, 1 << 30),
    "one_region": (None, 0, 0, 0),
}
NAMES = ("CHUNKS", "PARALLEL_MIN", "COLUMNS_PARALLEL_MIN", "COLUMNS_MIN_RUN_BYTES")


def mode(settings: tuple[int | None, ...], step: Callable[[], None]) -> Callable[[], None]:
    saved = tuple(getattr(config, k) for k in NAMES)

    def run() -> None:
        for k, v, s in zip(NAMES, settings, saved, strict=True):
            setattr(config, k, s if v is None else v)
        try:
            step()
        finally:
            for k, s in zip(NAMES, saved, strict=True):
                setattr(config, k, s)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for n, c in SHAPES:
        step = training_step(n, c)
        fns = {name: mode(settings, step) for name, settings in MODES.items()}
        times = alternated(fns, args.rounds, warmup=5)
        row: dict[str, object] = {"shape": [n, c], "elements": n * c,
                                  "run_bytes": c * 4 // nb.config.num_threads()}  # fmt: skip
        row.update({f"{k}_us": statistics.median(ts) * 1e6 for k, ts in times.items()})
        rows.append(row)
        print(
            f"{str((n, c)):>12s} {n * c:>7d}  "
            + "  ".join(f"{k} {statistics.median(ts) * 1e6:6.1f}" for k, ts in times.items()),
            flush=True,
        )
    if args.json:
        meta = {"threads": nb.config.num_threads(), "dtype": "float32", "rounds": args.rounds,
                "unit": "microseconds, medians of fused forward + backward"}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

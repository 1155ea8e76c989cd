"""Where two threads start to pay for the channel-parallel fused passes (segments layouts):
``config.FUSED_PARALLEL_MIN``. Functional fwd+bwd, float32, each shape serial (one chunk)
and at numba's thread count, alternated, ``timeit`` medians; also the plan each takes by
default.

    .venv/bin/python benchmarks/parallel_min.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import timeit

import numpy as np

from batchnorm import functional as F
from batchnorm.kernels.numba import config, plan

SHAPES = [(1, 256, 7, 7), (1, 384, 7, 7), (1, 512, 7, 7), (2, 512, 7, 7), (4, 512, 7, 7),
          (2, 256, 14, 14), (2, 64, 28, 28), (8, 64, 7, 7), (8, 64, 4, 4), (16, 64, 4, 4),
          (4, 32, 16, 16), (16, 16, 16, 16)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        c = shape[1]
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

        def step(x: np.ndarray = x, dy: np.ndarray = dy, w: np.ndarray = w, b: np.ndarray = b,
                 rm: np.ndarray = rm, rv: np.ndarray = rv) -> None:  # fmt: skip
            _, cache = F.batch_norm_forward(x, w, b, rm, rv, training=True)
            F.batch_norm_backward(dy, cache)

        times: dict[str, list[float]] = {"serial": [], "default": []}
        for _ in range(2):
            for label, chunks in (("serial", 1), ("default", None)):
                config.CHUNKS = chunks
                step()
                times[label].append(min(timeit.repeat(step, number=200, repeat=7)) / 200 * 1e3)
        config.CHUNKS = None
        serial, default = min(times["serial"]), min(times["default"])
        fused = plan.fused(x.reshape(shape[0], c, -1), 1)[:2]
        rows.append({"shape": shape, "elements": x.size, "plan_chunks_group": fused,
                     "serial_ms": serial, "default_ms": default})
        print(f"{shape!s:18} {x.size:>7} plan {fused!s:8} serial {serial:.4f} ms, default "
              f"{default:.4f} ms, serial/default {serial / default:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"fused_parallel_min": config.FUSED_PARALLEL_MIN,
                       "parallel_min": config.PARALLEL_MIN, "rows": rows}, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()

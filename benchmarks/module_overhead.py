"""What the NumPy module adds over the functional API, per call: ``BatchNorm1d(100)`` on a
(60, 100) float32 batch, forward then backward, against ``batch_norm_forward`` +
``batch_norm_backward`` with the same arrays (``timeit`` medians of 9 repeats, alternated).

    .venv/bin/python benchmarks/module_overhead.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable

import numpy as np

import batchnorm as bn
from batchnorm import functional as F


def median_us(fn: Callable[[], object], number: int = 20000) -> float:
    fn()
    return float(np.median(timeit.repeat(fn, number=number, repeat=9))) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 100), dtype=np.float32)
    dy = rng.standard_normal((60, 100), dtype=np.float32)
    layer = bn.BatchNorm1d(100, dtype=np.float32)
    assert layer.weight is not None and layer.bias is not None
    w, b, rm, rv = layer.weight.data, layer.bias.data, layer.running_mean, layer.running_var

    def module_step() -> None:
        layer.forward(x)
        layer.backward(dy)

    def functional_step() -> None:
        _, cache = F.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=0.1)
        F.batch_norm_backward(dy, cache)

    def module_forward() -> None:
        layer.forward(x)
        layer._cache = None  # as if backward had run

    def functional_forward() -> None:
        F.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=0.1)

    rows = []
    for _ in range(2):
        row = {"module_fwd_bwd_us": median_us(module_step),
               "functional_fwd_bwd_us": median_us(functional_step),
               "module_fwd_us": median_us(module_forward),
               "functional_fwd_us": median_us(functional_forward)}
        rows.append(row)
        print(f"fwd+bwd: module {row['module_fwd_bwd_us']:.1f} us, functional "
              f"{row['functional_fwd_bwd_us']:.1f} us, +"
              f"{row['module_fwd_bwd_us'] - row['functional_fwd_bwd_us']:.1f} us; forward: "
              f"+{row['module_fwd_us'] - row['functional_fwd_us']:.1f} us")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"case": [60, 100], "dtype": "float32", "rounds": rows}, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()

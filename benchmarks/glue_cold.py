"""What a training step's glue costs with warm caches and right after a large pass.

A tiny batch norm ((8, 256) float32, forward and the gradients of x, weight and bias), so
that the passes themselves cost next to nothing: our drop-in (forced onto our kernels), the
functional API, the kernels alone, PyTorch's own ``F.batch_norm``, and a bare autograd
step (``x * 1.0``). Each is timed warm, and right after copying 16 MiB (which leaves the
glue's code and data cold in cache, as a large pass of the layer before would). Medians of
280 steps.

    .venv/bin/python benchmarks/glue_cold.py --json benchmarks/results/glue_cold.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

import batchnorm.torch as bt
from batchnorm import functional as BF
from batchnorm.kernels import numba as K
from batchnorm.torch import routing

SHAPE = (8, 256)


def steps() -> dict[str, Callable[[], object]]:
    routing.MIN_NUMEL = 0  # our kernels at every size
    n, c = SHAPE
    x = torch.randn(SHAPE, requires_grad=True)
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    dy, rm, rv = torch.randn(SHAPE), torch.zeros(c), torch.ones(c)
    xn, dyn = x.detach().numpy().copy(), dy.numpy().copy()
    wn, bn_ = np.ones(c, np.float32), np.zeros(c, np.float32)
    rmn, rvn = np.zeros(c, np.float32), np.ones(c, np.float32)
    x3, dy3 = xn.reshape(n, c, 1), dyn.reshape(n, c, 1)

    def drop_in() -> None:
        torch.autograd.grad(bt.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5), (x, w, b), dy)

    def native() -> None:
        torch.autograd.grad(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5), (x, w, b), dy)

    def functional() -> None:
        _, cache = BF.batch_norm_forward(xn, wn, bn_, rmn, rvn, training=True, backend="numba")
        BF.batch_norm_backward(dyn, cache)

    def kernels() -> None:
        _, mean, _, rstd, _ = K.fused_forward(x3, wn, bn_, 1e-5, rmn, rvn, 0.1)
        K.fused_backward(dy3, x3, mean, rstd, wn, n)

    def bare_autograd() -> None:
        torch.autograd.grad(x * 1.0, (x,), dy)

    return {"drop-in (ours)": drop_in, "PyTorch F.batch_norm": native,
            "functional (ours)": functional, "kernels alone (ours)": kernels,
            "bare autograd step": bare_autograd}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    big = np.ones(4 << 20, np.float32)
    sink = np.empty_like(big)
    rows = []
    for name, fn in steps().items():
        out = {"step": name}
        for label, flush in (("warm_us", False), ("after_16MiB_copy_us", True)):
            times = []
            for i in range(args.steps):
                if flush:
                    np.copyto(sink, big)
                t0 = time.perf_counter()
                fn()
                if i >= 20:
                    times.append(time.perf_counter() - t0)
            out[label] = 1e6 * statistics.median(times)
        rows.append(out)
        warm, cold = out["warm_us"], out["after_16MiB_copy_us"]
        print(f"{name:24s} warm {warm:7.1f} us   cold {cold:7.1f} us")
    if args.json:
        meta = {"shape": SHAPE, "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

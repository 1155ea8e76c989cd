"""Where the drop-in's CPU kernels start beating PyTorch's: the crossovers of the routing table.

For each layout (NCHW-contiguous and channels_last with 64 channels, 2-D (N, 256)) and thread
count, times a training step of one batch norm (forward + backward through autograd,
float32) on inputs from 2**11 to 2**22 elements: PyTorch's ``F.batch_norm`` against
``batchnorm.torch.batch_norm`` forced onto our kernels, alternated, medians after warm-up,
in the default environment.
The crossover is the smallest size from which ours is faster at that size and every larger
one measured. ``batchnorm.torch.routing.CPU_MIN_NUMEL`` holds these numbers.

    .venv/bin/python benchmarks/crossover.py --json benchmarks/results/crossover.json
    .venv/bin/python benchmarks/crossover.py --layouts 2d   # one layout only
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

import batchnorm.torch as bt
from batchnorm.app.bench.timing import alternated
from batchnorm.torch import routing

CHANNELS = 64
# (N, H, W): 2**11 ... 2**22 elements with 64 channels
SHAPES = [(2, 4, 4), (2, 8, 8), (4, 8, 8), (8, 8, 8), (8, 16, 8), (8, 16, 16), (16, 16, 16),
          (32, 16, 16), (32, 32, 16), (32, 32, 32), (64, 32, 32)]  # fmt: skip
FEATURES = 256  # 2-D inputs: (N, 256), 2**11 ... 2**22 elements
LAYOUTS = ("contiguous", "channels_last", "2d")


def shapes(layout: str) -> list[tuple[int, ...]]:
    if layout == "2d":
        return [(2**k // FEATURES, FEATURES) for k in range(11, 23)]
    return [(n, CHANNELS, h, w) for n, h, w in SHAPES]


def _step(fn: Callable[..., torch.Tensor], x: torch.Tensor, w: torch.Tensor,
          b: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:  # fmt: skip
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])

    def run() -> None:
        # the gradients handed back, as to the layer below; none accumulated into x.grad (an
        # input of a network's inner layer is no leaf), which added a pass over x to each side
        y = fn(x, rm, rv, w, b, True, 0.1, 1e-5)
        torch.autograd.grad(y, (x, w, b), dy)

    return run


def time_pair(shape: tuple[int, ...], channels_last: bool, repeats: int) -> dict[str, float]:
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.ones(shape[1], requires_grad=True)
    b = torch.zeros(shape[1], requires_grad=True)
    dy = torch.randn_like(x)
    fns = {"torch": _step(F.batch_norm, x, w, b, dy), "ours": _step(bt.batch_norm, x, w, b, dy)}
    times = alternated(fns, repeats, warmup=5)
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    routing.MIN_NUMEL = 0  # ours on every size
    rows, crossovers = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for layout in args.layouts:
            ratios = []
            for shape in shapes(layout):
                us = time_pair(shape, layout == "channels_last", args.repeats)
                numel = int(torch.Size(shape).numel())
                ratio = us["torch"] / us["ours"]
                ratios.append((numel, ratio))
                rows.append({"threads": threads, "layout": layout, "numel": numel,
                             "torch_us": us["torch"], "ours_us": us["ours"]})  # fmt: skip
                print(
                    f"threads {threads} {layout:<13} {numel:>8} elements  torch "
                    f"{us['torch']:>8.1f} us  ours {us['ours']:>8.1f} us  {ratio:5.2f}x"
                )
            faster = [i for i in range(len(ratios)) if all(r > 1 for _, r in ratios[i:])]
            crossover = ratios[faster[0]][0] if faster else None
            crossovers[f"{layout},{threads}"] = crossover
            print(f"  crossover: {crossover} elements")
    if args.json:
        with open(args.json, "w") as fh:
            meta = {"torch": torch.__version__, "channels": CHANNELS, "features_2d": FEATURES,
                    "dtype": "float32"}
            json.dump({"meta": meta, "crossovers": crossovers, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

"""How much the bench's warm loop flatters: fwd+bwd with caches warm, or flushed as in a net.

In ``batchnorm bench`` every contender runs its forward and backward in a tight loop, so x,
dy and the outputs' memory are warm in cache from the call before. In a network the layers
between a batch norm's forward and its backward push them out. This times ours
(``batch_norm_forward`` + ``batch_norm_backward``) and PyTorch (``F.batch_norm`` +
``torch.autograd.grad``) three ways, each contender in a loop of its own, medians:

* ``warm``: back to back, as the bench does;
* ``cold start``: a 32 MiB copy before the forward (caches flushed), backward right after;
* ``cold both``: the copy before the forward and again before the backward.

    .venv/bin/python benchmarks/cache_state.py --json benchmarks/results/cache_state.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from batchnorm import functional as F
from batchnorm.app.bench.timing import parse_case

CASES = ["256x1024", "1024x512", "4096x256", "32x64x56x56", "32x64x56x56/cl", "16x128x28x28"]
MODES = ("warm", "cold start", "cold both")


def contenders(spec: str) -> dict[str, tuple[Callable[[], object], Callable[[object], object]]]:
    """name -> (forward, backward of what forward returned)."""
    case = parse_case(spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(case.shape, dtype=np.float32)
    dy = rng.standard_normal(case.shape, dtype=np.float32)
    c = case.shape[1]
    if case.channels_last:  # NHWC in memory, NCHW shape: as the bench and PyTorch see it
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        dy = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
        axis = -1
    else:
        axis = 1
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    xt = torch.from_numpy(np.moveaxis(x, -1, 1) if case.channels_last else x).requires_grad_()
    dyt = torch.from_numpy(np.moveaxis(dy, -1, 1) if case.channels_last else dy)
    wt, bt_ = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)

    def ours_fwd() -> object:
        return F.batch_norm_forward(x, w, b, training=True, axis=axis)[1]

    def ours_bwd(cache: object) -> object:
        return F.batch_norm_backward(dy, cache)  # type: ignore[arg-type]

    def torch_fwd() -> object:
        return torch.nn.functional.batch_norm(xt, None, None, wt, bt_, True)

    def torch_bwd(y: object) -> object:
        return torch.autograd.grad(y, (xt, wt, bt_), dyt)  # type: ignore[arg-type]

    return {"ours": (ours_fwd, ours_bwd), "torch": (torch_fwd, torch_bwd)}


def measure(spec: str, rounds: int) -> dict[str, dict[str, float]]:
    big = np.ones(8 << 20, np.float32)
    sink = np.empty_like(big)
    fns = contenders(spec)
    times: dict[str, dict[str, list[float]]] = {m: {k: [] for k in fns} for m in MODES}
    # each contender and mode in a loop of its own: "warm" stays warm, and neither library
    # runs between the other's calls (alternated, each ran with the other's data in cache,
    # and PyTorch's page faults came and went with our allocations)
    for mode in MODES:
        for name, (fwd, bwd) in fns.items():
            for i in range(rounds + 3):
                if mode != "warm":
                    np.copyto(sink, big)
                t0 = time.perf_counter()
                out = fwd()
                t1 = time.perf_counter()
                if mode == "cold both":
                    np.copyto(sink, big)
                t2 = time.perf_counter()
                bwd(out)
                t3 = time.perf_counter()
                if i >= 3:
                    times[mode][name].append((t1 - t0) + (t3 - t2))
    return {m: {k: 1e3 * statistics.median(v) for k, v in d.items()} for m, d in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=CASES)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for spec in args.cases:
        ms = measure(spec, args.rounds)
        row = {"case": spec, "ms": ms}
        rows.append(row)
        parts = "  ".join(
            f"{m}: ours {ms[m]['ours']:.3f} torch {ms[m]['torch']:.3f} "
            f"({ms[m]['torch'] / ms[m]['ours']:.2f}x)"
            for m in MODES
        )
        print(f"{spec:>16}  {parts}")
    if args.json:
        meta = {"threads": torch.get_num_threads(), "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

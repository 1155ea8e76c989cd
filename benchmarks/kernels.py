"""Per-kernel times of the numba backend against np.copyto of x (alternated).

    .venv/bin/python benchmarks/kernels.py [--threads 2] [--repeats 30] [--min] [CASE ...]

Cases as in ``batchnorm bench`` (``32x64x56x56``, ``/cl`` for channels-last). This is the
inner loop for tuning the kernels: no functional-API overhead, one line per case, each
kernel's time and its ratio to a copy of x. ``--min`` reports minima instead of medians,
which is the steadier figure on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numba
import numpy as np

from batchnorm.app.bench.timing import DEFAULT_CASES, alternated, parse_case
from batchnorm.kernels import numba as nb


def kernels(x: np.ndarray, dy: np.ndarray) -> dict[str, Callable[[], object]]:
    channels = x.shape[1]
    rng = np.random.default_rng(1)
    mean, _ = nb.channel_stats(x)
    a, b, c = (rng.random(channels) for _ in range(3))
    dst = np.empty_like(x)
    fns: dict[str, Callable[[], object]] = {
        "memcpy": lambda: np.copyto(dst, x),
        "stats": lambda: nb.channel_stats(x),
        "normalize": lambda: nb.normalize(x, mean, a, b),
        "grad_sums": lambda: nb.grad_sums(dy, x, mean),
        "grad_input": lambda: nb.grad_input(dy, x, mean, a, b, c),
    }
    if nb.fused_forward(x, a, b, 1e-5) is not None:
        count = x.shape[0] * x.shape[2]
        fns["fused_fwd"] = lambda: nb.fused_forward(x, a, b, 1e-5)
        fns["fused_bwd"] = lambda: nb.fused_backward(dy, x, mean, a, b, count)
    return fns


def time_case(fns: dict[str, Callable[[], object]], repeats: int, use_min: bool) -> str:
    """Warm up, then alternate the kernels round by round, in a shuffled order.

    A fixed order favours a kernel that follows another pass over x (x is then warm in
    cache); ``batchnorm bench`` shuffles for the same reason.
    """
    times = alternated(fns, repeats)
    stat = min if use_min else statistics.median
    ms = {k: 1e3 * stat(ts) for k, ts in times.items()}
    cp = ms["memcpy"]
    parts = "  ".join(f"{k} {t:.3f} ({t / cp:.2f}x)" for k, t in ms.items() if k != "memcpy")
    return f"memcpy {cp:.3f} ms  {parts}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("cases", nargs="*")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--min", action="store_true", help="minimum instead of median")
    args = p.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    for spec in args.cases or DEFAULT_CASES:
        case = parse_case(spec)
        n, c = case.shape[:2]
        inner = int(np.prod(case.shape[2:], dtype=np.int64))
        shape3 = (n * inner, c, 1) if case.channels_last else (n, c, inner)
        x = rng.standard_normal(shape3, dtype=np.float32).astype(args.dtype)
        dy = rng.standard_normal(shape3, dtype=np.float32).astype(args.dtype)
        print(f"{case.name:>18}  {time_case(kernels(x, dy), args.repeats, args.min)}")


if __name__ == "__main__":
    main()

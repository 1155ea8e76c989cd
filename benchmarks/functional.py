"""Functional training forward+backward, ours against PyTorch, in one process (alternated).

    .venv/bin/python benchmarks/functional.py [--threads 2] [--repeats 200] [--dtype float32]

Ours: ``batch_norm_forward`` + ``batch_norm_backward`` (running stats updated), and the
NumPy module ``BatchNorm{1,2}d`` forward + backward. PyTorch: ``F.batch_norm`` with
``requires_grad`` inputs + ``torch.autograd.grad`` (what a PyTorch user calls). Nothing in
the environment is changed (no OMP_WAIT_POLICY): this is the default a user gets. The
contenders run round by round in a shuffled order after a warm-up; the table gives medians
(or, with ``--min``, minima) in microseconds and torch/ours.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.app.bench.timing import alternated

CASES = [
    (60, 100),
    (256, 1024),
    (1024, 512),
    (4096, 256),
    (32, 64, 56, 56),
    (16, 128, 28, 28),
    (64, 32, 17, 17),
]


def contenders(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = np.ones(c, dtype), np.zeros(c, dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)

    def ours() -> object:
        y, cache = F.batch_norm_forward(x, w, b, rm, rv, training=True)
        return F.batch_norm_backward(dy, cache)

    layer = (bn.BatchNorm1d if len(shape) == 2 else bn.BatchNorm2d)(c, dtype=dtype)

    def module() -> object:
        layer(x)
        return layer.backward(dy)

    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    bt = torch.from_numpy(b.copy()).requires_grad_(True)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    dyt = torch.from_numpy(dy)

    def torch_fn() -> object:
        yt = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training=True)
        return torch.autograd.grad(yt, (xt, wt, bt), dyt)

    return {"ours": ours, "module": module, "torch": torch_fn}


def measure(
    fns: dict[str, Callable[[], object]], repeats: int, stat: Callable[[list[float]], float]
) -> dict[str, float]:
    times = alternated(fns, repeats, warmup=3)
    return {k: stat(v) * 1e6 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--min", action="store_true", help="minima instead of medians (steadier on a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if hasattr(bn.kernels, "threads"):
        bn.kernels.threads(args.threads)
    else:  # the code before kernels.threads() existed
        import numba

        numba.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
    print(
        f"{'shape':>18} {'ours us':>9} {'module us':>9} {'torch us':>9} {'torch/ours':>10}"
        f" {'module-ours':>11}"
    )
    for shape in CASES:
        repeats = int(np.clip(args.repeats * 200_000 // np.prod(shape), 20, args.repeats * 10))
        t = measure(contenders(shape, dtype), repeats, min if args.min else statistics.median)
        print(
            f"{'x'.join(map(str, shape)):>18} {t['ours']:9.1f} {t['module']:9.1f}"
            f" {t['torch']:9.1f} {t['torch'] / t['ours']:10.2f} {t['module'] - t['ours']:11.1f}"
        )


if __name__ == "__main__":
    main()

"""How far our passes are from the simplest loops over the same bytes.

For each 2-D case, ours (the numba backend's passes, as the functional API calls them)
against loops that do the least a pass can: a copy of x, ``y = x * a + b`` per column, a
float64 sum per column, the two-array ``sum(dy * x)`` per column and ``a * dy + b * x + c``,
all on the same threads, into a reused output; and a training forward + backward by ours
(functional API) and by PyTorch (``F.batch_norm`` + ``torch.autograd.grad``, in this
process: one OpenMP pool). Alternated in shuffled rounds, medians in µs. ``bare_fwd_bwd``
adds up the four bare loops a forward + backward needs at the least (column sums, affine;
column dot, the dx formula): a pass that was as cheap as its loop, with nothing around it.

NCHW cases (N x C x H x W) take the fused segments passes, which read x (and dy) from memory
once: their bare loops are the copy (the forward's traffic: x read, y written) and the dx
formula (the backward's: dy and x read, dx written), and ``bare_fwd_bwd`` is those two.

    .venv/bin/python benchmarks/floor.py [--rounds 300] [--json PATH] [CASE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as tF
from numba import njit, prange

from batchnorm import functional as F
from batchnorm.app.bench.timing import alternated
from batchnorm.kernels import numba as nb
from batchnorm.kernels.numba import config

CASES = [(60, 100), (256, 1024), (1024, 512), (4096, 256), (32, 4096)]


@njit(parallel=True, fastmath=True)
def copy(x, y, chunks):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    for t in prange(chunks):
        for r in range(n * t // chunks, n * (t + 1) // chunks):
            y[r, :] = x[r, :]


@njit(parallel=True, fastmath=True)
def affine(x, a, b, y, chunks):  # type: ignore[no-untyped-def]
    n, w = x.shape
    for t in prange(chunks):
        for r in range(n * t // chunks, n * (t + 1) // chunks):
            for j in range(w):
                y[r, j] = x[r, j] * a[j] + b[j]


@njit(parallel=True, fastmath=True)
def column_sums(x, out, chunks):  # type: ignore[no-untyped-def]
    n, w = x.shape
    for t in prange(chunks):
        acc = np.zeros(w)
        for r in range(n * t // chunks, n * (t + 1) // chunks):
            for j in range(w):
                acc[j] += x[r, j]
        out[t, :w] = acc


@njit(parallel=True, fastmath=True)
def column_dot(dy, x, out, chunks):  # type: ignore[no-untyped-def]
    n, w = x.shape
    for t in prange(chunks):
        acc = np.zeros(w)
        for r in range(n * t // chunks, n * (t + 1) // chunks):
            for j in range(w):
                acc[j] += np.float64(dy[r, j]) * x[r, j]
        out[t, :w] = acc


@njit(parallel=True, fastmath=True)
def dx_formula(dy, x, a, b, c, y, chunks):  # type: ignore[no-untyped-def]
    n, w = x.shape
    for t in prange(chunks):
        for r in range(n * t // chunks, n * (t + 1) // chunks):
            for j in range(w):
                y[r, j] = a[j] * dy[r, j] + b[j] * x[r, j] + c[j]


def contenders(
    shape: tuple[int, ...],
) -> tuple[dict[str, Callable[[], object]], int, tuple[str, ...]]:
    """The timed calls on a float32 case, the chunks (threads) they use, and the bare loops
    that make its floor."""
    n, c = shape[:2]
    inner = int(np.prod(shape[2:], dtype=np.int64))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32)
    dy = rng.standard_normal(shape, np.float32)
    x3, dy3 = x.reshape(n, c, inner), dy.reshape(n, c, inner)
    # the bare loops see (rows, columns): (N, C) for 2-D, (N * C, H * W) segments for NCHW
    x2, dy2 = (x.reshape(n, c), dy.reshape(n, c)) if inner == 1 else (
        x.reshape(n * c, inner), dy.reshape(n * c, inner))  # fmt: skip
    y = np.empty_like(x2)
    a, b = np.ones(x2.shape[1], np.float32), np.zeros(x2.shape[1], np.float32)
    chunks = config.chunks(x.size, x2.shape[0])
    sums = np.zeros((max(chunks, 1), x2.shape[1]))
    mean, _ = nb.channel_stats(x3)
    p, q = (rng.random(c) for _ in range(2))
    w, bias = (rng.random(c).astype(np.float32) for _ in range(2))
    xt, wt, bt = (torch.from_numpy(v).requires_grad_(True) for v in (x, w, bias))
    dyt = torch.from_numpy(dy)
    fns: dict[str, Callable[[], object]] = {
        "copy": lambda: copy(x2, y, chunks),
        "dx_formula": lambda: dx_formula(dy2, x2, a, b, a, y, chunks),
        "fused_forward": lambda: nb.fused_forward(x3, p, q, 1e-5),
        "fused_backward": lambda: nb.fused_backward(dy3, x3, mean, p, q, n * inner),
        "ours_fwd_bwd": lambda: F.batch_norm_backward(dy, F.batch_norm_forward(x, w, bias)[1]),
        "torch_fwd_bwd": lambda: torch.autograd.grad(
            tF.batch_norm(xt, None, None, wt, bt, training=True), (xt, wt, bt), dyt
        ),
    }
    if inner > 1:
        return fns, chunks, ("copy", "dx_formula")
    r = rng.random(c)
    fns |= {
        "affine": lambda: affine(x2, a, b, y, chunks),
        "column_sums": lambda: column_sums(x2, sums, chunks),
        "column_dot": lambda: column_dot(dy2, x2, sums, chunks),
        "stats": lambda: nb.channel_stats(x3),
        "normalize": lambda: nb.normalize(x3, mean, p, q),
        "grad_sums": lambda: nb.grad_sums(dy3, x3, mean),
        "grad_input": lambda: nb.grad_input(dy3, x3, mean, p, q, r),
    }
    return fns, chunks, ("column_sums", "affine", "column_dot", "dx_formula")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "cases", nargs="*", help="NxC or NxCxHxW, e.g. 1024x512 (default: the 2-D five)"
    )
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in c.split("x")) for c in args.cases] or CASES
    out = []
    for shape in shapes:
        fns, chunks, bare = contenders(shape)
        times = alternated(fns, args.rounds, warmup=10)
        row: dict[str, object] = {"shape": list(shape), "chunks": chunks}
        row.update({f"{k}_us": statistics.median(ts) * 1e6 for k, ts in times.items()})
        row["bare_fwd_bwd_us"] = sum(float(row[f"{k}_us"]) for k in bare)  # type: ignore[arg-type]
        out.append(row)
        print(f"{'x'.join(map(str, shape))} ({chunks} chunks): "
              + "  ".join(f"{k} {statistics.median(ts) * 1e6:.1f}" for k, ts in times.items())
              + f"  bare_fwd_bwd {row['bare_fwd_bwd_us']:.1f}", flush=True)  # fmt: skip
    if args.json:
        meta = {"threads": config.num_threads(), "dtype": "float32", "rounds": args.rounds,
                "unit": "microseconds, medians", "torch": torch.__version__,
                "torch_threads": torch.get_num_threads()}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cases": out}, f, indent=1)


if __name__ == "__main__":
    main()

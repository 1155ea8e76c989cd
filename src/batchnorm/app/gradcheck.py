"""Check BN's closed-form gradients against float64 finite differences and the seed's class.

For each shape given, draw x, weight, bias and a projection p (the loss is sum(p * y)),
then compare dx, dweight and dbias from ``batch_norm_backward`` with central differences,
and, on the same values laid out as rows, with the step-by-step backward of
``batchnorm.reference.BatchNorm``. Prints the largest errors; exit status 1 if any is
above ``--tol``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np


@dataclass
class GradcheckResult:
    shape: tuple[int, ...]
    axis: int
    training: bool
    finite_diff_error: float  # max |analytic - numeric| / max(1, |numeric|), over x, w, b
    reference_error: float  # max |closed form - seed's step-by-step backward|
    points: int  # finite-difference points evaluated


def check_gradients(
    shape: tuple[int, ...],
    axis: int = 1,
    training: bool = True,
    backend: str = "auto",
    seed: int = 0,
    max_points: int = 64,
    step: float = 1e-6,
) -> GradcheckResult:
    """Compare analytic gradients with finite differences at up to ``max_points`` entries."""
    from batchnorm import functional as F
    from batchnorm.reference import BatchNorm as ReferenceBatchNorm

    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = rng.standard_normal(shape) * 2 + 0.5
    weight, bias = rng.standard_normal(channels) + 1, rng.standard_normal(channels)
    running = (rng.standard_normal(channels), rng.random(channels) + 0.5)
    proj = rng.standard_normal(shape)

    def loss(x_: np.ndarray, w_: np.ndarray, b_: np.ndarray) -> float:
        rm, rv = running[0].copy(), running[1].copy()
        y = F.batch_norm(x_, rm, rv, w_, b_, training, 0.1, 1e-5, axis, backend=backend)
        return float(np.sum(proj * y))

    rm, rv = running[0].copy(), running[1].copy()
    y, cache = F.batch_norm_forward(
        x, weight, bias, rm, rv, training, 0.1, 1e-5, axis, backend=backend
    )
    grads = F.batch_norm_backward(proj, cache)
    worst, points = 0.0, 0
    for which, (array, grad) in enumerate(zip((x, weight, bias), grads, strict=True)):
        assert grad is not None
        flat = np.arange(array.size)
        if array.size > max_points:
            flat = rng.choice(array.size, max_points, replace=False)
        for k in flat:
            idx = np.unravel_index(k, array.shape)
            args_plus = [x, weight, bias]
            args_minus = [x, weight, bias]
            plus, minus = array.copy(), array.copy()
            plus[idx] += step
            minus[idx] -= step
            args_plus[which], args_minus[which] = plus, minus
            numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * step)
            worst = max(worst, abs(grad[idx] - numeric) / max(1.0, abs(numeric)))
            points += 1

    ref_error = float("nan")
    if training:  # the seed's class normalizes with batch statistics only
        rows = np.moveaxis(x, axis, -1).reshape(-1, channels)
        drows = np.moveaxis(proj, axis, -1).reshape(-1, channels)
        ref = ReferenceBatchNorm(channels)
        ref.gamma, ref.beta = weight.tolist(), bias.tolist()
        y_ref = np.array(ref.forward(rows.tolist()))
        dx_ref = np.array(ref.backward(drows.tolist()))
        dx = np.moveaxis(grads[0], axis, -1).reshape(-1, channels)
        y_rows = np.moveaxis(y, axis, -1).reshape(-1, channels)
        ref_error = max(
            float(np.abs(y_rows - y_ref).max()),
            float(np.abs(dx - dx_ref).max()),
            float(np.abs(np.asarray(grads[1]) - ref.grad_gamma).max()),
            float(np.abs(np.asarray(grads[2]) - ref.grad_beta).max()),
        )
    return GradcheckResult(tuple(shape), axis, training, worst, ref_error, points)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; write it like 8,3,5,5") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} needs 2+ positive sizes (N, C, ...)")
    return shape


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "shapes",
        nargs="*",
        type=_shape,
        metavar="SHAPE",
        help="input shapes such as 60,100 or 4,3,5,5 (default: a few)",
    )
    parser.add_argument("--axis", type=int, default=1, help="channel axis (default 1)")
    parser.add_argument("--backend", default="auto", help="auto, numpy or numba")
    parser.add_argument("--eval", action="store_true", help="check eval mode (running stats)")
    parser.add_argument("--points", type=int, default=64, help="finite-difference points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-6, help="largest acceptable error")


def run(args: argparse.Namespace) -> int:
    shapes = args.shapes or [(3, 2), (8, 5), (4, 3, 5, 5), (2, 3, 2, 3, 4)]
    print(f"{'shape':<18}{'mode':<7}{'points':>7}{'vs finite diff':>16}{'vs seed class':>16}")
    failed = False
    for shape in shapes:
        if not -len(shape) <= args.axis < len(shape):
            raise ValueError(f"axis {args.axis} is out of range for shape {shape}")
        result = check_gradients(
            shape, args.axis, not args.eval, args.backend, args.seed, args.points
        )
        bad = result.finite_diff_error > args.tol or result.reference_error > args.tol
        failed |= bad
        ref = "n/a (eval)" if np.isnan(result.reference_error) else f"{result.reference_error:.2e}"
        mode = "eval" if args.eval else "train"
        print(
            f"{'x'.join(map(str, shape)):<18}{mode:<7}{result.points:>7}"
            f"{result.finite_diff_error:>16.2e}{ref:>16}{'  FAIL' if bad else ''}"
        )
    print("FAILED" if failed else f"all errors below {args.tol:g}")
    return 1 if failed else 0

"""A printed walk through Batch Normalization.

First the seed notebook's own test through the pure-Python reference, then a BatchNorm2d
on random images: forward, backward, running statistics, and eval mode.
"""

from __future__ import annotations

import argparse

import numpy as np

SEED_X = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
SEED_DY = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    import batchnorm as bn

    print("1. The seed notebook's test, through batchnorm.reference.BatchNorm")
    ref = bn.reference.BatchNorm(num_features=2)
    print("   Output:    ", ref.forward(SEED_X))
    print("   Grad x:    ", ref.backward(SEED_DY))
    print("   Grad gamma:", ref.grad_gamma)
    print("   Grad beta: ", ref.grad_beta)

    y, cache = bn.functional.batch_norm_forward(np.array(SEED_X), np.ones(2), np.zeros(2))
    dx, dw, db = bn.functional.batch_norm_backward(np.array(SEED_DY), cache)
    diff = max(
        np.abs(y - np.array(ref.forward(SEED_X))).max(),
        np.abs(dx - np.array(ref.backward(SEED_DY))).max(),
    )
    print(f"   closed form (backend {cache.backend}) vs reference: max |diff| {diff:.1e}")

    rng = np.random.default_rng(args.seed)
    print("\n2. BatchNorm2d(4) on a batch of 8 random 5x5 images with 4 channels")
    layer = bn.BatchNorm2d(4)
    print("   ", layer)
    spread = np.array([3.0, 0.5, 1.0, 10.0])[None, :, None, None]
    x = (rng.standard_normal((8, 4, 5, 5)) * spread + 2.0).astype(np.float32)
    y = layer(x)
    print("   input  mean/std per channel:", _fmt(x.mean((0, 2, 3))), _fmt(x.std((0, 2, 3))))
    print("   output mean/std per channel:", _fmt(y.mean((0, 2, 3))), _fmt(y.std((0, 2, 3))))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(dy)
    print("   backward: dx sums to ~0 per channel:", _fmt(dx.sum((0, 2, 3))))
    assert layer.weight is not None and layer.bias is not None
    print("   weight.grad:", _fmt(layer.weight.grad), " bias.grad:", _fmt(layer.bias.grad))
    print("\n3. Running statistics after 20 training batches (momentum 0.1)")
    for _ in range(19):
        layer(x)
    print("   running_mean:", _fmt(layer.running_mean), " running_var:", _fmt(layer.running_var))
    print("   num_batches_tracked:", layer.num_batches_tracked)
    layer.eval()
    y_eval = layer(x)
    print("\n4. Eval mode normalizes with the running statistics instead of the batch's")
    print("   output mean per channel:", _fmt(y_eval.mean((0, 2, 3))))
    return 0


def _fmt(v: object) -> str:
    return "[" + ", ".join(f"{float(e):+.3f}" for e in np.asarray(v).ravel()) + "]"

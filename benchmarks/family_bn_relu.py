"""Fused BN+ReLU (+ residual) against BN then ReLU: CPU float32 forward + backward, and a
ResNet-18 training step with and without the fx fusion pass.

Run: ``python benchmarks/family_bn_relu.py [--reps N] [--out FILE]`` (the default environment:
no OpenMP variable is set). Contenders run alternated, round by round, after a warm-up; the
table gives medians and the ratios of medians. Writes JSON (default
``benchmarks/results/family_bn_relu.json``). ResNet-18 is ``benchmarks/e2e_cpu.py``'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from e2e_cpu import resnet18  # this folder's end-to-end script: one ResNet-18 for both
from torch import nn

import batchnorm.torch as bt
from batchnorm.app.bench.timing import alternated


def step_fn(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
            fused: bool) -> Callable[[], None]:
    g = torch.randn_like(x)

    def run() -> None:
        xi = x.detach().requires_grad_()
        if fused:
            y = layer(xi, residual)
        else:
            z = layer(xi)
            y = torch.relu(z if residual is None else z + residual)
        y.backward(g)

    return run


def alternate(contenders: dict[str, Callable[[], None]], reps: int, warmup: int = 2
              ) -> dict[str, float]:
    times = alternated(contenders, reps, warmup)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shape", default="32,64,56,56")
    parser.add_argument("--resnet-batch", type=int, default=16)
    parser.add_argument("--resnet-size", type=int, default=112)
    parser.add_argument("--out", default="benchmarks/results/family_bn_relu.json")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(shape)
    res = torch.randn(shape)
    c = shape[1]
    fused, ours, native = bt.BatchNormReLU2d(c), bt.BatchNorm2d(c), nn.BatchNorm2d(c)
    rows = {}
    for label, r in (("bn+relu", None), ("bn+add+relu", res)):
        rows[label] = alternate({
            "fused (ours)": step_fn(fused, x, r, True),
            "our BN, torch.relu": step_fn(ours, x, r, False),
            "PyTorch BN, torch.relu": step_fn(native, x, r, False),
        }, args.reps)
    model = resnet18(classes=1000)
    xb = torch.randn(args.resnet_batch, 3, args.resnet_size, args.resnet_size)
    yb = torch.randint(0, 1000, (args.resnet_batch,))
    converted = bt.convert_model(copy.deepcopy(model))
    fused_model = bt.fuse_bn_relu(converted)
    rows["resnet18 train step"] = alternate({
        "fused (ours)": train_step(fused_model, xb, yb),
        "our BN (convert_model)": train_step(converted, xb, yb),
        "PyTorch": train_step(model, xb, yb),
    }, max(3, args.reps // 3), warmup=1)
    meta = {"shape": shape, "dtype": "float32", "threads": torch.get_num_threads(),
            "resnet": [args.resnet_batch, 3, args.resnet_size, args.resnet_size],
            "reps": args.reps, "unit": "ms, median of alternated rounds"}
    for label, times in rows.items():
        base = times["fused (ours)"]
        print(label, {k: f"{v:.1f} ms ({v / base:.2f}x)" for k, v in times.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "ms": rows}, indent=1))


if __name__ == "__main__":
    main()

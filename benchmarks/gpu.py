"""batchnorm.torch's Triton kernels against PyTorch's native CUDA batch norm (cuDNN), on one GPU.

    .venv/bin/python benchmarks/gpu.py [--repeats 50]

For each case (NCHW and channels-last, float32 and bfloat16 input with float32 parameters, as
under AMP), first a correctness check of our module against ``nn.BatchNorm2d`` (output, input
and parameter gradients, running statistics), then CUDA-event timings of a training
forward+backward through autograd, alternating ours and PyTorch's, and a device-to-device copy
of the input measured in the same run. "GB/s" is the traffic of our kernels over their time:
forward reads x twice and writes y, backward reads x and dy twice and writes dx, 8 x nbytes
(the least any BN needs is 5 x nbytes: x, y; x, dy, dx); the copy moves 2 x nbytes. "of copy"
compares the two. Exit status 1 when a correctness check fails.

Without a GPU, ``TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu.py --smoke`` runs the same
code on tiny shapes on CPU under Triton's interpreter (the timings then mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import batchnorm.torch as bt
from batchnorm.app.bench.timing import alternated

SHAPES = [(32, 64, 112, 112), (64, 256, 56, 56), (128, 2048, 7, 7)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}  # atol, rtol on outputs


def _time(fns: dict[str, Callable[[], object]], repeats: int, cuda: bool) -> dict[str, float]:
    """Median ms per function; the functions alternate within every round (3 warm-up
    rounds: Triton compiles on first call). On a GPU each call is timed by device events."""
    if not cuda:
        times = alternated(fns, repeats, warmup=3)
        return {name: 1e3 * statistics.median(t) for name, t in times.items()}
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def on_device(fn: Callable[[], object]) -> float:
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return float(start.elapsed_time(stop))

    torch.cuda.synchronize()
    times = alternated(fns, repeats, warmup=3, timer=on_device)
    return {name: statistics.median(t) for name, t in times.items()}


def run_case(
    shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype, repeats: int, device: str
) -> tuple[list[tuple[str, float, bool]], dict[str, float], int]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=device, generator=gen).to(dtype).contiguous(memory_format=fmt)
    native = nn.BatchNorm2d(shape[1]).to(device)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        native.bias.uniform_(-0.5, 0.5)
    ours: Any = bt.convert_model(nn.BatchNorm2d(shape[1]).to(device))
    ours.load_state_dict(native.state_dict())
    assert bt.route(x, ours.weight) == "triton", "our module would not use the Triton kernels"

    # correctness: one training step, then the buffers and an eval forward
    atol, rtol = TOL[dtype]
    errors = []
    outs = []
    for m in (native, ours):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        with torch.no_grad():
            y_eval = m.eval()(x)
        m.train()
        outs.append([y, xi.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var, y_eval])
    names = ("y", "dx", "dw", "db", "rmean", "rvar", "y_eval")
    for name, a, b in zip(names, *outs, strict=True):
        scale = a.abs().max().item() + 1 if name in ("dw", "db") else 1.0  # sums over N*H*W
        err = (a.float() - b.float()).abs().max().item()
        ok = torch.allclose(a.float(), b.float(), atol=atol * scale, rtol=rtol)
        errors.append((name, err, ok))

    params: dict[str, Any] = {n: [x.clone().requires_grad_(), m.weight, m.bias] for n, m in
              (("ours", ours), ("torch", native))}  # fmt: skip
    dst = torch.empty_like(x)
    fns: dict[str, Callable[[], object]] = {
        "ours": lambda: torch.autograd.grad(ours(params["ours"][0]), params["ours"], dy),
        "torch": lambda: torch.autograd.grad(native(params["torch"][0]), params["torch"], dy),
        "copy": lambda: dst.copy_(x),
    }
    ms = _time(fns, repeats, device == "cuda")
    return errors, ms, x.numel() * x.element_size()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    args = parser.parse_args()
    shapes, device = SHAPES, "cuda"
    if args.smoke:
        from batchnorm.torch import routing

        routing.TRITON_ON_CPU = True
        shapes, device, args.repeats = [(4, 3, 5, 7), (6, 9, 2, 3)], "cpu", 2
        print("smoke run on CPU: checks only, the timings mean nothing")
    elif not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU (or --smoke)", file=sys.stderr)
        return 2
    else:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    head = f"{'case':<26} {'dtype':<9} {'ours ms':>8} {'torch ms':>9} {'torch/ours':>10} "
    head += f"{'ours GB/s':>9} {'copy GB/s':>9} {'of copy':>7}  check"
    print(head)
    failed = False
    for shape in shapes:
        for channels_last in (False, True):
            for dname, dtype in DTYPES.items():
                errors, ms, nbytes = run_case(shape, channels_last, dtype, args.repeats, device)
                bad = [f"{n} {e:.2g}" for n, e, ok in errors if not ok]
                failed |= bool(bad)
                ours_gbs = 8 * nbytes / ms["ours"] / 1e6
                copy_gbs = 2 * nbytes / ms["copy"] / 1e6
                case = "x".join(map(str, shape)) + (" cl" if channels_last else "")
                print(
                    f"{case:<26} {dname:<9} {ms['ours']:>8.3f} {ms['torch']:>9.3f} "
                    f"{ms['torch'] / ms['ours']:>9.2f}x {ours_gbs:>9.0f} {copy_gbs:>9.0f} "
                    f"{ours_gbs / copy_gbs:>6.0%}  {'FAIL ' + ', '.join(bad) if bad else 'ok'}"
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

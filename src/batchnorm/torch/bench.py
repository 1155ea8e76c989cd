"""``batchnorm bench --torch``: our drop-in modules against torch.nn.BatchNorm*d on CPU.

For each case, the median time of a training forward, a training forward+backward through
autograd (``torch.autograd.grad`` of the output with respect to input, weight and bias) and
an eval forward, for our module and PyTorch's, with the same thread count; and a
``Tensor.copy_`` of the same bytes (the memory-bandwidth floor). Every contender is warmed
up first, then they alternate round by round (A B C A B C ...), so that allocator state and
machine drift hit all alike.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

DEFAULT_CASES = (
    "60x100",
    "256x1024",
    "32x64x56x56",
    "32x64x56x56/cl",
    "32x2048x7x7",
    "8x3x224x224",
)
OPS = ("forward", "forward_backward", "eval")
LABELS = {"forward": "train fwd", "forward_backward": "fwd+bwd", "eval": "eval fwd"}


def parse_case(text: str) -> tuple[tuple[int, ...], bool]:
    """``32x64x56x56/cl`` -> ((32, 64, 56, 56), True)."""
    spec = text.strip().lower()
    channels_last = spec.endswith("/cl")
    spec = spec.removesuffix("/cl")
    try:
        shape = tuple(int(p) for p in spec.replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(f"bad case {text!r}: expected dimensions like 32x64x56x56") from None
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise ValueError(f"bad case {text!r}: need 2 to 5 positive dimensions (N, C, ...)")
    return shape, channels_last and len(shape) > 2


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _contenders(shape: tuple[int, ...], channels_last: bool, dtype: Any, backend: str) -> Any:
    import torch
    from torch import nn

    import batchnorm.torch as bt

    dims = len(shape) - 2
    native_cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        dy = dy.movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_()
    native = native_cls[dims](shape[1], dtype=dtype)
    ours: Any = bt.convert_model(native_cls[dims](shape[1], dtype=dtype))
    ours.backend = backend
    out: dict[str, dict[str, Callable[[], Any]]] = {}
    for name, m in (("ours", ours), ("torch", native)):
        params = [x, m.weight, m.bias]

        def forward(m: Any = m) -> Any:
            m.train()
            with torch.no_grad():
                return m(x)

        def forward_backward(m: Any = m, params: Any = params) -> Any:
            m.train()
            return torch.autograd.grad(m(x), params, dy)

        def evaluate(m: Any = m) -> Any:
            m.eval()
            with torch.no_grad():
                return m(x)

        out[name] = {"forward": forward, "forward_backward": forward_backward, "eval": evaluate}
    src, dst = x.detach(), torch.empty_like(x)
    out["copy"] = {"forward": lambda: dst.copy_(src)}
    out["route"] = bt.route(x)  # type: ignore[assignment]
    return out


def time_case(
    shape: tuple[int, ...],
    channels_last: bool,
    dtype: Any,
    backend: str,
    repeats: int,
    budget: float,
) -> dict[str, Any]:
    """Medians in ms per contender and op, after warm-up, alternating contenders."""
    import gc

    contenders = _contenders(shape, channels_last, dtype, backend)
    route = contenders.pop("route")
    first: dict[str, float] = {}
    round_s = 0.0
    for name, ops in contenders.items():
        for op, fn in ops.items():
            start = time.perf_counter()
            fn()  # first call: JIT compilation for numba
            first[f"{name} {op}"] = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(2):
                fn()
            round_s += (time.perf_counter() - start) / 2
    rounds = max(5, min(repeats, int(budget / max(round_s, 1e-9))))
    times: dict[str, dict[str, list[float]]] = {
        n: {op: [] for op in ops} for n, ops in contenders.items()
    }
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for op in OPS:
                for name, ops in contenders.items():
                    if op in ops:
                        start = time.perf_counter()
                        ops[op]()
                        times[name][op].append(time.perf_counter() - start)
    finally:
        gc.enable()
    ms = {n: {op: 1e3 * _median(t) for op, t in ts.items()} for n, ts in times.items()}
    name = "x".join(map(str, shape)) + (" cl" if channels_last else "")
    return {"case": name, "route": route, "rounds": rounds, "ms": ms, "first_call_s": first}


def format_table(results: list[dict[str, Any]], threads: int, dtype: str) -> str:
    head = f"{'case':<18} {'pass':<10} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10} "
    head += f"{'copy ms':>8} {'ours/copy':>9}  route"
    lines = [f"batchnorm.torch vs torch.nn, CPU, {dtype}, {threads} thread(s), median ms", head]
    lines.append("-" * len(head))
    for res in results:
        ms = res["ms"]
        copy = ms["copy"]["forward"]
        for i, op in enumerate(OPS):
            ours, native = ms["ours"][op], ms["torch"][op]
            lines.append(
                f"{res['case'] if i == 0 else '':<18} {LABELS[op]:<10} {ours:>9.3f} "
                f"{native:>9.3f} {native / ours:>9.2f}x "
                f"{(f'{copy:.3f}' if i == 0 else ''):>8} {ours / copy:>8.2f}x"
                f"  {res['route'] if i == 0 else ''}".rstrip()
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from batchnorm import backends
    from batchnorm.torch import function

    cases = [parse_case(c) for c in (getattr(args, "cases", None) or DEFAULT_CASES)]
    dtype_name = getattr(args, "dtype", None) or "float32"
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    threads = getattr(args, "threads", None) or 2
    repeats = int(getattr(args, "repeats", None) or 30)
    budget = float(getattr(args, "budget", None) or 8.0)
    wanted = (getattr(args, "backends", None) or "auto").split(",")[0].strip() or "auto"
    try:
        backend = backends.resolve(wanted)
    except (ImportError, ValueError):
        backend = backends.resolve("auto")
    torch.set_num_threads(threads)
    if backend == "numba":
        import numba

        numba.set_num_threads(min(threads, int(numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    results = []
    for shape, channels_last in cases:
        results.append(time_case(shape, channels_last, dtype, backend, repeats, budget))
    print(format_table(results, threads, dtype_name))
    print(
        f"our CPU backend: {backend}; torch {torch.__version__}; route 'torch': the input is "
        f"below batchnorm.torch.function.MIN_NUMEL ({function.MIN_NUMEL}) and runs PyTorch's kernel"
    )
    path = getattr(args, "json", None)
    if path:
        meta = {"threads": threads, "dtype": dtype_name, "backend": backend}
        with open(path, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)
    return 0

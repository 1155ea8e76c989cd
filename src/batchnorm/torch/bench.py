"""``batchnorm bench --torch``: our drop-in modules against torch.nn.BatchNorm*d on CPU.

For each case, the median time of a training forward, a training forward+backward through
autograd (``torch.autograd.grad`` of the output with respect to input, weight and bias) and
an eval forward, for our module and PyTorch's, with the same thread count; and a
``Tensor.copy_`` of the same bytes (the memory-bandwidth floor). Every contender is warmed
up first, then every round runs each once in a freshly shuffled order (seeded), so that
allocator state, cache warmth left by the previous contender and machine drift hit all alike.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from batchnorm.bench import (
    DEFAULT_CASES,
    OP_LABELS,
    OPS,
    Case,
    Contender,
    alternate,
    median,
    parse_case,
    time_once,
)


def _parse_case(text: str) -> Case:
    case = parse_case(text)
    if len(case.shape) > 5:
        raise ValueError(f"bad case {text!r}: torch's BatchNorm*d take 2 to 5 dimensions")
    return case


def _contenders(case: Case, dtype: Any, backend: str) -> tuple[list[Contender], str]:
    """Our module, PyTorch's and a copy of the same bytes; and the route our module takes."""
    import torch
    from torch import nn

    import batchnorm.torch as bt

    shape = case.shape
    dims = len(shape) - 2
    native_cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if case.channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        dy = dy.movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_()
    native = native_cls[dims](shape[1], dtype=dtype)
    ours: Any = bt.convert_model(native_cls[dims](shape[1], dtype=dtype))
    ours.backend = backend
    out = []
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

        out.append(
            Contender(
                name, {"forward": forward, "forward_backward": forward_backward, "eval": evaluate}
            )
        )
    src, dst = x.detach(), torch.empty_like(x)
    out.append(Contender("copy", {"forward": lambda: dst.copy_(src)}))
    return out, bt.route(x)


def time_case(case: Case, dtype: Any, backend: str, repeats: int, budget: float) -> dict[str, Any]:
    """Medians in ms per contender and op, after warm-up, alternating contenders."""
    contenders, route = _contenders(case, dtype, backend)
    first: dict[str, float] = {}
    round_s = 0.0
    for c in contenders:
        for op, fn in c.ops.items():
            first[f"{c.name} {op}"] = time_once(fn)  # first call: JIT compilation for numba
            round_s += (time_once(fn) + time_once(fn)) / 2
    rounds = max(5, min(repeats, int(budget / max(round_s, 1e-9))))
    alternate(contenders, rounds)
    ms = {c.name: {op: 1e3 * median(t) for op, t in c.times.items()} for c in contenders}
    return {"case": case.name, "route": route, "rounds": rounds, "ms": ms, "first_call_s": first}


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
                f"{res['case'] if i == 0 else '':<18} {OP_LABELS[op]:<10} {ours:>9.3f} "
                f"{native:>9.3f} {native / ours:>9.2f}x "
                f"{(f'{copy:.3f}' if i == 0 else ''):>8} {ours / copy:>8.2f}x"
                f"  {res['route'] if i == 0 else ''}".rstrip()
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from batchnorm import kernels as backends
    from batchnorm.torch import routing

    cases = [_parse_case(c) for c in (getattr(args, "cases", None) or DEFAULT_CASES)]
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
    for case in cases:
        results.append(time_case(case, dtype, backend, repeats, budget))
    print(format_table(results, threads, dtype_name))
    print(
        f"our CPU backend: {backend}; torch {torch.__version__}; route 'torch': the input is "
        "below the crossover of batchnorm.torch.routing.CPU_MIN_NUMEL "
        f"({routing.min_numel(False, threads)} at {threads} threads) and runs PyTorch's kernel"
    )
    path = getattr(args, "json", None)
    if path:
        meta = {"threads": threads, "dtype": dtype_name, "backend": backend}
        with open(path, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)
    return 0

"""Time the backends against PyTorch's CPU kernel and against memcpy.

For each case, the median time of a training forward, a training forward+backward and an
eval forward, for each of our backends (through the public functional API, as a user calls
it), PyTorch's CPU ``batch_norm`` with the same thread count, and ``np.copyto`` of the same
bytes (the memory-bandwidth floor). Every contender is warmed up first (the first calls,
JIT compilation included, are reported separately), then the contenders are alternated
round by round, in an order shuffled every round (B A C, C B A, ...), so that allocator
state, cache contents and machine drift hit all alike.

Cases are written ``N,C[,D...]`` (or with ``x``); a ``/cl`` suffix stores the input
channels-last (N, ..., C) and normalizes it with ``axis=-1`` (PyTorch gets the same memory
as a ``channels_last`` tensor).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
OP_LABELS = {"forward": "train fwd", "forward_backward": "fwd+bwd", "eval": "eval fwd"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "cases",
        nargs="*",
        metavar="CASE",
        help="input shapes such as 32x64x56x56 or 32x64x56x56/cl (channels-last); "
        f"default: {' '.join(DEFAULT_CASES)}",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for numba and torch (default: all)"
    )
    parser.add_argument(
        "--repeats", type=int, default=30, help="timed rounds per case (default 30)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=8.0,
        help="seconds of timing per case; big cases get fewer rounds (default 8, min 5 rounds)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends to time; the first is 'ours' in the ratios "
        "(default: numba,numpy, or numpy alone without numba)",
    )
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--torch",
        dest="torch_bench",
        action="store_true",
        help="run the PyTorch-integration benchmark instead (batchnorm.torch.bench)",
    )
    parser.add_argument(
        "--sync",
        action="store_true",
        help="run the SyncBatchNorm benchmark instead (batchnorm.distributed.bench)",
    )


# --- cases --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]  # logical (N, C, ...) shape
    channels_last: bool

    @property
    def name(self) -> str:
        text = "x".join(map(str, self.shape))
        return text + " cl" if self.channels_last else text


def parse_case(text: str) -> Case:
    spec = text.strip().lower()
    channels_last = spec.endswith("/cl")
    if channels_last:
        spec = spec[: -len("/cl")]
    try:
        shape = tuple(int(p) for p in spec.replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(
            f"bad case {text!r}: expected dimensions like 32x64x56x56 (optionally /cl)"
        ) from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"bad case {text!r}: need at least N and C, all positive")
    if channels_last and len(shape) < 3:
        channels_last = False  # (N, C) is already channels-last
    return Case(shape, channels_last)


# --- timing -------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    ops: dict[str, Callable[[], Any]]
    times: dict[str, list[float]] = field(default_factory=dict)
    first_call_s: float = 0.0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(contenders: list[Contender], repeats: int) -> None:
    """Round-robin timing: every round times every (op, contender) once, in shuffled order.

    The order is shuffled every round (seeded, so runs repeat) because a fixed one favours
    whoever follows a pass over the same input: measured here, the second of two identical
    contenders ran 15-30% faster on (32, 2048, 7, 7), reading x warm from the cache that
    the first had just filled.
    """
    import gc
    import random

    pairs = [(op, c) for op in OPS for c in contenders if op in c.ops]
    order = random.Random(0)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            order.shuffle(pairs)
            for op, c in pairs:
                c.times.setdefault(op, []).append(time_once(c.ops[op]))
    finally:
        if enabled:
            gc.enable()


# --- contenders ---------------------------------------------------------------------------
def _ours(name: str, data: dict[str, Any], axis: int) -> Contender:
    from batchnorm import functional as F

    x, dy, w, b, rm, rv = (data[k] for k in ("x", "dy", "w", "b", "rm", "rv"))

    def forward() -> Any:
        return F.batch_norm_forward(x, w, b, rm, rv, training=True, axis=axis, backend=name)

    def forward_backward() -> Any:
        _, cache = F.batch_norm_forward(x, w, b, rm, rv, training=True, axis=axis, backend=name)
        return F.batch_norm_backward(dy, cache)

    def evaluate() -> Any:
        return F.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis, backend=name)

    return Contender(
        name, {"forward": forward, "forward_backward": forward_backward, "eval": evaluate}
    )


def _torch(data: dict[str, Any], case: Case) -> Contender:
    import torch
    import torch.nn.functional as tF

    def t(a: Any) -> Any:
        return torch.from_numpy(a)

    # x and dy are stored as our contenders see them; channels-last arrays become NCHW views
    # with channels_last strides, which PyTorch's CPU kernel handles natively
    nd = len(case.shape)
    perm = (0, nd - 1, *range(1, nd - 1)) if case.channels_last else tuple(range(nd))
    x = t(data["x"]).permute(perm)
    dy = t(data["dy"]).permute(perm)
    w, b, rm, rv = (t(data[k]).clone() for k in ("w", "b", "rm", "rv"))
    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)
    bg = b.detach().requires_grad_(True)

    def forward() -> Any:
        with torch.no_grad():
            return tF.batch_norm(x, rm, rv, w, b, training=True)

    def forward_backward() -> Any:
        y = tF.batch_norm(xg, rm, rv, wg, bg, training=True)
        return torch.autograd.grad(y, (xg, wg, bg), dy)

    def evaluate() -> Any:
        with torch.no_grad():
            return tF.batch_norm(x, rm, rv, w, b, training=False)

    return Contender(
        "torch", {"forward": forward, "forward_backward": forward_backward, "eval": evaluate}
    )


def _memcpy(data: dict[str, Any]) -> Contender:
    import numpy as np

    x = data["x"]
    dst = np.empty_like(x)
    return Contender("memcpy", {"forward": lambda: np.copyto(dst, x)})


def _reference_times(data: dict[str, Any], case: Case, repeats: int) -> dict[str, Any]:
    """The seed's pure-Python class on a 2-D case (lists in, lists out)."""
    from batchnorm.reference import BatchNorm

    rows = data["x"].reshape(case.shape[0], -1).tolist()
    grads = data["dy"].reshape(case.shape[0], -1).tolist()
    ref = BatchNorm(len(rows[0]))
    fwd: list[float] = []
    both: list[float] = []
    for _ in range(repeats):
        fwd.append(time_once(lambda: ref.forward(rows)))
        both.append(time_once(lambda: (ref.forward(rows), ref.backward(grads))))
    return {
        "case": case.name,
        "repeats": repeats,
        "forward_ms": 1e3 * median(fwd),
        "forward_backward_ms": 1e3 * median(both),
    }


def _case_data(case: Case, dtype: str, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    stored = case.shape
    if case.channels_last:
        stored = (case.shape[0], *case.shape[2:], case.shape[1])
    channels = case.shape[1]
    x = rng.standard_normal(stored, dtype=np.float32).astype(dtype, copy=False)
    x *= 2.0
    x += 0.5
    dy = rng.standard_normal(stored, dtype=np.float32).astype(dtype, copy=False)
    return {
        "x": x,
        "dy": dy,
        "w": (1.0 + 0.1 * rng.standard_normal(channels)).astype(dtype),
        "b": (0.1 * rng.standard_normal(channels)).astype(dtype),
        "rm": np.zeros(channels, dtype),
        "rv": np.ones(channels, dtype),
    }


# --- the command --------------------------------------------------------------------------
def _set_threads(threads: int | None, backends: list[str], use_torch: bool) -> int:
    import os

    count = threads
    if "numba" in backends:
        import numba

        limit = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        if count is None:
            count = limit
        if count > limit:
            raise ValueError(
                f"--threads {count} exceeds numba's limit of {limit} "
                "(set NUMBA_NUM_THREADS before starting)"
            )
        numba.set_num_threads(count)
    if count is None:
        count = os.cpu_count() or 1
    if count < 1:
        raise ValueError(f"--threads must be at least 1, got {count}")
    if use_torch:
        import torch

        torch.set_num_threads(count)
    return count


def _versions(use_torch: bool) -> dict[str, str]:
    import platform

    import numpy as np

    from batchnorm import __version__

    out = {"batchnorm": __version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import numba

        out["numba"] = numba.__version__
    except ImportError:
        pass
    if use_torch:
        import torch

        out["torch"] = torch.__version__
    return out


def _case_result(
    case: Case, dtype: str, axis: int, contenders: list[Contender], ours: str, repeats: int
) -> dict[str, Any]:
    import numpy as np

    times = {
        c.name: {op: 1e3 * median(ts) for op, ts in c.times.items()}
        for c in contenders
        if c.name != "memcpy"
    }
    fastest = {c.name: {op: 1e3 * min(ts) for op, ts in c.times.items()} for c in contenders}
    memcpy = next(1e3 * median(c.times["forward"]) for c in contenders if c.name == "memcpy")
    result: dict[str, Any] = {
        "name": case.name,
        "shape": list(case.shape),
        "channels_last": case.channels_last,
        "axis": axis,
        "dtype": dtype,
        "bytes": int(np.prod(case.shape)) * np.dtype(dtype).itemsize,
        "repeats": repeats,
        "memcpy_ms": memcpy,
        "times_ms": times,
        "min_times_ms": fastest,  # the least-disturbed run, for machines shared with others
        "first_call_s": {c.name: c.first_call_s for c in contenders if c.name != "memcpy"},
        "ratios": {},
    }
    if ours in times:
        mine = times[ours]
        if "torch" in times:
            result["ratios"][f"torch_over_{ours}"] = {
                op: times["torch"][op] / mine[op] for op in OPS
            }
        result["ratios"][f"{ours}_over_memcpy"] = {op: mine[op] / memcpy for op in OPS}
    return result


def _print_table(results: list[dict[str, Any]], meta: dict[str, Any], ours: str) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [n for n in meta["contenders"] if n != "memcpy"]
    load = ", ".join(f"{v:.1f}" for v in meta["load_average"] if v is not None)
    table = Table(
        title=f"batch_norm, {meta['dtype']}, {meta['threads']} thread(s), median ms, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}" + (f", load average {load}" if load else ""),
        caption="ratios > 1 under torch/ours mean we are faster; ours/memcpy is the cost "
        "over a copy of x",
    )
    table.add_column("case")
    table.add_column("pass")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("memcpy", justify="right")
    if "torch" in names and ours in names:
        table.add_column(f"torch/{ours}", justify="right")
    if ours in names:
        table.add_column(f"{ours}/memcpy", justify="right")
    for res in results:
        for i, op in enumerate(OPS):
            row = [res["name"] if i == 0 else "", OP_LABELS[op]]
            row += [f"{res['times_ms'][n][op]:.3f}" for n in names]
            row.append(f"{res['memcpy_ms']:.3f}" if i == 0 else "")
            ratios = res["ratios"]
            if f"torch_over_{ours}" in ratios:
                row.append(f"{ratios[f'torch_over_{ours}'][op]:.2f}x")
            if f"{ours}_over_memcpy" in ratios:
                row.append(f"{ratios[f'{ours}_over_memcpy'][op]:.2f}x")
            table.add_row(*row, end_section=i == len(OPS) - 1)
    console = Console(width=max(Console().width, 124))
    console.print(table)
    compile_s = meta.get("first_call_s", {})
    if compile_s:
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in compile_s.items())
        console.print(f"first calls (JIT compilation for numba), all cases: {parts}")
    ref = meta.get("reference")
    if ref:
        console.print(
            f"seed reference (pure Python lists), {ref['case']}: forward "
            f"{ref['forward_ms']:.2f} ms, forward+backward {ref['forward_backward_ms']:.2f} ms"
        )


def _dispatch(module_name: str, flag: str, args: argparse.Namespace) -> int:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"{flag} needs {module_name}, which is not available here ({exc})"
        ) from exc
    return int(module.run(args) or 0)


def run(args: argparse.Namespace) -> int:
    import datetime
    import json
    import os
    import platform
    import sys

    # numba's OpenMP pool (system libgomp) and PyTorch's (its own libgomp) are two runtimes
    # in one process; with the default wait policy each one's idle threads spin and take
    # the cores from the other's next call (medians 30x worse here). Passive waiting for
    # both, set before either runtime starts, unless the caller chose a policy.
    policy_preset = "OMP_WAIT_POLICY" in os.environ
    late = [m for m in ("torch", "numba.np.ufunc.omppool") if m in sys.modules]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if getattr(args, "torch_bench", False):
        return _dispatch("batchnorm.torch.bench", "--torch", args)
    if getattr(args, "sync", False):
        return _dispatch("batchnorm.distributed.bench", "--sync", args)

    from batchnorm import kernels as bk

    cases = [parse_case(c) for c in (args.cases or DEFAULT_CASES)]
    fastest_first = sorted(bk.available(), key=lambda n: n != "numba")
    spec = args.backends or ",".join(fastest_first)
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    for n in wanted:
        bk.resolve(n)  # a clear error when a named backend is missing
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch is not installed: timing without it")
            use_torch = False
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    threads = _set_threads(args.threads, wanted, use_torch)
    ours = wanted[0]

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = []
    first_calls: dict[str, float] = {}
    for case in cases:
        data = _case_data(case, args.dtype)
        axis = -1 if case.channels_last else 1
        contenders = [_ours(n, data, axis) for n in wanted]
        if use_torch:
            contenders.append(_torch(data, case))
        contenders.append(_memcpy(data))
        for c in contenders:  # warm-up: first calls (JIT) timed apart, then two more rounds
            c.first_call_s = sum(time_once(fn) for fn in c.ops.values())
            first_calls[c.name] = first_calls.get(c.name, 0.0) + c.first_call_s
            for _ in range(2):
                for fn in c.ops.values():
                    fn()
        round_s = sum(time_once(fn) for c in contenders for fn in c.ops.values())
        repeats = max(
            min(5, args.repeats), min(args.repeats, int(args.budget / max(round_s, 1e-9)))
        )
        alternate(contenders, repeats)
        results.append(_case_result(case, args.dtype, axis, contenders, ours, repeats))

    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta: dict[str, Any] = {
        "command": "batchnorm bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "threads": threads,
        "contenders": [c.name for c in contenders],
        "versions": _versions(use_torch),
        "first_call_s": first_calls,
        "load_average": [load_start, load_end],  # 1-minute load before and after
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "omp_wait_policy_from": "environment" if policy_preset else "batchnorm bench",
        "omp_started_before_policy": late,  # runtimes already loaded keep their own policy
    }
    flat = [c for c in cases if len(c.shape) == 2]  # the seed's class takes (N, C) rows
    if flat:
        smallest = min(flat, key=lambda c: _prod(c.shape))
        ref_data = _case_data(smallest, args.dtype)
        meta["reference"] = _reference_times(ref_data, smallest, max(1, min(5, args.repeats)))
    _print_table(results, meta, ours)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "cases": results}, fh, indent=2)
            fh.write("\n")
        print(f"wrote {args.json}")
    return 0


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out

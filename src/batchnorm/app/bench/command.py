"""``batchnorm bench``: ours against PyTorch (and jitted JAX), at one API level at a time.

Levels (``--level``): ``functional`` (one function call forward, then its backward: ours
``batch_norm_forward`` + ``batch_norm_backward``, PyTorch's ``F.batch_norm`` +
``torch.autograd.grad``, a ``jax.jit`` function and its ``jax.vjp``), ``dropin`` (a module's
forward and backward: ``convert_model(nn.BatchNorm2d)`` against ``nn.BatchNorm2d``) and
``sync`` (a SyncBatchNorm training step over real processes).

Every case runs in new processes, with every contender at the user's defaults: the same
thread count (``--threads``, default all cores), no OpenMP wait policy imposed
(``--omp-wait-policy`` sets one for all and is printed). At the functional level each library
runs alone in a process of its own, as its users run it (no other library's thread pool
beside it), the rounds of the processes paired by index; at the drop-in level ours and
``torch.nn`` share one process, as a drop-in user's program does. JAX is an optional
contender (``pip install 'batchnorm[bench]'``). Ratios are medians of per-round ratios, with
their 25th-75th percentiles.

Cases are written ``N,C[,D...]`` (or with ``x``); a ``/cl`` suffix stores the input
channels-last (N, ..., C) and normalizes it with ``axis=-1``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from batchnorm.app.bench.timing import (
    DEFAULT_CASES,
    OP_LABELS,
    OPS,
    Case,
    median,
    parse_case,
    ratio_stats,
)

# glibc's variables that stop it giving freed memory back to the system (--malloc keep)
MALLOC_KEEP = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
KEEP_BYTES = 1 << 30

LEVELS = {
    "functional": "one function call: ours batch_norm_forward + batch_norm_backward; torch "
                  "F.batch_norm + torch.autograd.grad; jax.jit of the forward and of jax.vjp",
    "dropin": "a module: batchnorm.torch.convert_model(nn.BatchNormNd) against "
              "torch.nn.BatchNormNd, forward and torch.autograd.grad",
    "sync": "a SyncBatchNorm training step over real processes",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cases", nargs="*", metavar="CASE",
                        help="input shapes such as 32x64x56x56 or 32x64x56x56/cl "
                             f"(channels-last); default: {' '.join(DEFAULT_CASES)}")
    parser.add_argument("--level", choices=tuple(LEVELS), default="functional",
                        help="API level timed (default functional)")
    parser.add_argument("--torch", dest="level", action="store_const", const="dropin",
                        help="short for --level dropin")
    parser.add_argument("--sync", dest="level", action="store_const", const="sync",
                        help="short for --level sync")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every contender (default: all cores, "
                             f"{os.cpu_count()} here)")
    parser.add_argument("--repeats", type=int, default=30,
                        help="timed rounds per case, or steps per variant for sync (default 30)")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds of timing per case; big cases get fewer rounds "
                             "(default 8, min 5 rounds)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends of ours; the first is 'ours' in the "
                             "ratios and the only one at the dropin and sync levels "
                             "(default: the one a user gets, backend='auto')")
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--no-jax", action="store_true", help="do not time JAX")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None,
                        help="set OMP_WAIT_POLICY for every contender (default: leave the "
                             "environment as it is)")
    parser.add_argument("--malloc", choices=("default", "keep"), default="default",
                        help="keep: glibc keeps freed memory for reuse (MALLOC_MMAP_THRESHOLD_ "
                             "and MALLOC_TRIM_THRESHOLD_ at 1 GiB), so no contender faults its "
                             "outputs' pages in; default: the environment as it is")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--sync-worlds", type=int, nargs="+", default=None, metavar="P",
                        help="sync level: process counts (default 1 2 4)")
    parser.add_argument("--sync-batch", type=int, default=64, metavar="N",
                        help="sync level: examples per process (default 64)")
    parser.add_argument("--engine", choices=("mpi", "gloo"), default=None,
                        help="sync level: how processes talk (default mpi, or "
                             "$BATCHNORM_SYNC_ENGINE)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options every level shares, checked: threads, backends, environment."""
    from batchnorm import kernels

    threads = args.threads if args.threads is not None else (os.cpu_count() or 1)
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    spec = args.backends or kernels.resolve("auto")
    backends = [n.strip() for n in spec.split(",") if n.strip()]
    for n in backends:
        kernels.resolve(n)  # a clear error when a named backend is missing
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.malloc == "keep":
        env.update({name: str(KEEP_BYTES) for name in MALLOC_KEEP})
    malloc = ", ".join(f"{n}={env[n]}" for n in MALLOC_KEEP if n in env) or "glibc's default"
    return {"threads": threads, "backends": backends, "env": env, "malloc": malloc,
            "omp_wait_policy": env.get("OMP_WAIT_POLICY", "unset (each library's default)")}


def installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run(args: argparse.Namespace) -> int:
    opts = settings(args)
    if args.level == "sync":
        from batchnorm.app.bench import sync

        return sync.run(args, opts)
    return run_cases(args, opts)


def run_cases(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    import datetime
    import json
    import platform

    from batchnorm.app.bench import dropin, functional, process, table

    cases = [parse_case(c) for c in (args.cases or DEFAULT_CASES)]
    level = args.level
    backends = opts["backends"] if level == "functional" else opts["backends"][:1]
    if level == "dropin":
        for case in cases:
            dropin.check(case)
    others = [] if args.no_torch else ["torch"]
    if others and not installed("torch"):
        if level == "dropin":
            raise ImportError("--level dropin needs PyTorch: pip install 'batchnorm[torch]'")
        print("PyTorch is not installed: timing without it")
        others = []
    use_jax = level == "functional" and not args.no_jax
    if use_jax and not installed("jax"):
        print("jax is not installed: JAX skipped (pip install 'batchnorm[bench]' adds it)")
        use_jax = False
    # functional: each library alone in its own new process, as its users run it; dropin:
    # ours and torch.nn in one process, as a drop-in user holds both
    if level == "functional":
        groups = [(backends, []), *(([], [o]) for o in others), *([([], ["jax"])] * use_jax)]
        where = "each library in a new process of its own per case, rounds paired by index"
    else:
        groups = [(backends, others)]
        where = "ours and torch.nn in one new process per case"
    print(f"level {level}: {LEVELS[level]}; {where}")
    base = {"level": level, "dtype": args.dtype, "threads": opts["threads"],
            "repeats": args.repeats, "budget": args.budget}
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = []
    for case in cases:
        runs: list[dict[str, Any]] = []
        for mine, theirs in groups:
            rounds = runs[0]["rounds"] if runs else None
            runs.append(process.in_new_process(
                {**base, "case": case.spec, "backends": mine, "others": theirs,
                 "rounds": rounds}, opts["env"]))
        merged = runs[0]
        for extra in runs[1:]:  # memcpy stays the one timed beside ours
            for key in ("raw_ms", "faults", "first_call_s"):
                merged[key].update({k: v for k, v in extra[key].items() if k != "memcpy"})
        results.append(case_result(case, args.dtype, merged, backends[0]))
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta: dict[str, Any] = {
        "command": "batchnorm bench",
        "level": level,
        "api": LEVELS[level],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "threads": opts["threads"],
        "contenders": [*results[0]["min_times_ms"]] if results else [],
        "versions": versions(["torch"] * bool(others) + ["jax"] * use_jax),
        "first_call_s": {n: sum(r["first_call_s"].get(n, 0.0) for r in results)
                         for n in (results[0]["first_call_s"] if results else {})},
        "load_average": [load_start, load_end],  # 1-minute load before and after
        "omp_wait_policy": opts["omp_wait_policy"],
        "malloc": opts["malloc"],
        "processes": where,
    }
    flat = [c for c in cases if len(c.shape) == 2]  # the seed's class takes (N, C) rows
    if level == "functional" and flat:
        smallest = min(flat, key=lambda c: c.shape[0] * c.shape[1])
        meta["reference"] = functional.reference_times(smallest, args.dtype,
                                                       max(1, min(5, args.repeats)))
    table.print_table(results, meta)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "cases": results}, fh, indent=2)
            fh.write("\n")
        print(f"wrote {args.json}")
    return 0


def case_result(case: Case, dtype: str, run: dict[str, Any], ours: str) -> dict[str, Any]:
    """Medians, minima and per-round ratios (median and p25-p75) of one case."""
    import numpy as np

    # contenders in order: ours, the others, memcpy last
    raw: dict[str, dict[str, list[float]]] = dict(
        sorted(run["raw_ms"].items(), key=lambda kv: kv[0] == "memcpy"))
    copy = raw["memcpy"]["forward"]
    ratios: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, list[float]]] = {}

    def add(key: str, op: str, num: list[float], den: list[float]) -> None:
        mid, lo, hi = ratio_stats(num, den)
        ratios.setdefault(key, {})[op] = mid
        spread.setdefault(key, {})[op] = [lo, hi]

    for op in OPS:
        for other in ("torch", "jax"):
            if other in raw and ours in raw:
                add(f"{other}_over_{ours}", op, raw[other][op], raw[ours][op])
        if ours in raw:
            add(f"{ours}_over_memcpy", op, raw[ours][op], copy)
    return {
        "name": case.name,
        "shape": list(case.shape),
        "channels_last": case.channels_last,
        "axis": -1 if case.channels_last else 1,
        "dtype": dtype,
        "bytes": int(np.prod(case.shape)) * np.dtype(dtype).itemsize,
        "repeats": run["rounds"],
        "route": run["route"],
        "memcpy_ms": median(copy),
        "times_ms": {n: {op: median(t) for op, t in ops.items()}
                     for n, ops in raw.items() if n != "memcpy"},
        "min_times_ms": {n: {op: min(t) for op, t in ops.items()} for n, ops in raw.items()},
        "page_faults": {n: {op: median([float(f) for f in fs]) for op, fs in ops.items()}
                        for n, ops in run["faults"].items() if n != "memcpy"},
        "first_call_s": run["first_call_s"],
        "ratios": ratios,
        "ratio_spread": spread,  # 25th and 75th percentiles of the per-round ratios
    }


def versions(others: list[str]) -> dict[str, str]:
    import importlib.metadata
    import platform

    import numpy as np

    from batchnorm import __version__

    out = {"batchnorm": __version__, "numpy": np.__version__, "python": platform.python_version()}
    for name in ("numba", *others):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


__all__ = ["OP_LABELS", "OPS", "Case", "configure", "parse_case", "run"]

"""How the bench times: cases, contenders, alternated rounds, medians and spreads.

Every contender is warmed up first (its first calls, JIT compilation included, are timed
apart), then every round times each (pass, contender) once in an order shuffled every round,
so that allocator state, cache warmth left by the previous contender and machine drift hit
all alike. A ratio is taken round by round (the two contenders ran moments apart) and
reported as the median of the per-round ratios with their 25th-75th percentiles.

Each call's page faults are counted too (``getrusage``, outside the timed interval): an
output whose memory the allocator had given back to the system faults its pages in, which
can cost more than the pass itself (:mod:`batchnorm.kernels.buffers`).
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

OPS = ("forward", "forward_backward", "eval")
OP_LABELS = {"forward": "train fwd", "forward_backward": "fwd+bwd", "eval": "eval fwd"}
DEFAULT_CASES = (
    "60x100",
    "256x1024",
    "32x64x56x56",
    "32x64x56x56/cl",
    "32x2048x7x7",
    "8x3x224x224",
)


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]  # logical (N, C, ...) shape
    channels_last: bool

    @property
    def name(self) -> str:
        text = "x".join(map(str, self.shape))
        return text + " cl" if self.channels_last else text

    @property
    def spec(self) -> str:
        """The text :func:`parse_case` reads back."""
        return "x".join(map(str, self.shape)) + ("/cl" if self.channels_last else "")


def parse_case(text: str) -> Case:
    """``N x C [x D ...]`` (``x`` or ``,``), with ``/cl`` for channels-last storage."""
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


@dataclass
class Contender:
    name: str
    ops: dict[str, Callable[[], Any]]
    times: dict[str, list[float]] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(default_factory=dict)  # minor page faults per call
    first_call_s: float = 0.0


def median(values: list[float]) -> float:
    return percentile(values, 50.0)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (NumPy's default), without NumPy."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def minor_faults() -> int:
    """This process's minor page faults so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternated(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 2,
    timer: Callable[[Callable[[], Any]], float] = time_once,
) -> dict[str, list[float]]:
    """Each function's time per call, ``rounds`` of them: after ``warmup`` untimed rounds,
    every round calls each once in an order shuffled every round (seeded: a rerun, or every
    rank of a distributed run, uses the same orders). ``timer`` times one call (default
    the wall clock, in seconds; a GPU script passes one with device events).

    The timing loop of the scripts in ``benchmarks/``; the bench's own :func:`alternate`
    also counts page faults per pass.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    order = random.Random(0)
    for _ in range(rounds):
        order.shuffle(items)
        for name, fn in items:
            times[name].append(timer(fn))
    return times


def warm_up(contenders: list[Contender]) -> float:
    """First calls timed apart (JIT), two more rounds; returns the seconds of one round."""
    for c in contenders:
        c.first_call_s = sum(time_once(fn) for fn in c.ops.values())
        for _ in range(2):
            for fn in c.ops.values():
                fn()
    return sum(time_once(fn) for c in contenders for fn in c.ops.values())


def rounds_for(round_s: float, repeats: int, budget: float) -> int:
    """As many rounds as fit in ``budget`` seconds, at most ``repeats`` and at least 5."""
    return max(min(5, repeats), min(repeats, int(budget / max(round_s, 1e-9))))


def alternate(contenders: list[Contender], rounds: int) -> None:
    """Round-robin timing: every round times every (op, contender) once, in shuffled order.

    The order is shuffled every round (seeded, so runs repeat) because a fixed one favours
    whoever follows a pass over the same input: measured here, the second of two identical
    contenders ran 15-30% faster on (32, 2048, 7, 7), reading x warm from the cache that
    the first had just filled.
    """
    pairs = [(op, c) for op in OPS for c in contenders if op in c.ops]
    order = random.Random(0)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            order.shuffle(pairs)
            for op, c in pairs:
                before = minor_faults()
                c.times.setdefault(op, []).append(time_once(c.ops[op]))
                c.faults.setdefault(op, []).append(minor_faults() - before)
    finally:
        if enabled:
            gc.enable()


def ratio_stats(numerator: list[float], denominator: list[float]) -> list[float]:
    """[median, p25, p75] of the per-round ratios numerator[i] / denominator[i]."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=False) if b > 0]
    return [median(ratios), percentile(ratios, 25.0), percentile(ratios, 75.0)]

"""One case timed in a new Python process, as a user's program would run it.

Nothing carries over from another case or contender group: no warm JIT, no thread pool
started by a library the user's program would not hold, no allocator state. The parent
sends a JSON spec on the command line and reads the JSON result from the last line of
stdout::

    python -m batchnorm.app.bench.process '{"level": "functional", "case": "60x100", ...}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from batchnorm.app.bench import dropin, functional
from batchnorm.app.bench.timing import Contender, alternate, parse_case, rounds_for, warm_up


def set_threads(threads: int, backends: list[str], others: list[str]) -> None:
    """The same thread count for every contender of the process."""
    if "numba" in backends:
        import numba

        limit = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        if threads > limit:
            raise ValueError(f"--threads {threads} exceeds numba's limit of {limit} "
                             "(set NUMBA_NUM_THREADS before starting)")
        numba.set_num_threads(threads)
    if "torch" in others:
        import torch

        torch.set_num_threads(threads)
    if "jax" in others and threads < (os.cpu_count() or 1) and hasattr(os, "sched_setaffinity"):
        # XLA's CPU client has no thread-count setting: give it `threads` cores
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-round times (ms) of every contender of one case, in this process."""
    case = parse_case(spec["case"])
    backends, others = list(spec["backends"]), list(spec["others"])
    set_threads(int(spec["threads"]), backends, others)
    route = None
    contenders: list[Contender]
    if spec["level"] == "dropin":
        contenders, route = dropin.contenders(case, spec["dtype"], backends[0])
        if not others:  # ours alone was asked for
            contenders = [c for c in contenders if c.name != "torch"]
    else:
        contenders = functional.contenders(case, spec["dtype"], backends, others)
    round_s = warm_up(contenders)
    rounds = spec.get("rounds") or rounds_for(round_s, int(spec["repeats"]), spec["budget"])
    alternate(contenders, rounds)
    return {
        "rounds": rounds,
        "route": route,
        "first_call_s": {c.name: c.first_call_s for c in contenders},
        "raw_ms": {c.name: {op: [1e3 * t for t in ts] for op, ts in c.times.items()}
                   for c in contenders},
        "faults": {c.name: c.faults for c in contenders},
    }


def in_new_process(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """:func:`measure` in a new interpreter; its error, if any, raised here."""
    proc = subprocess.run(
        [sys.executable, "-m", "batchnorm.app.bench.process", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"timing {spec['case']} ({', '.join(spec['backends'] + spec['others'])}"
                           f") failed in its process: {detail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))

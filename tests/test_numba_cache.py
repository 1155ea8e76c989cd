"""The compiled-kernel cache across real processes: concurrent first use, damaged files.

Each child process normalizes a 2-D batch (rows kernels, one compiled call per pass) and
checks y and dx against the closed forms written out here in float64, then prints what its
cache did. The cache directory is a fresh tmp dir through ``BATCHNORM_CACHE_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

CHILD = r"""
import json, sys
import numpy as np
from batchnorm import functional as F, kernels

rng = np.random.default_rng(int(sys.argv[1]))
x = rng.standard_normal((64, 5)) * 3 + 1
dy = rng.standard_normal((64, 5))
w, b = rng.standard_normal(5), rng.standard_normal(5)
y, cache = F.batch_norm_forward(x, w, b, backend="numba")
dx, dw, db = F.batch_norm_backward(dy, cache)

mean, var = x.mean(0), x.var(0)
xhat = (x - mean) / np.sqrt(var + 1e-5)
m = x.shape[0]
want_dx = w / np.sqrt(var + 1e-5) / m * (m * dy - dy.sum(0) - xhat * (dy * xhat).sum(0))
err = max(np.abs(y - (xhat * w + b)).max(), np.abs(dx - want_dx).max())
print(json.dumps({"err": float(err), "cache": kernels.cache_info()}))
"""


def _run(cache_dir: Path, seeds: list[int]) -> list[dict]:
    env = {**os.environ, "BATCHNORM_CACHE_DIR": str(cache_dir)}
    env.pop("BATCHNORM_BACKEND", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(seed)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in seeds
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_four_processes_at_once_then_damaged_files(tmp_path: Path) -> None:
    results = _run(tmp_path, [0, 1, 2, 3])  # started together on an empty cache
    for r in results:
        assert r["err"] < 1e-12
    compiled = sum(r["cache"]["this_process"]["compiled"] for r in results)
    assert compiled >= 1  # somebody compiled...
    assert any(r["cache"]["this_process"]["loaded"] for r in results)  # ...the others loaded
    info = results[-1]["cache"]
    assert info["exists"] and info["entries"] >= 2

    # a later process compiles nothing
    (again,) = _run(tmp_path, [4])
    assert again["err"] < 1e-12 and again["cache"]["this_process"]["compiled"] == 0

    # every cache file damaged: index files garbage, data files truncated
    files = list(Path(info["directory"]).glob("*.nb[ic]"))
    assert files
    for path in files:
        if path.suffix == ".nbi":
            path.write_bytes(b"not a pickle")
        else:
            path.write_bytes(path.read_bytes()[:100])
    (damaged,) = _run(tmp_path, [5])
    assert damaged["err"] < 1e-12
    assert damaged["cache"]["this_process"]["dropped"] >= 1  # rebuilt, not fatal
    (rebuilt,) = _run(tmp_path, [6])
    assert rebuilt["err"] < 1e-12 and rebuilt["cache"]["this_process"]["compiled"] == 0


def test_unusable_cache_directory_is_skipped(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache directory cannot be created under a file")
    (r,) = _run(blocker, [7])
    assert r["err"] < 1e-12
    assert not r["cache"]["exists"]


def test_serial_and_parallel_builds_keep_separate_entries() -> None:
    """numba keys entries by name and bytecode, not flags: one name would mix the builds."""
    from batchnorm.kernels.numba import fused, rows, segments

    for kernel in (rows.stats, rows.normalize, segments.grad_sums, fused.forward[True]):
        serial = kernel.serial._cache._cache_file._index_path
        parallel = kernel.parallel._cache._cache_file._index_path
        assert serial != parallel


def test_every_compiled_kernel_has_its_own_name() -> None:
    """Templates (normalize / grad_input, rows / segments) give each compiled function its
    own qualified name: numba's symbol is that name, a per-process counter and the argument
    types, so two kernels of one name compiled in different processes and loaded from the
    cache into one could define one symbol twice and bind calls to the wrong code."""
    from batchnorm.kernels.numba import config, fused, rows, segments

    kernels = [k for mod in (rows, segments, fused) for k in vars(mod).values()
               if isinstance(k, config.Kernel)]  # fmt: skip
    kernels += [*fused.forward.values(), *fused.backward.values()]
    kernels = list({id(k): k for k in kernels}.values())
    funcs = [d.py_func for k in kernels for d in (k.serial, k.parallel)]
    funcs += [f.py_func for f in (rows.normalize_chunk, rows.grad_input_chunk)]
    names = [f"{f.__module__}.{f.__qualname__}" for f in funcs]
    assert len(kernels) >= 8
    assert len(set(names)) == len(names), sorted(names)

"""Cold start: the first BatchNorm2d(64) forward+backward on (32, 64, 56, 56) in new processes.

    .venv/bin/python benchmarks/cold_start.py [--processes 3] [--cache-dir DIR] [--json PATH]

Runs one process after another on the same compiled-kernel cache (a fresh temporary
directory unless ``--cache-dir`` is given): the first compiles what the call needs, the
next ones load it. Each prints its import time and its first forward+backward, the second
one including numba's own import and its first-call set-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, time
t0 = time.perf_counter()
import numpy as np
import batchnorm as bn
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((32, 64, 56, 56)).astype(np.float32)
dy = np.ones_like(x)
layer = bn.BatchNorm2d(64)
t2 = time.perf_counter()
layer(x)
layer.backward(dy)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_fwd_bwd_s": t3 - t2,
                  "cache": bn.kernels.cache_info()["this_process"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the per-process results here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BATCHNORM_CACHE_DIR": args.cache_dir or tmp}
        print(f"cache directory: {env['BATCHNORM_CACHE_DIR']}, load {os.getloadavg()[:2]}")
        for i in range(args.processes):
            out = subprocess.run(
                [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(
                f"process {i + 1}: import {r['import_s']:.2f} s, first fwd+bwd "
                f"{r['first_fwd_bwd_s']:.2f} s, cache {r['cache']}"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"empty cache first": args.cache_dir is None, "processes": rows}, fh,
                      indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()

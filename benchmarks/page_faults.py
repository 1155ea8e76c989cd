"""Page faults in a training loop: ours with and without recycled outputs, and PyTorch.

    .venv/bin/python benchmarks/page_faults.py [--shape 256 1024] [--processes 3] [--json PATH]

A user's loop (forward, then backward, again and again) in new processes, under two glibc
settings: its default, where whether freed output memory goes back to the system (and the
next call faults it in again) depends on what else the heap holds, and
``MALLOC_MMAP_THRESHOLD_=131072``, where every block of 128 KiB or more is mapped and
unmapped (the worst case, what the default drifts into). Ours runs with its recycled outputs
(:mod:`batchnorm.kernels.buffers`) and with them switched off; PyTorch is
``F.batch_norm`` + ``torch.autograd.grad``. Each process prints the median ms of a
forward+backward and its minor page faults per call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import numpy as np
which, shape = sys.argv[1], tuple(int(s) for s in sys.argv[2:])
rng = np.random.default_rng(0)
x = rng.standard_normal(shape, dtype=np.float32)
dy = rng.standard_normal(shape, dtype=np.float32)
if which == "torch":
    import torch
    import torch.nn.functional as F
    xt = torch.from_numpy(x).requires_grad_()
    w = torch.ones(shape[1], requires_grad=True)
    b = torch.zeros(shape[1], requires_grad=True)
    rm, rv, g = torch.zeros(shape[1]), torch.ones(shape[1]), torch.from_numpy(dy)
    def step():
        y = F.batch_norm(xt, rm, rv, w, b, True, 0.1, 1e-5)
        torch.autograd.grad(y, (xt, w, b), g)
else:
    from batchnorm import functional
    from batchnorm.kernels import buffers
    if which == "ours, not recycled":
        buffers.MIN_BYTES = 1 << 62
    w, b = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    def step():
        y, cache = functional.batch_norm_forward(x, w, b, rm, rv, training=True)
        functional.batch_norm_backward(dy, cache)
for _ in range(10):
    step()
times, faults = [], []
for _ in range(200):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"ms": 1e3 * float(np.median(times)), "faults": float(np.median(faults))}))
"""

WHO = ("ours", "ours, not recycled", "torch")
MALLOC = {
    "glibc default": {},
    "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    env0 = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_",
                                                              "MALLOC_TRIM_THRESHOLD_")}
    results = []
    for setting, extra in MALLOC.items():
        for _ in range(args.processes):
            for who in WHO:  # one process each, interleaved
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, who, *map(str, args.shape)],
                    env={**env0, **extra}, capture_output=True, text=True, check=True,
                )
                row = {"malloc": setting, "who": who, **json.loads(out.stdout.splitlines()[-1])}
                results.append(row)
                print(f"{setting:30s} {who:20s} {row['ms']:7.3f} ms  {row['faults']:6.0f} faults")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"shape": args.shape, "float32": True, "rows": results}, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()

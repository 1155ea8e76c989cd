"""PyTorch's BN and ours in one process, default environment: do the thread pools collide?

    .venv/bin/python benchmarks/threads.py [--layer default|omp|workqueue|tbb] [--threads 2]

``default`` is what ``import batchnorm`` chooses; the others force numba's threading layer
(``NUMBA_THREADING_LAYER``) before numba starts its pool. Nothing else in the environment
is set (no OMP_WAIT_POLICY). Each round runs PyTorch's training fwd+bwd, then ours, on the
same array, alternated; medians in ms. A pool that spins after its parallel region steals
the cores the other pool needs next. On a shared machine wall times are noisy, so the
script also measures the spinning itself: the CPU time the process burns during a 20 ms
sleep right after each call (threads that wait passively burn none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

CASES = [(1024, 512), (4096, 256), (32, 64, 56, 56), (16, 128, 28, 28)]


def time_case(shape: tuple[int, ...], repeats: int) -> str:
    import numpy as np
    import torch

    from batchnorm import functional as F
    from batchnorm.app.bench.timing import alternated

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.ones(c, requires_grad=True)
    bt = torch.zeros(c, requires_grad=True)
    dyt = torch.from_numpy(dy)

    def torch_step() -> None:
        y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
        torch.autograd.grad(y, (xt, wt, bt), dyt)

    def our_step() -> None:
        _, cache = F.batch_norm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32))
        F.batch_norm_backward(dy, cache)

    steps = (("torch", torch_step), ("ours", our_step))
    times = alternated(dict(steps), repeats, warmup=3)  # back to back, as in a training loop
    spin: dict[str, list[float]] = {"torch": [], "ours": []}
    for _ in range(repeats):  # then the spinning, apart (a sleep lets the pool doze off)
        for name, fn in steps:
            fn()
            c0 = time.process_time()
            time.sleep(0.02)
            spin[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    idle = {k: statistics.median(v) * 1e3 for k, v in spin.items()}
    return (
        f"{'x'.join(map(str, shape)):>14} {med['torch']:9.3f} {med['ours']:9.3f}"
        f" {idle['torch']:12.2f} {idle['ours']:12.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    if args.layer != "default":
        os.environ["NUMBA_THREADING_LAYER"] = args.layer
    import numba
    import torch

    from batchnorm import kernels

    torch.set_num_threads(args.threads)
    if hasattr(kernels, "threads"):
        kernels.threads(args.threads)
    else:
        numba.set_num_threads(args.threads)
    rows = [time_case(shape, args.repeats) for shape in CASES]
    layer = numba.threading_layer()
    print(f"numba threading layer: {layer}, threads {args.threads}")
    print(
        f"{'shape':>14} {'torch ms':>9} {'ours ms':>9} {'cpu ms idle':>12} {'cpu ms idle':>12}"
    )
    print(f"{'':>14} {'':>9} {'':>9} {'after torch':>12} {'after ours':>12}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

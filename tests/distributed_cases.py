"""Functions that run inside launched processes (batchnorm.distributed.launch).

Not a test module: tests/test_distributed_*.py launch these in 1-4 real processes (MPI or
gloo over 127.0.0.1). Every process builds the same whole batch from a seed, keeps its own
slice, runs SyncBatchNorm on it and compares with one layer normalizing the whole batch
(computed on every process). Each returns a JSON report of the largest differences; the
tests assert on it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from batchnorm import kernels
from batchnorm.distributed import SyncBatchNorm, TimedComm, as_communicator
from batchnorm.distributed.launch import Context
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

N = 13  # rows of the whole batch
# rows held by each process: "uneven" slices, and slices with one process empty
SPLITS: dict[int, dict[str, list[int]]] = {
    1: {"whole": [13]},
    2: {"uneven": [4, 9], "empty": [0, 13]},
    3: {"uneven": [2, 7, 4], "empty": [5, 0, 8]},
    4: {"uneven": [1, 5, 3, 4], "empty": [6, 2, 0, 5]},
}
# (shape of the whole batch, channel axis, momentum)
SHAPES: list[tuple[tuple[int, ...], int, float | None]] = [
    ((N, 5), 1, 0.1),
    ((N, 3, 7), 1, None),
    ((N, 4, 3, 5), 1, 0.1),
    ((N, 2, 3, 2, 2), 1, 0.3),
    ((N, 6, 4), -1, 0.1),  # channels-last
]
STEPS = 2
NUMPY_CLASSES = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}


def _err(a: Any, ref: Any) -> float:
    """Largest difference, relative to the reference's magnitude when that exceeds 1."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(a - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def _bump(report: dict[str, float], key: str, value: float) -> None:
    report[key] = max(report.get(key, 0.0), value)


def _subgroups(ctx: Context, sizes: list[int]) -> list[tuple[int, Any]]:
    """(P, raw group) for each P: a group of ranks 0..P-1, None on ranks outside it."""
    out: list[tuple[int, Any]] = []
    for p in sizes:
        if ctx.engine == "mpi":
            from mpi4py import MPI

            sub = ctx.raw.Split(0 if ctx.rank < p else MPI.UNDEFINED, ctx.rank)
            out.append((p, None if sub == MPI.COMM_NULL else sub))
        else:
            import torch.distributed as dist

            group = dist.new_group(ranks=list(range(p))) if p < ctx.size else None
            out.append((p, group if ctx.rank < p else None))
    return out


def _batch(shape: tuple[int, ...], seed: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=shape) * rng.uniform(0.5, 2.0, size=shape[-1])
    dy = rng.normal(0.0, 1.0, size=shape)
    return x.astype(dtype), dy.astype(dtype)


def numpy_equality(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """NumPy SyncBatchNorm on P processes vs one BatchNorm on the whole batch."""
    results: dict[str, Any] = {}
    for p, raw in _subgroups(ctx, payload["sizes"]):
        if ctx.rank >= p:
            continue
        comm = as_communicator(raw)  # gloo: None is the default group, all ranks
        assert comm.size == p, (comm, p)
        for split_name, rows in SPLITS[p].items():
            starts = np.concatenate(([0], np.cumsum(rows)))
            lo, hi = int(starts[comm.rank]), int(starts[comm.rank + 1])
            for dtype in ("float64", "float32"):
                key = f"P{p}/{split_name}/{dtype}"
                results[key] = _numpy_case(comm, raw, lo, hi, np.dtype(dtype))
    return results


def _numpy_case(comm: Any, raw: Any, lo: int, hi: int, dtype: np.dtype) -> dict[str, Any]:
    report: dict[str, Any] = {}
    calls = {"allgather": 0, "allreduce_sum": 0}
    for index, (shape, axis, momentum) in enumerate(SHAPES):
        timed = TimedComm(comm)
        # one layer over the raw engine communicator, one over the timed adapter: same values
        layers = [
            SyncBatchNorm(shape[axis], momentum=momentum, process_group=group, dtype=dtype,
                          axis=axis)
            for group in (timed, raw)
        ]
        oracle = NUMPY_CLASSES[len(shape)]
        ref = oracle(shape[axis], momentum=momentum, dtype=dtype, axis=axis)  # whole batch
        plain = oracle(shape[axis], momentum=momentum, dtype=dtype, axis=axis)  # no sync
        rng = np.random.default_rng(100 + index)
        w = rng.uniform(0.5, 1.5, shape[axis]).astype(dtype)
        b = rng.normal(0.0, 1.0, shape[axis]).astype(dtype)
        for layer in (*layers, ref, plain):
            assert layer.weight is not None and layer.bias is not None
            layer.weight.data[...] = w
            layer.bias.data[...] = b
        for step in range(STEPS):
            x, dy = _batch(shape, 1000 * index + step, dtype)
            y_ref = ref(x)
            dx_ref = ref.backward(dy)
            ys = []
            for layer in layers:
                y = layer(x[lo:hi])
                dx = layer.backward(dy[lo:hi])
                assert y.dtype == dtype and dx.dtype == dtype and y.shape == x[lo:hi].shape
                _bump(report, "y", _err(y, y_ref[lo:hi]))
                _bump(report, "dx", _err(dx, dx_ref[lo:hi]))
                ys.append(y)
            _bump(report, "raw_vs_adapter", _err(ys[1], ys[0]))
            if 0 < hi - lo and hi - lo < x.shape[0]:
                try:  # negative control: without sync the slice's statistics differ
                    _bump(report, "unsynced_y", _err(plain(x[lo:hi]), y_ref[lo:hi]))
                    plain.backward(dy[lo:hi])
                except ValueError:  # one value per channel in this slice alone
                    pass
        for layer in layers:
            assert layer.weight is not None and layer.bias is not None
            assert ref.weight is not None and ref.bias is not None
            assert layer.weight.grad is not None and layer.bias.grad is not None
            grads = comm.allreduce_sum(np.concatenate((layer.weight.grad, layer.bias.grad)))
            c = shape[axis]
            _bump(report, "dweight_summed", _err(grads[:c], ref.weight.grad))
            _bump(report, "dbias_summed", _err(grads[c:], ref.bias.grad))
            _bump(report, "running_mean", _err(layer.running_mean, ref.running_mean))
            _bump(report, "running_var", _err(layer.running_var, ref.running_var))
            assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == STEPS
            layer.eval()
        ref.eval()
        x, _ = _batch(shape, 1000 * index + 99, dtype)
        before = timed.calls
        _bump(report, "eval_y", _err(layers[0](x[lo:hi]), ref(x)[lo:hi]))
        report["eval_calls"] = report.get("eval_calls", 0) + timed.calls - before
        for name in calls:
            calls[name] += timed.stats[name].calls
            report[f"{name}_elements_per_call"] = timed.stats[name].elements // max(
                1, timed.stats[name].calls)
    report["calls_per_step"] = {k: v / (len(SHAPES) * STEPS) for k, v in calls.items()}
    report["backend"] = kernels.resolve("auto")
    return report


def torch_equality(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """batchnorm.torch.SyncBatchNorm on P gloo processes vs torch's BatchNorm on the batch."""
    import torch
    import torch.distributed as dist

    import batchnorm.torch.sync as S

    counted = {"all_gather": 0, "all_reduce": 0}
    gather, reduce_ = S._all_gather, dist.all_reduce

    def counting_gather(*args: Any) -> Any:
        counted["all_gather"] += 1
        return gather(*args)

    def counting_reduce(*args: Any, **kwargs: Any) -> Any:
        counted["all_reduce"] += 1
        return reduce_(*args, **kwargs)

    classes = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}
    results: dict[str, Any] = {}
    for p, group in _subgroups(ctx, payload["sizes"]):
        if ctx.rank >= p:
            continue
        rank = dist.get_rank(group)
        for split_name, rows in SPLITS[p].items():
            starts = np.concatenate(([0], np.cumsum(rows)))
            lo, hi = int(starts[rank]), int(starts[rank + 1])
            for dtype in (torch.float64, torch.float32):
                report: dict[str, Any] = {}
                for index, (shape, axis, momentum) in enumerate(SHAPES):
                    if axis != 1:
                        continue  # torch modules take channels on dim 1
                    c = shape[1]
                    ref = classes[len(shape)](c, momentum=momentum, dtype=dtype)
                    with torch.no_grad():
                        ref.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(7))
                        ref.bias.normal_(generator=torch.Generator().manual_seed(8))
                    sync = S.convert_sync_batchnorm(
                        classes[len(shape)](c, momentum=momentum, dtype=dtype), group)
                    assert isinstance(sync, S.SyncBatchNorm)
                    sync.load_state_dict(ref.state_dict())
                    S._all_gather, dist.all_reduce = counting_gather, counting_reduce
                    start = dict(counted)
                    for step in range(STEPS):
                        xn, dyn = _batch(shape, 1000 * index + step, np.float64)
                        x = torch.from_numpy(xn).to(dtype)
                        dy = torch.from_numpy(dyn).to(dtype)
                        xr = x.clone().requires_grad_(True)
                        y_ref = ref(xr)
                        y_ref.backward(dy)
                        xs = x[lo:hi].clone().requires_grad_(True)
                        y = sync(xs)
                        y.backward(dy[lo:hi])
                        assert xs.grad is not None and xr.grad is not None
                        _bump(report, "y", _err(y.detach(), y_ref.detach()[lo:hi]))
                        _bump(report, "dx", _err(xs.grad, xr.grad[lo:hi]))
                    S._all_gather, dist.all_reduce = gather, reduce_
                    if p > 1:
                        for name in counted:
                            report[f"{name}_per_layer"] = max(
                                report.get(f"{name}_per_layer", 0),
                                (counted[name] - start[name]) / STEPS)
                    grads = torch.cat((sync.weight.grad, sync.bias.grad)).to(torch.float64)
                    dist.all_reduce(grads, group=group)
                    _bump(report, "dweight_summed", _err(grads[:c], ref.weight.grad))
                    _bump(report, "dbias_summed", _err(grads[c:], ref.bias.grad))
                    _bump(report, "running_mean", _err(sync.running_mean, ref.running_mean))
                    _bump(report, "running_var", _err(sync.running_var, ref.running_var))
                    assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked)
                    sync.eval()
                    ref.eval()
                    xe = torch.from_numpy(_batch(shape, 77, np.float64)[0]).to(dtype)
                    S._all_gather, dist.all_reduce = counting_gather, counting_reduce
                    before = dict(counted)
                    with torch.no_grad():
                        _bump(report, "eval_y", _err(sync(xe[lo:hi]), ref(xe)[lo:hi]))
                    S._all_gather, dist.all_reduce = gather, reduce_
                    report["eval_calls"] = report.get("eval_calls", 0) + sum(
                        counted[k] - before[k] for k in counted)
                results[f"P{p}/{split_name}/{str(dtype).split('.')[-1]}"] = report
    return results


def gloo_all(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Both modules in one gloo launch (torch starts slowly): {"numpy": ..., "torch": ...}."""
    return {"numpy": numpy_equality(ctx, payload), "torch": torch_equality(ctx, payload)}


def hang(ctx: Context, payload: dict[str, Any]) -> None:
    """Rank 1 skips the collective that rank 0 waits in: the launcher must time out."""
    if ctx.rank == 1:
        time.sleep(float(payload["sleep"]))
        return
    layer = SyncBatchNorm(3, process_group=ctx.comm)
    layer(np.ones((4, 3), np.float32))


def fail(ctx: Context, payload: dict[str, Any]) -> None:
    """Rank 1 raises while rank 0 waits in a collective: the launch must fail fast."""
    if ctx.rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    SyncBatchNorm(3, process_group=ctx.comm)(np.ones((4, 3), np.float32))



def _layer(module: str, ctx: Context, features: int, timeout: float) -> Any:
    if module == "numpy":
        return SyncBatchNorm(features, process_group=ctx.raw, timeout=timeout)
    import batchnorm.torch as bt

    return bt.SyncBatchNorm(features, timeout=timeout)


def _input(module: str, shape: tuple[int, ...]) -> Any:
    x = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    if module == "numpy":
        return x
    import torch

    return torch.from_numpy(x)


def _report(ctx: Context, report: dict[str, Any]) -> None:
    """This rank's result, as the launcher reads it, written atomically."""
    tmp = ctx.workdir / f"rank{ctx.rank}.tmp"
    tmp.write_text(json.dumps(report))
    tmp.replace(ctx.workdir / f"rank{ctx.rank}.json")


def misuse(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Ranks that disagree or fail: each rank reports the error it raised and when.

    ``scenario``: "channels" (rank 1's layer has 6 features, rank 0's 4), "bad_input"
    (rank 1's input has 3 channels), "eval" (rank 1 is in eval mode: it makes no
    collective), "dies" (rank 1 exits before its first collective). The result is written
    here and the process leaves at once: a rank left waiting in a collective (or a dead peer)
    must not hold up the launch's own shutdown.
    """
    import os

    scenario, module, timeout = payload["scenario"], payload["module"], payload["timeout"]
    features = 6 if scenario == "channels" and ctx.rank == 1 else 4
    channels = 3 if scenario == "bad_input" and ctx.rank == 1 else features
    layer = _layer(module, ctx, features, timeout)
    report: dict[str, Any] = {"error": None}
    if ctx.rank == 1 and scenario == "eval":
        layer.eval()
    if ctx.rank == 1 and scenario == "dies":
        _report(ctx, {"died": True})
        os._exit(0)
    start = time.monotonic()
    try:
        layer(_input(module, (5, channels, 3)))
    except Exception as exc:  # noqa: BLE001 - the report is the error
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["seconds"] = time.monotonic() - start
    _report(ctx, report)
    if ctx.rank == 1 and scenario == "eval":  # alive and idle while rank 0 waits
        time.sleep(timeout + 3)
    # leave once every rank has reported (under MPI the first to exit ends the job)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
        (ctx.workdir / f"rank{r}.json").exists() for r in range(ctx.size)
    ):
        time.sleep(0.05)
    sys.stdout.flush()
    os._exit(0)

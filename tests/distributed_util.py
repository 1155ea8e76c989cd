"""Helpers shared by the multi-process tests: launching tests/distributed_cases.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchnorm.distributed.launch import launch

TESTS = Path(__file__).resolve().parent
# every launch is killed after this long; the cases take a few seconds on a busy 2-core box
TIMEOUT = 150.0
# tolerances on max|a - b| / max(1, max|b|) against one process normalizing the whole batch
TOL = {"float64": 1e-10, "float32": 1e-5}
COMPARED = ("y", "dx", "dweight_summed", "dbias_summed", "running_mean", "running_var", "eval_y")


def run_cases(n: int, function: str, payload: Any, engine: str,
              timeout: float = TIMEOUT) -> list[Any]:
    """Run ``distributed_cases:<function>`` in n processes; the numpy backend in each."""
    env = {"PYTHONPATH": str(TESTS), "BATCHNORM_BACKEND": "numpy"}
    return launch(n, f"distributed_cases:{function}", payload, engine=engine, timeout=timeout,
                  env=env)


def merge_reports(per_rank: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Largest value of each figure over the ranks, per case key ("P3/empty/float32")."""
    merged: dict[str, dict[str, Any]] = {}
    for report in per_rank:
        for case, figures in report.items():
            into = merged.setdefault(case, {})
            for name, value in figures.items():
                if isinstance(value, dict):
                    into[name] = value if name not in into else {
                        k: max(v, into[name][k]) for k, v in value.items()}
                else:
                    into[name] = max(value, into.get(name, value))
    return merged


def calls_per_step(case: str) -> dict[str, float]:
    """The NumPy SyncBatchNorm's collectives per training step: forward, an all-gather of the
    4-value agreement header and one of the statistics; backward, one all-reduce. A group of
    one ("P1/...") is plain batch norm: none."""
    if case.startswith("P1/"):
        return {"allgather": 0.0, "allreduce_sum": 0.0}
    return {"allgather": 2.0, "allreduce_sum": 1.0}


def check_equality(case: str, figures: dict[str, Any]) -> None:
    tol = TOL[case.rsplit("/", 1)[1]]
    for name in COMPARED:
        assert name in figures, f"{case}: no figure {name!r} in {figures}"
        assert figures[name] <= tol, (
            f"{case}: {name} differs from one process normalizing the whole batch by "
            f"{figures[name]:.3g} > {tol:g}; all figures: {figures}")
    assert figures["eval_calls"] == 0, f"{case}: eval made {figures['eval_calls']} collectives"
    if "unsynced_y" in figures:  # the control: without sync the same check fails
        assert figures["unsynced_y"] > 1e-2, f"{case}: plain BN matched the whole batch?"

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
              timeout: float = TIMEOUT, backend: str = "numpy") -> list[Any]:
    """Run ``distributed_cases:<function>`` in n processes, on ``backend``'s kernels."""
    env = {"PYTHONPATH": str(TESTS), "BATCHNORM_BACKEND": backend}
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


SCENARIOS = ("channels", "bad_input", "eval", "dies")
MISUSE_TIMEOUT = 3.0  # the collectives' timeout in the misuse cases, seconds


def misuse(engine: str, module: str, scenario: str) -> list[Any]:
    """Two ranks running ``distributed_cases:misuse``: each one's error report."""
    payload = {"scenario": scenario, "module": module, "timeout": MISUSE_TIMEOUT}
    return run_cases(2, "misuse", payload, engine, timeout=60)


def check_misuse(scenario: str, reports: list[Any]) -> None:
    """Every rank that computes raises the same clear error, within the timeout."""
    if scenario in ("channels", "bad_input"):
        want = {"channels": "num_features differ (rank 0: 4, rank 1: 6)",
                "bad_input": "rank 1: input has 3 channels on axis 1, expected 4"}[scenario]
        assert reports[0]["error"] == reports[1]["error"], reports
        assert reports[0]["error"].startswith("DisagreementError: SyncBatchNorm"), reports
        assert want in reports[0]["error"], reports
        assert all(r["seconds"] < MISUSE_TIMEOUT for r in reports), reports
        return
    assert reports[0]["error"].startswith("CollectiveError: SyncBatchNorm"), reports
    assert "all-gather" in reports[0]["error"] and "agreement" in reports[0]["error"], reports
    if scenario == "eval":  # rank 1 computed its eval output; rank 0 waited, then gave up
        assert reports[1]["error"] is None, reports
        assert f"did not complete within {MISUSE_TIMEOUT:g} s" in reports[0]["error"], reports
        assert MISUSE_TIMEOUT <= reports[0]["seconds"] < MISUSE_TIMEOUT + 2, reports
    else:  # the peer's socket closed: rank 0 learns at once
        assert reports[1] == {"died": True}, reports
        assert reports[0]["seconds"] < MISUSE_TIMEOUT + 2, reports

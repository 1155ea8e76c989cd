"""SyncBatchNorm over MPI: real processes under mpiexec (from the pip mpich package)."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("mpi4py")

from batchnorm.distributed.launch import LaunchError, find_mpiexec  # noqa: E402
from distributed_util import (  # noqa: E402
    calls_per_step as _calls,
)
from distributed_util import (  # noqa: E402
    check_equality,
    check_misuse,
    merge_reports,
    misuse,
    run_cases,
)

try:
    find_mpiexec()
except LaunchError as exc:  # pragma: no cover - the Makefile installs mpich
    pytest.skip(str(exc), allow_module_level=True)

# world size of the launch -> the group sizes tested in it (sub-communicators by Split)
LAUNCHES = {1: [1], 2: [2], 3: [3], 4: [1, 2, 3, 4]}
_cache: dict[int, dict[str, dict[str, Any]]] = {}


def _results(n: int) -> dict[str, dict[str, Any]]:
    if n not in _cache:
        _cache[n] = merge_reports(run_cases(n, "numpy_equality", {"sizes": LAUNCHES[n]}, "mpi"))
    return _cache[n]


@pytest.mark.parametrize("n", sorted(LAUNCHES))
def test_mpi_sync_batchnorm_equals_one_process(n: int) -> None:
    results = _results(n)
    expected = {
        f"P{p}/{split}/{dt}"
        for p in LAUNCHES[n]
        for split in (["whole"] if p == 1 else ["uneven", "empty"])
        for dt in ("float64", "float32")
    }
    assert set(results) == expected
    for case, figures in results.items():
        check_equality(case, figures)
        assert figures["calls_per_step"] == _calls(case), case
        assert figures["raw_vs_adapter"] == 0.0, case


def test_mpi_sync_batchnorm_on_the_numba_kernels() -> None:
    """The same equality with the Numba kernels in every process (compiled in each)."""
    pytest.importorskip("numba")
    results = merge_reports(
        run_cases(2, "numpy_equality", {"sizes": [2]}, "mpi", backend="numba", timeout=300)
    )
    assert set(results) == {f"P2/{s}/{dt}" for s in ("uneven", "empty")
                            for dt in ("float64", "float32")}  # fmt: skip
    for case, figures in results.items():
        check_equality(case, figures)
        assert figures["backend"] == "numba", case


def test_mpi_hung_collective_times_out_with_a_clear_error() -> None:
    start = time.monotonic()
    with pytest.raises(LaunchError, match="did not finish within 4 s"):
        run_cases(2, "hang", {"sleep": 60}, "mpi", timeout=4)
    assert time.monotonic() - start < 30  # killed, not waited for


def test_mpi_failing_process_fails_the_launch() -> None:
    with pytest.raises(LaunchError, match="deliberate failure on rank 1"):
        run_cases(2, "fail", {}, "mpi", timeout=60)


@pytest.mark.parametrize("scenario", ["channels", "bad_input", "eval"])
def test_mpi_ranks_that_disagree_or_stall_all_get_a_clear_error(scenario: str) -> None:
    check_misuse(scenario, misuse("mpi", "numpy", scenario))


def test_mpi_rank_that_dies_ends_the_job_at_once() -> None:
    """MPI has no way to tell the survivors: mpiexec ends the whole job (no hang)."""
    start = time.monotonic()
    with pytest.raises(LaunchError):
        misuse("mpi", "numpy", "dies")
    assert time.monotonic() - start < 30

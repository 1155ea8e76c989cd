"""SyncBatchNorm over torch.distributed (gloo on 127.0.0.1): real processes.

One launch of 4 processes covers groups of 1, 2, 3 and 4 (``new_group``) for both the
NumPy module (through the torch adapter) and batchnorm.torch.SyncBatchNorm.
"""

from __future__ import annotations

from typing import Any

import pytest

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_util import (  # noqa: E402
    SCENARIOS,
    check_equality,
    check_misuse,
    merge_reports,
    misuse,
    run_cases,
)
from distributed_util import (  # noqa: E402
    calls_per_step as _calls,
)

SIZES = [1, 2, 3, 4]
_cache: dict[str, dict[str, dict[str, Any]]] = {}


def _results(module: str) -> dict[str, dict[str, Any]]:
    if not _cache:
        per_rank = run_cases(4, "gloo_all", {"sizes": SIZES}, "gloo")
        for name in ("numpy", "torch"):
            _cache[name] = merge_reports([r[name] for r in per_rank])
    return _cache[module]


def _expected() -> set[str]:
    return {
        f"P{p}/{split}/{dt}"
        for p in SIZES
        for split in (["whole"] if p == 1 else ["uneven", "empty"])
        for dt in ("float64", "float32")
    }


def test_gloo_numpy_sync_batchnorm_equals_one_process() -> None:
    results = _results("numpy")
    assert set(results) == _expected()
    for case, figures in results.items():
        check_equality(case, figures)
        assert figures["calls_per_step"] == _calls(case), case


def test_gloo_torch_sync_batchnorm_equals_one_process() -> None:
    results = _results("torch")
    assert set(results) == _expected()
    for case, figures in results.items():
        check_equality(case, figures)
        if not case.startswith("P1/"):  # a group of one is plain batch norm, no collective
            assert figures["all_gather_per_layer"] == 2.0, case  # agreement, statistics
            assert figures["all_reduce_per_layer"] == 1.0, case


def test_gloo_failing_process_fails_the_launch() -> None:
    from batchnorm.distributed.launch import LaunchError

    with pytest.raises(LaunchError, match="deliberate failure on rank 1"):
        run_cases(2, "fail", {}, "gloo", timeout=60)


@pytest.mark.parametrize("module", ["numpy", "torch"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gloo_ranks_that_disagree_or_fail_all_get_a_clear_error(module: str, scenario: str) -> None:
    check_misuse(scenario, misuse("gloo", module, scenario))

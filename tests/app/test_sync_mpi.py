"""The application over MPI: the sync experiment and the sync level of the bench, with real
processes under mpiexec."""

from __future__ import annotations

import pytest

pytest.importorskip("mpi4py")

from batchnorm.distributed.launch import LaunchError, find_mpiexec  # noqa: E402

try:
    find_mpiexec()
except LaunchError as exc:  # pragma: no cover - the Makefile installs mpich
    pytest.skip(str(exc), allow_module_level=True)


def test_sync_experiment_matches_one_process() -> None:
    from batchnorm.app import data
    from batchnorm.app.experiments import sync

    try:
        data.mnist5k_path()
    except (ImportError, FileNotFoundError) as exc:  # pragma: no cover - experiments extra
        pytest.skip(str(exc))

    config = sync.Config(world_size=2, batch_per_process=3, steps=12, eval_every=6,
                         hidden=(16, 16), timeout=120)
    results = sync.run(config)
    assert results.completed and results.steps == [0, 6, 12]
    for arm in sync.ARMS:
        assert len(results.accuracy[arm]) == 3
    # SyncBN over 2 x 3 examples trains exactly like one process with batch 6
    assert results.max_param_diff_sync_vs_single < 1e-5
    gap = max(abs(a - b) for a, b in zip(results.accuracy["sync"], results.accuracy["single"],
                                         strict=True))
    assert gap <= 0.002  # float32 rounding may flip a test digit or two, no more
    # 2 BN layers x (agreement + statistics all-gathers, gradient all-reduce)
    assert results.collective["syncbn_calls_per_step"] == 2 * 3


def test_sync_bench_counts_one_collective_per_forward_and_backward() -> None:
    from batchnorm.app.bench import sync as bench

    rows = bench.measure((1, 2), batch=8, rounds=2, warmup=1, timeout=120)
    assert [r["processes"] for r in rows] == [1, 2]
    one, two = rows
    assert one["syncbn_calls_per_step"] == 0  # a group of one is plain batch norm
    # 3 BN layers x (all-gathers of the 4-value header and of the statistics, one all-reduce)
    assert two["syncbn_calls_per_step"] == 9
    assert two["elements_per_call"] == {"allgather": (4 + 201) // 2, "allreduce_sum": 200}
    for r in rows:
        assert r["step_sync_ms"] > 0 and r["syncbn_collectives_ms"] >= 0
    assert "SyncBN collectives" in bench._table(rows, "title")

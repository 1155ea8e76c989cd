"""SyncBatchNorm pieces in one process: the merge, the adapters, the modules' contracts.

The multi-process equality tests are in test_distributed_mpi.py and test_distributed_gloo.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.distributed import (
    CollectiveStats,
    MPIComm,
    SingleProcess,
    SyncBatchNorm,
    TimedComm,
    as_communicator,
    chan_merge,
    convert_sync_batchnorm,
    merge_all,
)
from batchnorm.distributed.agree import HEADER_SIZE
from batchnorm.nn.layers import mlp


def _summary(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    if x.shape[0] == 0:
        return 0.0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean = x.mean(axis=0)
    return float(x.shape[0]), mean, ((x - mean) ** 2).sum(axis=0)


@pytest.mark.parametrize("rows", [[7], [3, 4], [0, 7], [2, 0, 5], [1, 1, 1, 1, 3], [0, 0, 7, 0],
                                  [5, 0, 0, 0, 0, 2]])
def test_merge_all_equals_the_whole_batch(rows: list[int]) -> None:
    x = np.random.default_rng(len(rows)).normal(5.0, 3.0, size=(sum(rows), 4))
    bounds = np.cumsum([0, *rows])
    parts = [_summary(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    count, mean, m2 = merge_all(*zip(*parts, strict=True))
    assert count == x.shape[0]
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(m2, ((x - x.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-13)


def test_merge_is_stable_far_from_zero() -> None:
    # E[x^2] - E[x]^2 would lose every digit here; Chan's merge keeps them
    x = 1e9 + np.random.default_rng(0).normal(0.0, 1.0, size=(1000, 3))
    parts = [_summary(x[i : i + 125]) for i in range(0, 1000, 125)]
    _, _, m2 = merge_all(*zip(*parts, strict=True))
    np.testing.assert_allclose(m2 / 1000, x.var(axis=0), rtol=1e-6)


def test_merge_all_empty_and_bad_input() -> None:
    z = np.zeros(2)
    count, mean, m2 = merge_all([0, 0], [z, z], [z, z])
    assert count == 0 and not mean.any() and not m2.any()
    assert chan_merge((0.0, z, z), (3.0, z + 1, z + 2))[0] == 3.0
    with pytest.raises(ValueError, match="one \\(count, mean, m2\\) per process"):
        merge_all([1], [z, z], [z])
    with pytest.raises(ValueError, match="non-negative"):
        merge_all([-1, 2], [z, z], [z, z])


class FakeGroup:
    """P processes simulated in one: the other ranks' buffers are given in advance."""

    def __init__(self, others: list[np.ndarray], sums: np.ndarray | None = None) -> None:
        self.others, self.sums = others, sums
        self.rank, self.size = 0, 1 + len(others)

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        if buf.size == HEADER_SIZE:  # the agreement header: the other ranks agree
            return np.stack([buf] * self.size)
        return np.stack([buf, *self.others])

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return buf + (0 if self.sums is None else self.sums)


def test_collective_stats_buffers_and_merge() -> None:
    x = np.random.default_rng(3).normal(size=(9, 2))
    mine, theirs = _summary(x[:4]), _summary(x[4:])
    other = np.concatenate(([theirs[0]], theirs[1], theirs[2]))
    count, mean, m2 = CollectiveStats(FakeGroup([other])).merge_stats(4, mine[1], mine[2])
    assert count == 9 and isinstance(count, int)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(m2, x.var(0) * 9, rtol=1e-13)
    sync = CollectiveStats(FakeGroup([], sums=np.arange(4.0)))
    a, b = sync.sum_grads(np.ones(2), np.full(2, 2.0))
    np.testing.assert_array_equal(a, [1.0, 2.0])
    np.testing.assert_array_equal(b, [4.0, 5.0])


def test_collective_stats_rejects_mismatched_channels() -> None:
    class Short(FakeGroup):
        def allgather(self, buf: np.ndarray) -> np.ndarray:
            return np.zeros((2, buf.size - 2))

    with pytest.raises(RuntimeError, match="same number of channels"):
        CollectiveStats(Short([np.zeros(5)])).merge_stats(2, np.zeros(2), np.zeros(2))


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 4), (4, 3, 2, 5), (3, 3, 2, 2, 2)])
def test_single_process_sync_equals_batchnorm(shape: tuple[int, ...], backend: str) -> None:
    classes = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}
    ref = classes[len(shape)](3, dtype=np.float64, backend=backend)
    timed = TimedComm(SingleProcess())
    layer = SyncBatchNorm(3, process_group=timed, dtype=np.float64, backend=backend)
    rng = np.random.default_rng(1)
    for _ in range(2):
        x, dy = rng.normal(2.0, 3.0, shape), rng.normal(size=shape)
        np.testing.assert_allclose(layer(x), ref(x), rtol=0, atol=1e-14)
        np.testing.assert_allclose(layer.backward(dy), ref.backward(dy), rtol=0, atol=1e-13)
    assert timed.calls == 0  # a group of one is plain batch norm: no collective
    for a, b in zip(layer.state_dict().values(), ref.state_dict().values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    layer.eval()
    ref.eval()
    x = rng.normal(size=shape)
    np.testing.assert_allclose(layer(x), ref(x), rtol=0, atol=1e-14)
    assert timed.calls == 0


def test_eval_without_running_stats_makes_no_collective_call() -> None:
    timed = TimedComm(SingleProcess())
    layer = SyncBatchNorm(2, track_running_stats=False, process_group=timed)
    layer.eval()
    layer(np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32))
    assert timed.calls == 0


def test_one_value_per_channel_uses_the_global_count() -> None:
    other = np.concatenate(([3.0], np.zeros(2), np.ones(2)))  # another process holds 3 rows
    layer = SyncBatchNorm(2, process_group=FakeGroup([other]), dtype=np.float64)
    y = layer(np.ones((1, 2)))  # one row here, four in the group: fine
    assert y.shape == (1, 2)
    empty = np.concatenate(([0.0], np.zeros(2), np.zeros(2)))
    alone = SyncBatchNorm(2, process_group=FakeGroup([empty]), dtype=np.float64)
    before = alone.running_mean.copy()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        alone(np.ones((1, 2)))
    np.testing.assert_array_equal(alone.running_mean, before)


def test_non_finite_anywhere_in_the_group_is_rejected() -> None:
    other = np.concatenate(([3.0], [np.nan, 0.0], np.ones(2)))
    layer = SyncBatchNorm(2, process_group=FakeGroup([other]), dtype=np.float64)
    with pytest.raises(ValueError, match="non-finite"):
        layer(np.ones((4, 2)))
    np.testing.assert_array_equal(layer.running_mean, [0.0, 0.0])


def test_any_ndim_and_bad_input() -> None:
    layer = SyncBatchNorm(3, process_group=SingleProcess(), axis=-1)
    assert layer(np.ones((2, 4, 5, 3), np.float32)).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="at least 2D"):
        layer(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(np.ones((4, 2), np.float32))


def test_as_communicator() -> None:
    single = SingleProcess()
    assert as_communicator(single) is single
    timed = TimedComm(single)
    assert as_communicator(timed) is timed
    with pytest.raises(TypeError, match="mpi4py communicator"):
        as_communicator(object())
    # None outside torch.distributed: a group of one (PyTorch's SyncBatchNorm does the same)
    torch_dist: Any = __import__("sys").modules.get("torch.distributed")
    if torch_dist is None or not torch_dist.is_initialized():
        assert isinstance(as_communicator(None), SingleProcess)


def test_mpi_adapter_on_comm_self() -> None:
    mpi = pytest.importorskip("mpi4py.MPI")
    comm = as_communicator(mpi.COMM_SELF)
    assert isinstance(comm, MPIComm) and comm.size == 1 and comm.rank == 0
    np.testing.assert_array_equal(comm.allgather(np.arange(3.0)), [[0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(comm.allreduce_sum(np.arange(3.0)), [0.0, 1.0, 2.0])


def test_convert_sync_batchnorm_shares_parameters_and_buffers() -> None:
    net = mlp([5, 4, 4, 3], batch_norm=True, rng=0)
    before = net.state_dict()
    old = [m for m in net.modules() if isinstance(m, bn.BatchNorm1d)]
    group = SingleProcess()
    out = convert_sync_batchnorm(net, group)
    assert out is net
    new = [m for m in net.modules() if isinstance(m, SyncBatchNorm)]
    assert len(new) == len(old) == 2
    assert all(m in net.layers for m in new)  # Sequential's list, not just its attributes
    for o, s in zip(old, new, strict=True):
        assert s.weight is o.weight and s.bias is o.bias and s.running_mean is o.running_mean
        assert s.process_group is group
    assert list(net.state_dict()) == list(before)
    single = convert_sync_batchnorm(bn.BatchNorm1d(3), group)
    assert isinstance(single, SyncBatchNorm)
    assert SyncBatchNorm.convert_sync_batchnorm(single) is single


def test_torch_sync_batchnorm_outside_a_group_is_batchnorm() -> None:
    torch = pytest.importorskip("torch")
    from batchnorm.torch.sync import SyncBatchNorm as TorchSync
    from batchnorm.torch.sync import convert_sync_batchnorm as convert

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    bn2d = model[1]
    converted = convert(model)
    assert isinstance(converted[1], TorchSync) and isinstance(converted[2][0], TorchSync)
    assert converted[1].weight is bn2d.weight and converted[1].running_mean is bn2d.running_mean
    import batchnorm.torch as bt

    ours = bt.convert_sync_batchnorm(torch.nn.Sequential(bt.BatchNorm2d(4)))
    assert isinstance(ours[0], TorchSync)  # batchnorm.torch's modules convert too
    ref = torch.nn.BatchNorm2d(4, momentum=None, dtype=torch.float64)
    layer = TorchSync(4, momentum=None, dtype=torch.float64)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.running_var, ref.running_var)
    assert int(layer.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="at least 2D"):
        layer(torch.ones(4))
    with pytest.raises(ValueError, match="expected 4 channels"):
        layer(torch.ones(2, 3))

"""SyncBatchNorm for the NumPy modules: batch statistics over every process's slice.

Forward: first the ranks agree (:mod:`batchnorm.distributed.agree`: one all-gather of a
4-value header; a disagreement or one rank's invalid input raises the same error on every
rank). Then, per channel, each process computes (count, mean, M2) of its own slice; ONE
all-gather of one buffer ``[count, mean(C), M2(C)]``; every process merges the P summaries
with Chan's pairwise formula (:mod:`batchnorm.math`) into the statistics of
the whole batch. Backward: ONE all-reduce of one buffer ``[sum(dy)(C), sum(dy*(x-mean))(C)]``
gives the two global sums of the closed-form dx. Parameter gradients stay this process's
sums, as in PyTorch: data-parallel training all-reduces them with the other gradients.
Eval (with running statistics) and a group of one make no collective call. Every
collective gives up after ``timeout`` seconds with :class:`~batchnorm.distributed.comm.
CollectiveError` naming it (a rank that died, stalled or is in eval mode).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchnorm.distributed import agree
from batchnorm.distributed.comm import (
    CollectiveError,
    Communicator,
    SyncArgs,
    as_communicator,
)
from batchnorm.math import merge_all
from batchnorm.nn.batchnorm import _BatchNorm
from batchnorm.nn.module import Module

__all__ = ["CollectiveStats", "SyncBatchNorm", "convert_sync_batchnorm"]


class CollectiveStats:
    """:class:`batchnorm.functional.StatsSync` over a communicator: one collective per call."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def _collective(self, what: str, call: Any, buf: np.ndarray) -> np.ndarray:
        try:
            return call(buf)  # type: ignore[no-any-return]
        except CollectiveError as exc:
            raise CollectiveError(f"SyncBatchNorm {what}: {exc}") from exc

    def agree(self, header: list[float], axis: int) -> None:
        """One all-gather of every rank's :func:`agree.header`; the same error on every rank
        when they disagree (before any collective sized by the channels)."""
        table = self._collective("agreement", self.comm.allgather, np.array(header))
        agree.check(table.tolist(), axis)

    def merge_stats(
        self, count: int, mean: np.ndarray, m2: np.ndarray
    ) -> tuple[int, np.ndarray, np.ndarray]:
        channels = mean.shape[0]
        buf = np.concatenate(([float(count)], mean, m2))
        table = self._collective("statistics", self.comm.allgather, buf)  # (P, 1 + 2C)
        if table.shape != (self.comm.size, buf.size):
            raise RuntimeError(
                f"all-gather returned shape {table.shape}, expected {(self.comm.size, buf.size)}"
                ": do all processes have the same number of channels?"
            )
        total, mean_g, m2_g = merge_all(
            table[:, 0].tolist(), list(table[:, 1 : 1 + channels]), list(table[:, 1 + channels :])
        )
        return int(round(total)), np.array(mean_g, dtype=np.float64), np.array(m2_g, np.float64)

    def sum_grads(
        self, sum_dy: np.ndarray, sum_dy_xmu: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        channels = sum_dy.shape[0]
        total = self._collective(
            "gradient sums", self.comm.allreduce_sum, np.concatenate((sum_dy, sum_dy_xmu))
        )
        return total[:channels], total[channels:]


class SyncBatchNorm(SyncArgs, _BatchNorm):
    r"""Batch normalization whose training statistics span every process of a group.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with E and Var over the union of the batches of all processes in ``process_group``:
    P processes holding slices of one batch (of any sizes, empty ones included) get the
    output, dx, running statistics and (summed over processes) parameter gradients of one
    process normalizing the whole batch. Each training forward makes one all-gather, each
    backward one all-reduce; eval makes none (with ``track_running_stats=False``, eval
    normalizes with this process's batch alone, as PyTorch's SyncBatchNorm does).

    Args:
        num_features, eps, momentum, affine, track_running_stats: as
            :class:`batchnorm.BatchNorm2d`.
        process_group: an mpi4py communicator (``MPI.COMM_WORLD`` or one from
            ``Split``), a torch.distributed ProcessGroup, a
            :class:`~batchnorm.distributed.Communicator`, or None: torch's default group
            when initialized, else this process alone.
        dtype, axis, backend, bias: as :class:`batchnorm.BatchNorm2d`, after process_group
            (pass them by keyword).
        timeout: keyword-only, seconds each collective may take (MPI and torch groups).

    Shape:
        Any input with at least 2 dimensions and ``num_features`` channels on ``axis``.
        Every process must call forward (and backward) the same number of times.

    Example::

        from mpi4py import MPI
        layer = SyncBatchNorm(64, process_group=MPI.COMM_WORLD)
        y = layer(x_local)             # statistics of all ranks' x_local together
        dx = layer.backward(dy_local)  # then all-reduce layer.weight.grad like other grads
    """

    _resolved: tuple[Any, CollectiveStats] | None = None  # (process_group, its adapter)

    def forward(self, x: Any) -> np.ndarray:
        sync = self._sync()
        if sync is not None:  # agree first: a bad input on one rank stops every rank
            arr = np.asarray(x)
            sync.agree(agree.header(self.num_features, arr.shape, self.axis, arr.dtype.name),
                       self.axis)  # fmt: skip
        return super().forward(x)

    def _check_ndim(self, ndim: int) -> None:
        if ndim < 2:
            raise ValueError(f"expected at least 2D input (got {ndim}D input)")

    @property
    def comm(self) -> Communicator:
        """The adapter over ``process_group``."""
        return self._collective().comm

    def _collective(self) -> CollectiveStats:
        group = self.process_group
        if group is None:  # torch's default group may be initialized after construction
            return CollectiveStats(as_communicator(None, self.timeout))
        if self._resolved is None or self._resolved[0] is not group:
            self._resolved = (group, CollectiveStats(as_communicator(group, self.timeout)))
        return self._resolved[1]

    def _sync(self) -> CollectiveStats | None:
        # eval never communicates; without running statistics it uses this process's batch,
        # as PyTorch's SyncBatchNorm does; a group of one is plain batch norm
        if not self.training:
            return None
        collective = self._collective()
        return collective if collective.comm.size > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: Module, process_group: Any = None) -> Module:
        """See :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", process_group={self.process_group!r}"


def _convert_one(bn: _BatchNorm, process_group: Any) -> SyncBatchNorm:
    sync = SyncBatchNorm.like(
        bn, process_group, dtype=bn.dtype, axis=bn.axis, backend=bn.backend,
        bias=bn.bias is not None,
    )  # fmt: skip
    # share parameters and buffers, as PyTorch's convert_sync_batchnorm does
    sync.weight, sync.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(sync, name, getattr(bn, name))
    sync.training = bn.training
    return sync


def convert_sync_batchnorm(module: Module, process_group: Any = None) -> Module:
    """Replace every NumPy BatchNorm layer in ``module`` by a :class:`SyncBatchNorm`.

    The new layers share the old ones' parameters and buffers. Returns ``module`` with its
    children replaced, or the new layer when ``module`` itself is a BatchNorm layer.
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        return _convert_one(module, process_group)
    for name, child in list(module.named_children()):
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
            for value in vars(module).values():  # containers such as Sequential.layers
                if isinstance(value, list):
                    value[:] = [new if item is child else item for item in value]
    return module

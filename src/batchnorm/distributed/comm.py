"""One small adapter over the collective engines that SyncBatchNorm runs on.

SyncBatchNorm needs two collectives, each over one float64 buffer: an all-gather (every
process gets every process's buffer) and a sum all-reduce. :class:`Communicator` names
them; :class:`MPIComm` implements them with mpi4py, :class:`TorchComm` with
torch.distributed (gloo on CPU, NCCL on GPU), :class:`SingleProcess` for one process.
:class:`TimedComm` wraps any of them and counts calls, bytes and seconds (tests and
``batchnorm bench --sync`` use it). :func:`as_communicator` picks the adapter for an
mpi4py communicator, a torch ProcessGroup or None (torch's default group).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

__all__ = [
    "DEFAULT_TIMEOUT",
    "CollectiveError",
    "Communicator",
    "MPIComm",
    "SingleProcess",
    "SyncArgs",
    "TimedComm",
    "TorchComm",
    "as_communicator",
]


# seconds a collective may take before every waiting rank gives up (configurable per adapter)
DEFAULT_TIMEOUT = 300.0


_Sync = TypeVar("_Sync", bound="SyncArgs")


class SyncArgs:
    """What a SyncBatchNorm's constructor adds to its batch norm's, where
    ``torch.nn.SyncBatchNorm`` has it: ``process_group`` after the first five arguments
    (num_features, eps, momentum, affine, track_running_stats) and keyword-only ``timeout``,
    the seconds each collective may take. Mixed in before a batch-norm class (the NumPy one
    or torch's), which gets every other argument."""

    process_group: Any
    timeout: float

    def __init__(self, *args: Any, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> None:
        group = args[5] if len(args) > 5 else kwargs.pop("process_group", None)
        super().__init__(*args[:5], *args[6:], **kwargs)  # type: ignore[call-arg]
        self.process_group = group
        self.timeout = float(timeout)

    @classmethod
    def like(cls: type[_Sync], bn: Any, process_group: Any, **kwargs: Any) -> _Sync:
        """A new layer with batch-norm layer ``bn``'s five leading arguments."""
        return cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                   process_group, **kwargs)  # fmt: skip


class CollectiveError(RuntimeError):
    """A collective did not complete: it timed out (a rank died, stalled, or is not calling
    it, e.g. in eval mode) or the engine reported a failure."""


def _timed_out(what: str, size: int, seconds: float, rank: int, world: int) -> CollectiveError:
    return CollectiveError(
        f"{what} of {size} float64 values did not complete within {seconds:g} s on rank "
        f"{rank} of {world}: another rank died, stalled, or is not making this call (in eval "
        "mode? a different number of layers or steps?)"
    )


@runtime_checkable
class Communicator(Protocol):
    """The collectives SyncBatchNorm uses. Every process of the group must call each one.

    ``allgather(buf)`` takes a 1-d float64 array of the same length on every process and
    returns a ``(size, len)`` array whose row r is process r's buffer. ``allreduce_sum(buf)``
    returns the elementwise sum of every process's buffer.
    """

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def allgather(self, buf: np.ndarray) -> np.ndarray: ...

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray: ...


def _buffer(buf: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(buf, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"collective buffers are 1-d, got shape {arr.shape}")
    return arr


class SingleProcess:
    """A group of one: the collectives return their input."""

    rank = 0
    size = 1

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        return _buffer(buf)[None, :].copy()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return _buffer(buf).copy()

    def __repr__(self) -> str:
        return "SingleProcess()"


class MPIComm:
    """Collectives over an mpi4py communicator (``MPI.COMM_WORLD`` or a sub-communicator).

    MPI has no timeouts: each collective is started non-blocking and polled until it
    completes or ``timeout`` seconds pass (then :class:`CollectiveError`).
    """

    def __init__(self, comm: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.comm = comm
        self.timeout = float(timeout)

    def _wait(self, request: Any, what: str, size: int) -> None:
        start = time.monotonic()
        spin_until, deadline = start + 2e-3, start + self.timeout
        pause = 5e-5
        while not request.Test():  # spin first, as a blocking MPI call does; long waits idle
            now = time.monotonic()
            if now > deadline:
                raise _timed_out(what, size, self.timeout, self.rank, self.size)
            if now > spin_until:
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        send = _buffer(buf)
        recv = np.empty((self.size, send.size), dtype=np.float64)
        self._wait(self.comm.Iallgather(send, recv), "MPI all-gather", send.size)
        return recv

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        send = _buffer(buf)
        recv = np.empty_like(send)
        self._wait(self.comm.Iallreduce(send, recv, op=MPI.SUM), "MPI all-reduce", send.size)
        return recv

    def __repr__(self) -> str:
        return f"MPIComm(rank={self.rank}, size={self.size})"


class TorchComm:
    """Collectives over a torch.distributed process group (None: the default group).

    NumPy buffers go through CPU tensors for gloo (and MPI) groups and through tensors
    on the current CUDA device for NCCL groups.
    """

    def __init__(self, group: Any = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        self.timeout = float(timeout)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialized: call "
                "torch.distributed.init_process_group(...) before using a torch process group"
            )
        self.group = group
        self._dist = dist
        self._device = "cpu"
        if str(dist.get_backend(group)).lower() == "nccl":
            import torch

            self._device = f"cuda:{torch.cuda.current_device()}"

    @property
    def rank(self) -> int:
        return int(self._dist.get_rank(self.group))

    @property
    def size(self) -> int:
        return int(self._dist.get_world_size(self.group))

    def _tensor(self, buf: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(_buffer(buf).copy()).to(self._device)

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        send = self._tensor(buf)
        out = send.new_empty(self.size * send.numel())
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        work = gather(out, send, group=self.group, async_op=True)
        wait(work, "torch.distributed all-gather", send.numel(), self.timeout, self.group)
        return out.view(self.size, -1).cpu().numpy()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        t = self._tensor(buf)
        op = self._dist.ReduceOp.SUM
        work = self._dist.all_reduce(t, op=op, group=self.group, async_op=True)
        wait(work, "torch.distributed all-reduce", t.numel(), self.timeout, self.group)
        return t.cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchComm(rank={self.rank}, size={self.size}, device={self._device!r})"


def wait(work: Any, what: str, size: int, timeout: float, group: Any = None) -> None:
    """Wait for a torch.distributed ``Work`` at most ``timeout`` seconds, else
    :class:`CollectiveError` (also when the engine fails, e.g. a peer's socket closed)."""
    from datetime import timedelta

    import torch.distributed as dist

    try:
        done = work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as exc:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise _timed_out(what, size, timeout, rank, world) from exc
        raise CollectiveError(
            f"{what} of {size} values failed on rank {rank} of {world} (a rank died?): {exc}"
        ) from exc
    if done is False:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise _timed_out(what, size, timeout, rank, world)


@dataclass
class OpStats:
    """Calls, float64 elements sent and wall-clock seconds of one kind of collective."""

    calls: int = 0
    elements: int = 0
    seconds: float = 0.0


@dataclass
class TimedComm:
    """Wraps a communicator and records what each collective cost on this process."""

    inner: Communicator
    stats: dict[str, OpStats] = field(
        default_factory=lambda: {"allgather": OpStats(), "allreduce_sum": OpStats()}
    )

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def size(self) -> int:
        return self.inner.size

    def _record(self, name: str, buf: np.ndarray, start: float) -> None:
        op = self.stats[name]
        op.calls += 1
        op.elements += int(np.size(buf))
        op.seconds += time.perf_counter() - start

    def allgather(self, buf: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.inner.allgather(buf)
        self._record("allgather", buf, start)
        return out

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.inner.allreduce_sum(buf)
        self._record("allreduce_sum", buf, start)
        return out

    @property
    def calls(self) -> int:
        return sum(op.calls for op in self.stats.values())

    @property
    def seconds(self) -> float:
        return sum(op.seconds for op in self.stats.values())

    def reset(self) -> None:
        for op in self.stats.values():
            op.calls, op.elements, op.seconds = 0, 0, 0.0


def _is_mpi_comm(obj: Any) -> bool:
    return type(obj).__module__.startswith("mpi4py") and hasattr(obj, "Allgather")


def _torch_default_group_ready() -> bool:
    dist = sys.modules.get("torch.distributed")  # torch not imported: no group can exist
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def as_communicator(group: Any = None, timeout: float = DEFAULT_TIMEOUT) -> Communicator:
    """The adapter for ``group``.

    Args:
        group: a :class:`Communicator` (returned as it is), an mpi4py communicator, a
            torch.distributed ProcessGroup, or None: torch.distributed's default group when
            it is initialized, else a :class:`SingleProcess` group (as PyTorch's
            SyncBatchNorm falls back to plain batch norm outside a process group).
        timeout: seconds each collective of a new MPI or torch adapter may take.

    Raises:
        TypeError: ``group`` is none of these.
    """
    if group is None:
        return TorchComm(None, timeout) if _torch_default_group_ready() else SingleProcess()
    if _is_mpi_comm(group):
        return MPIComm(group, timeout)
    if type(group).__module__.startswith("torch"):
        return TorchComm(group, timeout)
    if isinstance(group, Communicator):
        return group
    raise TypeError(
        "process_group must be an mpi4py communicator, a torch.distributed ProcessGroup, "
        f"a batchnorm.distributed.Communicator or None, got {type(group).__name__}"
    )

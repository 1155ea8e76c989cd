"""SyncBatchNorm across processes and machines, on existing engines (MPI, torch.distributed).

>>> from mpi4py import MPI                                     # doctest: +SKIP
>>> from batchnorm.distributed import SyncBatchNorm            # doctest: +SKIP
>>> layer = SyncBatchNorm(64, process_group=MPI.COMM_WORLD)   # doctest: +SKIP

See docs/distributed.md. The PyTorch module is :class:`batchnorm.torch.SyncBatchNorm`.
"""

from batchnorm.distributed.agree import DisagreementError
from batchnorm.distributed.comm import (
    DEFAULT_TIMEOUT,
    CollectiveError,
    Communicator,
    MPIComm,
    SingleProcess,
    TimedComm,
    TorchComm,
    as_communicator,
)
from batchnorm.distributed.syncbn import CollectiveStats, SyncBatchNorm, convert_sync_batchnorm
from batchnorm.math import chan_merge, merge_all

__all__ = [
    "DEFAULT_TIMEOUT",
    "CollectiveError",
    "CollectiveStats",
    "Communicator",
    "DisagreementError",
    "MPIComm",
    "SingleProcess",
    "SyncBatchNorm",
    "TimedComm",
    "TorchComm",
    "as_communicator",
    "chan_merge",
    "convert_sync_batchnorm",
    "merge_all",
]

"""SyncBatchNorm for PyTorch on CPU (gloo) and CUDA (NCCL): one algorithm for both.

PyTorch's own ``torch.nn.SyncBatchNorm`` accepts only GPU tensors. This one runs wherever
the process group's backend does, with the algorithm of :mod:`batchnorm.distributed`:

* forward: the ranks agree first (:mod:`batchnorm.distributed.agree`: one all-gather of a
  fixed-size header with each rank's count; a disagreement or one rank's invalid input
  raises the same error on every rank, before any state changes). Then per-channel (mean,
  M2) of this process's slice, computed in x's dtype (no float64 copy of x); ONE
  all-gather of ``[mean, M2]`` (float64 on CPU, float32 on GPU unless x is float64); Chan's
  pairwise merge (:func:`batchnorm.math.merge_all`, the same code as the
  NumPy module) gives the statistics of the whole batch, exact with uneven and empty
  slices;
* backward: ONE all-reduce of ``[sum(dy), sum(dy * (x - mean))]``, then the closed-form dx.
  Parameter gradients are this process's sums (DDP all-reduces them with the rest).

Outside an initialized process group, in a group of one, and in eval mode it is plain
batch norm and makes no collective call, as PyTorch's module does. Every collective waits
at most ``timeout`` seconds (:class:`~batchnorm.distributed.comm.CollectiveError` then).
NaN/inf propagate as in ``nn.SyncBatchNorm``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.distributed.agree import HEADER_SIZE, check, header
from batchnorm.distributed.comm import CollectiveError, SyncArgs, wait
from batchnorm.math import grad_coefficients, inverse_std, merge_all
from batchnorm.torch.glue import BNFunction, Inputs, Needs, StatsArgs, too_few_values
from batchnorm.torch.modules import batch_norm_arguments

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the per-channel vectors and collectives: float64 on CPU (as PyTorch's CPU
    kernel accumulates), float32 on GPU unless x is float64."""
    if x.dtype == torch.float64 or x.device.type == "cpu":
        return torch.float64
    return torch.float32


def _collective(what: str, work: Any, size: int, group: Any, timeout: float) -> None:
    try:
        wait(work, what, size, timeout, group)
    except CollectiveError as exc:
        raise CollectiveError(f"SyncBatchNorm: {exc}") from exc


def _all_gather(buf: torch.Tensor, group: Any, what: str, timeout: float) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = buf.new_empty(size * buf.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, buf, group=group, async_op=True)
    _collective(f"all-gather ({what})", work, buf.numel(), group, timeout)
    return out.view(size, buf.numel())


def _agree(x: torch.Tensor, num_features: int, group: Any, timeout: float) -> list[float]:
    """The agreement all-gather (:mod:`batchnorm.distributed.agree`), with each rank's count
    appended: the only host sync of the forward. Returns the counts of all ranks."""
    dtype_name = str(x.dtype).removeprefix("torch.")
    mine = header(num_features, tuple(x.shape), 1, dtype_name)
    count = x.numel() // x.shape[1] if x.dim() >= 2 and x.shape[1] else 0
    buf = torch.tensor([*mine, float(count)], dtype=_acc_dtype(x), device=x.device)
    table = _all_gather(buf, group, "agreement", timeout).tolist()
    check(table)
    return [row[HEADER_SIZE] for row in table]


class _SyncBatchNormFunction(BNFunction):
    """Config: ``(group, counts, timeout)``; no residual."""

    @staticmethod
    def run(
        ctx: Any, t: Inputs, stats: StatsArgs, group: Any, counts: list[float], timeout: float
    ) -> torch.Tensor:
        x, _, weight, bias = t
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        acc = _acc_dtype(x)
        if x.numel():  # in x's dtype (no float64 copy of x); PyTorch's CPU reduction is exact
            var, mean = torch.var_mean(x, dim=dims, correction=0)  # to float32 rounding
            mean, m2 = mean.to(acc), var.to(acc) * (x.numel() // channels)
        else:
            mean = m2 = torch.zeros(channels, dtype=acc, device=x.device)
        table = _all_gather(torch.cat((mean, m2)), group, "statistics", timeout)
        total, mean, m2 = merge_all(counts, list(table[:, :channels]), list(table[:, channels:]))
        if total == 1:
            raise too_few_values(
                tuple(x.shape), " with 1 value per channel over the whole process group"
            )
        # NaN/inf propagate into y and the running statistics, as in nn.SyncBatchNorm: no
        # check, hence no host sync
        if total > 0:
            var = m2 / total
            stats.update_running(mean, m2, total, acc)
        else:
            var = torch.ones_like(mean)
        invstd = inverse_std(var, stats.eps)
        shape = [1, channels] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = torch.zeros_like(mean) if bias is None else bias.to(acc)
        y = x - mean.to(x.dtype).view(shape)
        y.mul_(scale.to(x.dtype).view(shape)).add_(shift.to(x.dtype).view(shape))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total, ctx.group, ctx.timeout = total, group, timeout
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def grads(ctx: Any, dy: torch.Tensor, needs: Needs) -> tuple[Any, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        dy = dy.to(x.dtype)
        xmu = x - mean.to(x.dtype).view(shape)  # in x's dtype, as forward
        sum_dy = dy.sum(dim=dims, dtype=mean.dtype)
        sum_dy_xmu = (dy * xmu).sum(dim=dims, dtype=mean.dtype)
        grad_weight = grad_bias = None
        if weight is not None and needs.weight:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)  # this process's share
        if ctx.has_bias and needs.bias:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else dy.dtype)
        if not needs.x:
            return None, None, grad_weight, grad_bias
        both = torch.cat((sum_dy, sum_dy_xmu))
        work = dist.all_reduce(both, op=dist.ReduceOp.SUM, group=ctx.group, async_op=True)
        _collective("all-reduce (gradient sums)", work, both.numel(), ctx.group, ctx.timeout)
        w = torch.ones_like(invstd) if weight is None else weight.to(mean.dtype)
        a, b, c = grad_coefficients(w, invstd, both[:channels], both[channels:], max(ctx.total, 1))
        dx = xmu.mul_(b.to(x.dtype).view(shape)).add_(c.to(x.dtype).view(shape))
        dx.addcmul_(dy, a.to(x.dtype).view(shape))
        return dx, None, grad_weight, grad_bias


class SyncBatchNorm(SyncArgs, _BatchNorm):
    r"""Batch normalization over the whole batch of a process group, on CPU or CUDA.

    A drop-in for ``torch.nn.SyncBatchNorm`` (same constructor, state dict and
    :meth:`convert_sync_batchnorm`) that also runs on CPU tensors with the gloo backend.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with E and Var over the union of the inputs of every process in ``process_group``.

    Args:
        num_features: C of an input of shape (N, C, ...).
        eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm2d``.
        process_group: the torch.distributed group to synchronize over; None: the default.
        device, dtype: of the parameters and buffers, as ``torch.nn.SyncBatchNorm``.
        timeout: keyword-only, seconds each collective may take before every waiting rank
            raises :class:`~batchnorm.distributed.comm.CollectiveError`.

    Shape:
        Input (N, C, ...) with at least 2 dimensions; N may differ between processes and
        may be 0. Output has the input's shape.

    Example::

        dist.init_process_group("gloo", ...)
        model = convert_sync_batchnorm(model)        # every BatchNorm*d -> SyncBatchNorm
        model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on dim 1, got input of shape "
                f"{tuple(input.shape)}"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        need_sync = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )
        if need_sync:  # agree first: one rank's bad input stops every rank, before any update
            group, timeout = self.process_group, self.timeout
            counts = _agree(input, self.num_features, group, timeout)
        else:
            self._check_input_dim(input)
        running_mean, running_var, bn_training, factor = batch_norm_arguments(self)
        if not need_sync:
            return TF.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                self.eps,
            )  # fmt: skip
        stats = StatsArgs(running_mean, running_var, bn_training, factor, self.eps)
        out: torch.Tensor = _SyncBatchNormFunction.apply(
            input, None, self.weight, self.bias, stats, group, counts, timeout
        )
        return out

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any = None
    ) -> torch.nn.Module:
        """See :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


_BN_NAME = re.compile(r"BatchNorm[123]?d?$")


def _is_batchnorm(module: torch.nn.Module) -> bool:
    if isinstance(module, SyncBatchNorm):
        return False
    if isinstance(module, _BatchNorm):
        return True
    # batch-norm modules that do not derive from torch's _BatchNorm (e.g. batchnorm.torch's)
    names = ("num_features", "eps", "momentum", "affine", "track_running_stats", "running_mean")
    return bool(_BN_NAME.search(type(module).__name__)) and all(hasattr(module, n) for n in names)


def convert_sync_batchnorm(module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
    """Replace every ``BatchNorm*d`` in ``module`` by :class:`SyncBatchNorm`, like PyTorch's.

    The new layers share the old ones' parameters and buffers and keep their train/eval
    mode. Returns the converted module (a new one when ``module`` itself is a BatchNorm).
    """
    out = module
    if _is_batchnorm(module):
        bn: Any = module
        sync = SyncBatchNorm.like(bn, process_group)
        if bn.affine:
            with torch.no_grad():
                sync.weight = bn.weight
                sync.bias = bn.bias
        sync.running_mean = bn.running_mean
        sync.running_var = bn.running_var
        sync.num_batches_tracked = getattr(bn, "num_batches_tracked", None)
        sync.training = bn.training
        if hasattr(bn, "qconfig"):
            sync.qconfig = bn.qconfig
        out = sync
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out

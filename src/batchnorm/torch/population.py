"""Exact population statistics for PyTorch models: ``update_bn_stats``.

The same procedure as :func:`batchnorm.nn.update_bn_stats` (see there for why): forward
pre-hooks record each BN layer's per-batch ``(count, mean, m2)`` in float64, merged across
batches with Chan's formula and, for SyncBatchNorm layers in an initialized process group,
across processes with :func:`batchnorm.math.merge_all`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.math import merge_all
from batchnorm.nn.population import Totals, feed

__all__ = ["update_bn_stats"]


def _batch_stats(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """This process's (count, mean, m2) per channel (axis 1), in float64."""
    x = x.detach().to(torch.float64)
    dims = [0] + list(range(2, x.dim()))
    count = x.numel() // x.shape[1]
    mean = x.mean(dims)
    centered = x - mean.reshape((1, -1) + (1,) * (x.dim() - 2))
    return count, mean, (centered * centered).sum(dims)


def _synced(bn: nn.Module) -> bool:
    """True for a SyncBatchNorm layer in a process group of more than one."""
    if "process_group" not in vars(bn) or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(bn.process_group) > 1  # type: ignore[arg-type]


def _all_processes(group: Any, count: int, mean: torch.Tensor, m2: torch.Tensor
                   ) -> tuple[float, torch.Tensor, torch.Tensor]:
    size = dist.get_world_size(group)
    local = torch.cat([mean.new_tensor([count]), mean, m2])
    every = local.new_empty(size * local.numel())
    dist.all_gather_into_tensor(every, local, group=group)
    rows = every.view(size, -1)
    c = mean.numel()
    return merge_all(rows[:, 0].tolist(), list(rows[:, 1 : 1 + c]), list(rows[:, 1 + c :]))


@torch.no_grad()
def update_bn_stats(
    model: nn.Module, data: Iterable[Any], num_batches: int | None = None
) -> nn.Module:
    """Set every BN layer's running statistics to the exact population ones over ``data``.

    ``data`` yields inputs, or tuples/lists whose first element is the input, already on the
    model's device; at most ``num_batches`` are used. The model runs in training mode (upstream
    BN layers normalize with batch statistics, as in training); afterwards parameters,
    ``num_batches_tracked``, other buffers and every module's mode are as they were, and each
    BN's ``running_mean`` / ``running_var`` hold the exact mean and unbiased variance of the
    values it saw (all or nothing: on an error the model is left as it was). Returns the model.
    """
    layers = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None]
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, {k: v.clone() for k, v in bn.named_buffers(recurse=False) if v is not None})
             for bn in layers]
    totals = Totals()

    def record(bn: nn.Module, args: tuple[Any, ...]) -> None:
        count, mean, m2 = _batch_stats(args[0])
        if _synced(bn):
            count, mean, m2 = _all_processes(bn.process_group, count, mean, m2)  # type: ignore[assignment]
        totals.add(id(bn), count, mean, m2)

    hooks = [bn.register_forward_pre_hook(record) for bn in layers]
    model.train()
    done = False
    try:
        feed(model, data, num_batches)
        exact = {key: totals.population(key) for key in totals.stats}
        done = True
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes:
            module.training = mode
        for bn, buffers in saved:
            for name, value in buffers.items():
                getattr(bn, name).copy_(value)
            if done and id(bn) in exact:  # a layer the data never reached keeps its own
                _, mean, var = exact[id(bn)]
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    return model

"""Drop-in ``BatchNorm1d/2d/3d`` for PyTorch, and ``convert_model`` to swap them into a model.

Each class subclasses PyTorch's own (``isinstance(m, torch.nn.BatchNorm2d)`` holds; state_dict,
repr, ``.to()``, DDP and optimizers behave as usual) and changes one thing: ``forward`` calls
:func:`batchnorm.torch.function.batch_norm`, which runs our kernels where they apply and
PyTorch's elsewhere (the rules: :mod:`batchnorm.torch.routing`).

Under ``torch.fx`` tracing they appear in the graph as leaf modules (``call_module`` nodes),
as PyTorch's own batch norms do: the traced graph calls the module itself on real tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.math import module_call_of
from batchnorm.torch.function import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_model", "revert_model"]


def batch_norm_arguments(
    module: _BatchNorm,
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, float]:
    """PyTorch's ``_BatchNorm.forward`` up to its ``batch_norm`` call
    (:func:`batchnorm.math.module_call`).

    Counts the batch in ``num_batches_tracked`` (training); returns the (running_mean,
    running_var, training, momentum) arguments of ``batch_norm``.
    """
    tracked = module.num_batches_tracked
    call = module_call_of(module)
    if call.count_batch and tracked is not None:
        tracked.add_(1)
    return (
        module.running_mean if call.pass_buffers else None,
        module.running_var if call.pass_buffers else None,
        call.batch_stats,
        call.momentum,
    )


class _Ours(_BatchNorm):
    """PyTorch's ``_BatchNorm.forward``, calling our ``batch_norm``."""

    backend: str = "auto"  # CPU backend: "auto", "numpy" or "numba" (set per instance if needed)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):  # record a leaf, as fx does for torch.nn modules
            tracer = input.tracer
            return tracer.create_proxy(  # type: ignore[no-any-return]
                "call_module", tracer.path_of_module(self), (input,), {}
            )
        self._check_input_dim(input)
        running_mean, running_var, bn_training, factor = batch_norm_arguments(self)
        return batch_norm(
            input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
            self.eps, backend=self.backend,
        )  # fmt: skip

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles PyTorch's own module, sharing this one's state."""
        return _swap(self, _TO_TORCH)


class BatchNorm1d(_Ours, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on batchnorm's kernels; same constructor and semantics."""


class BatchNorm2d(_Ours, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on batchnorm's kernels; same constructor and semantics."""


class BatchNorm3d(_Ours, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on batchnorm's kernels; same constructor and semantics."""


_TO_OURS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type, type] = {ours: native for native, ours in _TO_OURS.items()}


def _swap(module: nn.Module, mapping: dict[type, type]) -> nn.Module:
    cls = mapping.get(type(module))
    if cls is not None:
        new: nn.Module = cls.__new__(cls)  # type: ignore[call-overload]
        # the same parameters, buffers, mode and hooks; dicts copied so the two stay apart
        state: dict[str, Any] = {
            k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()
        }
        new.__dict__.update(state)
        return new
    for name, child in module.named_children():
        swapped = _swap(child, mapping)
        if swapped is not child:
            setattr(module, name, swapped)
    return module


def convert_model(model: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` in ``model`` for ours, in place; return the model.

    The new modules share the old ones' parameters and buffers (optimizers built before keep
    working) and keep their mode, device and dtype. Subclasses of PyTorch's classes
    (``SyncBatchNorm``, a user's own) are left alone. When ``model`` itself is a batch norm,
    the new module is returned (as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does).
    """
    return _swap(model, _TO_OURS)


def revert_model(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert_model`: ours back to ``nn.BatchNorm1d/2d/3d``."""
    return _swap(model, _TO_TORCH)

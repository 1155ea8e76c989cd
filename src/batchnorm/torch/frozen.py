"""Frozen batch norm: eval-mode BN as a fixed per-channel affine map, in any mode.

``FrozenBatchNorm2d`` has torchvision's buffers and state_dict keys (``weight``, ``bias``,
``running_mean``, ``running_var``; no parameters, no ``num_batches_tracked``) and computes
``y = x * scale + shift`` with ``(scale, shift)`` from :func:`batchnorm.math.eval_affine`,
which is eval BN's output whether the module is in training mode or not. Detectors fine-tune
with it because their per-GPU batches are too small for batch statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.math import eval_affine

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_batchnorm",
]


class FrozenBatchNorm(nn.Module):
    """BN with fixed statistics and affine parameters, stored as buffers; (N, C, ...) input of
    any rank (what a SyncBatchNorm freezes into)."""

    _expected_ndim: tuple[int, ...] = ()  # empty: any rank >= 2
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, **factory: Any) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BN's state_dict loads as is
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or (self._expected_ndim and x.dim() not in self._expected_ndim):
            dims = " or ".join(f"{d}D" for d in self._expected_ndim) or "at least 2D"
            raise ValueError(f"expected {dims} input (got {x.dim()}D input)")
        scale, shift = eval_affine(self.weight, self.bias, self.running_mean, self.running_var,
                                   self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen BN of (N, C) or (N, C, L) input."""

    _expected_ndim = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen BN of (N, C, H, W) input, as torchvision's ``FrozenBatchNorm2d``."""

    _expected_ndim = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen BN of (N, C, D, H, W) input."""

    _expected_ndim = (5,)


def _frozen_class(bn: _BatchNorm) -> type[FrozenBatchNorm]:
    for base, cls in ((nn.BatchNorm1d, FrozenBatchNorm1d), (nn.BatchNorm2d, FrozenBatchNorm2d),
                      (nn.BatchNorm3d, FrozenBatchNorm3d)):
        if isinstance(bn, base):
            return cls
    return FrozenBatchNorm  # SyncBatchNorm and others of no fixed rank


def frozen_copy(bn: _BatchNorm) -> FrozenBatchNorm:
    """A frozen BN holding ``bn``'s eval-mode map (copies of its statistics and parameters)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot freeze {type(bn).__name__}({bn.num_features}) with "
            "track_running_stats=False: it has no running statistics to freeze"
        )
    ref = bn.running_mean
    frozen = _frozen_class(bn)(bn.num_features, bn.eps, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        if bn.weight is not None:
            frozen.weight.copy_(bn.weight)
        if bn.bias is not None:
            frozen.bias.copy_(bn.bias)
    frozen.train(bn.training)
    return frozen


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Swap every batch norm in ``model`` (PyTorch's, ours, SyncBatchNorm) for a frozen one.

    In place; returns the model, or the frozen module when ``model`` is itself a batch norm.
    Every BN is checked before any is swapped: a BN without running statistics raises
    ValueError and leaves the model as it was.
    """
    found = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    frozen = {id(m): frozen_copy(m) for m in found}
    if isinstance(model, _BatchNorm):
        return frozen[id(model)]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in frozen:
                setattr(parent, name, frozen[id(child)])
    return model

"""Folding batch norm into the Linear layer before it, for inference (NumPy models).

In eval, BN is ``y = x * scale + shift`` per feature (:func:`batchnorm.math.eval_affine`), so
``Linear`` then ``BatchNorm1d`` is one ``Linear`` with ``W[o] * scale[o]`` and bias
``b[o] * scale[o] + shift[o]``. The PyTorch version is :func:`batchnorm.torch.fold_batchnorm`.
"""

from __future__ import annotations

import copy

import numpy as np

from batchnorm.math import eval_affine
from batchnorm.nn.batchnorm import _BatchNorm
from batchnorm.nn.layers import Linear, Sequential
from batchnorm.nn.module import Module, Parameter

__all__ = ["fold_batchnorm"]


def _folded(layer: Module | None, bn: _BatchNorm, where: str) -> Linear:
    if not isinstance(layer, Linear):
        before = "nothing" if layer is None else f"a {type(layer).__name__}"
        raise ValueError(f"cannot fold {where} ({type(bn).__name__}): it follows {before}, "
                         "expected a Linear layer")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {where}: track_running_stats=False, its eval output "
                         "uses batch statistics")
    features = bn.num_features
    w = np.ones(features) if bn.weight is None else bn.weight.data.astype(np.float64)
    b = np.zeros(features) if bn.bias is None else bn.bias.data.astype(np.float64)
    scale, shift = eval_affine(w, b, bn.running_mean.astype(np.float64),
                               bn.running_var.astype(np.float64), bn.eps)
    out = copy.deepcopy(layer)
    dtype = layer.weight.data.dtype
    bias = np.zeros(features) if layer.bias is None else layer.bias.data.astype(np.float64)
    out.weight = Parameter((layer.weight.data * scale[:, None]).astype(dtype))
    out.bias = Parameter((bias * scale + shift).astype(dtype))
    return out


def _fold(seq: Sequential, prefix: str) -> Sequential:
    layers: list[Module] = []
    for i, layer in enumerate(seq):
        if isinstance(layer, _BatchNorm):
            prev = layers.pop() if layers else None
            layers.append(_folded(prev, layer, f"layer {prefix}{i}"))
        elif isinstance(layer, Sequential):
            layers.append(_fold(layer, f"{prefix}{i}."))
        else:
            layers.append(copy.deepcopy(layer))
    return Sequential(*layers)


def fold_batchnorm(model: Sequential) -> Sequential:
    """An eval-mode ``Sequential`` equal to ``model`` in eval, with each BN folded into the
    ``Linear`` before it. ValueError names a BN with no Linear right before it (or no running
    statistics); ``model`` is never changed.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"fold_batchnorm takes a Sequential, got {type(model).__name__}")
    folded = _fold(model, "")
    folded.eval()
    return folded

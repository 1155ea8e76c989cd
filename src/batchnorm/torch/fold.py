"""Folding batch norm into the layer before it, for inference.

In eval, BN is ``y = x * scale + shift`` per channel (:func:`batchnorm.math.eval_affine`);
after a Conv or Linear layer, whose output channel ``o`` is ``W[o] . x + b[o]``, that is the
same layer with ``W[o] * scale[o]`` and ``b[o] * scale[o] + shift[o]`` (for a transposed
conv the output channels are the weight's second axis, per group). ``fold_batchnorm`` finds
the pairs in ``Sequential`` order, or in the ``torch.fx`` graph when the model is not a plain
stack, and returns an eval-mode copy without BN layers; the given model is not changed.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.math import eval_affine

__all__ = ["fold_batchnorm", "folded"]

FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
            nn.ConvTranspose3d)


def folded(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of ``layer`` (Conv/ConvTranspose/Linear) that computes ``bn(layer(x))`` in eval."""
    if not isinstance(layer, FOLDABLE):
        raise ValueError(
            f"cannot fold {type(bn).__name__}: the layer before it is a {type(layer).__name__}, "
            f"expected one of {[c.__name__ for c in FOLDABLE]}"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) with track_running_stats=False:"
            " its eval output uses batch statistics"
        )
    out = copy.deepcopy(layer)
    w = out.weight
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    channels = int(w.shape[1] * layer.groups if transposed else w.shape[0])  # type: ignore
    if channels != bn.num_features:
        raise ValueError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) after a layer with "
            f"{channels} output channels"
        )
    f64 = torch.float64
    ones = torch.ones(channels, dtype=f64, device=w.device)
    scale, shift = eval_affine(
        ones if bn.weight is None else bn.weight.detach().to(f64),
        0 * ones if bn.bias is None else bn.bias.detach().to(f64),
        bn.running_mean.to(f64), bn.running_var.to(f64), bn.eps,
    )
    bias = 0 * ones if layer.bias is None else layer.bias.detach().to(f64)
    with torch.no_grad():
        if transposed:  # weight (in, out/groups, k...): scale the out axis within each group
            g = int(layer.groups)  # type: ignore[arg-type]
            grouped = w.detach().to(f64).reshape((g, -1) + tuple(w.shape[1:]))
            factor = scale.reshape((g, 1, -1) + (1,) * (w.dim() - 2))
            new_w = (grouped * factor).reshape(w.shape)
        else:
            new_w = w.detach().to(f64) * scale.reshape((-1,) + (1,) * (w.dim() - 1))
        out.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
        out.bias = nn.Parameter((bias * scale + shift).to(w.dtype), requires_grad=w.requires_grad)
    return out


def _fold_sequences(model: nn.Module) -> bool:
    """Fold every BN that follows its layer in a Sequential; False (nothing changed) unless
    that covers every BN in the model."""
    pairs = []
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for before, name in zip(names, names[1:], strict=False):
            bn = parent._modules[name]
            if isinstance(bn, _BatchNorm) and isinstance(parent._modules[before], FOLDABLE):
                pairs.append((parent, before, name))
    if len(pairs) != sum(isinstance(m, _BatchNorm) for m in model.modules()):
        return False
    replaced = [(p, before, name, folded(p._modules[before], p._modules[name]))  # type: ignore
                for p, before, name in pairs]
    for parent, before, name, layer in replaced:
        parent._modules[before] = layer
        parent._modules[name] = nn.Identity()
    return True


class _Tracer(fx.Tracer):
    """Keeps every batch norm (ours have Python control flow inside) as one graph node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _fold_graph(model: nn.Module) -> fx.GraphModule:
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as exc:
        raise ValueError(
            f"cannot fold batch norm in {type(model).__name__}: its BN layers do not each "
            f"follow a Conv/Linear in a Sequential, and torch.fx cannot trace it ({exc})"
        ) from exc
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn = modules[node.target]
        prev = node.args[0] if node.args else None
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"):
            raise ValueError(
                f"cannot fold BN {node.target!r}: no Conv/Linear layer precedes it "
                f"(its input is {prev})"
            )
        if len(prev.users) != 1:
            raise ValueError(
                f"cannot fold BN {node.target!r}: the output of {prev.target!r} is also used "
                "elsewhere, so its weights cannot change"
            )
        layer = folded(modules[prev.target], bn)
        parent, _, attr = str(prev.target).rpartition(".")
        setattr(gm.get_submodule(parent), attr, layer)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BN folded into the Conv/Linear before it.

    Its output in eval equals ``model``'s in eval (up to rounding). Pairs are taken from
    ``Sequential`` order when that covers every BN (the copy keeps the model's classes, BN
    slots become ``nn.Identity``), else from the ``torch.fx`` graph (a ``GraphModule`` comes
    back). A BN with no Conv/Linear right before it, or without running statistics, raises
    ValueError naming it; ``model`` is never changed.
    """
    work = copy.deepcopy(model).eval()
    if isinstance(work, _BatchNorm):
        raise ValueError(f"cannot fold {type(work).__name__}: no layer precedes it")
    if _fold_sequences(work):
        return work
    return _fold_graph(work).eval()

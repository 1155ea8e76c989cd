"""Exact population statistics: ``update_bn_stats`` for NumPy models.

The running averages a BN layer keeps in training (EMA) lag behind the weights and weigh
recent batches most. After training, run data through the model in training mode (each
layer normalizing with batch statistics, as in training) and set every BN layer's
``running_mean`` / ``running_var`` to the exact mean and unbiased variance of all the values
it saw: per batch ``(count, mean, m2)`` from the kernel layer, merged across batches with
Chan's formula (:func:`batchnorm.math.chan_merge`) and across processes for SyncBatchNorm.
Averaging per-batch variances instead (fvcore's ``update_bn_stats``) misses the spread of the
batch means. :func:`feed` and :class:`Totals` serve the PyTorch version too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from batchnorm import kernels
from batchnorm.layout import view
from batchnorm.math import chan_merge
from batchnorm.nn.batchnorm import _BatchNorm
from batchnorm.nn.module import Module

__all__ = ["Totals", "feed", "update_bn_stats"]


class Totals:
    """Per-layer ``(count, mean, m2)``, merged batch by batch (exact and stable)."""

    def __init__(self) -> None:
        self.stats: dict[int, tuple[float, Any, Any]] = {}

    def add(self, key: int, count: float, mean: Any, m2: Any) -> None:
        seen = self.stats.get(key)
        self.stats[key] = (count, mean, m2) if seen is None else chan_merge(seen, (count, mean, m2))

    def population(self, key: int) -> tuple[float, Any, Any]:
        """(count, mean, unbiased variance) of everything layer ``key`` saw."""
        count, mean, m2 = self.stats[key]
        if count < 2:
            raise ValueError(f"a batch norm layer saw {count:g} values per channel; need 2+")
        return count, mean, m2 / (count - 1)


def feed(run: Callable[[Any], Any], data: Iterable[Any], num_batches: int | None) -> int:
    """Call ``run`` on the input of each batch (a batch or a tuple whose first element is the
    input), at most ``num_batches`` of them; returns how many. ValueError when there were none.
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or int(num_batches) != num_batches or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    seen = 0
    for batch in data:
        if num_batches is not None and seen >= num_batches:
            break
        run(batch[0] if isinstance(batch, (tuple, list)) else batch)
        seen += 1
    if not seen:
        raise ValueError("update_bn_stats got no batches: the data yielded nothing")
    return seen


def update_bn_stats(
    model: Module, batches: Iterable[Any], num_batches: int | None = None
) -> Module:
    """Set every BN layer's running statistics to the exact population ones over ``batches``.

    Runs the batches through ``model`` in training mode; afterwards parameters, gradients,
    ``num_batches_tracked`` and every module's mode are as they were, and ``running_mean`` /
    ``running_var`` hold the exact mean and unbiased variance (all or nothing: on an error
    the model is left as it was). Returns the model.
    """
    layers = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None]
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, np.array(bn.running_mean), np.array(bn.running_var),
              np.array(bn.num_batches_tracked)) for bn in layers]
    grads = [(p, p.grad) for p in model.parameters()]
    totals = Totals()

    def observe(bn: _BatchNorm) -> Callable[[Any], np.ndarray]:
        forward = type(bn).forward

        def record(x: Any) -> np.ndarray:
            x = np.asarray(x)
            layout = view(x, bn.axis)
            x3 = layout.to3d(x, x.dtype)
            mean, m2 = kernels.get(bn.backend, x.dtype).channel_stats(x3)
            count = x3.shape[0] * x3.shape[2]
            sync = bn._sync()
            if sync is not None:
                count, mean, m2 = sync.merge_stats(count, mean, m2)
            totals.add(id(bn), count, mean, m2)
            return forward(bn, x)

        return record

    for bn in layers:
        bn.forward = observe(bn)  # type: ignore[method-assign,assignment]
    model.train()
    done = False
    try:
        feed(model.forward, batches, num_batches)
        exact = {key: totals.population(key) for key in totals.stats}
        done = True
    finally:
        for bn in layers:
            del bn.forward
            bn._cache = None
        for module, mode in modes:
            module.training = mode
        for p, g in grads:
            p.grad = g
        for bn, mean, var, tracked in saved:
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean[...], bn.running_var[...] = mean, var
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked[...] = tracked
            if done and id(bn) in exact:  # a layer the data never reached keeps its own
                _, bn.running_mean[...], bn.running_var[...] = exact[id(bn)]
    return model

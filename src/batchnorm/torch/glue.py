"""What the autograd Functions of :mod:`batchnorm.torch` share: their statistics arguments
as one value, the running-statistics update, and the gradients ``backward`` returns.

The Functions (:mod:`~batchnorm.torch.function`, :mod:`~batchnorm.torch.fused`,
:mod:`~batchnorm.torch.fused_triton`, :mod:`~batchnorm.torch.sync`) take ``x``, the affine
parameters (the inputs that get gradients) and one :class:`StatsArgs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from batchnorm.math import running_stats

__all__ = ["StatsArgs", "input_grads", "too_few_values"]


@dataclass(frozen=True)
class StatsArgs:
    """The statistics arguments of a ``torch.nn.functional.batch_norm`` call, in its order:
    the running buffers (updated in training, used in eval; None when not passed), whether
    to normalize with the batch's statistics, the running average's factor and eps."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    training: bool
    momentum: float
    eps: float

    def args(self) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, float, float]:
        """``(running_mean, running_var, training, momentum, eps)``, the buffers not copied."""
        return self.running_mean, self.running_var, self.training, self.momentum, self.eps

    def update_running(self, mean: Any, m2: Any, count: float, dtype: torch.dtype) -> None:
        """Average a batch's per-channel ``mean`` and ``m2`` over ``count`` values into the
        running buffers, in place (:func:`batchnorm.math.running_stats`, computed in dtype)."""
        rm, rv = self.running_mean, self.running_var
        if rm is not None and rv is not None:
            new_mean, new_var = running_stats(rm.to(dtype), rv.to(dtype), mean, m2, count,
                                              self.momentum)  # fmt: skip
            rm.copy_(new_mean)
            rv.copy_(new_var)


def too_few_values(shape: Any, detail: str = "") -> ValueError:
    """PyTorch's error for a training batch of one value per channel."""
    return ValueError(
        f"Expected more than 1 value per channel when training, got input size {shape}{detail}"
    )


def input_grads(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    """``backward``'s return: ``grads`` for the first inputs (None where autograd needs none),
    None for the remaining arguments."""
    needs = ctx.needs_input_grad
    mine = tuple(g if need else None for g, need in zip(grads, needs, strict=False))
    return mine + (None,) * (len(needs) - len(mine))

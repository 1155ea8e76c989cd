"""What the autograd Functions of :mod:`batchnorm.torch` share: one base class with one
signature, their statistics arguments as one value, the running-statistics update, and the
gradients ``backward`` returns.

The Functions (:mod:`~batchnorm.torch.function`, :mod:`~batchnorm.torch.fused`,
:mod:`~batchnorm.torch.fused_triton`, :mod:`~batchnorm.torch.sync`) derive from
:class:`BNFunction`: they take ``x``, a residual (added before a ReLU), the affine parameters
(the inputs that get gradients), one :class:`StatsArgs` and their own configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from batchnorm.math import running_stats

__all__ = ["BNFunction", "Inputs", "Needs", "StatsArgs", "input_grads", "too_few_values"]


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


class Inputs(NamedTuple):
    """The inputs of a :class:`BNFunction` that get gradients, in ``apply``'s order."""

    x: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


class Needs(NamedTuple):
    """Which of the :class:`Inputs` autograd wants a gradient for."""

    x: bool
    residual: bool
    weight: bool
    bias: bool


class BNFunction(torch.autograd.Function):
    """Base of the autograd Functions: ``apply(x, residual, weight, bias, stats, *config)``.

    A subclass defines two static methods: ``run(ctx, inputs, stats, *config) -> y``, which
    saves what it needs on ctx, and ``grads(ctx, dy, needs) -> (dx, dresidual, dweight,
    dbias)``, run as backward (decorate it ``once_differentiable`` where double backward would
    be wrong). Autograd names the graph node after the subclass (``<name>Backward``).
    """

    @classmethod
    def apply(cls, *args: Any) -> Any:
        return super().apply(cls, *args)  # forward is static: it gets the subclass from here

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        cls: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        stats: StatsArgs,
        *config: Any,
    ) -> torch.Tensor:
        ctx.function = cls
        return cls.run(ctx, Inputs(x, residual, weight, bias), stats, *config)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        needs = Needs(*ctx.needs_input_grad[1:5])
        return input_grads(ctx, None, *ctx.function.grads(ctx, dy, needs))

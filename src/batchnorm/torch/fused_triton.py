"""The autograd Function of fused BN + ReLU (+ residual) on the Triton kernels of
:mod:`batchnorm.kernels.triton.relu` (CUDA; CPU under ``TRITON_INTERPRET=1``). Status: checked
against PyTorch under Triton's interpreter only; these kernels have not run on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.kernels.triton import relu as tr
from batchnorm.math import grad_coefficients, inverse_std
from batchnorm.torch.glue import BNFunction, Inputs, Needs, StatsArgs, too_few_values

DTYPES = tr.DTYPES
view3d = tr.view3d


def _vec(t: torch.Tensor | None, like: torch.Tensor, fill: float) -> torch.Tensor:
    if t is None:
        return torch.full((like.shape[1],), fill, device=like.device, dtype=torch.float32)
    return t.detach().to(torch.float32)


class TritonBNReLU(BNFunction):
    """``relu(batch_norm(x) + residual)`` on the Triton kernels; x and residual share a layout.
    No config."""

    @staticmethod
    def run(ctx: Any, t: Inputs, stats: StatsArgs) -> torch.Tensor:
        x, residual, weight, bias = t
        shape = tr.view3d(x)
        assert shape is not None
        outer, _, inner, strides = shape
        n = outer * inner
        training = stats.training
        if training:
            if n <= 1:
                raise too_few_values(list(x.shape))
            mean, m2 = tr.channel_stats(x, n, inner, strides)
            var = m2 / n
            stats.update_running(mean, m2, n, torch.float32)
        else:
            assert stats.running_mean is not None and stats.running_var is not None
            mean, var = stats.running_mean.detach().float(), stats.running_var.detach().float()
        rstd = inverse_std(var, stats.eps)
        w, shift = _vec(weight, x, 1.0), _vec(bias, x, 0.0)
        y = tr.normalize_relu(x, residual, mean, w * rstd, shift, n, inner, strides)
        ctx.save_for_backward(x, y if residual is not None else None, mean, rstd, w, shift)
        dtypes = (None if t is None else t.dtype for t in (weight, bias))
        ctx.config = (n, inner, strides, training, residual is not None, *dtypes)
        return y

    @staticmethod
    def grads(ctx: Any, dy: torch.Tensor, needs: Needs) -> tuple[Any, ...]:
        x, y, mean, rstd, w, shift = ctx.saved_tensors
        n, inner, strides, training, has_res, w_dtype, b_dtype = ctx.config
        dy = dy if dy.stride() == x.stride() else torch.empty_like(x).copy_(dy)
        scale = w * rstd
        s1, s2 = tr.relu_grad_sums(dy, x, y, mean, scale, shift, n, inner, strides)
        if training:
            a, b, c = grad_coefficients(w, rstd, s1, s2, n)
        else:
            a, b, c = scale, torch.zeros_like(w), torch.zeros_like(w)
        want_dz = has_res and needs.residual
        dx, dz = tr.relu_grad_input(dy, x, y, mean, scale, shift, a, b, c, n, inner, strides,
                                    want_dz)
        dweight = None if w_dtype is None else (s2 * rstd).to(w_dtype)
        dbias = None if b_dtype is None else s1.to(b_dtype)
        return dx, dz, dweight, dbias

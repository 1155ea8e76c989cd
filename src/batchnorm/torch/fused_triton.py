"""Triton kernels for fused BN + ReLU (+ residual) on the GPU (CPU under ``TRITON_INTERPRET=1``).

The same passes as the CPU kernels (:mod:`batchnorm.kernels.numba.relu`) over the strided
``(outer, C, inner)`` view (NCHW: ``(N, C, H*W)``; channels-last: ``(N*H*W, C, 1)``):

- ``_stats``: one program per channel, exact two-pass mean and M2 in float32;
- ``_normalize_relu``: ``y = max((x - mean) * scale + shift [+ residual], 0)``;
- ``_relu_grad_sums``: one program per channel, ``sum(dz)`` and ``sum(dz * (x - mean))`` with
  ``dz = dy * (z > 0)``, the mask read from y (with a residual) or recomputed from x;
- ``_relu_grad_input``: ``dx = a * dz + b * (x - mean) + c`` (and dz for the residual).

Values are converted to float32 after each load and back at each store. Status: checked
against PyTorch under Triton's interpreter only; one program per channel for the reductions
is simple and exact but not tuned, and these kernels have not run on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from batchnorm.math import grad_coefficients, inverse_std
from batchnorm.torch.glue import StatsArgs, input_grads, too_few_values

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # elements per program and step (tests set it small)


def view3d(x: torch.Tensor) -> tuple[int, int, int, tuple[int, int, int]] | None:
    """(outer, C, inner, strides) of x as (outer, C, inner), or None for other layouts."""
    c = x.shape[1]
    if x.is_contiguous():
        inner = x[0, 0].numel() if x.dim() > 2 else 1
        return x.shape[0], c, inner, (c * inner, inner, 1)
    if x.movedim(1, -1).is_contiguous():
        return x.numel() // c, c, 1, (c, 1, 1)
    return None


@triton.jit
def _offsets(step, c, n, INNER, so, sc, si, BLOCK: tl.constexpr):
    idx = step * BLOCK + tl.arange(0, BLOCK)
    return (idx // INNER) * so + c * sc + (idx % INNER) * si, idx < n


@triton.jit
def _stats(x_ptr, mean_ptr, m2_ptr, n, INNER, so, sc, si, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(0, tl.cdiv(n, BLOCK)):
        off, mask = _offsets(step, c, n, INNER, so, sc, si, BLOCK)
        acc += tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(0, tl.cdiv(n, BLOCK)):
        off, mask = _offsets(step, c, n, INNER, so, sc, si, BLOCK)
        d = tl.where(mask, tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        acc += d * d
    tl.store(mean_ptr + c, mean)
    tl.store(m2_ptr + c, tl.sum(acc, axis=0))


@triton.jit
def _normalize_relu(x_ptr, res_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, n, INNER, so, sc,
                    si, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    off, mask = _offsets(tl.program_id(1), c, n, INNER, so, sc, si, BLOCK)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    v = (x - tl.load(mean_ptr + c)) * tl.load(scale_ptr + c) + tl.load(shift_ptr + c)
    if HAS_RES:
        v += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, tl.maximum(v, 0.0).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz(dy_ptr, x_ptr, y_ptr, off, mask, m, s, t, HAS_Y: tl.constexpr):
    """dy where z > 0 (from y, or recomputed from x), else 0; and x - mean."""
    xm = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - m
    if HAS_Y:
        keep = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32) > 0.0
    else:
        keep = xm * s + t > 0.0
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return tl.where(keep & mask, dy, 0.0), tl.where(mask, xm, 0.0)


@triton.jit
def _relu_grad_sums(dy_ptr, x_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, s1_ptr, s2_ptr, n,
                    INNER, so, sc, si, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    m, s, t = tl.load(mean_ptr + c), tl.load(scale_ptr + c), tl.load(shift_ptr + c)
    a = tl.zeros([BLOCK], dtype=tl.float32)
    b = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(0, tl.cdiv(n, BLOCK)):
        off, mask = _offsets(step, c, n, INNER, so, sc, si, BLOCK)
        g, xm = _dz(dy_ptr, x_ptr, y_ptr, off, mask, m, s, t, HAS_Y)
        a += g
        b += g * xm
    tl.store(s1_ptr + c, tl.sum(a, axis=0))
    tl.store(s2_ptr + c, tl.sum(b, axis=0))


@triton.jit
def _relu_grad_input(dy_ptr, x_ptr, y_ptr, dx_ptr, dz_ptr, mean_ptr, scale_ptr, shift_ptr,
                     a_ptr, b_ptr, c_ptr, n, INNER, so, sc, si, HAS_Y: tl.constexpr,
                     WANT_DZ: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    off, mask = _offsets(tl.program_id(1), c, n, INNER, so, sc, si, BLOCK)
    m, s, t = tl.load(mean_ptr + c), tl.load(scale_ptr + c), tl.load(shift_ptr + c)
    g, xm = _dz(dy_ptr, x_ptr, y_ptr, off, mask, m, s, t, HAS_Y)
    dx = tl.load(a_ptr + c) * g + tl.load(b_ptr + c) * xm + tl.load(c_ptr + c)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WANT_DZ:
        tl.store(dz_ptr + off, g.to(dz_ptr.dtype.element_ty), mask=mask)


def _vec(t: torch.Tensor | None, like: torch.Tensor, fill: float) -> torch.Tensor:
    if t is None:
        return torch.full((like.shape[1],), fill, device=like.device, dtype=torch.float32)
    return t.detach().to(torch.float32)


class TritonBNReLU(torch.autograd.Function):
    """``relu(batch_norm(x) + residual)`` on the Triton kernels; x and residual share a layout."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        stats: StatsArgs,
    ) -> torch.Tensor:
        shape = view3d(x)
        assert shape is not None
        outer, channels, inner, strides = shape
        n = outer * inner
        grid = (channels, triton.cdiv(n, BLOCK))
        training = stats.training
        if training:
            if n <= 1:
                raise too_few_values(list(x.shape))
            mean = torch.empty(channels, device=x.device, dtype=torch.float32)
            m2 = torch.empty_like(mean)
            _stats[(channels,)](x, mean, m2, n, inner, *strides, BLOCK=BLOCK)
            var = m2 / n
            stats.update_running(mean, m2, n, torch.float32)
        else:
            assert stats.running_mean is not None and stats.running_var is not None
            mean, var = stats.running_mean.detach().float(), stats.running_var.detach().float()
        rstd = inverse_std(var, stats.eps)
        w, shift = _vec(weight, x, 1.0), _vec(bias, x, 0.0)
        y = torch.empty_like(x)
        _normalize_relu[grid](x, x if residual is None else residual, y, mean, w * rstd, shift,
                              n, inner, *strides, HAS_RES=residual is not None, BLOCK=BLOCK)
        ctx.save_for_backward(x, y if residual is not None else None, mean, rstd, w, shift)
        dtypes = (None if t is None else t.dtype for t in (weight, bias))
        ctx.config = (n, inner, strides, grid, training, residual is not None, *dtypes)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, y, mean, rstd, w, shift = ctx.saved_tensors
        n, inner, strides, grid, training, has_res, w_dtype, b_dtype = ctx.config
        dy = dy if dy.stride() == x.stride() else torch.empty_like(x).copy_(dy)
        has_y = y is not None
        scale = w * rstd
        s1, s2 = torch.empty_like(mean), torch.empty_like(mean)
        _relu_grad_sums[(mean.numel(),)](dy, x, y if has_y else x, mean, scale, shift, s1, s2,
                                         n, inner, *strides, HAS_Y=has_y, BLOCK=BLOCK)
        if training:
            a, b, c = grad_coefficients(w, rstd, s1, s2, n)
        else:
            a, b, c = scale, torch.zeros_like(w), torch.zeros_like(w)
        want_dz = has_res and ctx.needs_input_grad[1]
        dx = torch.empty_like(x)
        dz = torch.empty_like(x) if want_dz else dx
        _relu_grad_input[grid](dy, x, y if has_y else x, dx, dz, mean, scale, shift, a, b, c, n,
                               inner, *strides, HAS_Y=has_y, WANT_DZ=want_dz, BLOCK=BLOCK)
        dweight = None if w_dtype is None else (s2 * rstd).to(w_dtype)
        dbias = None if b_dtype is None else s1.to(b_dtype)
        return input_grads(ctx, dx, dz if want_dz else None, dweight, dbias)

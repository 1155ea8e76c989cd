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

from batchnorm.layout import tensor_view

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # elements per program and step (tests set it small)


def view3d(x: torch.Tensor) -> tuple[int, int, int, tuple[int, int, int]] | None:
    """(outer, C, inner, strides) of x seen as (outer, C, inner) (:mod:`batchnorm.layout`), or
    None for layouts that view would need a copy for."""
    x3 = tensor_view(x)
    if x3 is None:
        return None
    outer, channels, inner = x3.shape
    return outer, channels, inner, tuple(x3.stride())  # type: ignore[return-value]


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


# --- host launchers: what the autograd Function in batchnorm.torch.fused_triton calls ---------
def channel_stats(x: torch.Tensor, n: int, inner: int, strides: tuple[int, int, int]) -> Any:
    """Per-channel float32 (mean, m2) over the n values of each channel (one program each)."""
    channels = x.shape[1]
    mean = torch.empty(channels, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    _stats[(channels,)](x, mean, m2, n, inner, *strides, BLOCK=BLOCK)
    return mean, m2


def normalize_relu(x: torch.Tensor, residual: torch.Tensor | None, mean: torch.Tensor,
                   scale: torch.Tensor, shift: torch.Tensor, n: int, inner: int,
                   strides: tuple[int, int, int]) -> torch.Tensor:
    """``y = max((x - mean) * scale + shift [+ residual], 0)`` in x's dtype and layout."""
    y = torch.empty_like(x)
    grid = (x.shape[1], triton.cdiv(n, BLOCK))
    _normalize_relu[grid](x, x if residual is None else residual, y, mean, scale, shift, n,
                          inner, *strides, HAS_RES=residual is not None, BLOCK=BLOCK)
    return y


def relu_grad_sums(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, mean: torch.Tensor,
                   scale: torch.Tensor, shift: torch.Tensor, n: int, inner: int,
                   strides: tuple[int, int, int]) -> Any:
    """Per-channel ``sum(dz)`` and ``sum(dz * (x - mean))``, ``dz = dy * (z > 0)``; the mask is
    read from y when given (a residual was added), else recomputed from x."""
    s1, s2 = torch.empty_like(mean), torch.empty_like(mean)
    _relu_grad_sums[(mean.numel(),)](dy, x, x if y is None else y, mean, scale, shift, s1, s2,
                                     n, inner, *strides, HAS_Y=y is not None, BLOCK=BLOCK)
    return s1, s2


def relu_grad_input(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None,
                    mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, a: Any, b: Any,
                    c: Any, n: int, inner: int, strides: tuple[int, int, int],
                    want_dz: bool) -> Any:
    """``dx = a * dz + b * (x - mean) + c``, and dz itself when ``want_dz`` (else None)."""
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if want_dz else dx
    grid = (x.shape[1], triton.cdiv(n, BLOCK))
    _relu_grad_input[grid](dy, x, x if y is None else y, dx, dz, mean, scale, shift, a, b, c, n,
                           inner, *strides, HAS_Y=y is not None, WANT_DZ=want_dz, BLOCK=BLOCK)
    return dx, dz if want_dz else None

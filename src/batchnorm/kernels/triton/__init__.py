"""Triton kernels for torch tensors on the GPU (and on CPU under ``TRITON_INTERPRET=1``).

The same passes as the other kernel implementations (:class:`batchnorm.kernels.Kernels`), over
a strided ``(outer, C, inner)`` view of a torch tensor (:func:`batchnorm.layout.tensor_view`:
NCHW is ``(N, C, H*W)``, channels-last ``(N*H*W, C, 1)``; no copy). The per-channel vectors
are float32 tensors on x's device. The drop-in (:mod:`batchnorm.torch`) calls the whole-op
launchers :func:`forward` and :func:`backward`, which keep every per-channel step on the
device (no host sync):

- training forward: ``_stats_kernel`` (per split: count, mean, m2, Chan-merged tile by tile),
  ``_finalize_kernel`` (merges the splits, updates the running buffers, writes mean and rstd),
  ``_normalize_kernel`` (``y = (x - mean) * scale + shift``, programs in reverse order so that
  it starts on the tiles the statistics pass read last, still in L2);
- backward: ``_grad_kernel`` (per split ``sum(dy)``, ``sum(dy * (x - mean))``),
  ``_grad_coef_kernel`` (a, b, c of :func:`batchnorm.math.grad_coefficients`, parameter
  gradients), ``_grad_kernel`` again (``dx = a * dy + b * (x - mean) + c``).
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.kernels.triton import jit
from batchnorm.kernels.triton.tiling import NUM_WARPS, Plan, cdiv, np2, plan, programs_for

__all__ = [
    "DTYPES",
    "backward",
    "channel_stats",
    "coefficients",
    "forward",
    "grad_input",
    "grad_sums",
    "normalize",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _blocks(p: Plan) -> dict[str, int]:
    return {
        "BLOCK_O": p.block_o, "BLOCK_C": p.block_c, "BLOCK_I": p.block_i, "num_warps": NUM_WARPS
    }  # fmt: skip


def _plan(x3: torch.Tensor, programs: int | None) -> Plan:
    outer, channels, inner = x3.shape
    return plan(outer, channels, inner, programs or programs_for(x3.device))


def _channel_grid(channels: int) -> tuple[int, int, tuple[int]]:
    block_c = min(np2(channels), 128)
    return block_c, 32, (cdiv(channels, block_c),)


def _f32(x3: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.float32, device=x3.device)


def _out(x3: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out``, or a new tensor with x3's shape, strides and dtype."""
    if out is not None:
        return out
    return torch.empty_strided(x3.shape, x3.stride(), dtype=x3.dtype, device=x3.device)


def _normalize_pass(x3: torch.Tensor, y3: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                    weight: torch.Tensor | None, shift: torch.Tensor | None, p: Plan) -> None:
    """``y = (x - mean) * scale [* weight] [+ shift]`` into y3 (absent vectors: ``mean`` is
    passed, never read)."""
    jit._normalize_kernel[p.grid](
        x3, y3, mean, scale, mean if weight is None else weight, mean if shift is None else shift,
        x3.shape[1], *p.extent, *x3.stride(), p.o_per, p.i_per, p.split_i,
        HAS_W=weight is not None, HAS_B=shift is not None, **_blocks(p),
    )  # fmt: skip


def _grad_pass(dy3: torch.Tensor, x3: torch.Tensor, mean: torch.Tensor, p: Plan,
               sums: torch.Tensor | None = None, coef: torch.Tensor | None = None,
               dx3: torch.Tensor | None = None) -> None:
    """The per-split grad sums into ``sums`` (2, splits, C), or, given ``dx3``, dx from ``coef``
    (3, C): one launch of ``jit._grad_kernel`` (what a pass does not use gets ``mean``)."""
    s0, s1 = (mean, mean) if sums is None else sums
    jit._grad_kernel[p.grid](
        dy3, x3, mean, s0, s1, mean if coef is None else coef, mean if dx3 is None else dx3,
        x3.shape[1], *p.extent, *x3.stride(), *dy3.stride(), p.o_per, p.i_per, p.split_i,
        DX_PASS=dx3 is not None, **_blocks(p),
    )  # fmt: skip


# --- the passes of batchnorm.kernels.Kernels ------------------------------------------------


def _stats(x3: torch.Tensor, p: Plan) -> torch.Tensor:
    """Per split and channel (count, mean, m2): a (3, splits, C) float32 table."""
    partial = _f32(x3, 3, p.splits, x3.shape[1])
    jit._stats_kernel[p.grid](
        x3, partial[0], partial[1], partial[2], x3.shape[1], *p.extent, *x3.stride(),
        p.o_per, p.i_per, p.split_i, **_blocks(p),
    )  # fmt: skip
    return partial


def finalize(
    partial: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    count: float,
    momentum: float,
    eps: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, rstd, m2)`` from the split table (training; running buffers updated when given)
    or from the running buffers (eval: m2 is left unset)."""
    channels = partial.shape[2]
    mean, rstd, m2 = _f32(partial, 3, channels)
    block_c, block_s, grid = _channel_grid(channels)
    update = training and running_mean is not None and running_var is not None
    jit._finalize_kernel[grid](
        partial[0], partial[1], partial[2],
        running_mean if running_mean is not None else mean,
        running_var if running_var is not None else rstd, mean, rstd, m2,
        channels, partial.shape[1], float(count), float(momentum), float(eps),
        TRAINING=training, UPDATE=update, BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    return mean, rstd, m2


def channel_stats(x3: torch.Tensor, programs: int | None = None) -> tuple[Any, Any]:
    """Per-channel ``(mean, m2)`` (float32)."""
    p = _plan(x3, programs)
    mean, _, m2 = finalize(_stats(x3, p), None, None, p.count, 0.0, 1.0, True)
    return mean, m2


def normalize(
    x3: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    out: torch.Tensor | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """``y = (x - mean) * scale + shift`` in x's dtype, into ``out`` (a view like x3)."""
    y3 = _out(x3, out)
    _normalize_pass(x3, y3, mean, scale, None, shift, _plan(x3, programs))
    return y3


def _grad_partials(dy3: torch.Tensor, x3: torch.Tensor, mean: torch.Tensor, p: Plan) -> Any:
    partial = _f32(x3, 2, p.splits, x3.shape[1])
    _grad_pass(dy3, x3, mean, p, sums=partial)
    return partial


def grad_sums(
    dy3: torch.Tensor, x3: torch.Tensor, mean: torch.Tensor, programs: int | None = None
) -> tuple[Any, Any]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` (float32)."""
    partial = _grad_partials(dy3, x3, mean, _plan(x3, programs))
    return partial[0].sum(0), partial[1].sum(0)


def coefficients(
    sums: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    count: float,
    batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coef, dweight, dbias)`` from the (2, splits, C) table of grad sums: coef is (3, C),
    the a, b, c of :func:`batchnorm.math.grad_coefficients` (b = c = 0 for running stats)."""
    channels = sums.shape[2]
    coef = _f32(sums, 3, channels)
    dweight, dbias = _f32(sums, 2, channels)
    block_c, block_s, grid = _channel_grid(channels)
    jit._grad_coef_kernel[grid](
        sums[0], sums[1], rstd, rstd if weight is None else weight, coef, dweight, dbias,
        channels, sums.shape[1], float(count),
        HAS_W=weight is not None, BATCH_STATS=batch_stats, BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    return coef, dweight, dbias


def grad_input(
    dy3: torch.Tensor,
    x3: torch.Tensor,
    mean: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    out: torch.Tensor | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """``dx = a * dy + b * (x - mean) + c`` in x's dtype, into ``out`` (a view like x3)."""
    dx3 = _out(x3, out)
    coef = torch.stack((a, b, c)).to(torch.float32)
    _grad_pass(dy3, x3, mean, _plan(x3, programs), coef=coef, dx3=dx3)
    return dx3


# --- the whole operation, every per-channel step on the device ------------------------------


def forward(
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    out: torch.Tensor | None = None,
    programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y3, mean, rstd)``; mean and rstd are float32 (C,) for :func:`backward`.

    In training the statistics come from the batch and the running buffers (when given) are
    updated in place; otherwise the running buffers are used.
    """
    p = _plan(x3, programs)
    if training:
        partial = _stats(x3, p)
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    else:
        partial = _f32(x3, 3, 1, x3.shape[1])  # not read in eval
    mean, rstd, _ = finalize(partial, running_mean, running_var, p.count, momentum, eps, training)
    y3 = _out(x3, out)
    _normalize_pass(x3, y3, mean, rstd, weight, bias, p)
    return y3, mean, rstd


def backward(
    dy3: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    batch_stats: bool,
    need_input: bool = True,
    need_params: bool = True,
    out: torch.Tensor | None = None,
    programs: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dx3, dweight, dbias)``; the parameter gradients are float32 (C,).

    ``batch_stats``: whether forward normalized with the batch's own statistics (training),
    which adds the two terms through mean and variance to dx. ``dy3`` may have any strides.
    """
    p = _plan(x3, programs)
    if batch_stats or need_params:
        sums = _grad_partials(dy3, x3, mean, p)
    else:
        sums = torch.zeros(2, 1, x3.shape[1], dtype=torch.float32, device=x3.device)
    coef, dweight, dbias = coefficients(sums, rstd, weight, p.count, batch_stats)
    dx3 = None
    if need_input:
        dx3 = _out(x3, out)
        _grad_pass(dy3, x3, mean, p, coef=coef, dx3=dx3)
    return dx3, dweight, dbias

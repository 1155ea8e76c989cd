"""Triton kernels for batch normalization on the GPU (and on CPU under ``TRITON_INTERPRET=1``).

The input is seen as a strided ``(outer, C, inner)`` array, as in :mod:`batchnorm.functional`:
NCHW is ``(N, C, H*W)`` and channels-last is ``(N*H*W, C, 1)``; an (N, C) input is
``(N, C, 1)``. Every data pass tiles that array into ``[BLOCK_O, BLOCK_C, BLOCK_I]`` blocks; the
grid is ``(channel blocks, splits)``, each split owning a rectangle of (outer, inner) indices.

Training forward, three launches:

1. ``_stats_kernel``: per split and channel, the count, mean and M2 (sum of squared deviations)
   in float32, each tile's (mean, M2) merged into the running one with Chan's parallel formula.
2. ``_finalize_kernel``: merges the splits (mean first, then ``M2 = sum(M2_s + n_s (mean_s -
   mean)^2)``, both stable), updates the running buffers in place, writes mean and rstd.
3. ``_normalize_kernel``: ``y = (x - mean) * (weight * rstd) + bias``, its programs in reverse
   order so that it starts on the tiles the statistics pass read last (still in L2).

Backward: ``_grad_sums_kernel`` (per-split ``sum(dy)`` and ``sum(dy * (x - mean))``),
``_grad_coef_kernel`` (the coefficients of :func:`batchnorm.functional.batch_norm_backward`:
``a = w * rstd``, ``b = -a * rstd^2 * sum_dy_xmu / m``, ``c = -a * sum_dy / m``, and the
parameter gradients), then ``_grad_input_kernel``: ``dx = a * dy + b * (x - mean) + c``.

Every value is converted to float32 right after its load and back to the output's dtype right
at its store: Triton's CPU interpreter computes bfloat16 arithmetic wrongly (it has no native
bfloat16), while bfloat16 loads, float32 math and bfloat16 stores are exact there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["backward", "forward", "supported"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# elements per tile: 2048 with 8 warps keeps every data kernel under 80 registers a thread on
# sm_90 (4096 with 4 warps needed up to 254: low occupancy for memory-bound passes)
TILE = 2048
NUM_WARPS = 8  # per program of the data passes: 8 elements per thread and tile
# programs launched per data pass, about; a small number under the interpreter so that the tests
# exercise several splits per channel, several tiles per split and partial tiles
PROGRAMS_PER_SM = 8
INTERPRETER_PROGRAMS = 4


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """How one (outer, C, inner) shape is tiled and split across programs."""

    outer: int
    channels: int
    inner: int
    block_o: int
    block_c: int
    block_i: int
    o_per: int  # outer indices per split
    i_per: int  # inner indices per split
    split_o: int
    split_i: int

    @property
    def splits(self) -> int:
        return self.split_o * self.split_i

    @property
    def grid(self) -> tuple[int, int]:
        return (triton.cdiv(self.channels, self.block_c), self.splits)


def _block_inner(inner: int) -> int:
    """The largest power of two (128 to TILE) that pads ``inner`` by at most 5%, else the
    tightest; small ``inner`` take the next power of two."""
    if inner <= 128:
        return _np2(inner)
    top = min(TILE, _np2(inner))
    sizes = [b for b in (4096, 2048, 1024, 512, 256, 128) if b <= top] or [128]
    for b in sizes:
        if triton.cdiv(inner, b) * b <= 1.05 * inner:
            return b
    return min(sizes, key=lambda b: triton.cdiv(inner, b) * b)


def plan(outer: int, channels: int, inner: int, programs: int) -> Plan:
    """Tile sizes and splits for about ``programs`` programs per pass."""
    if inner > 1:  # NCHW-like: contiguous runs along inner, one channel per tile
        block_i = _block_inner(inner)
        block_c = 1
    else:  # channels-last or (N, C): contiguous runs along the channels
        block_i = 1
        block_c = min(_np2(channels), 128)
    block_o = max(1, min(_np2(outer), TILE // (block_i * block_c)))
    c_blocks = triton.cdiv(channels, block_c)
    want = max(1, programs // c_blocks)
    o_blocks = triton.cdiv(outer, block_o)
    i_blocks = triton.cdiv(inner, block_i)
    split_o = max(1, min(want, o_blocks))
    split_i = max(1, min(want // split_o, i_blocks))
    o_per = triton.cdiv(o_blocks, split_o) * block_o
    i_per = triton.cdiv(i_blocks, split_i) * block_i
    split_o = triton.cdiv(outer, o_per)  # no empty splits
    split_i = triton.cdiv(inner, i_per)
    return Plan(outer, channels, inner, block_o, block_c, block_i, o_per, i_per, split_o, split_i)


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(index) * PROGRAMS_PER_SM
    return INTERPRETER_PROGRAMS


def _merged_stride(dims: list[tuple[int, int]]) -> int | None:
    """The stride of ``dims`` ((size, stride) pairs) merged into one dim, or None."""
    dims = [(n, st) for n, st in dims if n != 1]
    for (_, outer_stride), (n, st) in zip(dims, dims[1:], strict=False):
        if outer_stride != st * n:
            return None
    return dims[-1][1] if dims else 1


def strides3d(t: torch.Tensor, channels_last: bool) -> tuple[int, int, int] | None:
    """Strides of ``t`` seen as (outer, C, inner), or None when that view needs a copy."""
    sizes, strides = t.shape, t.stride()
    spatial = list(zip(sizes[2:], strides[2:], strict=True))
    if channels_last:  # outer = (N, spatial...), inner = ()
        so = _merged_stride([(sizes[0], strides[0]), *spatial])
        return None if so is None else (so, strides[1], 0)
    si = _merged_stride(spatial)
    return None if si is None else (strides[0], strides[1], si)


def is_channels_last(x: torch.Tensor) -> bool | None:
    """False for contiguous x, True for channels-last x (channels densest), else None."""
    if x.is_contiguous():
        return False
    if x.movedim(1, -1).is_contiguous():
        return True
    return None


def view3d(x: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """(outer, C, inner) sizes and strides of ``x`` (NCHW or channels-last), or None."""
    cl = is_channels_last(x)
    if cl is None:
        return None
    inner = 1
    for s in x.shape[2:]:
        inner *= s
    sizes = (x.shape[0] * inner, x.shape[1], 1) if cl else (x.shape[0], x.shape[1], inner)
    strides = strides3d(x, cl)
    assert strides is not None
    return sizes, strides


def supported(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x`` as it is (dtype, layout, 32-bit offsets)."""
    return x.dtype in DTYPES and x.dim() >= 2 and x.numel() < 2**31 and view3d(x) is not None


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile(
    pid_c,
    o0,
    i0,
    o_hi,
    i_hi,
    C,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Index vectors and the mask of one [BLOCK_O, BLOCK_C, BLOCK_I] tile."""
    o = o0 + tl.arange(0, BLOCK_O)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    i = i0 + tl.arange(0, BLOCK_I)
    mask = (o < o_hi)[:, None, None] & (c < C)[None, :, None] & (i < i_hi)[None, None, :]
    return o[:, None, None], c[None, :, None], i[None, None, :], mask


@triton.jit
def _split_bounds(pid_s, OUTER, INNER, O_PER, I_PER, SPLIT_I):
    o_lo = (pid_s // SPLIT_I) * O_PER
    i_lo = (pid_s % SPLIT_I) * I_PER
    o_hi = tl.minimum(o_lo + O_PER, OUTER)
    i_hi = tl.minimum(i_lo + I_PER, INNER)
    return o_lo, i_lo, o_hi, i_hi


@triton.jit
def _stats_kernel(
    X, P_COUNT, P_MEAN, P_M2,
    C, OUTER, INNER, SO, SC, SI, O_PER, I_PER, SPLIT_I,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_lo, i_lo, o_hi, i_hi = _split_bounds(pid_s, OUTER, INNER, O_PER, I_PER, SPLIT_I)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for o0 in range(o_lo, o_hi, BLOCK_O):
        for i0 in range(i_lo, i_hi, BLOCK_I):
            o, c, i, mask = _tile(pid_c, o0, i0, o_hi, i_hi, C, BLOCK_O, BLOCK_C, BLOCK_I)
            x = tl.load(X + o * SO + c * SC + i * SI, mask=mask, other=0.0).to(tl.float32)
            n_o = tl.minimum(o_hi - o0, BLOCK_O)
            n_i = tl.minimum(i_hi - i0, BLOCK_I)
            nb = (n_o * n_i).to(tl.float32)
            tile_mean = tl.sum(tl.sum(x, axis=2), axis=0) / nb
            d = tl.where(mask, x - tile_mean[None, :, None], 0.0)
            tile_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
            total = count + nb  # Chan et al.: merge (count, mean, m2) with (nb, tile_mean, ..)
            delta = tile_mean - mean
            mean += delta * (nb / total)
            m2 += tile_m2 + delta * delta * (count * nb / total)
            count = total
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    tl.store(P_COUNT + pid_s * C + c, count, mask=cmask)
    tl.store(P_MEAN + pid_s * C + c, mean, mask=cmask)
    tl.store(P_M2 + pid_s * C + c, m2, mask=cmask)


@triton.jit
def _finalize_kernel(
    P_COUNT, P_MEAN, P_M2, RM, RV, MEAN, RSTD,
    C, SPLITS, total, momentum, eps,
    TRAINING: tl.constexpr, UPDATE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if TRAINING:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            m = (s < SPLITS)[:, None] & cmask[None, :]
            offs = s[:, None] * C + c[None, :]
            n = tl.load(P_COUNT + offs, mask=m, other=0.0)
            acc += tl.sum(n * tl.load(P_MEAN + offs, mask=m, other=0.0), axis=0)
        mean = acc / total
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            m = (s < SPLITS)[:, None] & cmask[None, :]
            offs = s[:, None] * C + c[None, :]
            n = tl.load(P_COUNT + offs, mask=m, other=0.0)
            d = tl.load(P_MEAN + offs, mask=m, other=0.0) - mean[None, :]
            m2 += tl.sum(tl.load(P_M2 + offs, mask=m, other=0.0) + n * d * d, axis=0)
        var = m2 / total
        if UPDATE:  # running_var gets the unbiased variance, as in PyTorch
            rm = tl.load(RM + c, mask=cmask, other=0.0).to(tl.float32)
            rv = tl.load(RV + c, mask=cmask, other=0.0).to(tl.float32)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * (m2 / (total - 1.0))
            tl.store(RM + c, rm.to(RM.dtype.element_ty), mask=cmask)
            tl.store(RV + c, rv.to(RV.dtype.element_ty), mask=cmask)
    else:
        mean = tl.load(RM + c, mask=cmask, other=0.0).to(tl.float32)
        var = tl.load(RV + c, mask=cmask, other=1.0).to(tl.float32)
    var = tl.where(cmask, var, 1.0)  # lanes past C: no 1 / 0 (the interpreter would warn)
    tl.store(MEAN + c, mean, mask=cmask)
    tl.store(RSTD + c, 1.0 / tl.sqrt(var + eps), mask=cmask)


@triton.jit
def _normalize_kernel(
    X, Y, MEAN, RSTD, W, B,
    C, OUTER, INNER, SO, SC, SI, O_PER, I_PER, SPLIT_I,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    # programs in reverse launch order: the tiles the previous pass read last, still in L2,
    # are read first
    pid_c = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_s = tl.num_programs(1) - 1 - tl.program_id(1)
    o_lo, i_lo, o_hi, i_hi = _split_bounds(pid_s, OUTER, INNER, O_PER, I_PER, SPLIT_I)
    cv = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cv < C
    mean = tl.load(MEAN + cv, mask=cmask, other=0.0)
    scale = tl.load(RSTD + cv, mask=cmask, other=0.0)
    if HAS_W:
        scale *= tl.load(W + cv, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        shift = tl.load(B + cv, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = mean[None, :, None]
    scale = scale[None, :, None]
    shift = shift[None, :, None]
    for o0 in range(o_lo, o_hi, BLOCK_O):
        for i0 in range(i_lo, i_hi, BLOCK_I):
            o, c, i, mask = _tile(pid_c, o0, i0, o_hi, i_hi, C, BLOCK_O, BLOCK_C, BLOCK_I)
            offs = o * SO + c * SC + i * SI
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * scale + shift
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(
    DY, X, MEAN, P_SDY, P_SDYX,
    C, OUTER, INNER, SO, SC, SI, DSO, DSC, DSI, O_PER, I_PER, SPLIT_I,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_lo, i_lo, o_hi, i_hi = _split_bounds(pid_s, OUTER, INNER, O_PER, I_PER, SPLIT_I)
    cv = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cv < C
    mean = tl.load(MEAN + cv, mask=cmask, other=0.0)[None, :, None]
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for o0 in range(o_lo, o_hi, BLOCK_O):
        for i0 in range(i_lo, i_hi, BLOCK_I):
            o, c, i, mask = _tile(pid_c, o0, i0, o_hi, i_hi, C, BLOCK_O, BLOCK_C, BLOCK_I)
            x = tl.load(X + o * SO + c * SC + i * SI, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + o * DSO + c * DSC + i * DSI, mask=mask, other=0.0).to(tl.float32)
            sum_dy += tl.sum(tl.sum(dy, axis=2), axis=0)
            sum_dy_xmu += tl.sum(tl.sum(tl.where(mask, dy * (x - mean), 0.0), axis=2), axis=0)
    tl.store(P_SDY + pid_s * C + cv, sum_dy, mask=cmask)
    tl.store(P_SDYX + pid_s * C + cv, sum_dy_xmu, mask=cmask)


@triton.jit
def _grad_coef_kernel(
    P_SDY, P_SDYX, RSTD, W, COEF, DW, DB,
    C, SPLITS, count,
    HAS_W: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = (s < SPLITS)[:, None] & cmask[None, :]
        offs = s[:, None] * C + c[None, :]
        sum_dy += tl.sum(tl.load(P_SDY + offs, mask=m, other=0.0), axis=0)
        sum_dy_xmu += tl.sum(tl.load(P_SDYX + offs, mask=m, other=0.0), axis=0)
    rstd = tl.load(RSTD + c, mask=cmask, other=0.0)
    # the coefficients of batchnorm.functional.batch_norm_backward, term for term
    if HAS_W:
        a = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32) * rstd
    else:
        a = rstd
    if BATCH_STATS:
        b = -a * rstd * rstd * sum_dy_xmu / count
        cc = -a * sum_dy / count
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
        cc = tl.zeros([BLOCK_C], dtype=tl.float32)
    tl.store(COEF + c, a, mask=cmask)
    tl.store(COEF + C + c, b, mask=cmask)
    tl.store(COEF + 2 * C + c, cc, mask=cmask)
    tl.store(DW + c, sum_dy_xmu * rstd, mask=cmask)
    tl.store(DB + c, sum_dy, mask=cmask)


@triton.jit
def _grad_input_kernel(
    DY, X, MEAN, COEF, DX,
    C, OUTER, INNER, SO, SC, SI, DSO, DSC, DSI, O_PER, I_PER, SPLIT_I,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    # programs in reverse launch order: the tiles the previous pass read last, still in L2,
    # are read first
    pid_c = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_s = tl.num_programs(1) - 1 - tl.program_id(1)
    o_lo, i_lo, o_hi, i_hi = _split_bounds(pid_s, OUTER, INNER, O_PER, I_PER, SPLIT_I)
    cv = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cv < C
    mean = tl.load(MEAN + cv, mask=cmask, other=0.0)[None, :, None]
    a = tl.load(COEF + cv, mask=cmask, other=0.0)[None, :, None]
    b = tl.load(COEF + C + cv, mask=cmask, other=0.0)[None, :, None]
    cc = tl.load(COEF + 2 * C + cv, mask=cmask, other=0.0)[None, :, None]
    for o0 in range(o_lo, o_hi, BLOCK_O):
        for i0 in range(i_lo, i_hi, BLOCK_I):
            o, c, i, mask = _tile(pid_c, o0, i0, o_hi, i_hi, C, BLOCK_O, BLOCK_C, BLOCK_I)
            offs = o * SO + c * SC + i * SI
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + o * DSO + c * DSC + i * DSI, mask=mask, other=0.0).to(tl.float32)
            dx = a * dy + b * (x - mean) + cc
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- launchers


def _blocks(p: Plan) -> dict[str, int]:
    return {
        "BLOCK_O": p.block_o, "BLOCK_C": p.block_c, "BLOCK_I": p.block_i, "num_warps": NUM_WARPS
    }


def _finalize_grid(channels: int) -> tuple[int, int, tuple[int]]:
    block_c = min(_np2(channels), 128)
    return block_c, 32, (triton.cdiv(channels, block_c),)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``; mean and rstd are float32 (C,) for :func:`backward`.

    In training the statistics come from the batch and the running buffers (when given) are
    updated in place; otherwise the running buffers are used.
    """
    view = view3d(x)
    if view is None:
        raise ValueError("the Triton kernels take NCHW-contiguous or channels-last input")
    (outer, channels, inner), (so, sc, si) = view
    p = plan(outer, channels, inner, programs or _programs(x.device))
    f32: dict[str, Any] = {"dtype": torch.float32, "device": x.device}
    mean = torch.empty(channels, **f32)
    rstd = torch.empty(channels, **f32)
    block_c, block_s, fgrid = _finalize_grid(channels)
    if training:
        partial = torch.empty(3, p.splits, channels, **f32)
        _stats_kernel[p.grid](
            x, partial[0], partial[1], partial[2],
            channels, outer, inner, so, sc, si, p.o_per, p.i_per, p.split_i, **_blocks(p),
        )  # fmt: skip
        update = running_mean is not None and running_var is not None
        _finalize_kernel[fgrid](
            partial[0], partial[1], partial[2],
            running_mean if update else mean, running_var if update else rstd, mean, rstd,
            channels, p.splits, float(outer * inner), float(momentum), float(eps),
            TRAINING=True, UPDATE=update, BLOCK_C=block_c, BLOCK_S=block_s,
        )  # fmt: skip
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        _finalize_kernel[fgrid](
            mean, mean, mean, running_mean, running_var, mean, rstd,
            channels, 0, 1.0, 0.0, float(eps),
            TRAINING=False, UPDATE=False, BLOCK_C=block_c, BLOCK_S=block_s,
        )  # fmt: skip
    y = torch.empty_like(x)  # same strides as x: both layouts are dense
    _normalize_kernel[p.grid](
        x, y, mean, rstd,
        mean if weight is None else weight, mean if bias is None else bias,
        channels, outer, inner, so, sc, si, p.o_per, p.i_per, p.split_i,
        HAS_W=weight is not None, HAS_B=bias is not None, **_blocks(p),
    )  # fmt: skip
    return y, mean, rstd


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    batch_stats: bool,
    need_input: bool = True,
    need_params: bool = True,
    programs: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``; the parameter gradients are float32 (C,).

    ``batch_stats``: whether forward normalized with the batch's own statistics (training),
    which adds the two terms through mean and variance to dx.
    """
    view = view3d(x)
    if view is None:
        raise ValueError("the Triton kernels take NCHW-contiguous or channels-last input")
    (outer, channels, inner), (so, sc, si) = view
    cl = bool(is_channels_last(x))
    dstrides = strides3d(dy, cl)
    if dstrides is None:  # dy's elements don't fit three strides: copy it into x's layout
        dy = torch.empty_like(x, dtype=dy.dtype).copy_(dy)
        dstrides = strides3d(dy, cl)
        assert dstrides is not None
    dso, dsc, dsi = dstrides
    p = plan(outer, channels, inner, programs or _programs(x.device))
    f32: dict[str, Any] = {"dtype": torch.float32, "device": x.device}
    splits = p.splits if (batch_stats or need_params) else 0
    partial = torch.empty(2, max(splits, 1), channels, **f32)
    if splits:
        _grad_sums_kernel[p.grid](
            dy, x, mean, partial[0], partial[1],
            channels, outer, inner, so, sc, si, dso, dsc, dsi, p.o_per, p.i_per, p.split_i,
            **_blocks(p),
        )  # fmt: skip
    coef = torch.empty(3, channels, **f32)
    dweight = torch.empty(channels, **f32)
    dbias = torch.empty(channels, **f32)
    block_c, block_s, fgrid = _finalize_grid(channels)
    _grad_coef_kernel[fgrid](
        partial[0], partial[1], rstd, mean if weight is None else weight, coef, dweight, dbias,
        channels, splits, float(outer * inner),
        HAS_W=weight is not None, BATCH_STATS=batch_stats, BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    dx = None
    if need_input:
        dx = torch.empty_like(x)
        _grad_input_kernel[p.grid](
            dy, x, mean, coef, dx,
            channels, outer, inner, so, sc, si, dso, dsc, dsi, p.o_per, p.i_per, p.split_i,
            **_blocks(p),
        )  # fmt: skip
    return dx, dweight, dbias

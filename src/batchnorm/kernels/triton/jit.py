"""The Triton kernels (``@triton.jit``); launched by :mod:`batchnorm.kernels.triton`.

Every value is converted to float32 right after its load and back to the output's dtype right
at its store: Triton's CPU interpreter computes bfloat16 arithmetic wrongly (it has no native
bfloat16), while bfloat16 loads, float32 math and bfloat16 stores are exact there.

Two formulas are written out here for speed; each names its one copy in :mod:`batchnorm.math`
and ``tests/test_torch_triton.py`` pins the two equal.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _program(C, OUTER, INNER, O_PER, I_PER, SPLIT_I, BLOCK_C: tl.constexpr,
             REVERSED: tl.constexpr):  # fmt: skip
    """This program's channel block and split: pid_c, pid_s, bounds, channels and their mask.

    REVERSED: programs in reverse launch order, so an elementwise pass reads first the tiles
    the previous pass read last, still in L2.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    if REVERSED:
        pid_c = tl.num_programs(0) - 1 - pid_c
        pid_s = tl.num_programs(1) - 1 - pid_s
    o_lo, i_lo, o_hi, i_hi = _split_bounds(pid_s, OUTER, INNER, O_PER, I_PER, SPLIT_I)
    cv = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_c, pid_s, o_lo, i_lo, o_hi, i_hi, cv, cv < C


@triton.jit
def _split_rows(s0, SPLITS, c, cmask, C, BLOCK_S: tl.constexpr):
    """Offsets and mask of rows s0 .. s0 + BLOCK_S of a (splits, C) table, channels c."""
    s = s0 + tl.arange(0, BLOCK_S)
    return s[:, None] * C + c[None, :], (s < SPLITS)[:, None] & cmask[None, :]


@triton.jit
def _stats_kernel(
    X, P_COUNT, P_MEAN, P_M2,
    C, OUTER, INNER, SO, SC, SI, O_PER, I_PER, SPLIT_I,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    pid_c, pid_s, o_lo, i_lo, o_hi, i_hi, cv, cmask = _program(
        C, OUTER, INNER, O_PER, I_PER, SPLIT_I, BLOCK_C, False
    )
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
            # batchnorm.math.chan_merge_step: (count, mean, m2) merged with this tile's
            total = count + nb
            delta = tile_mean - mean
            mean += delta * (nb / total)
            m2 += tile_m2 + delta * delta * (count * nb / total)
            count = total
    tl.store(P_COUNT + pid_s * C + cv, count, mask=cmask)
    tl.store(P_MEAN + pid_s * C + cv, mean, mask=cmask)
    tl.store(P_M2 + pid_s * C + cv, m2, mask=cmask)


@triton.jit
def _finalize_kernel(
    P_COUNT, P_MEAN, P_M2, RM, RV, MEAN, RSTD, M2,
    C, SPLITS, total, momentum, eps,
    TRAINING: tl.constexpr, UPDATE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if TRAINING:  # batchnorm.math.merge_all of the splits' summaries: mean first, then m2
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            offs, m = _split_rows(s0, SPLITS, c, cmask, C, BLOCK_S)
            n = tl.load(P_COUNT + offs, mask=m, other=0.0)
            acc += tl.sum(n * tl.load(P_MEAN + offs, mask=m, other=0.0), axis=0)
        mean = acc / total
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            offs, m = _split_rows(s0, SPLITS, c, cmask, C, BLOCK_S)
            n = tl.load(P_COUNT + offs, mask=m, other=0.0)
            d = tl.load(P_MEAN + offs, mask=m, other=0.0) - mean[None, :]
            m2 += tl.sum(tl.load(P_M2 + offs, mask=m, other=0.0) + n * d * d, axis=0)
        var = m2 / total
        tl.store(M2 + c, m2, mask=cmask)
        if UPDATE:  # batchnorm.math.running_stats: the unbiased variance, as in PyTorch
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
    tl.store(RSTD + c, 1.0 / tl.sqrt(var + eps), mask=cmask)  # batchnorm.math.inverse_std


@triton.jit
def _normalize_kernel(
    X, Y, MEAN, RSTD, W, B,
    C, OUTER, INNER, SO, SC, SI, O_PER, I_PER, SPLIT_I,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    pid_c, pid_s, o_lo, i_lo, o_hi, i_hi, cv, cmask = _program(
        C, OUTER, INNER, O_PER, I_PER, SPLIT_I, BLOCK_C, True
    )
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
        offs, m = _split_rows(s0, SPLITS, c, cmask, C, BLOCK_S)
        sum_dy += tl.sum(tl.load(P_SDY + offs, mask=m, other=0.0), axis=0)
        sum_dy_xmu += tl.sum(tl.load(P_SDYX + offs, mask=m, other=0.0), axis=0)
    rstd = tl.load(RSTD + c, mask=cmask, other=0.0)
    # batchnorm.math.grad_coefficients, term for term
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
def _grad_kernel(
    DY, X, MEAN, P_SDY, P_SDYX, COEF, DX,
    C, OUTER, INNER, SO, SC, SI, DSO, DSC, DSI, O_PER, I_PER, SPLIT_I,
    DX_PASS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    """The two backward passes over the (x, dy) tiles, one compiled for each DX_PASS.

    False: per split ``sum(dy)`` and ``sum(dy * (x - mean))`` into P_SDY, P_SDYX. True:
    ``dx = a * dy + b * (x - mean) + c`` into DX, a, b, c the rows of COEF; its programs run in
    reverse order (see _program).
    """
    pid_c, pid_s, o_lo, i_lo, o_hi, i_hi, cv, cmask = _program(
        C, OUTER, INNER, O_PER, I_PER, SPLIT_I, BLOCK_C, DX_PASS
    )
    mean = tl.load(MEAN + cv, mask=cmask, other=0.0)[None, :, None]
    if DX_PASS:
        a = tl.load(COEF + cv, mask=cmask, other=0.0)[None, :, None]
        b = tl.load(COEF + C + cv, mask=cmask, other=0.0)[None, :, None]
        cc = tl.load(COEF + 2 * C + cv, mask=cmask, other=0.0)[None, :, None]
    else:
        sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for o0 in range(o_lo, o_hi, BLOCK_O):
        for i0 in range(i_lo, i_hi, BLOCK_I):
            o, c, i, mask = _tile(pid_c, o0, i0, o_hi, i_hi, C, BLOCK_O, BLOCK_C, BLOCK_I)
            offs = o * SO + c * SC + i * SI
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + o * DSO + c * DSC + i * DSI, mask=mask, other=0.0).to(tl.float32)
            if DX_PASS:
                dx = a * dy + b * (x - mean) + cc
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            else:
                sum_dy += tl.sum(tl.sum(dy, axis=2), axis=0)
                sum_dy_xmu += tl.sum(tl.sum(tl.where(mask, dy * (x - mean), 0.0), axis=2), axis=0)
    if not DX_PASS:
        tl.store(P_SDY + pid_s * C + cv, sum_dy, mask=cmask)
        tl.store(P_SDYX + pid_s * C + cv, sum_dy_xmu, mask=cmask)

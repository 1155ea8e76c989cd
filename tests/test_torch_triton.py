"""The Triton kernels, run on CPU by Triton's interpreter (TRITON_INTERPRET=1).

Triton reads TRITON_INTERPRET when a function is decorated: ``@triton.jit`` then returns an
``InterpretedFunction``, and that includes triton.language's own helpers (``tl.zeros``), so
the variable must be set before triton is first imported in the process. This module sets it
while it imports triton and our kernels, when triton is not imported yet (and again while its
tests run); otherwise its tests skip and one test runs the whole file in a fresh process.

Shapes are small and odd; ``programs`` is kept small so that every case runs several splits
per channel, several tiles per split and partial tiles.

What the interpreter cannot check: compilation for a GPU (types, layouts, register use), real
float16/bfloat16 hardware arithmetic (the kernels load, convert to float32, compute, convert
back at the store: that path is exact in the interpreter, whose own bfloat16 arithmetic is
wrong), races (the interpreter runs programs one after another), and speed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

_FRESH = "triton" not in sys.modules
_OLD_ENV = os.environ.get("TRITON_INTERPRET")
if _FRESH:
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton, see above

try:
    torch = pytest.importorskip("torch")
    triton = pytest.importorskip("triton")
    if _FRESH:  # decorate our kernels now, under the variable
        importlib.import_module("batchnorm.kernels.triton")
finally:  # the rest of this process (other test files) sees the environment it had
    if _OLD_ENV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_ENV

from torch import nn  # noqa: E402

import batchnorm.torch as bt  # noqa: E402
from batchnorm import math as bnmath  # noqa: E402
from batchnorm.layout import tensor_channels_last, tensor_view  # noqa: E402
from batchnorm.torch import routing  # noqa: E402

# Outputs in each dtype against PyTorch in float64 on the same (rounded) input, then rounded
# to the dtype. The kernels compute in float32: over these small batches (m <= 400 values per
# channel) that leaves about 1e-6 relative error before the final rounding, so the two
# roundings differ by at most one unit of the dtype (relative spacing 2**-10 for float16,
# 2**-7 for bfloat16) and float32 results by a few hundred float32 ulps; atol covers values
# near zero, where the float32 error is absolute.
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-5, "rtol": 2.0**-10},
    torch.bfloat16: {"atol": 1e-5, "rtol": 2.0**-7},
}
EPS32 = torch.finfo(torch.float32).eps
DTYPES = list(TOL)
TILE = 32  # elements per tile in these tests (4096 on a GPU)
PROGRAMS = 8  # programs per pass, about (a thousand on a GPU)
CASES = [  # shape, channels_last
    ((5, 3, 7, 9), False),
    ((5, 3, 7, 9), True),
    ((13, 70), False),
    ((3, 6, 11), True),
    ((3, 3, 3, 2, 5), False),
]


@pytest.fixture(scope="module")
def tk() -> Iterator[ModuleType]:
    if not _FRESH:
        pytest.skip("triton was imported before TRITON_INTERPRET=1: see test_in_fresh_process")
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module("batchnorm.kernels.triton")
    plan = importlib.import_module("batchnorm.kernels.triton.tiling")
    assert isinstance(module.jit._stats_kernel, InterpretedFunction), "kernels not interpreted"
    threads, tile = torch.get_num_threads(), plan.TILE
    torch.set_num_threads(1)
    plan.TILE = TILE  # small tiles: several per split, and partial ones, on small inputs
    os.environ["TRITON_INTERPRET"] = "1"  # triton also reads it while interpreting
    try:
        yield module
    finally:
        plan.TILE = tile
        torch.set_num_threads(threads)
        if _OLD_ENV is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _OLD_ENV


if not _FRESH:  # triton came in without the interpreter: run this file in a new process

    def test_in_fresh_process() -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
        res = subprocess.run(
            [*cmd, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else x.contiguous()


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """got (in dtype) against want (float64), rounded to dtype: see TOL."""
    torch.testing.assert_close(got.double(), want.to(dtype).double(), **TOL[dtype])


def _close_sums(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> None:
    """Float32 per-channel sums (parameter gradients) against float64 ones: summing m terms in
    float32 errs by at most m * eps32 * sum(|terms|) (recursive summation's bound; tiles and
    splits only lower it); terms is (m, C)."""
    bound = terms.shape[0] * EPS32 * terms.abs().sum(0)
    err = (got.double() - want.double()).abs()
    assert (err <= bound + 1e-12).all(), (err, bound)


def _fwd(tk, x, *args, **kwargs):
    """tk.forward on the (outer, C, inner) views of x and a new y."""
    y = torch.empty_like(x)
    _, mean, rstd = tk.forward(tensor_view(x), *args, out=tensor_view(y), **kwargs)
    return y, mean, rstd


def _bwd(tk, dy, x, *args, **kwargs):
    cl = tensor_channels_last(x)
    dy3 = tensor_view(dy, cl)
    if dy3 is None:
        dy3 = tensor_view(torch.empty_like(x, dtype=dy.dtype).copy_(dy), cl)
    dx = torch.empty_like(x)
    _, dw, db = tk.backward(dy3, tensor_view(x, cl), *args, out=tensor_view(dx, cl), **kwargs)
    return dx, dw, db


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """(m, C): the values of each channel in a column."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _inputs(shape, channels_last, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _layout((torch.randn(shape, generator=gen) * 2 + 3).to(dtype), channels_last)
    w = (torch.rand(c, generator=gen) + 0.5).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype)
    dy = _layout(torch.randn(shape, generator=gen).to(dtype), channels_last)
    return x, w, b, dy


def _oracle(x, w, b, dy, rm, rv, training, eps):
    """PyTorch in float64 on the same (already rounded) values: y, dx, dw, db."""
    xr = x.double().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    yr = nn.functional.batch_norm(xr, rm, rv, wr, br, training, 0.1, eps)
    yr.backward(dy.double())
    xhat = (yr.detach() - br.detach().view(1, -1, *[1] * (x.dim() - 2))) / wr.detach().view(
        1, -1, *[1] * (x.dim() - 2)
    )
    return yr.detach(), xr.grad, wr.grad, br.grad, xhat


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=str)
def test_training_forward_and_backward(tk, shape, channels_last, dtype) -> None:
    x, w, b, dy = _inputs(shape, channels_last, dtype)
    c = shape[1]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    y, mean, rstd = _fwd(tk, x, w, b, rm, rv, True, 0.1, 1e-5, programs=PROGRAMS)
    assert y.dtype == dtype and y.stride() == x.stride()
    yr, dxr, dwr, dbr, xhat = _oracle(x, w, b, dy, rm_ref, rv_ref, True, 1e-5)
    _close(y, yr, dtype)
    torch.testing.assert_close(rm.double(), rm_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rv.double(), rv_ref, atol=1e-6, rtol=1e-5)
    dx, dw, db = _bwd(tk, dy, x, w, mean, rstd, True, programs=PROGRAMS)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    _close(dx, dxr, dtype)
    _close_sums(dw, dwr, _per_channel(dy.double() * xhat))
    _close_sums(db, dbr, _per_channel(dy.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES[:3], ids=str)
def test_eval_forward_and_backward(tk, shape, channels_last, dtype) -> None:
    x, w, b, dy = _inputs(shape, channels_last, dtype, seed=1)
    c = shape[1]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    y, mean, rstd = _fwd(tk, x, w, b, rm, rv, False, 0.1, 1e-3, programs=PROGRAMS)
    yr, dxr, dwr, dbr, xhat = _oracle(x, w, b, dy, rm.double(), rv.double(), False, 1e-3)
    _close(y, yr, dtype)
    dx, dw, db = _bwd(tk, dy, x, w, mean, rstd, False, programs=PROGRAMS)
    _close(dx, dxr, dtype)
    _close_sums(dw, dwr, _per_channel(dy.double() * xhat))
    _close_sums(db, dbr, _per_channel(dy.double()))


def test_chan_merge_and_finalize_equal_batchnorm_math(tk) -> None:
    """_stats_kernel and _finalize_kernel write out math.chan_merge_step, merge_all,
    running_stats and inverse_std: the same numbers as those functions on the same tiles."""
    x = torch.randn(7, 3, 6, 5, generator=torch.Generator().manual_seed(7)) * 3 + 2
    x3 = tensor_view(x)
    p = tk._plan(x3, PROGRAMS)
    assert p.splits > 1 and p.o_per > p.block_o  # several splits, several tiles each
    table = tk._stats(x3, p)  # (count, mean, m2) of each split, merged tile by tile in-kernel
    for s in range(p.splits):  # each split: math.merge_all over its tiles, in float64
        o_lo, i_lo = (s // p.split_i) * p.o_per, (s % p.split_i) * p.i_per
        tiles = []
        for o0 in range(o_lo, min(o_lo + p.o_per, p.outer), p.block_o):
            for i0 in range(i_lo, min(i_lo + p.i_per, p.inner), p.block_i):
                o_hi = min(o0 + p.block_o, o_lo + p.o_per, p.outer)
                i_hi = min(i0 + p.block_i, i_lo + p.i_per, p.inner)
                t = x3[o0:o_hi, :, i0:i_hi].double().movedim(1, -1).reshape(-1, 3)
                tiles.append((t.shape[0], t.mean(0), ((t - t.mean(0)) ** 2).sum(0)))
        n, mean, m2 = bnmath.merge_all(*zip(*tiles, strict=True))
        assert table[0, s].tolist() == [n] * 3
        torch.testing.assert_close(table[1, s].double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(table[2, s].double(), m2, rtol=1e-5, atol=1e-5)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    want_rm, want_rv = rm.double(), rv.double()
    mean, rstd, m2 = tk.finalize(table, rm, rv, p.count, 0.3, 1e-2, True)
    n, want_mean, want_m2 = bnmath.merge_all(
        table[0, :, 0].tolist(), list(table[1].double()), list(table[2].double())
    )
    want_rm, want_rv = bnmath.running_stats(want_rm, want_rv, want_mean, want_m2, n, 0.3)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2.double(), want_m2, rtol=1e-5, atol=1e-5)
    want_rstd = bnmath.inverse_std(want_m2 / n, 1e-2)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-6, atol=0)
    torch.testing.assert_close(rm.double(), want_rm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), want_rv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("has_weight", [True, False])
def test_coefficient_kernel_equals_batchnorm_math(tk, has_weight) -> None:
    """_grad_coef_kernel writes out math.grad_coefficients: the same a, b, c."""
    gen = torch.Generator().manual_seed(8)
    sums = torch.randn(2, 3, 6, generator=gen)  # 3 splits of (sum_dy, sum_dy_xmu)
    rstd = torch.rand(6, generator=gen) + 0.5
    w = torch.rand(6, generator=gen) + 0.5 if has_weight else None
    coef, dw, db = tk.coefficients(sums, rstd, w, 37.0, True)
    sum_dy, sum_dy_xmu = sums.double().sum(1)
    weight = w.double() if has_weight else torch.ones(6, dtype=torch.float64)
    want = bnmath.grad_coefficients(weight, rstd.double(), sum_dy, sum_dy_xmu, 37.0)
    for got, ref in zip(coef, want, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dw.double(), sum_dy_xmu * rstd.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(db.double(), sum_dy, rtol=1e-6, atol=1e-7)
    coef, _, _ = tk.coefficients(sums, rstd, w, 37.0, False)  # running stats: dx = a * dy
    assert coef[1:].abs().max() == 0
    torch.testing.assert_close(coef[0].double(), want[0], rtol=1e-6, atol=0)


def test_per_pass_functions_match_the_whole_op(tk) -> None:
    """The Kernels passes (channel_stats, normalize, grad_sums, grad_input) with the math of
    batchnorm.math give what forward/backward give."""
    x, w, b, dy = _inputs((5, 3, 7, 9), True, torch.float32, seed=4)
    x3, dy3 = tensor_view(x), tensor_view(dy)
    mean, m2 = tk.channel_stats(x3, programs=PROGRAMS)
    count = x3.shape[0] * x3.shape[2]
    rstd = bnmath.inverse_std(m2 / count, 1e-5)
    y3 = tk.normalize(x3, mean, rstd * w, b, programs=PROGRAMS)
    y_ref, mean_ref, rstd_ref = _fwd(tk, x, w, b, None, None, True, 0.1, 1e-5, programs=PROGRAMS)
    torch.testing.assert_close(y3, tensor_view(y_ref), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-6, atol=1e-6)
    sum_dy, sum_dy_xmu = tk.grad_sums(dy3, x3, mean, programs=PROGRAMS)
    a, bb, c = bnmath.grad_coefficients(w, rstd, sum_dy, sum_dy_xmu, count)
    dx3 = tk.grad_input(dy3, x3, mean, a, bb, c, programs=PROGRAMS)
    dx_ref, dw_ref, db_ref = _bwd(tk, dy, x, w, mean_ref, rstd_ref, True, programs=PROGRAMS)
    torch.testing.assert_close(dx3, tensor_view(dx_ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum_dy, db_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum_dy_xmu * rstd, dw_ref, rtol=1e-5, atol=1e-5)


def test_statistics_are_stable_for_large_offsets(tk) -> None:
    """mean 1e4, std 1 in float32: E[x^2] - E[x]^2 would lose every digit of the variance."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, 5, 7, generator=gen, dtype=torch.float64) + 1e4
    x32 = x.float()
    rm, rv = torch.zeros(3), torch.ones(3)
    _, mean, rstd = _fwd(tk, x32, None, None, rm, rv, True, 1.0, 0.0, programs=PROGRAMS)
    var = x32.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), x32.double().mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), var.rsqrt(), rtol=1e-3, atol=0)
    torch.testing.assert_close(rv.double(), x32.double().var(dim=(0, 2, 3)), rtol=1e-3, atol=0)


def test_nonfinite_values_propagate_as_in_torch(tk) -> None:
    x, w, b, _ = _inputs((4, 3, 5, 6), False, torch.float32)
    x[1, 2, 3, 4] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    y, _, _ = _fwd(tk, x, w, b, rm, rv, True, 0.1, 1e-5)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    assert torch.isnan(rm[2]) and torch.isnan(rv[2]) and torch.isfinite(rm[:2]).all()


def test_test_shapes_use_several_splits_and_tiles(tk) -> None:
    for shape, channels_last in CASES:
        x = _layout(torch.empty(shape), channels_last)
        p = tk._plan(tensor_view(x), PROGRAMS)
        assert p.splits > 1, shape
        tiles = (p.o_per // p.block_o) * (p.i_per // p.block_i)
        assert tiles > 1, shape


def test_plan_covers_every_element(tk, monkeypatch) -> None:
    plan = importlib.import_module("batchnorm.kernels.triton.tiling")
    monkeypatch.setattr(plan, "TILE", 4096)
    assert plan.plan(32, 64, 112 * 112, 1056).block_i == 512  # 2% padding, not 30% with 4096
    for outer, c, inner, programs in [
        (5, 3, 63, 3), (315, 70, 1, 4), (1, 2, 10000, 7), (64, 256, 3136, 1056), (7, 3, 300, 1)
    ]:  # fmt: skip
        p = plan.plan(outer, c, inner, programs)
        assert p.split_o * p.o_per >= outer and (p.split_o - 1) * p.o_per < outer
        assert p.split_i * p.i_per >= inner and (p.split_i - 1) * p.i_per < inner
        assert p.o_per % p.block_o == 0 and p.i_per % p.block_i == 0


def test_grad_output_of_any_strides(tk) -> None:
    x, w, b, _ = _inputs((4, 3, 5, 6), True, torch.float32)
    _, mean, rstd = _fwd(tk, x, w, b, None, None, True, 0.1, 1e-5)
    xr = x.clone().requires_grad_()
    for dy in (torch.ones(1).expand(4, 3, 5, 6), torch.randn(4, 3, 5, 12)[..., ::2]):
        want = torch.autograd.grad(nn.functional.batch_norm(xr, None, None, w, b, True), xr, dy)
        dx, _, _ = _bwd(tk, dy, x, w, mean, rstd, True)
        torch.testing.assert_close(dx, want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "kwargs", [{}, {"momentum": None, "affine": False}, {"track_running_stats": False}], ids=str
)
def test_module_on_the_triton_path(tk, monkeypatch, dtype, kwargs) -> None:
    """The whole drop-in (module, autograd Function, dispatch) with the Triton kernels."""
    monkeypatch.setattr(routing, "TRITON_ON_CPU", True)
    torch.manual_seed(0)
    ours = bt.convert_model(nn.BatchNorm2d(3, **kwargs))  # float32 parameters, as AMP keeps
    native = nn.BatchNorm2d(3, dtype=torch.float64, **kwargs)  # the float64 oracle
    native.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(3)
    bounds: dict[str, torch.Tensor] = {}
    for step in range(3):
        if step == 2:
            native.eval()
            ours.eval()
        x = _layout(torch.randn(4, 3, 5, 3, generator=gen) + 1, step == 1).to(dtype)
        assert routing.route(x, ours.weight) == "triton"
        xa = x.double().requires_grad_()
        xb = x.clone().requires_grad_()
        ya, yb = native(xa), ours(xb)
        assert yb.dtype == dtype
        _close(yb, ya, dtype)
        dy = torch.randn(x.shape, generator=gen).to(dtype)
        ya.backward(dy.double())
        yb.backward(dy)
        _close(xb.grad, xa.grad, dtype)
        if ours.weight is not None:
            xhat = (
                ya.detach() - native.bias.detach().view(1, 3, 1, 1)
            ) / native.weight.detach().view(1, 3, 1, 1)
            # each step accumulates into .grad: the bound of both steps' terms
            terms = {"weight": dy.double() * xhat, "bias": dy.double()}
            for (name, pa), pb in zip(native.named_parameters(), ours.parameters(), strict=True):
                bounds[name] = bounds.get(name, 0) + _per_channel(terms[name]).abs().sum(0)
                err = (pb.grad.double() - pa.grad).abs()
                assert (err <= x.numel() // 3 * EPS32 * bounds[name] + 1e-12).all(), (name, err)
        for ba, bb in zip(native.buffers(), ours.buffers(), strict=True):
            torch.testing.assert_close(bb.double(), ba.double(), atol=1e-6, rtol=1e-5)


def test_gpu_benchmark_script_smoke() -> None:
    """benchmarks/gpu.py's code path (checks included) on CPU under the interpreter."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count(" ok") == 8, res.stdout


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grads", ["x", "params"])
def test_triton_path_with_some_inputs_needing_grad(tk, monkeypatch, training, grads) -> None:
    monkeypatch.setattr(routing, "TRITON_ON_CPU", True)
    native = nn.BatchNorm2d(3).train(training)
    ours = bt.convert_model(nn.BatchNorm2d(3).train(training))
    with torch.no_grad():
        for m in (native, ours):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.running_var.fill_(2.0)
    for m in (native, ours):
        m.requires_grad_(grads == "params")
    x = torch.randn(4, 3, 5, 3, generator=torch.Generator().manual_seed(4)) + 1
    xa, xb = x.clone().requires_grad_(grads == "x"), x.clone().requires_grad_(grads == "x")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    native(xa).backward(dy)
    ours(xb).backward(dy)
    if grads == "x":
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
        assert ours.weight.grad is None
    else:
        assert xb.grad is None
        torch.testing.assert_close(ours.weight.grad, native.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.bias.grad, native.bias.grad, atol=1e-4, rtol=1e-4)

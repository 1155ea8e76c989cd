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
        importlib.import_module("batchnorm.torch.triton_kernels")
finally:  # the rest of this process (other test files) sees the environment it had
    if _OLD_ENV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_ENV

from torch import nn  # noqa: E402

import batchnorm.torch as bt  # noqa: E402
from batchnorm.torch import function  # noqa: E402

# tolerances against PyTorch on the float32 copy of the same input, for outputs in each dtype
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
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

    module = importlib.import_module("batchnorm.torch.triton_kernels")
    assert isinstance(module._stats_kernel, InterpretedFunction), "kernels not interpreted"
    threads, tile = torch.get_num_threads(), module.TILE
    torch.set_num_threads(1)
    module.TILE = TILE  # small tiles: several per split, and partial ones, on small inputs
    os.environ["TRITON_INTERPRET"] = "1"  # triton also reads it while interpreting
    try:
        yield module
    finally:
        module.TILE = tile
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
    """got (in dtype) against want (float32), allowing one rounding to dtype and then some."""
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **TOL[dtype])


def _inputs(shape, channels_last, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _layout((torch.randn(shape, generator=gen) * 2 + 3).to(dtype), channels_last)
    w = (torch.rand(c, generator=gen) + 0.5).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype)
    dy = _layout(torch.randn(shape, generator=gen).to(dtype), channels_last)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES, ids=str)
def test_training_forward_and_backward(tk, shape, channels_last, dtype) -> None:
    x, w, b, dy = _inputs(shape, channels_last, dtype)
    c = shape[1]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, mean, rstd = tk.forward(x, w, b, rm, rv, True, 0.1, 1e-5, programs=PROGRAMS)
    assert y.dtype == dtype and y.stride() == x.stride()
    xr = x.float().requires_grad_()
    wr, br = w.float().requires_grad_(), b.float().requires_grad_()
    yr = nn.functional.batch_norm(xr, rm_ref, rv_ref, wr, br, True, 0.1, 1e-5)
    yr.backward(dy.float())
    _close(y, yr, dtype)
    torch.testing.assert_close(rm, rm_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rv, rv_ref, atol=1e-6, rtol=1e-5)
    dx, dw, db = tk.backward(dy, x, w, mean, rstd, True, programs=PROGRAMS)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    _close(dx, xr.grad, dtype)
    torch.testing.assert_close(dw, wr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(db, br.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", CASES[:3], ids=str)
def test_eval_forward_and_backward(tk, shape, channels_last, dtype) -> None:
    x, w, b, dy = _inputs(shape, channels_last, dtype, seed=1)
    c = shape[1]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    y, mean, rstd = tk.forward(x, w, b, rm, rv, False, 0.1, 1e-3, programs=PROGRAMS)
    xr = x.float().requires_grad_()
    wr, br = w.float().requires_grad_(), b.float().requires_grad_()
    yr = nn.functional.batch_norm(xr, rm, rv, wr, br, False, 0.1, 1e-3)
    yr.backward(dy.float())
    _close(y, yr, dtype)
    dx, dw, db = tk.backward(dy, x, w, mean, rstd, False, programs=PROGRAMS)
    _close(dx, xr.grad, dtype)
    torch.testing.assert_close(dw, wr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(db, br.grad, atol=1e-4, rtol=1e-4)


def test_statistics_are_stable_for_large_offsets(tk) -> None:
    """mean 1e4, std 1 in float32: E[x^2] - E[x]^2 would lose every digit of the variance."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, 5, 7, generator=gen, dtype=torch.float64) + 1e4
    x32 = x.float()
    rm, rv = torch.zeros(3), torch.ones(3)
    _, mean, rstd = tk.forward(x32, None, None, rm, rv, True, 1.0, 0.0, programs=PROGRAMS)
    var = x32.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), x32.double().mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), var.rsqrt(), rtol=1e-3, atol=0)
    torch.testing.assert_close(rv.double(), x32.double().var(dim=(0, 2, 3)), rtol=1e-3, atol=0)


def test_nonfinite_values_propagate_as_in_torch(tk) -> None:
    x, w, b, _ = _inputs((4, 3, 5, 6), False, torch.float32)
    x[1, 2, 3, 4] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    y, _, _ = tk.forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    assert torch.isnan(rm[2]) and torch.isnan(rv[2]) and torch.isfinite(rm[:2]).all()


def test_test_shapes_use_several_splits_and_tiles(tk) -> None:
    for shape, channels_last in CASES:
        x = _layout(torch.empty(shape), channels_last)
        (outer, c, inner), _ = tk.view3d(x)
        p = tk.plan(outer, c, inner, PROGRAMS)
        assert p.splits > 1, shape
        tiles = (p.o_per // p.block_o) * (p.i_per // p.block_i)
        assert tiles > 1, shape


def test_plan_covers_every_element(tk, monkeypatch) -> None:
    monkeypatch.setattr(tk, "TILE", 4096)
    assert tk.plan(32, 64, 112 * 112, 1056).block_i == 512  # 2% padding, not 30% with 4096
    for outer, c, inner, programs in [
        (5, 3, 63, 3), (315, 70, 1, 4), (1, 2, 10000, 7), (64, 256, 3136, 1056), (7, 3, 300, 1)
    ]:  # fmt: skip
        p = tk.plan(outer, c, inner, programs)
        assert p.split_o * p.o_per >= outer and (p.split_o - 1) * p.o_per < outer
        assert p.split_i * p.i_per >= inner and (p.split_i - 1) * p.i_per < inner
        assert p.o_per % p.block_o == 0 and p.i_per % p.block_i == 0


def test_grad_output_of_any_strides(tk) -> None:
    x, w, b, _ = _inputs((4, 3, 5, 6), True, torch.float32)
    _, mean, rstd = tk.forward(x, w, b, None, None, True, 0.1, 1e-5)
    xr = x.clone().requires_grad_()
    for dy in (torch.ones(1).expand(4, 3, 5, 6), torch.randn(4, 3, 5, 12)[..., ::2]):
        want = torch.autograd.grad(nn.functional.batch_norm(xr, None, None, w, b, True), xr, dy)
        dx, _, _ = tk.backward(dy, x, w, mean, rstd, True)
        torch.testing.assert_close(dx, want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "kwargs", [{}, {"momentum": None, "affine": False}, {"track_running_stats": False}], ids=str
)
def test_module_on_the_triton_path(tk, monkeypatch, dtype, kwargs) -> None:
    """The whole drop-in (module, autograd Function, dispatch) with the Triton kernels."""
    monkeypatch.setattr(function, "TRITON_ON_CPU", True)
    torch.manual_seed(0)
    native = nn.BatchNorm2d(3, **kwargs)  # float32 parameters, as AMP keeps them
    ours = bt.convert_model(nn.BatchNorm2d(3, **kwargs))
    ours.load_state_dict(native.state_dict())
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        if step == 2:
            native.eval()
            ours.eval()
        x = _layout(torch.randn(4, 3, 5, 3, generator=gen) + 1, step == 1)
        assert function.route(x.to(dtype), ours.weight) == "triton"
        xa = x.clone().requires_grad_()
        xb = x.to(dtype).requires_grad_()
        ya, yb = native(xa), ours(xb)
        assert yb.dtype == dtype
        _close(yb, ya, dtype)
        dy = torch.randn(x.shape, generator=gen)
        ya.backward(dy)
        yb.backward(dy.to(dtype))
        _close(xb.grad, xa.grad, dtype)
        for pa, pb in zip(native.parameters(), ours.parameters(), strict=True):
            assert pb.grad is not None and pa.grad is not None
            torch.testing.assert_close(pb.grad, pa.grad, atol=0.05, rtol=0.02)
        for ba, bb in zip(native.buffers(), ours.buffers(), strict=True):
            torch.testing.assert_close(bb, ba, atol=1e-3, rtol=1e-3)


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
    monkeypatch.setattr(function, "TRITON_ON_CPU", True)
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

"""batchnorm.torch on CPU: same semantics as torch.nn.BatchNorm*d in every mode."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.autograd import gradcheck, gradgradcheck  # noqa: E402

import batchnorm.torch as bt  # noqa: E402
from batchnorm.torch import routing  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_on_our_kernels")

TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-9}}

SHAPES = {1: [(7, 5), (6, 5, 9)], 2: [(6, 5, 4, 3)], 3: [(3, 5, 2, 3, 4)]}
NATIVE = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OURS = {1: bt.BatchNorm1d, 2: bt.BatchNorm2d, 3: bt.BatchNorm3d}


def _pair(d: int, dtype: torch.dtype, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    native = NATIVE[d](5, dtype=dtype, **kwargs)
    if native.weight is not None:
        with torch.no_grad():
            native.weight.uniform_(0.5, 1.5)
    if native.bias is not None:
        with torch.no_grad():
            native.bias.uniform_(-0.5, 0.5)
    ours = OURS[d](5, dtype=dtype, **kwargs)
    ours.load_state_dict(native.state_dict())
    return native, ours


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _close(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    torch.testing.assert_close(a, b, equal_nan=True, **TOL[dtype])


def _compare_steps(native, ours, shape, dtype, layout, steps=3, grads=(True, True)) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 3
        if layout == "channels_last":
            x = _channels_last(x)
        xa = x.clone().requires_grad_(grads[0])
        xb = x.clone().requires_grad_(grads[0])
        ya, yb = native(xa), ours(xb)
        _close(ya, yb, dtype)
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        if ya.requires_grad:
            ya.backward(dy)
            yb.backward(dy)
        if grads[0]:
            _close(xa.grad, xb.grad, dtype)
        for pa, pb in zip(native.parameters(), ours.parameters(), strict=True):
            _close(pa.grad, pb.grad, dtype)
        for (name, ba), bb in zip(native.named_buffers(), ours.buffers(), strict=True):
            assert ba.dtype == bb.dtype, name
            _close(ba, bb, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "d,shape", [(d, s) for d, shapes in SHAPES.items() for s in shapes], ids=str
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_and_eval_match_torch(d, shape, dtype, layout) -> None:
    native, ours = _pair(d, dtype)
    x = torch.randn(shape, dtype=dtype)
    assert bt.route(x if layout == "contiguous" else _channels_last(x), ours.weight) == "cpu"
    _compare_steps(native, ours, shape, dtype, layout)
    native.eval()
    ours.eval()
    _compare_steps(native, ours, shape, dtype, layout, steps=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": None},
        {"affine": False},
        {"bias": False},
        {"track_running_stats": False},
        {"momentum": 0.3, "eps": 1e-3},
        {"affine": False, "track_running_stats": False, "momentum": None},
    ],
    ids=str,
)
@pytest.mark.parametrize("training", [True, False])
def test_options_match_torch(kwargs, training) -> None:
    native, ours = _pair(2, torch.float64, **kwargs)
    _compare_steps(native, ours, (6, 5, 4, 3), torch.float64, "contiguous")  # train a little
    native.train(training)
    ours.train(training)
    _compare_steps(native, ours, (6, 5, 4, 3), torch.float64, "channels_last")
    assert repr(native).replace("torch.nn.modules.batchnorm", "") == repr(ours)


@pytest.mark.parametrize("grads", [(True, False), (False, True)], ids=["x-only", "params-only"])
def test_grad_on_some_inputs(grads) -> None:
    native, ours = _pair(2, torch.float64)
    for m in (native, ours):
        m.requires_grad_(grads[1])
    _compare_steps(native, ours, (6, 5, 4, 3), torch.float64, "contiguous", grads=grads)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("training", [True, False])
def test_no_grad_and_inference_mode(context, training) -> None:
    native, ours = _pair(2, torch.float32)
    native.train(training)
    ours.train(training)
    manager = torch.no_grad if context == "no_grad" else torch.inference_mode
    for _ in range(2):
        x = torch.randn(6, 5, 4, 3) + 1
        with manager():
            ya, yb = native(x), ours(x)
        assert not yb.requires_grad
        _close(ya, yb, torch.float32)
        for ba, bb in zip(native.buffers(), ours.buffers(), strict=True):
            _close(ba, bb, torch.float32)


def test_gradcheck_and_gradgradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, generator=gen).add(0.5).requires_grad_()
    b = torch.rand(3, dtype=torch.float64, generator=gen).requires_grad_()
    rm = torch.randn(3, dtype=torch.float64, generator=gen)
    rv = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5

    def train(x, w, b):
        return bt.batch_norm(x, None, None, w, b, True)

    def evaluate(x, w, b):
        return bt.batch_norm(x, rm, rv, w, b, False)

    for f in (train, evaluate):
        assert gradcheck(f, (x, w, b))
        assert gradgradcheck(f, (x, w, b))
    assert gradgradcheck(lambda x: bt.batch_norm(x, None, None, None, None, True), (x,))


def test_double_backward_matches_torch() -> None:
    native, ours = _pair(2, torch.float64)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64)
    outs = []
    for m in (native, ours):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(m(xi).pow(3).sum(), xi, create_graph=True)
        gx.pow(2).sum().backward()
        outs.append((xi.grad, m.weight.grad))
    for a, b in zip(*outs, strict=True):
        _close(a, b, torch.float64)


@pytest.mark.parametrize("training", [True, False])
def test_double_backward_against_finite_differences_of_our_first_order_grads(training) -> None:
    """The oracle is independent of the double-backward path (PyTorch's differentiable ops):
    central differences of <dx, v> and <dw, u>, each computed by our first-order kernels."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen) * 2 + 1
    w = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    b = torch.randn(3, dtype=torch.float64, generator=gen)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    dy = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    v = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    u = torch.randn(3, dtype=torch.float64, generator=gen)
    assert bt.route(x, w, b) == "cpu"

    def first_order(x, w, create_graph):
        y = bt.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
        gx, gw = torch.autograd.grad(y, (x, w), dy, create_graph=create_graph)
        return (gx * v).sum() + (gw * u).sum()

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    hx, hw = torch.autograd.grad(first_order(xg, wg, True), (xg, wg))
    h = 1e-6
    for param, got in ((x, hx), (w, hw)):
        want = torch.empty_like(param)
        for i in range(param.numel()):
            values = []
            for step in (h, -h):
                xs, ws = x.clone(), w.clone()
                (xs if param is x else ws).view(-1)[i] += step
                with torch.enable_grad():
                    values.append(
                        first_order(xs.requires_grad_(), ws.requires_grad_(), False).item()
                    )
            want.view(-1)[i] = (values[0] - values[1]) / (2 * h)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_saved_tensor_hooks_see_and_replace_the_input() -> None:
    """Everything backward reads goes through save_for_backward: hooks that offload the saved
    tensors (here a copy) are honoured, so changing x's memory after forward changes nothing."""
    native, ours = _pair(2, torch.float32)
    x = torch.randn(6, 5, 4, 3) * 2 + 1
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t.clone()

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = native(xa)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yb = ours(xb)
    assert any(t is xb for t in packed)
    xb.data.zero_()  # behind autograd's back: only the packed copy still holds x
    dy = torch.randn(x.shape)
    ya.backward(dy)
    yb.backward(dy)
    _close(xa.grad, xb.grad, torch.float32)
    _close(native.weight.grad, ours.weight.grad, torch.float32)


def test_dx_is_not_computed_when_the_input_needs_no_grad(monkeypatch) -> None:
    from batchnorm import functional

    backward = functional.backward_3d

    def refuse_dx(*args: object, need_input: bool = True) -> object:
        if need_input:
            raise AssertionError("dx computed")
        return backward(*args, need_input=False)

    native, ours = _pair(2, torch.float32)
    x = torch.randn(6, 5, 4, 3) + 1
    assert bt.route(x, ours.weight) == "cpu"
    monkeypatch.setattr(functional, "backward_3d", refuse_dx)  # the drop-in's backward
    dy = torch.randn(x.shape)
    native(x).backward(dy)
    ours(x).backward(dy)
    _close(native.weight.grad, ours.weight.grad, torch.float32)
    _close(native.bias.grad, ours.bias.grad, torch.float32)
    with pytest.raises(AssertionError, match="dx computed"):  # the patch does bite
        ours(x.clone().requires_grad_()).backward(dy)


def test_expanded_and_strided_grad_outputs() -> None:
    native, ours = _pair(2, torch.float32)
    x = _channels_last(torch.randn(6, 5, 4, 3))
    for reduce in (lambda y: y.sum(), lambda y: y[:, :, ::2].pow(2).sum()):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        reduce(native(xa)).backward()
        reduce(ours(xb)).backward()
        _close(xa.grad, xb.grad, torch.float32)


def test_routes() -> None:
    x = torch.randn(4, 3, 5, 6)
    w = torch.ones(3)
    assert bt.route(x, w) == "cpu"
    assert bt.route(x.to(memory_format=torch.channels_last), w) == "cpu"
    assert bt.route(x.double(), w.double()) == "cpu"
    assert bt.route(x[:, :, ::2], w) == "torch"  # strided: not a zero-copy view
    assert bt.route(x.half(), w.half()) == "torch"
    assert bt.route(x.bfloat16(), w) == "torch"
    assert bt.route(x, w.double()) == "torch"  # mixed dtypes: PyTorch decides
    assert bt.route(x[:0]) == "torch"
    assert bt.route(torch.randn(5)) == "torch"


def test_small_inputs_go_to_torch_by_default(monkeypatch) -> None:
    monkeypatch.setattr(routing, "MIN_NUMEL", None)  # the measured table
    assert bt.route(torch.randn(60, 100)) == "torch"
    for layout in routing.LAYOUTS:
        crossover = routing.min_numel(layout, torch.get_num_threads())
        if layout == "2d":
            x = torch.randn(crossover // 256, 256)
        else:
            x = torch.randn(crossover // 256, 64, 2, 2)
            if layout == "channels_last":
                x = _channels_last(x)
        assert routing.layout_of(x, layout == "channels_last") == layout
        assert bt.route(x) == "cpu"
        assert bt.route(x[:-1]) == "torch"
        assert bt.route(x, training=False) == "torch"  # eval: PyTorch's kernel at every size
    assert routing.min_numel("contiguous", 64) == routing.CPU_MIN_NUMEL[("contiguous", 2)]
    with pytest.raises(ValueError, match="unknown layout"):
        routing.min_numel("nchw", 2)


def test_eval_calls_of_the_module_go_to_torch_by_default(monkeypatch) -> None:
    monkeypatch.setattr(routing, "MIN_NUMEL", None)
    calls: list[bool] = []

    def spy(x: torch.Tensor, given: list[torch.Tensor], training: bool) -> str:
        calls.append(training)
        return "torch"

    monkeypatch.setattr(routing, "_cpu", spy)
    layer = bt.BatchNorm2d(4)
    x = torch.randn(8, 4, 3, 3)
    layer(x)
    layer.eval()
    layer(x)
    assert calls == [True, False]


def test_numba_kernels_run_with_torchs_thread_count(monkeypatch) -> None:
    numba = pytest.importorskip("numba")
    from batchnorm import functional

    seen = []
    forward, backward = functional.forward_3d, functional.backward_3d

    def spy_forward(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return forward(*args, **kwargs)

    def spy_backward(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return backward(*args, **kwargs)

    monkeypatch.setattr(functional, "forward_3d", spy_forward)  # what the drop-in calls
    monkeypatch.setattr(functional, "backward_3d", spy_backward)
    layer = bt.BatchNorm2d(3)
    layer.backend = "numba"
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        layer(torch.randn(4, 3, 5, 5, requires_grad=True)).sum().backward()
        want = min(threads, numba.config.NUMBA_NUM_THREADS)
        assert seen[-2:] == [want, want]


def test_fallbacks_still_match_torch() -> None:
    native, ours = _pair(2, torch.float32)
    x = torch.randn(6, 5, 8, 3)[:, :, ::2]  # non-contiguous view goes to PyTorch's kernel
    _close(native(x), ours(x), torch.float32)
    native.half()
    ours.half()
    xh = torch.randn(6, 5, 4, 3).half()
    assert bt.route(xh, ours.weight) == "torch"
    torch.testing.assert_close(native(xh), ours(xh))


def test_nonfinite_batch_behaves_like_torch() -> None:
    """NaN/inf propagate as in PyTorch (our NumPy functional would raise instead)."""
    native, ours = _pair(2, torch.float32)
    x = torch.randn(6, 5, 4, 3)
    x[2, 1, 0, 0] = float("nan")
    x[0, 3, 1, 1] = float("inf")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = native(xa), ours(xb)
    _close(ya, yb, torch.float32)
    assert torch.isnan(yb[:, 1]).all() and torch.isfinite(yb[:, 0]).all()
    dy = torch.randn_like(x)
    ya.backward(dy)
    yb.backward(dy)
    _close(xa.grad, xb.grad, torch.float32)
    _close(native.weight.grad, ours.weight.grad, torch.float32)
    for ba, bb in zip(native.buffers(), ours.buffers(), strict=True):
        _close(ba, bb, torch.float32)
    assert torch.isnan(ours.running_mean[1])


def test_errors_match_torch() -> None:
    native, ours = _pair(2, torch.float32)
    one = torch.randn(1, 5, 1, 1)
    for m in (native, ours):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            m(one)
        with pytest.raises(ValueError, match="expected 4D input"):
            m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="eps must be positive"):
        bt.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0)


def test_backend_choice() -> None:
    native, ours = _pair(2, torch.float64)
    ours.backend = "numpy"
    _compare_steps(native, ours, (6, 5, 4, 3), torch.float64, "channels_last", steps=1)
    ours.backend = "nonesuch"
    with pytest.raises(ValueError, match="unknown backend"):
        ours(torch.randn(6, 5, 4, 3, dtype=torch.float64))


def test_torch_compile_traces_pytorchs_op() -> None:
    torch.manual_seed(0)
    native = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ours = bt.convert_model(copy.deepcopy(native))
    compiled = torch.compile(ours, backend="eager", fullgraph=True)  # no graph break
    x = torch.randn(4, 3, 8, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = native(xa), compiled(xb)
    _close(ya, yb, torch.float32)
    ya.sum().backward()
    yb.sum().backward()
    _close(xa.grad, xb.grad, torch.float32)
    _close(native[1].running_var, ours[1].running_var, torch.float32)
    assert int(ours[1].num_batches_tracked) == 1


def test_convert_and_revert_model() -> None:
    torch.manual_seed(0)
    sync = nn.SyncBatchNorm(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(4, affine=False)),
        sync,
        nn.Flatten(),
        nn.Linear(4 * 36, 6),
        nn.BatchNorm1d(6, track_running_stats=False).double().float(),
    )
    model[1].eval()
    params = list(model.parameters())
    keys = model.state_dict().keys()
    same = bt.convert_model(model)
    assert same is model
    assert type(model[1]) is bt.BatchNorm2d and type(model[2][1]) is bt.BatchNorm1d
    assert type(model[6]) is bt.BatchNorm1d and model[3] is sync
    assert not model[1].training and model[2][1].training
    assert model[1].momentum is None and model[2][1].weight is None
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert model.state_dict().keys() == keys
    assert isinstance(model[1], nn.BatchNorm2d)
    bt.revert_model(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][1]) is nn.BatchNorm1d
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    root = bt.convert_model(nn.BatchNorm3d(2))
    assert type(root) is bt.BatchNorm3d
    assert type(bt.revert_model(root)) is nn.BatchNorm3d


def test_converted_module_keeps_hooks_and_to() -> None:
    bn = nn.BatchNorm2d(3)
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    ours = bt.convert_model(bn)
    ours(torch.randn(2, 3, 2, 2))
    assert seen == [bt.BatchNorm2d]
    ours.to(torch.float64)
    assert ours.weight.dtype == torch.float64 and ours.running_var.dtype == torch.float64
    assert bt.route(torch.randn(2, 3, 2, 2, dtype=torch.float64), ours.weight) == "cpu"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATCHNORM_BACKEND": "numpy"}  # no JIT compilation in the child
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def test_imports_without_triton_and_batchnorm_without_torch() -> None:
    no_triton = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, batchnorm.torch as bt\n"
        "from batchnorm.torch import routing\n"
        "assert not routing.triton_available()\n"
        "routing.MIN_NUMEL = 0; x = torch.randn(4, 3, 2, 2)\n"
        "assert bt.route(x) == 'cpu'\n"
        "m = bt.BatchNorm2d(3); m(x).sum().backward()\n"
        "print('ok')\n"
    )
    res = _run(no_triton)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    no_torch = (
        "import sys; sys.modules['torch'] = None\n"
        "import batchnorm\n"
        "try:\n    import batchnorm.torch\nexcept ImportError:\n    print('ok')\n"
    )
    res = _run(no_torch)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_eval_without_running_statistics_raises_pytorchs_error(monkeypatch) -> None:
    from batchnorm.torch import function, routing

    monkeypatch.setattr(routing, "MIN_NUMEL", 0)  # every CPU size would go to our kernels
    x = torch.randn(6, 5, 4, 3)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.functional.batch_norm(x, None, None, training=False)
    with pytest.raises(RuntimeError) as mine:
        function.batch_norm(x, None, None, training=False)
    assert str(mine.value) == str(theirs.value)

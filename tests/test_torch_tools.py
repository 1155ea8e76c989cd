"""A converted model under PyTorch's tools: each traces as PyTorch's own batch norm.

Each tool sees a Conv-BN-ReLU net converted with ``convert_model``, traces (or compiles) it on
one input, runs it on another, and must give the native model's output there, and the same
running statistics (training). A tracer that recorded our NumPy route would replay the first
input's statistics as constants: the second input (another scale and offset) tells.
"""

from __future__ import annotations

import copy
import io

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import batchnorm.torch as bt  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_on_our_kernels")

ATOL, RTOL = 1e-5, 1e-4  # float32, the same op on the same values


def _nets(training: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    native = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(2), nn.BatchNorm1d(4)
    )
    with torch.no_grad():  # buffers away from their defaults: eval must use them
        for m in native.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    ours = bt.convert_model(copy.deepcopy(native))
    assert type(ours[1]) is bt.BatchNorm2d and type(ours[4]) is bt.BatchNorm1d
    return native.train(training), ours.train(training)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    xa = torch.randn(4, 3, 8, 8, generator=gen)
    xb = torch.randn(6, 3, 8, 8, generator=gen) * 3 + 2  # another batch, other statistics
    return xa, xb


def _same(native: nn.Module, ours: nn.Module, run, x: torch.Tensor) -> None:  # noqa: ANN001
    want, got = native(x), run(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for (name, a), b in zip(native.state_dict().items(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_trace(training: bool) -> None:
    native, ours = _nets(training)
    xa, xb = _inputs()
    with torch.no_grad():
        traced = torch.jit.trace(ours, xa, check_trace=False)
        native(xa)  # tracing ran the model once: so does the native one
        _same(native, ours, traced, xb)
    graph = str(traced.inlined_graph)
    assert "aten::batch_norm" in graph


def test_jit_script_scripts_pytorchs_module() -> None:
    native, ours = _nets(False)
    native_weight, native_var = ours[1].weight, ours[1].running_var
    scripted = torch.jit.script(ours)
    _, xb = _inputs()
    with torch.no_grad():
        _same(native, ours, scripted, xb)
    # torch.jit.script puts what __prepare_scriptable__ returns into the model itself
    # (PyTorch's rule for every module): PyTorch's layer, sharing our layer's state
    assert type(ours[1]) is nn.BatchNorm2d
    assert ours[1].weight is native_weight and ours[1].running_var is native_var


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fx_symbolic_trace(training: bool) -> None:
    native, ours = _nets(training)
    gm = torch.fx.symbolic_trace(ours)
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert leaves == ["0", "1", "2", "3", "4"]  # our modules are leaves, like PyTorch's
    assert isinstance(gm.get_submodule("1"), bt.BatchNorm2d)
    xa, xb = _inputs()
    for x in (xa, xb):
        _same(native, ours, gm, x)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile(training: bool) -> None:
    native, ours = _nets(training)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)  # no graph break
    xa, xb = _inputs()
    for x in (xa, xb):
        _same(native, ours, compiled, x)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export(training: bool) -> None:
    native, ours = _nets(training)
    xa, xb = _inputs()
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(ours, (xa,), dynamic_shapes=({0: batch},))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("batch_norm" in op for op in ops), ops
    _same(native, ours, exported.module(), xb)


def test_onnx_export_torchscript() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    native, ours = _nets(False)
    xa, xb = _inputs()
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            ours, (xa,), buf, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
        )
        want = native(xb)
    model = onnx.load_from_string(buf.getvalue())
    # the exporter folds the first BN into its Conv; the second stays a BatchNormalization
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 1
    (got,) = ReferenceEvaluator(model).run(None, {"x": xb.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, atol=ATOL, rtol=RTOL)

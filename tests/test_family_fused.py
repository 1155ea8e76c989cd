"""Fused BN + ReLU (+ residual) against PyTorch's ``relu(bn(x) + residual)`` in float64, on
both kernel paths (fused training passes and per-pass kernels), both backends, both layouts;
gradcheck; what the backward keeps; and the fx pass on a ResNet basic block."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm.torch as bt
from batchnorm import kernels

FUSED = {2: bt.BatchNormReLU1d, 3: bt.BatchNormReLU1d, 4: bt.BatchNormReLU2d,
         5: bt.BatchNormReLU3d}
NATIVE = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = [(9, 3), (4, 3, 70), (3, 4, 9, 10), (2, 3, 2, 5, 8)]


@pytest.fixture(autouse=True)
def _small_inputs_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchnorm.torch import routing

    monkeypatch.setattr(routing, "MIN_NUMEL", 0)


@pytest.fixture(params=["fused", "per-pass"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if "numba" in kernels.available():
        from batchnorm.kernels.numba import relu

        monkeypatch.setattr(relu, "FUSE_MIN_INNER", 1 if request.param == "fused" else 1 << 30)
    return str(request.param)


def _pair(shape, momentum, rng):
    c = shape[1]
    fused = FUSED[len(shape)](c, momentum=momentum).double()
    native = NATIVE[len(shape)](c, momentum=momentum).double()
    w, b, rm = rng.normal(1, 0.5, c), rng.normal(0, 0.5, c), rng.normal(0, 1, c)
    with torch.no_grad():
        for m in (fused, native):
            m.weight.copy_(torch.tensor(w))
            m.bias.copy_(torch.tensor(b))
            m.running_mean.copy_(torch.tensor(rm))
    return fused, native


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_matches_pytorch(shape, residual, training, backend, path, rng):
    fused, native = _pair(shape, None if training and residual else 0.1, rng)
    fused.backend = backend
    fused.train(training), native.train(training)
    x = torch.tensor(rng.normal(0.3, 1.5, shape))
    r = torch.tensor(rng.normal(size=shape)) if residual else None
    dy = torch.tensor(rng.normal(size=shape))
    grads = []
    for m in (fused, native):
        xi = x.clone().requires_grad_()
        ri = r.clone().requires_grad_() if r is not None else None
        y = m(xi, ri) if m is fused else torch.relu(m(xi) + (ri if ri is not None else 0))
        y.backward(dy)
        grads.append([y, xi.grad, None if ri is None else ri.grad, m.weight.grad, m.bias.grad,
                      m.running_mean, m.running_var, m.num_batches_tracked])
    for ours, theirs in zip(*grads, strict=True):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-12)


def test_channels_last_and_float32(backend, path, rng):
    fused, native = _pair((8, 6, 9, 9), 0.1, rng)
    fused, native = fused.float(), native.float()
    fused.backend = backend
    x = torch.tensor(rng.normal(size=(8, 6, 9, 9)), dtype=torch.float32)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    y = fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.relu(native(x2))
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.running_var, native.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck(residual, path, rng):
    layer = bt.BatchNormReLU2d(3).double()
    x = torch.tensor(rng.normal(size=(4, 3, 3, 5)), requires_grad=True)
    r = torch.tensor(rng.normal(size=(4, 3, 3, 5)), requires_grad=True) if residual else None
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -0.5, 2.0]))
    args = (x, r) if residual else (x,)
    assert torch.autograd.gradcheck(lambda *a: layer(*a), args, eps=1e-6, atol=1e-6)


def test_backward_keeps_no_pre_activation(rng):
    """Without a residual only x is saved (ReLU's mask is recomputed from it); BN then
    torch.relu keeps x and BN's output."""
    def saved(fn) -> int:
        count = 0

        def pack(t):
            nonlocal count
            count += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return count

    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    fused, native = bt.BatchNormReLU2d(3), nn.BatchNorm2d(3)
    assert saved(lambda: fused(x)) == x.numel()
    assert saved(lambda: torch.relu(native(x))) >= 2 * x.numel()


def test_other_devices_and_dtypes_fall_back_to_pytorch(rng):
    fused, native = _pair((5, 3, 4), 0.1, rng)
    x = torch.tensor(rng.normal(size=(5, 3, 4)), dtype=torch.bfloat16)
    fused, native = fused.to(torch.bfloat16), native.to(torch.bfloat16)
    torch.testing.assert_close(fused(x, x), torch.relu(native(x) + x))


def test_one_value_per_channel_raises():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bt.BatchNormReLU1d(3).double()(torch.ones(1, 3, dtype=torch.float64))


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), bt.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + x)


def test_fx_pass_fuses_a_resnet_basic_block(rng):
    torch.manual_seed(0)
    block = nn.Sequential(BasicBlock(4), nn.BatchNorm2d(4), nn.Flatten()).double()
    fused = bt.fuse_bn_relu(block)
    kinds = [type(m).__name__ for m in fused.modules() if "BatchNorm" in type(m).__name__]
    assert kinds == ["BatchNormReLU2d", "BatchNormReLU2d", "BatchNorm2d"], kinds  # no ReLU after
    code = fused.code
    assert "relu" not in code.replace("BatchNormReLU", "") and "add" not in code, code
    x = torch.tensor(rng.normal(size=(3, 4, 6, 5)))
    outs = []
    for model in (block, fused):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, model.get_submodule("0.conv1").weight.grad,
                     model.get_submodule("0.bn2").running_var))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    block.eval(), fused.eval()
    torch.testing.assert_close(fused(x), block(x), rtol=1e-12, atol=1e-12)
    assert copy.deepcopy(fused)(x).shape == (3, 120)


def test_kernel_modules_agree(rng):
    """The Numba kernels against the NumPy ones, mask from y and recomputed from x."""
    if "numba" not in kernels.available():
        pytest.skip("numba not installed")
    from batchnorm.kernels import numpy as knp
    from batchnorm.kernels.numba import relu as knb

    x3, dy3, r3 = (rng.normal(size=(5, 3, 80)) for _ in range(3))
    mean, scale, shift = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    for res in (None, r3):
        y_np, y_nb = (k.normalize_relu(x3, mean, scale, shift, res) for k in (knp, knb))
        np.testing.assert_allclose(y_nb, y_np, rtol=1e-14, atol=1e-15)
        y = None if res is None else y_np
        for k in (knp, knb):
            sums = k.relu_grad_sums(dy3, x3, mean, scale, shift, y)
            dx, dz = k.relu_grad_input(dy3, x3, mean, scale, shift, y, (scale, shift, mean), True)
            if k is knp:
                expected = (sums, dx, dz)
            else:
                for a, b in zip((*sums, dx, dz), (*expected[0], expected[1], expected[2]),
                                strict=True):
                    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_bn_relu_follows_the_drop_ins_routing_table(monkeypatch):
    from batchnorm.torch import fused, routing

    monkeypatch.setattr(routing, "MIN_NUMEL", None)  # the measured table
    crossover = routing.min_numel("contiguous", torch.get_num_threads())
    x = torch.empty(crossover // 64, 64, 1, 1)
    assert fused._ours(x, None, True)
    assert not fused._ours(x[:-1], None, True)  # below the crossover: PyTorch's ops
    assert not fused._ours(x, None, False)  # eval: PyTorch's ops at every size

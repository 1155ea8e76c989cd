"""Ghost BN (NumPy and torch) against its definition: PyTorch's BN called on each chunk in turn
(outputs, gradients, running statistics, num_batches_tracked), in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
import batchnorm.torch as bt
from batchnorm.nn import family

NP = {2: batchnorm.GhostBatchNorm1d, 3: batchnorm.GhostBatchNorm1d,
      4: batchnorm.GhostBatchNorm2d, 5: batchnorm.GhostBatchNorm3d}
TORCH = {2: bt.GhostBatchNorm1d, 3: bt.GhostBatchNorm1d, 4: bt.GhostBatchNorm2d,
         5: bt.GhostBatchNorm3d}
REF = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
       5: torch.nn.BatchNorm3d}
CASES = [((12, 3), 4), ((10, 3), 4), ((7, 2, 5), 2), ((9, 3, 2, 3), 4), ((5, 2, 2, 3, 2), 5),
         ((6, 4, 3), 10)]


def _oracle(x, dy, w, b, size, momentum, steps=1):
    ref = REF[x.ndim](x.shape[1], momentum=momentum).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        ref.bias.copy_(torch.tensor(b))
    for _ in range(steps):
        xt = torch.tensor(x, requires_grad=True)
        y = torch.cat([ref(c) for c in torch.split(xt, size)])
        y.backward(torch.tensor(dy))
    return ref, y.detach().numpy(), xt.grad.numpy()


def _params(c, rng):
    return rng.normal(1, 0.3, c), rng.normal(0, 0.3, c)


@pytest.mark.parametrize(("shape", "size"), CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("group_below", [0, 1 << 30])  # chunks one by one / side by side
def test_numpy_ghost_is_bn_per_chunk(shape, size, momentum, group_below, backend, rng,
                                     monkeypatch):
    monkeypatch.setattr(family, "GROUP_BELOW", group_below)
    x, dy = rng.normal(1, 2, shape), rng.normal(size=shape)
    w, b = _params(shape[1], rng)
    ref, y0, dx0 = _oracle(x, dy, w, b, size, momentum, steps=2)
    layer = NP[len(shape)](shape[1], size, momentum=momentum, dtype=np.float64, backend=backend)
    layer.weight.data[...], layer.bias.data[...] = w, b
    for _ in range(2):
        layer.zero_grad()
        y = layer(x)
        dx = layer.backward(dy)
    np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, ref.weight.grad.numpy() / 2, rtol=1e-10)
    np.testing.assert_allclose(layer.bias.grad, ref.bias.grad.numpy() / 2, rtol=1e-10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_allclose(getattr(layer, name), getattr(ref, name).numpy(), rtol=1e-12)


@pytest.mark.parametrize(("shape", "size"), CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_ghost_is_bn_per_chunk(shape, size, momentum, rng):
    x, dy = rng.normal(1, 2, shape), rng.normal(size=shape)
    w, b = _params(shape[1], rng)
    ref, y0, dx0 = _oracle(x, dy, w, b, size, momentum)
    layer = TORCH[len(shape)](shape[1], size, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w))
        layer.bias.copy_(torch.tensor(b))
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(torch.tensor(dy))
    np.testing.assert_allclose(y.detach().numpy(), y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), dx0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_allclose(getattr(layer, name).numpy(), getattr(ref, name).numpy(),
                                   rtol=1e-12)


def test_channels_last_numpy(rng):
    x = np.moveaxis(rng.normal(size=(8, 5, 4, 3)), 3, 1)  # (8, 3, 5, 4) channels-last memory
    x = np.ascontiguousarray(np.moveaxis(x, 1, -1))  # (8, 5, 4, 3), axis=-1
    dy = rng.normal(size=x.shape)
    layer = batchnorm.GhostBatchNorm2d(3, 3, dtype=np.float64, axis=-1)
    y = layer(x)
    dx = layer.backward(dy)
    to_nchw = lambda a: np.moveaxis(a, -1, 1)  # noqa: E731
    _, y0, dx0 = _oracle(to_nchw(x), to_nchw(dy), np.ones(3), np.zeros(3), 3, 0.1)
    np.testing.assert_allclose(to_nchw(y), y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_nchw(dx), dx0, rtol=1e-10, atol=1e-12)


def test_gradcheck_torch_and_eval(rng):
    layer = bt.GhostBatchNorm2d(2, 3).double()
    x = torch.tensor(rng.normal(size=(7, 2, 2, 3)), requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-7)
    ref = torch.nn.BatchNorm2d(2).double()
    ref.load_state_dict(layer.state_dict())
    layer.eval(), ref.eval()
    np.testing.assert_array_equal(layer(x).detach().numpy(), ref(x).detach().numpy())


def test_finite_differences_numpy(rng):
    shape = (7, 2, 3)
    x, p = rng.normal(size=shape), rng.normal(size=shape)
    layer = batchnorm.GhostBatchNorm1d(2, 3, dtype=np.float64, track_running_stats=False)
    layer(x)
    dx = layer.backward(p)
    h = 1e-6
    for idx in [(0, 0, 0), (3, 1, 2), (6, 0, 1), (4, 1, 0)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd = float(((layer(xp) - layer(xm)) * p).sum()) / (2 * h)
        assert abs(fd - dx[idx]) < 1e-7 * max(1.0, abs(fd))


@pytest.mark.parametrize("size", [0, -2, 2.5, True])
def test_bad_virtual_batch_size(size):
    for cls in (batchnorm.GhostBatchNorm2d, bt.GhostBatchNorm2d):
        with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
            cls(3, size)


def test_last_chunk_of_one_raises_and_changes_nothing():
    x = np.random.default_rng(0).normal(size=(5, 3))
    for layer in (batchnorm.GhostBatchNorm1d(3, 2, dtype=np.float64),
                  bt.GhostBatchNorm1d(3, 2).double()):
        arg = x if isinstance(layer, batchnorm.GhostBatchNorm1d) else torch.tensor(x)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(arg)
        assert int(layer.num_batches_tracked) == 0
        np.testing.assert_array_equal(np.asarray(layer.running_mean), 0)
        layer.virtual_batch_size = 0
        with pytest.raises(ValueError, match="virtual_batch_size"):
            layer(arg)

"""Batch Renorm (NumPy and torch) against its definition (Ioffe 2017, Algorithm 1), PyTorch's
BN at rmax=1, dmax=0, and float64 gradients (autograd of the definition, finite differences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
import batchnorm.torch as bt

SHAPES = [(7, 3), (5, 4, 6), (4, 3, 5, 2), (3, 2, 3, 2, 4)]
NP_CLASSES = {2: batchnorm.BatchRenorm1d, 3: batchnorm.BatchRenorm1d,
              4: batchnorm.BatchRenorm2d, 5: batchnorm.BatchRenorm3d}
TORCH_CLASSES = {2: bt.BatchRenorm1d, 3: bt.BatchRenorm1d, 4: bt.BatchRenorm2d,
                 5: bt.BatchRenorm3d}


def definition(x, w, b, rm, rv, eps, rmax, dmax, momentum):
    """Algorithm 1 of the paper, on float64 torch tensors; r and d detached."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dims)
    var = ((x - mu.reshape(shape)) ** 2).mean(dims)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(rv + eps)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax).detach()
    d = torch.clamp((mu - rm) / sigma, -dmax, dmax).detach()
    xhat = (x - mu.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    y = w.reshape(shape) * xhat + b.reshape(shape)
    n = x.numel() // x.shape[1]
    new_rm = (1 - momentum) * rm + momentum * mu.detach()
    new_rv = (1 - momentum) * rv + momentum * var.detach() * n / (n - 1)
    return y, new_rm, new_rv


def _draw(shape, rng):
    c = shape[1]
    x = rng.normal(1.5, 2.0, shape)
    w, b = rng.normal(1, 0.3, c), rng.normal(0, 0.3, c)
    rm, rv = rng.normal(0, 1, c), rng.uniform(0.3, 3, c)  # r and d clip on some channels
    dy = rng.normal(0, 1, shape)
    return x, w, b, rm, rv, dy


def _oracle(x, w, b, rm, rv, dy, rmax, dmax, momentum=0.1):
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in "xwb")
         for k, v in dict(x=x, w=w, b=b).items()}
    y, new_rm, new_rv = definition(t["x"], t["w"], t["b"], torch.tensor(rm), torch.tensor(rv),
                                   1e-5, rmax, dmax, momentum)
    y.backward(torch.tensor(dy))
    return (y.detach().numpy(), new_rm.numpy(), new_rv.numpy(),
            *(t[k].grad.numpy() for k in "xwb"))


def _numpy_layer(shape, w, b, rm, rv, backend, **kw):
    layer = NP_CLASSES[len(shape)](shape[1], dtype=np.float64, backend=backend, **kw)
    layer.weight.data[...], layer.bias.data[...] = w, b
    layer.running_mean[...], layer.running_var[...] = rm, rv
    return layer


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("limits", [(3.0, 5.0), (1.5, 0.5)])
def test_numpy_renorm_matches_definition(shape, limits, backend, rng):
    x, w, b, rm, rv, dy = _draw(shape, rng)
    y0, rm0, rv0, dx0, dw0, db0 = _oracle(x, w, b, rm, rv, dy, *limits)
    layer = _numpy_layer(shape, w, b, rm, rv, backend, rmax=limits[0], dmax=limits[1])
    y = layer(x)
    np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, rm0, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.running_var, rv0, rtol=1e-12, atol=1e-14)
    assert int(layer.num_batches_tracked) == 1
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, dx0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, dw0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, db0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_renorm_matches_definition(shape, rng):
    x, w, b, rm, rv, dy = _draw(shape, rng)
    y0, rm0, rv0, dx0, dw0, db0 = _oracle(x, w, b, rm, rv, dy, 2.0, 0.7)
    layer = TORCH_CLASSES[len(shape)](shape[1], rmax=2.0, dmax=0.7).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w))
        layer.bias.copy_(torch.tensor(b))
        layer.running_mean.copy_(torch.tensor(rm))
        layer.running_var.copy_(torch.tensor(rv))
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(torch.tensor(dy))
    np.testing.assert_allclose(y.detach().numpy(), y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean.numpy(), rm0, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.running_var.numpy(), rv0, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(xt.grad.numpy(), dx0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), dw0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad.numpy(), db0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_rmax_1_dmax_0_is_pytorch_bn(momentum, rng):
    """Two training steps then eval: outputs, gradients and buffers equal nn.BatchNorm2d's."""
    ours = bt.BatchRenorm2d(3, momentum=momentum, rmax=1.0, dmax=0.0).double()
    ref = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    mine = _numpy_layer((2, 3, 4, 4), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3),
                        "numpy", rmax=1.0, dmax=0.0, momentum=momentum)
    for _ in range(2):
        x = rng.normal(2, 3, (6, 3, 4, 5))
        dy = rng.normal(size=x.shape)
        outs = []
        for layer in (ours, ref):
            xt = torch.tensor(x, requires_grad=True)
            layer(xt).backward(torch.tensor(dy))
            outs.append(xt.grad.numpy())
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-10, atol=1e-12)
        mine(x)
        np.testing.assert_allclose(mine.backward(dy), outs[1], rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(ref, name).numpy(),
                                   rtol=1e-13)
        np.testing.assert_allclose(getattr(mine, name), getattr(ref, name).numpy(), rtol=1e-13)
    np.testing.assert_allclose(ours.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-10)
    x = torch.tensor(rng.normal(size=(4, 3, 2, 2)))
    ours.eval(), ref.eval(), mine.eval()
    np.testing.assert_allclose(ours(x).detach().numpy(), ref(x).detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(mine(x.numpy()), ref(x).detach().numpy(), rtol=1e-13)


def test_eval_is_bn_eval(rng):
    x = rng.normal(size=(5, 4, 3))
    ours = bt.BatchRenorm1d(4, rmax=2.0, dmax=1.0).double()
    ref = torch.nn.BatchNorm1d(4).double()
    for layer in (ours, ref):
        with torch.no_grad():
            layer.running_mean.copy_(torch.tensor(rng.normal(size=4)))
    ref.load_state_dict(ours.state_dict())
    ours.eval(), ref.eval()
    np.testing.assert_array_equal(ours(torch.tensor(x)).detach().numpy(),
                                  ref(torch.tensor(x)).detach().numpy())


def _loss_numpy(layer, x, p):
    state = {k: np.copy(v) for k, v in layer.state_dict().items()}
    y = layer(x)
    layer.load_state_dict(state)
    layer._family_cache = None
    return float((y * p).sum())


def test_finite_differences_where_r_and_d_clip(rng):
    """With r and d at their limits they are locally constant, so dy/dx is the full derivative:
    finite differences check it (NumPy) and torch.autograd.gradcheck checks the torch layer."""
    shape = (4, 3, 5)
    x, p = rng.normal(size=shape), rng.normal(size=shape)
    layer = _numpy_layer(shape, rng.normal(1, 0.2, 3), rng.normal(size=3), np.full(3, 50.0),
                         np.full(3, 1e4), "numpy", rmax=2.0, dmax=0.25)
    layer(x)
    dx = layer.backward(p)
    h = 1e-6
    for idx in [(0, 0, 0), (1, 2, 3), (3, 1, 4), (2, 0, 1)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd = (_loss_numpy(layer, xp, p) - _loss_numpy(layer, xm, p)) / (2 * h)
        assert abs(fd - dx[idx]) < 1e-7 * max(1.0, abs(fd))
    torch_layer = bt.BatchRenorm1d(3, rmax=2.0, dmax=0.25).double()
    with torch.no_grad():
        torch_layer.running_mean.fill_(50.0)
        torch_layer.running_var.fill_(1e4)
    torch_layer.momentum = 0.0  # keep r and d at the same limits through gradcheck's calls
    xt = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(torch_layer, (xt,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs", [dict(rmax=0.5), dict(dmax=-1.0), dict(rmax=float("nan")),
                                    dict(track_running_stats=False)])
def test_bad_settings_raise(kwargs):
    for cls in (batchnorm.BatchRenorm2d, bt.BatchRenorm2d):
        with pytest.raises(ValueError, match="rmax|dmax|running"):
            cls(3, **kwargs)


def test_bad_schedule_value_leaves_layer_unchanged(rng):
    x = rng.normal(size=(4, 3, 2, 2))
    for layer in (batchnorm.BatchRenorm2d(3), bt.BatchRenorm2d(3)):
        layer.rmax = 0.9
        before = {k: np.copy(np.asarray(v)) for k, v in layer.state_dict().items()}
        with pytest.raises(ValueError, match="rmax must be"):
            layer(x.astype(np.float32) if isinstance(layer, batchnorm.BatchRenorm2d)
                  else torch.tensor(x, dtype=torch.float32))
        after = {k: np.asarray(v) for k, v in layer.state_dict().items()}
        for k in before:
            np.testing.assert_array_equal(before[k], after[k])


def test_one_value_per_channel_raises_and_changes_nothing():
    layer = batchnorm.BatchRenorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones((1, 3), np.float32))
    assert int(layer.num_batches_tracked) == 0
    tl = bt.BatchRenorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tl(torch.ones(1, 3))
    assert int(tl.num_batches_tracked) == 0

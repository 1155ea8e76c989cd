"""BatchNorm1d/2d/3d against torch.nn over several training steps, state dicts, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn

torch = pytest.importorskip("torch")

TOL = {np.float64: 1e-10, np.float32: 3e-5, np.float16: 2e-2}
CLASSES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def _pair(shape, axis, dtype, backend, **kwargs):
    channels = shape[axis]
    name = CLASSES[len(shape)]
    ours = getattr(bn, name)(channels, dtype=dtype, axis=axis, backend=backend, **kwargs)
    # the oracle computes in float64 for float16, PyTorch's CPU kernel has no such path
    tdtype = torch.float64 if dtype == np.float16 else getattr(torch, np.dtype(dtype).name)
    theirs = getattr(torch.nn, name)(channels, dtype=tdtype, **kwargs)
    return ours, theirs, tdtype


def _to_torch(a, axis):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))


def _from_torch(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


@pytest.mark.parametrize(
    "shape,axis",
    [((2, 1), 1), ((13, 5), 1), ((3, 7, 2), 1), ((2, 3, 5, 7), 1), ((3, 5, 4, 3), -1),
     ((2, 2, 3, 2, 3), 1), ((2, 3, 2, 2, 5), -1)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}, {"bias": False}],
)
def test_training_steps_then_eval_match_torch(shape, axis, dtype, kwargs, backend, rng):
    ours, theirs, tdtype = _pair(shape, axis, dtype, backend, **kwargs)
    channels = shape[axis]
    if ours.weight is not None:
        w = (rng.standard_normal(channels) + 1).astype(dtype)
        ours.weight.data[...] = w
        theirs.weight.data = torch.from_numpy(w).to(tdtype)
    tol = TOL[dtype]
    for _step in range(3):
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = _to_torch(x, axis).to(tdtype).requires_grad_()
        y = ours(x)
        yt = theirs(xt)
        dx = ours.backward(dy)
        yt.backward(_to_torch(dy, axis).to(xt.dtype))
        assert y.dtype == dtype and dx.dtype == dtype
        np.testing.assert_allclose(y, _from_torch(yt, axis), atol=tol, rtol=tol)
        np.testing.assert_allclose(dx, _from_torch(xt.grad, axis), atol=tol, rtol=tol)
        for name in ("weight", "bias"):
            p, tp = getattr(ours, name), getattr(theirs, name)
            assert (p is None) == (tp is None)
            if p is not None:  # accumulated over the steps, as in torch
                scale = max(1.0, float(tp.grad.abs().max()))
                np.testing.assert_allclose(p.grad, tp.grad.numpy(), atol=tol * scale, rtol=tol)
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(their_state)
    for key, value in their_state.items():
        assert ours_state[key].shape == tuple(value.shape)
        np.testing.assert_allclose(ours_state[key], value.numpy(), atol=tol, rtol=tol)
    ours.eval()
    theirs.eval()
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    yt = theirs(_to_torch(x, axis).to(tdtype))
    np.testing.assert_allclose(ours(x), _from_torch(yt, axis), atol=tol, rtol=tol)


def test_momentum_none_is_cumulative_average(rng):
    layer = bn.BatchNorm1d(2, momentum=None, dtype=np.float64)
    batches = [rng.standard_normal((5, 2)) * (i + 1) + i for i in range(4)]
    for x in batches:
        layer(x)
    np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(0) for b in batches], 0))
    np.testing.assert_allclose(layer.running_var, np.mean([b.var(0, ddof=1) for b in batches], 0))
    assert int(layer.num_batches_tracked) == 4


def test_state_dict_round_trips_with_torch_both_ways(rng, tmp_path):
    theirs = torch.nn.BatchNorm2d(3)
    theirs.weight.data.normal_()
    theirs.bias.data.normal_()
    theirs(torch.randn(4, 3, 2, 2))
    ours = bn.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())  # torch tensors accepted
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[key], value.numpy())
    ours(rng.standard_normal((4, 3, 2, 2)).astype(np.float32))
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    assert int(back.num_batches_tracked) == 2
    np.testing.assert_array_equal(back.running_var.numpy(), ours.running_var)
    # through an .npz file, no pickle
    bn.save(ours.state_dict(), tmp_path / "bn.npz")
    fresh = bn.BatchNorm2d(3)
    fresh.load_state_dict(bn.load(tmp_path / "bn.npz"))
    for key, value in ours.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value)


def test_state_dict_is_a_copy():
    layer = bn.BatchNorm1d(2)
    state = layer.state_dict()
    state["running_mean"][...] = 7
    assert not layer.running_mean.any()


def test_load_state_dict_errors_name_the_key_and_change_nothing():
    layer = bn.BatchNorm1d(3)
    good = layer.state_dict()
    missing = dict(good)
    del missing["running_var"]
    with pytest.raises(KeyError, match="missing keys \\['running_var'\\]"):
        layer.load_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected keys \\['extra'\\]"):
        layer.load_state_dict({**good, "extra": np.zeros(3)})
    bad = {**good, "running_mean": np.full(3, 9.0), "bias": np.zeros(4)}
    with pytest.raises(ValueError, match="'bias'.*shape \\(4,\\)"):
        layer.load_state_dict(bad)
    assert not layer.running_mean.any()  # validated before anything was written
    with pytest.raises(TypeError, match="num_batches_tracked"):
        layer.load_state_dict({**good, "num_batches_tracked": np.array(1.5)})


def test_checkpoint_without_num_batches_tracked_loads_as_in_torch(rng):
    theirs = torch.nn.BatchNorm1d(3)
    theirs(torch.randn(8, 3))  # one batch counted
    old = {k: v.clone() for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    old["running_mean"] += 1.0
    theirs.load_state_dict(old)  # PyTorch accepts a plain dict from before the buffer
    ours = bn.BatchNorm1d(3)
    ours(rng.standard_normal((8, 3)).astype(np.float32))
    ours.load_state_dict(old)
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[key], value.numpy())
    assert int(ours.num_batches_tracked) == 1  # kept, as PyTorch keeps its own


def test_misspelled_backend_is_refused_by_the_constructor():
    with pytest.raises(ValueError, match="unknown backend 'numab'"):
        bn.BatchNorm2d(4, backend="numab")


def test_npz_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, weight=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        bn.load(path)


def test_input_checks():
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        bn.BatchNorm1d(3)(np.ones((2, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bn.BatchNorm2d(3)(np.ones((2, 3, 2)))
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        bn.BatchNorm3d(3)(np.ones((2, 3, 2, 2)))
    with pytest.raises(ValueError, match="expected 3 channels on axis 1"):
        bn.BatchNorm1d(3)(np.ones((4, 5)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.BatchNorm1d(3)(np.ones((1, 3)))
    with pytest.raises(TypeError, match="floating-point"):
        bn.BatchNorm1d(3)(np.ones((4, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="dtype must be"):
        bn.BatchNorm1d(3, dtype=np.int32)
    with pytest.raises(ValueError, match="num_features"):
        bn.BatchNorm1d(0)


def test_rejected_batch_changes_nothing():
    layer = bn.BatchNorm1d(2)
    layer(np.arange(8, dtype=np.float32).reshape(4, 2))
    before = layer.state_dict()
    x = np.ones((4, 2), np.float32)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_backward_misuse():
    layer = bn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((4, 3)))
    layer(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(ValueError, match="grad_output has shape"):
        layer.backward(np.ones((4, 2)))


def test_empty_batch_module():
    layer = bn.BatchNorm1d(3)
    y = layer(np.empty((0, 3), np.float32))
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)


def test_repr_reset_and_modes():
    layer = bn.BatchNorm2d(4, momentum=None, affine=False)
    assert repr(layer) == repr(torch.nn.BatchNorm2d(4, momentum=None, affine=False))
    assert repr(bn.BatchNorm1d(3)) == repr(torch.nn.BatchNorm1d(3))
    layer(np.random.default_rng(0).standard_normal((3, 4, 2, 2)))
    assert layer.running_mean.any()
    layer.reset_running_stats()
    assert not layer.running_mean.any() and int(layer.num_batches_tracked) == 0
    assert layer.eval() is layer and not layer.training
    assert layer.train().training
    assert [name for name, _ in bn.BatchNorm1d(2).named_parameters()] == ["weight", "bias"]

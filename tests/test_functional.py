"""batchnorm.functional against PyTorch 2.13 CPU, finite differences and BN's invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import batchnorm as bn
from batchnorm import functional as F

torch = pytest.importorskip("torch")

# absolute tolerance per dtype, for values of order 1
TOL = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 1e-2}

SHAPES = [
    ((2, 1), 1),
    ((7, 3), 1),
    ((2, 5, 3), 1),
    ((3, 4, 5, 7), 1),
    ((2, 3, 3, 5, 2), 1),
    ((5, 7, 3), -1),
    ((3, 5, 7, 4), -1),
    ((11, 13), 0),
    ((4, 3, 5), 2),
]


def _torch_layout(a: np.ndarray, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, axis, 1))


def _torch_bn(x, dy, weight, bias, rm, rv, training, momentum, eps, axis, dtype):
    """PyTorch's result in float64 (the oracle) on the same values, in our layout."""
    tdtype = torch.float64 if dtype == np.float16 else torch.from_numpy(np.zeros(1, dtype)).dtype
    xt = torch.tensor(_torch_layout(x, axis), dtype=tdtype, requires_grad=True)
    wt = None if weight is None else torch.tensor(weight, dtype=tdtype, requires_grad=True)
    bt = None if bias is None else torch.tensor(bias, dtype=tdtype, requires_grad=True)
    rmt = None if rm is None else torch.tensor(rm, dtype=tdtype)
    rvt = None if rv is None else torch.tensor(rv, dtype=tdtype)
    yt = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training, momentum, eps)
    yt.backward(torch.tensor(_torch_layout(dy, axis), dtype=tdtype))
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, axis)  # noqa: E731
    return {
        "y": back(yt),
        "dx": back(xt.grad),
        "dw": None if wt is None else wt.grad.numpy(),
        "db": None if bt is None else bt.grad.numpy(),
        "rm": None if rmt is None else rmt.numpy(),
        "rv": None if rvt is None else rvt.numpy(),
    }


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training,track", [(True, True), (True, False), (False, True)])
def test_matches_torch(shape, axis, dtype, affine, training, track, backend, rng):
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = (rng.standard_normal(channels) + 1).astype(dtype) if affine else None
    bias = rng.standard_normal(channels).astype(dtype) if affine else None
    rm = (rng.standard_normal(channels) * 0.1).astype(dtype) if track else None
    rv = (rng.random(channels) + 0.5).astype(dtype) if track else None
    expected = _torch_bn(x, dy, weight, bias, rm, rv, training, 0.3, 1e-3, axis, dtype)
    rm_ours = None if rm is None else rm.copy()
    rv_ours = None if rv is None else rv.copy()
    y, cache = F.batch_norm_forward(
        x, weight, bias, rm_ours, rv_ours, training, 0.3, 1e-3, axis, backend=backend
    )
    dx, dw, db = F.batch_norm_backward(dy, cache)
    tol = TOL[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(y, expected["y"], atol=tol, rtol=tol)
    np.testing.assert_allclose(dx, expected["dx"], atol=tol, rtol=tol)
    for ours, key in ((dw, "dw"), (db, "db"), (rm_ours, "rm"), (rv_ours, "rv")):
        if expected[key] is None:
            assert ours is None
        else:
            scale = max(1.0, float(np.abs(expected[key]).max()))
            np.testing.assert_allclose(ours, expected[key], atol=tol * scale, rtol=tol)


def test_batch_norm_updates_running_stats_in_place(rng):
    x = rng.standard_normal((10, 3)) * 4 + 2
    rm, rv = np.zeros(3), np.ones(3)
    F.batch_norm(x, rm, rv, training=True, momentum=0.25)
    np.testing.assert_allclose(rm, 0.25 * x.mean(0))
    np.testing.assert_allclose(rv, 0.75 + 0.25 * x.var(0, ddof=1))
    y = F.batch_norm(x, rm, rv, training=False, eps=0.0)
    np.testing.assert_allclose(y, (x - rm) / np.sqrt(rv))


def _against_torch(x, axis, backend, rng):
    """Training fwd+bwd of x (any strides) against PyTorch float64; returns (y, dx)."""
    channels = x.shape[axis]
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    w = (rng.standard_normal(channels) + 1).astype(x.dtype)
    b = rng.standard_normal(channels).astype(x.dtype)
    expected = _torch_bn(
        x.astype(np.float64), dy.astype(np.float64), w, b, None, None, True, 0.1, 1e-5, axis,
        np.float64,
    )  # fmt: skip
    y, cache = F.batch_norm_forward(x, w, b, axis=axis, backend=backend)
    dx, _, _ = F.batch_norm_backward(dy, cache)
    tol = TOL[x.dtype.type] * 5
    np.testing.assert_allclose(y, expected["y"], atol=tol, rtol=tol)
    np.testing.assert_allclose(dx, expected["dx"], atol=tol, rtol=tol)
    return y, dx, cache


def test_keeps_channels_last_memory_layout(backend, rng):
    x = np.moveaxis(rng.standard_normal((2, 5, 6, 4)).astype(np.float32), -1, 1)  # NCHW view
    assert not x.flags.c_contiguous
    y, dx, cache = _against_torch(x, 1, backend, rng)
    assert cache.layout.channels_last
    assert np.shares_memory(cache.x3, x)  # no copy of the input
    assert y.strides == x.strides and dx.strides == x.strides


@pytest.mark.parametrize("shape,axis", [((6, 4), 1), ((5, 3, 4, 2), 1), ((4, 2, 3), -1)])
def test_keeps_fortran_order(shape, axis, backend, rng):
    x = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
    y, dx, cache = _against_torch(x, axis, backend, rng)
    assert np.shares_memory(cache.x3, x)  # seen through its transpose, not copied
    assert y.flags.f_contiguous and dx.flags.f_contiguous


def test_strided_input_is_accepted(backend, rng):
    x = rng.standard_normal((6, 4, 10))[:, :, ::3]
    y, dx, _ = _against_torch(x, 1, backend, rng)
    assert y.flags.c_contiguous and dx.flags.c_contiguous  # other strides: C order


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((4, 3, 2), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_finite_differences(shape, axis, training, backend, rng):
    channels = shape[axis]
    x = rng.standard_normal(shape) * 2 + 1
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    rm, rv = rng.standard_normal(channels), rng.random(channels) + 0.5
    proj = rng.standard_normal(shape)  # loss = sum(proj * y)

    def loss(x_, w_, b_):
        y = F.batch_norm(
            x_, rm.copy(), rv.copy(), w_, b_, training, 0.1, 1e-5, axis, backend=backend
        )
        return float((proj * y).sum())

    _, cache = F.batch_norm_forward(
        x, weight, bias, rm.copy(), rv.copy(), training, 0.1, 1e-5, axis, backend=backend
    )
    dx, dw, db = F.batch_norm_backward(proj, cache)
    h = 1e-6
    for arr, grad, args in ((x, dx, 0), (weight, dw, 1), (bias, db, 2)):
        numeric = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[i] += h
            minus[i] -= h
            pa = [x, weight, bias]
            ma = [x, weight, bias]
            pa[args], ma[args] = plus, minus
            numeric[i] = (loss(*pa) - loss(*ma)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


def test_float32_variance_is_stable_for_large_means(backend, rng):
    x = (rng.standard_normal((256, 4, 9)) + 1e4).astype(np.float32)
    y, _ = F.batch_norm_forward(x, None, None, backend=backend)
    y64, _ = F.batch_norm_forward(x.astype(np.float64), None, None, backend="numpy")
    assert np.abs(y - y64).max() < 1e-4
    # the naive E[x^2] - E[x]^2 in float32 would lose the unit variance entirely
    np.testing.assert_allclose(y.std(axis=(0, 2)), 1.0, atol=1e-3)


def test_float32_sums_accumulate_in_float64(backend):
    # 2**24 + many ones: a float32 accumulator stops growing at 2**24
    x = np.ones((1 << 12, 1, 1 << 10), np.float32)
    x[0, 0, 0] = 3.0
    _, cache = F.batch_norm_forward(x, None, None, backend=backend)
    n = x.size
    np.testing.assert_allclose(cache.mean, (n + 2) / n, rtol=1e-12)


# -- properties --------------------------------------------------------------------------

_values = st.floats(-100, 100, allow_nan=False, width=64)


@st.composite
def _batches(draw):
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 4))
    x = draw(hnp.arrays(np.float64, (n, c), elements=_values))
    # keep channels away from constant, where eps dominates and invariance is approximate
    x = x + np.arange(n)[:, None] * draw(st.floats(0.5, 3))
    assume(x.std(axis=0).min() > 0.1)
    return x


@settings(max_examples=40, deadline=None)
@given(x=_batches(), shift=st.floats(-50, 50), scale=st.floats(0.5, 20))
def test_invariant_to_channel_shift_and_positive_scale(x, shift, scale):
    eps = 1e-300  # eps must be positive in training (as in PyTorch); this one is negligible
    y = F.batch_norm(x, None, None, training=True, eps=eps)
    y2 = F.batch_norm(x * scale + shift, None, None, training=True, eps=eps)
    np.testing.assert_allclose(y2, y, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(x=_batches(), data=st.data())
def test_output_channels_have_mean_beta_and_dx_sums_to_zero(x, data):
    c = x.shape[1]
    beta = data.draw(hnp.arrays(np.float64, (c,), elements=st.floats(-5, 5)))
    gamma = data.draw(hnp.arrays(np.float64, (c,), elements=st.floats(-5, 5)))
    dy = data.draw(hnp.arrays(np.float64, x.shape, elements=st.floats(-5, 5)))
    y, cache = F.batch_norm_forward(x, gamma, beta)
    np.testing.assert_allclose(y.mean(axis=0), beta, atol=1e-9)
    dx, _, _ = F.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-8 * max(1.0, np.abs(dy).sum()))


# -- bad input ---------------------------------------------------------------------------


def test_one_value_per_channel_in_training_is_rejected():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(np.ones((1, 3)), None, None, training=True)
    # eval mode has no such limit
    F.batch_norm(np.ones((1, 3)), np.zeros(3), np.ones(3), training=False)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, object, np.complex128])
def test_non_float_input_is_rejected(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        F.batch_norm(np.ones((4, 3), dtype=dtype), None, None, training=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_training_batch_leaves_running_stats(bad, backend):
    x = np.random.default_rng(0).standard_normal((8, 3))
    x[5, 1] = bad
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    with pytest.raises(ValueError, match=r"non-finite.*channels \[1\]"):
        F.batch_norm(x, rm, rv, training=True, backend=backend)
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)


def test_empty_batch_gives_empty_output_and_keeps_stats(backend):
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    y, cache = F.batch_norm_forward(
        np.empty((0, 3, 4)), np.ones(3), np.zeros(3), rm, rv, backend=backend
    )
    assert y.shape == (0, 3, 4)
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    dx, dw, db = F.batch_norm_backward(np.empty((0, 3, 4)), cache)
    assert dx.shape == (0, 3, 4)
    np.testing.assert_array_equal(dw, 0.0)
    np.testing.assert_array_equal(db, 0.0)


def test_bad_shapes_and_arguments_are_named():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        F.batch_norm(x, None, None, np.ones(4), training=True)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        F.batch_norm(x, np.zeros(2), np.ones(3), training=True)
    with pytest.raises(ValueError, match="required when training=False"):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="given together"):
        F.batch_norm(x, np.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        F.batch_norm(x, None, None, training=True, axis=2)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        F.batch_norm(np.ones(3), None, None, training=True)
    with pytest.raises(ValueError, match="unknown backend"):
        F.batch_norm(x, None, None, training=True, backend="cuda")


def test_backward_with_wrong_dy_shape():
    _, cache = F.batch_norm_forward(np.ones((4, 3)) * np.arange(4)[:, None], None, None)
    with pytest.raises(ValueError, match=r"grad_output has shape \(3, 4\)"):
        F.batch_norm_backward(np.ones((3, 4)), cache)


def test_backend_env_var(monkeypatch):
    from batchnorm import kernels as backends

    monkeypatch.setenv("BATCHNORM_BACKEND", "numpy")
    assert backends.resolve("auto") == "numpy"
    monkeypatch.setenv("BATCHNORM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("auto")
    monkeypatch.delenv("BATCHNORM_BACKEND")
    assert backends.resolve("auto") in backends.available()
    assert bn.functional.batch_norm(np.ones((2, 1)), None, None, training=True).shape == (2, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_training_passes_match_torch(dtype, rng, monkeypatch):
    """Long contiguous channels take the numba backend's one-read fused passes."""
    numba_backend = pytest.importorskip("batchnorm.kernels.numba")
    calls = []

    def spy(name):
        real = getattr(numba_backend, name)

        def wrapper(*args):
            out = real(*args)
            calls.append((name, out is not None))
            return out

        return wrapper

    for name in ("fused_forward", "fused_backward"):
        monkeypatch.setattr(numba_backend, name, spy(name))
    shape = (3, 5, 2055)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight, bias = (rng.standard_normal(5) + 1).astype(dtype), rng.standard_normal(5).astype(dtype)
    rm, rv = np.zeros(5, dtype), np.ones(5, dtype)
    expected = _torch_bn(x, dy, weight, bias, rm.copy(), rv.copy(), True, 0.1, 1e-5, 1, dtype)
    y, cache = F.batch_norm_forward(x, weight, bias, rm, rv, backend="numba")
    dx, dw, db = F.batch_norm_backward(dy, cache)
    assert calls == [("fused_forward", True), ("fused_backward", True)]
    tol = TOL[dtype]
    for ours, key in ((y, "y"), (dx, "dx"), (dw, "dw"), (db, "db"), (rm, "rm"), (rv, "rv")):
        scale = max(1.0, float(np.abs(expected[key]).max()))
        np.testing.assert_allclose(ours, expected[key], atol=tol * scale, rtol=tol)


# -- the NumPy API's contract where PyTorch has a rule -----------------------------------


def test_eps_must_be_positive_in_training_as_in_torch():
    x = np.random.default_rng(0).standard_normal((4, 3))
    for eps in (0.0, -1e-5):
        with pytest.raises(ValueError, match="eps must be positive"):
            torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True, eps=eps)
        with pytest.raises(ValueError, match="eps must be positive in training"):
            F.batch_norm(x, None, None, training=True, eps=eps)


def test_running_stats_must_be_arrays_updated_all_or_nothing(backend):
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(TypeError, match="running_mean must be a NumPy array.*got list"):
        F.batch_norm(x, [0.0] * 3, np.ones(3), training=True, backend=backend)
    rm, rv = np.zeros(3), np.ones(3)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is read-only"):
        F.batch_norm(x, rm, rv, training=True, backend=backend)
    np.testing.assert_array_equal(rm, 0.0)  # nothing written before the refusal
    y = F.batch_norm(x, rm, rv, training=False, backend=backend)  # eval only reads them
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5))


def test_functional_momentum_none_is_a_clear_error():
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(TypeError, match="momentum must be a number.*num_batches_tracked"):
        F.batch_norm(x, np.zeros(3), np.ones(3), training=True, momentum=None)


@pytest.mark.parametrize("scale", [1e160, 1e200, 1e300])
def test_huge_finite_data_matches_torch(scale, backend, rng):
    """Squared deviations overflow: PyTorch gives y = bias (rstd 0); so do we, no error."""
    x = rng.standard_normal((16, 3)) * scale
    rm, rv = np.zeros(3), np.ones(3)
    expected = _torch_bn(
        x, np.ones_like(x), None, None, rm.copy(), rv.copy(), True, 0.1, 1e-5, 1, np.float64
    )
    y = F.batch_norm(x, rm, rv, training=True, backend=backend)
    np.testing.assert_array_equal(y, expected["y"])
    np.testing.assert_allclose(rm, expected["rm"], rtol=1e-12)
    np.testing.assert_array_equal(rv, expected["rv"])  # inf, as PyTorch stores it


def test_cache_reads_x_at_backward_whatever_its_strides(backend, rng):
    """The documented rule: x is held by reference, contiguous or strided alike."""
    base = rng.standard_normal((6, 4, 10))
    dy = rng.standard_normal((6, 4, 5))
    results = []
    for x in (np.ascontiguousarray(base[:, :, ::2]), base.copy()[:, :, ::2]):
        _, cache = F.batch_norm_forward(x, None, None, backend=backend)
        x *= 3.0  # changed in place between forward and backward
        results.append(F.batch_norm_backward(dy, cache)[0])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_big_endian_input_is_converted(backend, rng):
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y, cache = F.batch_norm_forward(x.astype(">f4"), None, None, backend=backend)
    assert y.dtype == np.float32 and y.dtype.isnative
    np.testing.assert_array_equal(y, F.batch_norm_forward(x, None, None, backend=backend)[0])
    dx, _, _ = F.batch_norm_backward(np.ones((8, 3), ">f4"), cache)
    assert dx.dtype == np.float32


def test_inverse_std_is_one_over_sqrt_as_pytorch_computes_it(rng):
    """rstd = 1 / sqrt(var + eps), each operation rounded once, as PyTorch's CPU kernel computes
    it (``1 / std::sqrt``; our Triton kernel too); (var + eps) ** -0.5 differs from it by an
    ulp on about a quarter of these values."""
    import math

    from batchnorm.math import inverse_std

    var = rng.random(10_000) * 10.0
    want = np.array([1.0 / math.sqrt(v + 1e-5) for v in var])
    np.testing.assert_array_equal(inverse_std(var, 1e-5), want)
    pytest.importorskip("numba")
    from batchnorm.kernels.numba import config

    assert all(config.inverse_std(v, 1e-5) == w for v, w in zip(var[:200], want[:200], strict=True))

"""The numba backend against the numpy backend and PyTorch, on every kernel path.

Small arrays run the serial builds; the ``parallel`` path forces the chunked builds (three
chunks, whatever the thread count, so per-chunk partials are merged) and tiny two-pass
blocks (so Chan merges between blocks run too). Compilation dominates this file's time,
so the parallel path is checked in float32 only: its kernel bodies are the serial ones.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")

from batchnorm import functional as F  # noqa: E402
from batchnorm import kernels as backends  # noqa: E402
from batchnorm.kernels import numba as nb  # noqa: E402
from batchnorm.kernels import numpy as npb  # noqa: E402
from batchnorm.kernels.numba import config, plan, rows  # noqa: E402

# (outer, C, inner): rows kernels for inner < ROWS_MAX_INNER and for few channels of short
# segments (plan.use_rows), segments kernels otherwise
SHAPES3 = [
    (7, 1, 1),  # C = 1
    (13, 3, 1),  # C = 3, channels-last / 2-D rows
    (43, 4, 1),  # rows: several eight-row sweeps and leftover rows in every chunk
    (150, 3, 1),  # more rows than COLUMNS_MAX_ROWS: reductions split by rows, not columns
    (9, 40, 1),  # 40 columns in 16-column blocks: chunks of 16, 16 and 8 columns
    (2, 5, 1),  # N = 2
    (5, 7, 11),  # short inner: rows kernels over C * inner columns
    (2, 3, 50),  # C = 3, short segments: rows kernels over C * inner columns too
    (3, 5, 17),
    (2, 3, 300),  # C = 3, segments
    (2, 2, 1009),  # long prime inner: several two-pass blocks per segment
]
TOL = {np.float32: {"rtol": 2e-6, "atol": 2e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}


@pytest.fixture(params=["serial", "parallel"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "parallel":
        monkeypatch.setattr(config, "PARALLEL_MIN", 0)
        monkeypatch.setattr(config, "CHUNKS", 3)
        monkeypatch.setattr(config, "BLOCK", 7)
    return str(request.param)


def _dtypes(path: str) -> list[Any]:
    return [np.float32] if path == "parallel" else [np.float32, np.float64]


def _data(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (3.0 * rng.standard_normal(shape) + 5.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def test_threads_partials_share_no_cache_line() -> None:
    for width in (1, 3, 16, 17, 512):
        partials = config.per_chunk(2, width)
        assert partials.shape[1] >= width and not partials.any()
        # whatever the base address's alignment, row 0's last value and row 1's first are
        # a cache line (64 bytes) apart or more
        assert partials.strides[0] - width * partials.itemsize >= 64


def test_reductions_split_by_columns_when_rows_are_few() -> None:
    few = np.empty((config.COLUMNS_MAX_ROWS, 4, 1), np.float32)
    many = np.empty((config.COLUMNS_MAX_ROWS + 1, 4, 1), np.float32)
    assert plan.by_columns(few, 2) and not plan.by_columns(few, 1)
    assert not plan.by_columns(many, 2)
    assert [tuple(rows.span(t, 3, 9, 40, True)) for t in range(3)] == [
        (0, 9, 0, 0), (0, 9, 0, 16), (0, 9, 16, 40)
    ]  # 40 // 3 = 13 rounds down to 0; every column in exactly one chunk


def test_path_switches() -> None:
    assert plan.use_rows(np.empty((4, 3, 1)))
    assert not plan.use_rows(np.empty((4, 3, config.ROWS_FALLBACK_INNER + 1)))
    assert plan.use_rows(np.empty((256, 8, 49), np.float32))  # runs of 1.5 KiB: not fused
    assert plan.fusable(np.empty((256, 8, 49), np.float32), 1) == (0, 0)
    assert not plan.use_rows(np.empty((32, 64, 64), np.float32))  # fused segments take these
    assert plan.rows_for_stats(np.empty((32, 64, 64), np.float32))  # ...but not the statistics
    assert not plan.rows_for_stats(np.empty((2, 256, 196), np.float32))  # too few rows
    assert plan.rows_for_stats(np.empty((2, 2048, 16), np.float32))  # 4x4: rows even so
    assert not plan.rows_for_stats(np.empty((4, 3, config.ROWS_FALLBACK_INNER + 1)))
    assert config.chunks(10, 10) == 1  # small arrays: one chunk, the serial build

    def one_region(shape3: tuple[int, int, int], threads: int = 2) -> int:
        with pytest.MonkeyPatch.context() as mp:  # whatever this machine's cores
            mp.setattr(config, "num_threads", lambda: threads)
            return plan.one_region(np.empty(shape3, np.float32))

    assert one_region((32, 4096, 1)) == 2  # few rows, 8 KiB of a row a thread: one region
    assert one_region((64, 1000, 1)) == 2  # 2000 bytes a thread, 64K values
    assert one_region((32, 1024, 1)) == 2  # 32K values
    assert one_region((128, 512, 1)) == 0  # 1 KiB a thread: two regions
    assert one_region((32, 512, 1)) == 0  # 16K values: serial
    assert one_region((256, 1024, 1)) == 0  # many rows: by rows
    assert one_region((32, 4096, 3)) == 0  # maps: by rows
    assert one_region((32, 4096, 1), threads=1) == 0


@pytest.mark.parametrize("shape3", SHAPES3, ids=str)
def test_kernels_match_numpy(path: str, shape3: tuple[int, int, int]) -> None:
    for dtype in _dtypes(path):
        x, dy = _data(shape3, dtype)
        channels = shape3[1]
        rng = np.random.default_rng(1)
        mean, m2 = nb.channel_stats(x)
        mean0, m20 = npb.channel_stats(x)
        np.testing.assert_allclose(mean, mean0, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m2, m20, rtol=1e-10, atol=1e-10)
        assert mean.dtype == m2.dtype == np.float64 and mean.shape == (channels,)

        scale, shift, c = (rng.standard_normal(channels) for _ in range(3))
        y = nb.normalize(x, mean0, scale, shift)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_allclose(y, npb.normalize(x, mean0, scale, shift), **TOL[dtype])

        sums = nb.grad_sums(dy, x, mean0)
        sums0 = npb.grad_sums(dy, x, mean0)
        for got, want in zip(sums, sums0, strict=True):
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)

        dx = nb.grad_input(dy, x, mean0, scale, shift, c)
        assert dx.dtype == x.dtype
        np.testing.assert_allclose(dx, npb.grad_input(dy, x, mean0, scale, shift, c), **TOL[dtype])


# (shape, axis): 2-D..5-D, channels-last via axis=-1
CASES = [
    ((2, 5), 1),
    ((60, 100), 1),
    ((3, 1, 7), 1),
    ((4, 3, 5, 7), 1),
    ((2, 3, 4, 5, 6), 1),
    ((3, 5, 7, 4), -1),
    ((5, 6, 3), -1),
    ((2, 17, 31), 1),
]
TORCH_TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-10}}


@pytest.mark.parametrize(("shape", "axis"), CASES, ids=str)
def test_matches_torch(path: str, shape: tuple[int, ...], axis: int) -> None:
    torch = pytest.importorskip("torch")
    tF = torch.nn.functional
    for dtype in _dtypes(path):
        x, dy = _data(shape, dtype, seed=len(shape))
        channels = shape[axis]
        rng = np.random.default_rng(2)
        w = (1.0 + 0.2 * rng.standard_normal(channels)).astype(dtype)
        b = (0.3 * rng.standard_normal(channels)).astype(dtype)
        rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
        y, cache = F.batch_norm_forward(x, w, b, rm, rv, training=True, axis=axis, backend="numba")
        dx, dw, db = F.batch_norm_backward(dy, cache)

        def to_torch(a: np.ndarray) -> Any:
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.movedim(-1, 1) if axis == -1 else t

        xt = to_torch(x).requires_grad_(True)
        wt = torch.from_numpy(w).requires_grad_(True)
        bt = torch.from_numpy(b).requires_grad_(True)
        rmt, rvt = torch.zeros(channels, dtype=xt.dtype), torch.ones(channels, dtype=xt.dtype)
        yt = tF.batch_norm(xt, rmt, rvt, wt, bt, training=True)
        dxt, dwt, dbt = torch.autograd.grad(yt, (xt, wt, bt), to_torch(dy))

        def back(t: Any) -> np.ndarray:
            t = t.detach()
            return (t.movedim(1, -1) if axis == -1 else t).numpy()

        tol = TORCH_TOL[dtype]
        assert y.dtype == x.dtype and dx.dtype == x.dtype
        np.testing.assert_allclose(y, back(yt), **tol)
        np.testing.assert_allclose(dx, back(dxt), **tol)
        np.testing.assert_allclose(dw, dwt.numpy(), **tol)
        np.testing.assert_allclose(db, dbt.numpy(), **tol)
        np.testing.assert_allclose(rm, rmt.numpy(), **tol)
        np.testing.assert_allclose(rv, rvt.numpy(), **tol)

        # eval forward with the updated running statistics
        ye = F.batch_norm(x, rm, rv, w, b, training=False, axis=axis, backend="numba")
        yet = tF.batch_norm(to_torch(x), rmt, rvt, wt.detach(), bt.detach(), training=False)
        np.testing.assert_allclose(ye, back(yet), **tol)


@pytest.mark.parametrize("shape3", [(4000, 2, 1), (4, 2, 1000)], ids=["rows", "segments"])
def test_big_mean_float32_is_stable(path: str, shape3: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(3)
    x64 = 1e4 + rng.standard_normal(shape3)
    x = x64.astype(np.float32)
    mean, m2 = nb.channel_stats(x)
    exact = x.astype(np.float64)
    count = shape3[0] * shape3[2]
    want_mean = exact.mean(axis=(0, 2))
    want_var = exact.var(axis=(0, 2))
    np.testing.assert_allclose(mean, want_mean, rtol=1e-13)
    np.testing.assert_allclose(m2 / count, want_var, rtol=1e-9)
    rstd = 1.0 / np.sqrt(want_var + 1e-5)
    y = nb.normalize(x, want_mean, rstd, np.zeros(shape3[1]))
    y64 = (exact - want_mean[None, :, None]) * rstd[None, :, None]
    assert np.abs(y - y64).max() < 1e-4


@pytest.mark.parametrize("offset", [5.0, 1e4])
def test_rows_float32_passes_stay_within_ulps_of_their_terms(path: str, offset: float) -> None:
    """The rows passes compute float32 in float32 (the mean's rounding folded into the
    constant term): each result within a few float32 ulps of its largest term, mean 1e4
    included (without the fold, x - mean would be off by half an ulp of 1e4, 5e-4)."""
    rng = np.random.default_rng(4)
    shape3 = (64, 5, 3)
    x64 = offset + rng.standard_normal(shape3)
    x = x64.astype(np.float32)
    dy = rng.standard_normal(shape3).astype(np.float32)
    mean = x.astype(np.float64).mean(axis=(0, 2)) + 1e-3 * rng.standard_normal(5)
    p, q, r = (rng.standard_normal(5) for _ in range(3))
    xm = x.astype(np.float64) - mean[None, :, None]
    g = dy.astype(np.float64)
    eps = np.finfo(np.float32).eps
    cases = (
        (nb.normalize(x, mean, p, q), xm * p[:, None] + q[:, None], (xm * p[:, None], q[:, None])),
        (
            nb.grad_input(dy, x, mean, p, q, r),
            g * p[:, None] + xm * q[:, None] + r[:, None],
            (g * p[:, None], xm * q[:, None], r[:, None]),
        ),
    )
    for got, want, terms in cases:
        assert got.dtype == np.float32
        bound = 4 * eps * sum(np.abs(t) for t in terms)
        assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


def test_rows_passes_keep_infinite_and_huge_means_as_float64_does(path: str) -> None:
    """Eval normalize with running means inf, -inf, 1e300 (beyond float32) and NaN: the
    float32 rows pass gives what the float64 formula rounded to float32 gives (the fold of
    the mean's rounding must not turn inf into NaN)."""
    x = np.linspace(-2.0, 2.0, 64, dtype=np.float32).reshape(16, 4, 1)
    mean = np.array([np.inf, -np.inf, 1e300, np.nan])
    scale, shift = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.5, -1.0, 3.0, 0.0])
    with np.errstate(invalid="ignore", over="ignore"):
        want = ((x.astype(np.float64) - mean[None, :, None]) * scale[None, :, None]
                + shift[None, :, None]).astype(np.float32)  # fmt: skip
    got = nb.normalize(x, mean, scale, shift)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 40)], ids=str)
def test_nan_reaches_the_check(path: str, shape: tuple[int, ...]) -> None:
    x, _ = _data(shape, np.float32)
    x.flat[5] = np.nan
    channels = shape[1]
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        F.batch_norm(x, rm, rv, training=True, backend="numba")
    assert np.all(rm == 0) and np.all(rv == 1)
    y = F.batch_norm(x, rm, rv, training=False, backend="numba")
    assert np.isnan(y.flat[5]) and np.isfinite(np.delete(y.ravel(), 5)).all()


def test_empty_batch_and_float16_routing() -> None:
    x = np.zeros((0, 3, 4), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = F.batch_norm(x, rm, rv, training=False, backend="numba")
    assert y.shape == x.shape and y.dtype == np.float32
    assert nb.normalize(np.zeros((0, 3, 1), np.float64), *(np.zeros(3),) * 3).shape == (0, 3, 1)
    assert backends.get("numba", np.float16) is npb
    assert backends.get("numba", np.float32) is nb


def _check_fused_backward(
    dy: np.ndarray, x: np.ndarray, mean: np.ndarray, rstd: np.ndarray, w: np.ndarray, count: int
) -> None:
    """fused_backward against the numpy passes with the coefficients written out here."""
    back = nb.fused_backward(dy, x, mean, rstd, w, count)
    assert back is not None
    dx, sum_dy, sum_dy_xmu = back
    sum_dy0, sum_dy_xmu0 = npb.grad_sums(dy, x, mean)
    np.testing.assert_allclose(sum_dy, sum_dy0, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sum_dy_xmu, sum_dy_xmu0, rtol=1e-10, atol=1e-10)
    a = w * rstd
    dx0 = npb.grad_input(dy, x, mean, a, -a * rstd**2 * sum_dy_xmu0 / count, -a * sum_dy0 / count)
    assert dx.dtype == x.dtype
    np.testing.assert_allclose(dx, dx0, **TOL[x.dtype.type])


@pytest.mark.parametrize(
    "shape3",
    [
        (2, 13, 1031),  # segments of 4 KiB: one channel per group
        (3, 50, 49),  # 7x7-like segments: groups of three float32 channels, the last partial
    ],
    ids=str,
)
def test_fused_helpers_match_the_public_passes(
    path: str, shape3: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # small runs, so that these small arrays make groups enough for three chunks
    monkeypatch.setattr(config, "FUSE_RUN_BYTES", 600)
    monkeypatch.setattr(config, "FUSE_MIN_RUN_BYTES", 300)
    eps = 1e-5
    for dtype in _dtypes(path):
        x, dy = _data(shape3, dtype)
        channels = shape3[1]
        count = shape3[0] * shape3[2]
        rng = np.random.default_rng(4)
        w = 1.0 + 0.2 * rng.standard_normal(channels)
        b = rng.standard_normal(channels)
        fused = nb.fused_forward(x, w, b, eps)
        assert fused is not None
        y, mean, m2, rstd_fused, finite = fused
        assert finite is True
        mean0, m20 = nb.channel_stats(x)
        np.testing.assert_allclose(mean, mean0, rtol=1e-12)
        np.testing.assert_allclose(m2, m20, rtol=1e-10)
        rstd = 1.0 / np.sqrt(m20 / count + eps)
        np.testing.assert_allclose(rstd_fused, rstd, rtol=1e-10)
        assert y.dtype == x.dtype
        np.testing.assert_allclose(y, nb.normalize(x, mean0, rstd * w, b), **TOL[dtype])

        _check_fused_backward(dy, x, mean0, rstd, w, count)


def test_fused_helpers_decline_where_they_would_not_gain(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = np.zeros((4, 3, 300), np.float32)  # every channel in one group: x is one run
    assert plan.fusable(whole, 1) == (1, 3)
    monkeypatch.setattr(config, "FUSE_RUN_BYTES", 2400)  # groups of 2: runs of 2.3 KiB
    assert nb.fused_forward(whole, None, None, 1e-5) is None
    assert nb.fused_backward(whole, whole, np.zeros(3), np.ones(3), None, 1200) is None
    monkeypatch.undo()
    rows = np.zeros((4, 8, 49), np.float32)  # shorter segments go to the rows kernels instead
    assert plan.use_rows(rows) and nb.fused_forward(rows, None, None, 1e-5) is not None
    monkeypatch.setattr(config, "FUSE_MAX_BYTES", 8192)
    assert plan.fusable(np.zeros((4, 8, 1024), np.float32), 1) == (0, 0)  # 16 KiB a channel
    monkeypatch.setattr(config, "CHUNKS", 2)
    monkeypatch.setattr(config, "FUSE_MAX_BYTES", 1 << 20)
    lone = np.zeros((4, 1, 8192), np.float32)  # one channel would leave a thread idle
    assert plan.fusable(lone, 1) == (0, 0)
    assert plan.fusable(np.zeros((4, 3, 8192), np.float32), 1) == (2, 1)  # 2 + 1: fused


def test_fused_group_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "CHUNKS", 2)
    monkeypatch.setattr(config, "FUSE_RUN_BYTES", 16384)
    monkeypatch.setattr(config, "FUSE_MAX_BYTES", 4 << 20)

    def group(shape: tuple[int, int, int], arrays: int) -> int:
        return plan.fusable(np.empty(shape, np.float32), arrays)[1]

    assert group((32, 2048, 49), 2) == 83  # 7x7 maps: 83 channels make 16 KiB runs
    assert group((256, 2048, 49), 2) == 41  # ...fewer where dy and x would not fit 4 MiB
    assert group((512, 2048, 49), 2) == 0  # ...and none where the runs would be under 4 KiB
    assert group((32, 64, 64), 2) == 32  # 8x8 maps: 64 channels in a group a thread
    assert group((32, 256, 16), 2) == 128  # 4x4 maps: likewise (8 KiB runs)
    assert group((32, 64, 3136), 2) == 1  # 56x56 maps: one channel a run
    assert group((8, 3, 50176), 2) == 1  # 224x224 maps: one
    assert group((64, 3, 50176), 1) == 0  # 12 MiB a channel: not fused


@pytest.mark.parametrize(
    "shape3",
    [
        (50, 7, 1),
        (9, 4, 3),
        # parallel: by columns in one region (runs of 16 bytes suffice here), blocks of 16
        # and 24 channels; float64 too
        (20, 40, 1),
    ],
    ids=str,
)
def test_rows_training_passes_in_one_call(
    path: str, shape3: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows layouts always take the one-call training passes; numbers as the public passes."""
    monkeypatch.setattr(config, "COLUMNS_MIN_RUN_BYTES", 16)
    if path == "parallel":
        x3 = np.empty(shape3, np.float32)
        assert plan.one_region(x3) == (2 if shape3 == (20, 40, 1) else 0)
    eps, momentum = 1e-5, 0.3
    dtypes = [np.float32, np.float64] if shape3 == (20, 40, 1) else _dtypes(path)
    for dtype in dtypes:
        x, dy = _data(shape3, dtype)
        channels = shape3[1]
        count = shape3[0] * shape3[2]
        rng = np.random.default_rng(5)
        w = 1.0 + 0.2 * rng.standard_normal(channels)
        b = rng.standard_normal(channels)
        rm = rng.standard_normal(channels).astype(dtype)
        rv = (1.0 + rng.random(channels)).astype(dtype)
        rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
        done = nb.fused_forward(x, w, b, eps, rm, rv, momentum)
        assert done is not None
        y, mean, m2, rstd, finite = done
        assert finite is True
        mean0, m20 = npb.channel_stats(x)
        np.testing.assert_allclose(mean, mean0, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m2, m20, rtol=1e-10)
        rstd0 = 1.0 / np.sqrt(m20 / count + eps)
        np.testing.assert_allclose(rstd, rstd0, rtol=1e-10)
        np.testing.assert_allclose(y, npb.normalize(x, mean0, rstd0 * w, b), **TOL[dtype])
        # running statistics by PyTorch's rule, written out here
        np.testing.assert_allclose(rm, (1 - momentum) * rm0 + momentum * mean0, **TOL[dtype])
        want_var = (1 - momentum) * rv0 + momentum * m20 / (count - 1)
        np.testing.assert_allclose(rv, want_var, **TOL[dtype])

        _check_fused_backward(dy, x, mean0, rstd0, w, count)

        # NaN in one channel: nothing written to either buffer
        x[1, 2, 0] = np.nan
        before = rm.copy(), rv.copy()
        done = nb.fused_forward(x, w, b, eps, rm, rv, momentum)
        assert done is not None and not np.isfinite(done[1][2]) and done[4] is False
        np.testing.assert_array_equal(rm, before[0])
        np.testing.assert_array_equal(rv, before[1])


@pytest.mark.parametrize("shape3", [(50, 7, 1), (9, 4, 3), (6, 40, 16), (3, 5, 70)], ids=str)
def test_eval_pass_in_one_call(path: str, shape3: tuple[int, int, int]) -> None:
    """The eval forward's one call (coefficients from the running statistics, then
    normalize) gives what the public pass gives with the coefficients written out here."""
    eps = 1e-3
    for dtype in _dtypes(path):
        x, _ = _data(shape3, dtype)
        channels = shape3[1]
        rng = np.random.default_rng(6)
        w = (1.0 + 0.2 * rng.standard_normal(channels)).astype(dtype)
        b = rng.standard_normal(channels).astype(dtype)
        rm = rng.standard_normal(channels).astype(dtype)
        rv = (0.5 + rng.random(channels)).astype(dtype)
        rstd0 = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
        for weight, bias in ((w, b), (None, None)):
            y, mean, rstd = nb.fused_eval(x, weight, bias, rm, rv, eps)
            np.testing.assert_array_equal(mean, rm.astype(np.float64))
            np.testing.assert_allclose(rstd, rstd0, rtol=1e-15)
            scale = rstd0 * (1.0 if weight is None else w)
            shift = np.zeros(channels) if bias is None else b.astype(np.float64)
            assert y.dtype == x.dtype and y.shape == x.shape
            np.testing.assert_allclose(y, npb.normalize(x, mean, scale, shift), **TOL[dtype])


def test_eval_takes_the_rows_pass_on_short_segments() -> None:
    assert plan.rows_for_eval(np.empty((64, 128, 16), np.float32))  # 4x4 maps: rows
    assert not plan.use_rows(np.empty((64, 128, 16), np.float32))  # (training: segments)
    assert not plan.rows_for_eval(np.empty((32, 64, 64), np.float32))  # 8x8 maps: segments
    assert plan.rows_for_eval(np.empty((60, 100, 1), np.float32))  # 2-D
    assert not plan.rows_for_eval(np.empty((2, 2048, 16), np.float32))  # two rows: segments


def test_threads_sets_and_restores() -> None:
    import numba

    before = numba.get_num_threads()
    with backends.threads(1):
        assert numba.get_num_threads() == 1
        assert config.chunks(1 << 30, 1000) == 1  # one thread: one chunk, the serial build
    assert numba.get_num_threads() == before
    with pytest.raises(ValueError, match="positive"):
        backends.threads(0)


LAYER_CHILD = """
import torch  # PyTorch's OpenMP pool first, as in a training script
import numba, numpy as np
from batchnorm.kernels.numba import config
import batchnorm.kernels.numba as nb
config.CHUNKS = 2
nb.channel_stats(np.ones((64, 3, 1)))
print(numba.threading_layer())
"""


@pytest.mark.parametrize("chosen", [None, "workqueue"])
def test_threading_layer_is_omp_unless_the_user_chose(chosen: str | None) -> None:
    import os
    import subprocess
    import sys

    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if chosen:
        env["NUMBA_THREADING_LAYER"] = chosen
    out = subprocess.run(
        [sys.executable, "-c", LAYER_CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == (chosen or "omp")


FORK_CHILD = """
import multiprocessing as mp
import numpy as np
import batchnorm.kernels.numba as nb
from batchnorm.kernels.numba import config, relu

config.CHUNKS = 2
x = np.random.default_rng(0).standard_normal((64, 3, 40)).astype(np.float32)
parent = nb.channel_stats(x)  # parallel regions in the parent first
relu.normalize_relu(x, parent[0], np.ones(3), np.zeros(3), None)


def child(_):
    mean, m2 = nb.channel_stats(x)
    y = relu.normalize_relu(x, mean, np.ones(3), np.zeros(3), None)
    return mean.tolist(), m2.tolist(), float(y.sum()), config.chunks(x.size, 64)


if __name__ == "__main__":
    with mp.get_context("fork").Pool(1) as pool:
        mean, m2, total, chunks = pool.map_async(child, [0]).get(timeout=60)[0]
    assert np.allclose(mean, parent[0], rtol=1e-12) and np.allclose(m2, parent[1], rtol=1e-12)
    assert chunks == 1  # serial builds in the child
    print("child ok", total > 0)
"""


def test_a_forked_child_runs_the_kernels_serially_instead_of_dying(tmp_path) -> None:
    """GNU OpenMP cannot run parallel regions in a child forked from a process that ran
    them (numba's omp layer terminates such a child): our kernels go serial there."""
    import subprocess
    import sys

    script = tmp_path / "fork_child.py"
    script.write_text(FORK_CHILD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "child ok True" in out.stdout


SHARED_POOL_CHILD = """
import os, time
import numpy as np
import torch  # PyTorch's libgomp first, as in a training script

import batchnorm.kernels.numba as nb
from batchnorm.kernels.numba import config

torch.set_num_threads(2)
config.CHUNKS = 2
t = torch.randn(1024, 512)
x = np.ones((40960, 3, 1))
main = str(os.getpid())


def cpu_ns():
    return {tid: int(open(f"/proc/self/task/{tid}/schedstat").read().split()[0])
            for tid in os.listdir("/proc/self/task")}


def workers_during(fn):
    time.sleep(0.1)  # past the previous region's spin
    before = cpu_ns()
    end = time.perf_counter() + 0.3  # many scheduler ticks: a busy thread's CPU time is
    while time.perf_counter() < end:  # accounted at ticks and switches, not continuously
        fn()
    after = cpu_ns()
    return {k for k in after if k != main and after[k] - before.get(k, 0) > 100_000}


for _ in range(3):
    torch.nn.functional.batch_norm(t, None, None, training=True)
    nb.channel_stats(x)
theirs = workers_during(lambda: torch.nn.functional.batch_norm(t, None, None, training=True))
ours = workers_during(lambda: nb.channel_stats(x))
print(sorted(theirs), sorted(ours))
assert ours and ours <= theirs, (theirs, ours)
print("shared")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_our_parallel_regions_run_on_pytorchs_openmp_threads() -> None:
    """The omp layer binds to the libgomp PyTorch loaded: the worker threads that run our
    parallel kernels are PyTorch's own (a second pool would show a thread of its own)."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", SHARED_POOL_CHILD], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "shared" in out.stdout


def test_fused_passes_go_parallel_from_their_own_threshold() -> None:
    """Channel-parallel fused passes take two threads from FUSED_PARALLEL_MIN elements, below
    the unfused kernels' PARALLEL_MIN (measured to pay there: docs/performance.md)."""
    import numba

    from batchnorm import kernels

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    assert config.FUSED_PARALLEL_MIN < config.PARALLEL_MIN
    with kernels.threads(2):
        small = np.zeros((1, 256, 49), np.float32)  # 12,544 elements: under the threshold
        assert small.size < config.FUSED_PARALLEL_MIN
        assert plan.fusable(small, 1)[0] == 1
        above = np.zeros((1, 512, 49), np.float32)  # 25,088: two threads, seven groups
        assert config.FUSED_PARALLEL_MIN <= above.size < config.PARALLEL_MIN
        assert plan.fusable(above, 1)[0] == 2
        assert plan.chunks(above) == 1  # the unfused kernels stay serial at this size
        halves = np.zeros((8, 64, 49), np.float32)  # one group of 64 split in two of 6 KiB runs
        assert plan.fusable(halves, 1) == (2, 32)
        one_group = np.zeros((16, 32, 49), np.float32)  # halves would run 3 KiB: one thread
        assert plan.fusable(one_group, 1) == (1, 32)

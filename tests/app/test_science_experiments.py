"""The Santurkar et al. experiments (noisy-bn, ics, landscape) on a few steps: what their
results must satisfy by construction, checks against independent computations, resume."""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common, get, ics, landscape, noisy_bn
from batchnorm.nn.layers import mlp
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.optim import SGD


def test_registered_with_claim_and_verdict() -> None:
    for name in ("noisy-bn", "ics", "landscape"):
        module = get(name)
        assert module.NAME == name and len(module.CLAIM) > 200
        assert callable(module.verdict) and callable(module.figures)


# -- noisy-bn ---------------------------------------------------------------------------
def test_zero_noise_is_bn_exactly(small: data_mod.Dataset) -> None:
    cfg = noisy_bn.Config(steps=40, eval_every=10, noise_mean=0.0, noise_std=(0.0, 0.0),
                          probe_size=100)
    r = noisy_bn.run(cfg, data=small)
    assert r.accuracy["noisy"] == r.accuracy["bn"]
    assert r.percentiles["noisy"] == r.percentiles["bn"]
    assert r.percentiles["plain"] != r.percentiles["bn"]  # the comparison can tell nets apart
    assert r.completed and r.steps == [0, 10, 20, 30, 40]


def test_noise_moves_the_units_input(small: data_mod.Dataset) -> None:
    r = noisy_bn.run(noisy_bn.Config(steps=40, eval_every=10, probe_size=100), data=small)
    assert r.percentiles["noisy"] != r.percentiles["bn"]
    assert r.accuracy["noisy"] != r.accuracy["bn"]


def test_shift_noise_has_the_stated_distribution() -> None:
    layer = noisy_bn.ShiftNoise(0.5, (1.0, 1.25), np.random.default_rng(0))
    x = np.zeros((20_000, 50), np.float32)
    means, stds = [], []
    for _ in range(2):
        y = layer.forward(x)
        means.append(y.mean(axis=0))
        stds.append(y.std(axis=0))
        tol = 4 * 1.25 / np.sqrt(len(x))  # four standard errors of a mean
        assert np.all(np.abs(means[-1]) <= 0.5 + tol)
        assert np.all((stds[-1] > 1.0 - 0.03) & (stds[-1] < 1.25 + 0.03))
        assert np.ptp(means[-1]) > 0.5  # units get different means
    assert np.abs(means[0] - means[1]).max() > 0.1  # and they change from step to step
    dy = np.ones_like(x)
    assert layer.backward(dy) is dy
    layer.eval()
    assert layer.forward(x) is x


# -- ics --------------------------------------------------------------------------------
def test_no_step_means_no_shift(small: data_mod.Dataset) -> None:
    for bn in (False, True):
        net = mlp([784, 20, 20, 20, 10], "sigmoid", batch_norm=bn, init="xavier", rng=1)
        before = net.state_dict()
        l2, rel, cos = ics.shift(net, small.x_train[:60], small.y_train[:60], lr=0.0)
        assert l2 == [0.0, 0.0, 0.0] and rel == [0.0, 0.0, 0.0]
        np.testing.assert_allclose(cos, 1.0, rtol=1e-12)
        for k, v in net.state_dict().items():  # measuring changed nothing (BN stats included)
            np.testing.assert_array_equal(v, before[k])


def test_shift_matches_pytorch_autograd(small: data_mod.Dataset) -> None:
    torch = pytest.importorskip("torch")
    net = mlp([784, 16, 12, 10], "sigmoid", init="xavier", dtype=np.float64, rng=3)
    x, y = small.x_train[:60].astype(np.float64), small.y_train[:60]
    l2, _, cos = ics.shift(net, x, y, lr=0.5)
    lins = [layer for layer in net.layers if hasattr(layer, "weight")]

    def grads(ws: list[Any]) -> list[Any]:
        h = torch.tensor(x)
        params = [t.detach().clone().requires_grad_(True) for t in ws]
        for i in range(0, len(params), 2):
            h = h @ params[i].T + params[i + 1]
            if i + 2 < len(params):
                h = torch.sigmoid(h)
        torch.nn.functional.cross_entropy(h, torch.tensor(y)).backward()
        return [p.grad for p in params]

    ws = [torch.tensor(a) for lin in lins for a in (lin.weight.data, lin.bias.data)]
    g = grads(ws)
    for layer in (1, 2):  # Linear 2 and 3: move the weights and biases of those below
        moved = [w - 0.5 * gi if i < 2 * layer else w
                 for i, (w, gi) in enumerate(zip(ws, g, strict=True))]
        g2 = grads(moved)[2 * layer].flatten()
        g1 = g[2 * layer].flatten()
        assert l2[layer - 1] == pytest.approx(float((g1 - g2).norm()), rel=1e-9)
        assert cos[layer - 1] == pytest.approx(
            float(g1 @ g2 / (g1.norm() * g2.norm())), rel=1e-9)


def test_ics_run_records_every_layer(small: data_mod.Dataset) -> None:
    cfg = ics.Config(steps=20, measure_every=10, deep_hidden=(20,) * 5)
    r = ics.run(cfg, data=small)
    assert r.steps == [0, 10] and r.completed
    assert [len(r.cosine[n][0]) for n in ics.NETS] == [3, 3, 5, 5]
    assert "mean cosine" in ics.verdict(r)


# -- landscape --------------------------------------------------------------------------
def test_step_size_zero_changes_nothing(small: data_mod.Dataset) -> None:
    r = landscape.run(landscape.Config(steps=20, probe_every=5, step_sizes=(0.0,)), data=small)
    for n in landscape.NETS:
        assert [p[0] for p in r.path_loss[n]] == r.loss[n]
        assert all(c == [0.0] for c in r.grad_change[n])
        m = r.measures(n)
        assert np.all(m["loss_max"] == m["loss_min"])


def _final_state(tmp_path: Path, name: str, config: Any, module: Any, data: Any) -> dict:
    ckpt = common.Checkpoint(tmp_path / f"{name}.npz")
    module.run(config, data=data, checkpoint=ckpt)
    arrays, _ = common.load_checkpoint(ckpt.path)
    return arrays


def test_probes_do_not_change_training(tmp_path: Path, small: data_mod.Dataset) -> None:
    base = landscape.Config(steps=30, probe_every=1000)
    often = dataclasses.replace(base, probe_every=3)
    a = _final_state(tmp_path, "rare", base, landscape, small)
    b = _final_state(tmp_path, "often", often, landscape, small)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_path_loss_at_one_lr_is_the_loss_after_the_real_step(small: data_mod.Dataset) -> None:
    net = mlp([784, 30, 10], "sigmoid", init="xavier", rng=5)
    x, y = small.x_train[:60], small.y_train[:60]
    _, _, losses, _ = landscape.probe(net, x, y, [0.7])
    trained = copy.deepcopy(net)
    loss_fn = CrossEntropyLoss()
    common.train_step(trained, loss_fn, SGD(trained.parameters(), lr=0.7), x, y)
    assert losses[0] == pytest.approx(loss_fn.forward(trained.forward(x), y), rel=1e-6)


# -- resume ------------------------------------------------------------------------------
def _interrupt_then_resume(tmp_path: Path, module: Any, config: Any, data: Any,
                           interrupt: Any) -> Any:
    ckpt = common.Checkpoint(tmp_path / "ck.npz", every=0)

    def progress(done: int, total: int, text: str) -> None:
        if done == 100:
            interrupt()

    with pytest.raises(KeyboardInterrupt):
        module.run(config, data=data, progress=progress, checkpoint=ckpt)
    _, meta = common.load_checkpoint(ckpt.path)
    assert meta["step"] == 100  # saved at a step boundary
    resumed = common.Checkpoint(ckpt.path, resume=True)
    return module.run(config, data=data, checkpoint=resumed)


def _raise() -> None:
    raise KeyboardInterrupt


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("how", ["raise", "signal"])
@pytest.mark.parametrize("name", ["noisy-bn", "ics", "landscape"])
def test_interrupt_and_resume_give_the_same_numbers(tmp_path: Path, small: data_mod.Dataset,
                                                    name: str, how: str) -> None:
    if how == "signal" and threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    module = get(name)
    every = {"noisy-bn": "eval_every", "ics": "measure_every", "landscape": "probe_every"}
    extra = {"deep_hidden": (20, 20, 20)} if name == "ics" else {}
    config = module.Config(steps=150, **{every[name]: 40}, **extra)
    whole = module.run(config, data=small)
    resumed = _interrupt_then_resume(tmp_path, module, config, small,
                                     _raise if how == "raise" else _sigint)
    a, b = whole.to_dict(), resumed.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b

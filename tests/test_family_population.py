"""update_bn_stats (NumPy and torch): the exact mean and unbiased variance of everything each BN
layer saw, with upstream BN layers normalizing with batch statistics; the rest of the model
as it was; all or nothing on bad data; across processes for SyncBatchNorm (gloo)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
import batchnorm.torch as bt
from batchnorm.nn import Linear, ReLU, Sequential

TESTS = Path(__file__).resolve().parent


def _batches(rng: np.random.Generator, sizes=(5, 8, 3, 6)) -> list[np.ndarray]:
    # batches drawn around different means, so averaging per-batch variances would be wrong
    return [rng.normal(i * 1.5, 1 + i, (n, 4)) for i, n in enumerate(sizes)]


def _torch_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=0.3), nn.ReLU(),
                         nn.Linear(5, 3), bt.GhostBatchNorm1d(3, 3)).double()


def _expected_torch(model: nn.Module, batches: list[np.ndarray]) -> list[tuple[Any, Any]]:
    """From the definition: per batch, the first BN normalizes with that batch's statistics."""
    lin1, bn1, _, lin2, _ = model
    seen1, seen2 = [], []
    with torch.no_grad():
        for b in batches:
            h = lin1(torch.tensor(b))
            seen1.append(h)
            z = nn.functional.batch_norm(h, None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps)
            seen2.append(lin2(torch.relu(z)))
    return [(torch.cat(s).mean(0), torch.cat(s).var(0, unbiased=True)) for s in (seen1, seen2)]


def test_torch_exact_population_statistics(rng):
    model = _torch_model()
    model.eval()
    model[1].train()  # a mixed mode, restored afterwards
    batches = _batches(rng)
    expected = _expected_torch(model, batches)
    params = copy.deepcopy(dict(model.named_parameters()))
    tracked = [model[1].num_batches_tracked.clone(), model[4].num_batches_tracked.clone()]
    data = [(torch.tensor(b), torch.zeros(len(b))) for b in batches]  # (input, label) tuples
    assert bt.update_bn_stats(model, data) is model
    for bn, (mean, var) in zip((model[1], model[4]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-13, atol=1e-13)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=0, atol=0)
    assert [m.training for m in model] == [False, True, False, False, False]
    torch.testing.assert_close(model[1].num_batches_tracked, tracked[0])
    torch.testing.assert_close(model[4].num_batches_tracked, tracked[1])


def test_torch_num_batches_and_bare_inputs(rng):
    model = _torch_model()
    batches = _batches(rng)
    expected = _expected_torch(model, batches[:2])
    bt.update_bn_stats(model, iter(torch.tensor(b) for b in batches), num_batches=2)
    torch.testing.assert_close(model[1].running_var, expected[0][1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("data", [[], "bad batch", "num_batches"])
def test_torch_bad_data_leaves_model_as_it_was(data, rng):
    model = _torch_model()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    kwargs: dict[str, Any] = {}
    if data == "bad batch":  # the second batch has the wrong width: fails midway
        data = [torch.tensor(rng.normal(size=(4, 4))), torch.zeros(4, 7, dtype=torch.float64)]
    elif data == "num_batches":
        data, kwargs = [torch.tensor(rng.normal(size=(4, 4)))], {"num_batches": 0}
    with pytest.raises((ValueError, RuntimeError), match="no batches|num_batches|shape|size"):
        bt.update_bn_stats(model, data, **kwargs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not any(m.training for m in model.modules())


def _numpy_model() -> Sequential:
    f64 = np.float64
    return Sequential(Linear(4, 5, bias=False, dtype=f64, rng=1),
                      batchnorm.BatchNorm1d(5, dtype=f64, momentum=None), ReLU(),
                      Linear(5, 3, dtype=f64, rng=2), batchnorm.BatchRenorm1d(3, dtype=f64))


def test_numpy_exact_population_statistics(rng, backend):
    model = _numpy_model()
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    model.eval()
    batches = _batches(rng)
    lin1, bn1, _, lin2, bn2 = model
    seen1, seen2 = [], []
    for b in batches:  # the definition, written out
        h = b @ lin1.weight.data.T
        seen1.append(h)
        z = np.maximum((h - h.mean(0)) / np.sqrt(h.var(0) + bn1.eps) * bn1.weight.data
                       + bn1.bias.data, 0)
        seen2.append(z @ lin2.weight.data.T + lin2.bias.data)
    params = {k: v.copy() for k, v in model.state_dict().items() if "running" not in k}
    assert batchnorm.nn.update_bn_stats(model, [(b, None) for b in batches]) is model
    for bn, seen in ((bn1, seen1), (bn2, seen2)):
        np.testing.assert_allclose(bn.running_mean, np.concatenate(seen).mean(0), rtol=1e-13,
                                   atol=1e-13)
        np.testing.assert_allclose(bn.running_var, np.concatenate(seen).var(0, ddof=1),
                                   rtol=1e-13, atol=1e-13)
    for k, v in model.state_dict().items():
        if k in params:
            np.testing.assert_array_equal(v, params[k])
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert "forward" not in vars(bn1)  # the recording wrapper is gone


def test_numpy_bad_data_leaves_model_as_it_was(rng):
    model = _numpy_model()
    before = model.state_dict()
    with pytest.raises(ValueError, match="no batches"):
        batchnorm.nn.update_bn_stats(model, iter([]))
    with pytest.raises(ValueError):
        batchnorm.nn.update_bn_stats(model, [rng.normal(size=(3, 4)), rng.normal(size=(3, 6))])
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert model.training and "forward" not in vars(model[1])


# -- across processes -------------------------------------------------------------------------
ROWS = [[3, 5], [7, 2]]  # batch sizes of rank 0 and rank 1


def _rank_batches(rank: int) -> list[np.ndarray]:
    rng = np.random.default_rng(rank)
    return [rng.normal(rank * 2.0 + i, 1.0 + rank, (n, 3)) for i, n in enumerate(ROWS[rank])]


def sync_case(ctx: Any, payload: Any) -> dict[str, float]:
    """Inside a launched gloo process: both SyncBatchNorms' population statistics vs all the
    data of both ranks."""
    from batchnorm.distributed import SyncBatchNorm

    everything = np.concatenate([b for r in range(ctx.size) for b in _rank_batches(r)])
    mine = _rank_batches(ctx.rank)
    ours = bt.update_bn_stats(bt.SyncBatchNorm(3).double(), [torch.tensor(b) for b in mine])
    layer = batchnorm.nn.update_bn_stats(SyncBatchNorm(3, dtype=np.float64), mine)
    err: dict[str, float] = {}
    for name, mean, var in (("torch", ours.running_mean.numpy(), ours.running_var.numpy()),
                            ("numpy", layer.running_mean, layer.running_var)):
        err[name] = float(max(np.abs(mean - everything.mean(0)).max(),
                              np.abs(var - everything.var(0, ddof=1)).max()))
    return err


def test_sync_batchnorm_population_over_processes():
    from batchnorm.distributed.launch import launch

    env = {"PYTHONPATH": str(TESTS), "BATCHNORM_BACKEND": "numpy"}
    results = launch(2, "test_family_population:sync_case", None, engine="gloo", timeout=150,
                     env=env)
    for report in results:
        assert report["torch"] < 1e-12 and report["numpy"] < 1e-12, results

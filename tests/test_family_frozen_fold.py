"""Frozen BN (torchvision's definition), freeze_batchnorm, and folding BN into the layer before
it (torch: against the original model in eval and torch's fuse_conv_bn_eval; NumPy: against
the original Sequential in eval)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import batchnorm
import batchnorm.torch as bt
from batchnorm.nn import Linear, ReLU, Sequential
from batchnorm.nn.batchnorm import _BatchNorm as _NumpyBN


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def torchvision_frozen(x, w, b, rm, rv, eps):
    """torchvision's FrozenBatchNorm2d.forward, written from its definition."""
    scale = w * (rv + eps).rsqrt()
    shift = b - rm * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def test_frozen_matches_torchvision_definition_in_any_mode():
    bn = _randomize(nn.BatchNorm2d(4, eps=1e-3)).double()
    frozen = bt.freeze_batchnorm(copy.deepcopy(bn))
    assert isinstance(frozen, bt.FrozenBatchNorm2d)
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    assert not list(frozen.parameters())
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    expected = torchvision_frozen(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, 1e-3)
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), expected, rtol=1e-14, atol=1e-14)
    bn.eval()
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-13, atol=1e-13)
    fresh = bt.FrozenBatchNorm2d(4).double()
    fresh.load_state_dict(bn.state_dict())  # a BN's state_dict (with num_batches_tracked) loads
    torch.testing.assert_close(fresh.running_var, bn.running_var)


def test_freeze_batchnorm_swaps_every_kind_in_place():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.ReLU(),
                          nn.Sequential(bt.BatchNorm1d(3), bt.GhostBatchNorm1d(3, 2)),
                          bt.BatchRenorm1d(3, affine=False), bt.SyncBatchNorm(3))
    model = _randomize(model).double()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    expected = copy.deepcopy(model).eval()(x)
    same = bt.freeze_batchnorm(model)
    assert same is model
    kinds = [type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert kinds == ["FrozenBatchNorm1d"] * 4 + ["FrozenBatchNorm"], kinds
    model.train()
    torch.testing.assert_close(model(x), expected, rtol=1e-13, atol=1e-13)


def test_freeze_without_running_stats_raises_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bt.freeze_batchnorm(model)
    assert [type(m) for m in model] == [nn.BatchNorm1d, nn.BatchNorm1d]


CONVS = [
    (nn.Conv1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), (2, 3, 7, 6)),
    (nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4, affine=False), (2, 2, 4, 3, 5)),
    (nn.Linear(5, 7), nn.BatchNorm1d(7), (3, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), (2, 4, 3, 4)),
    (nn.ConvTranspose1d(3, 2, 2), nn.BatchNorm1d(2), (2, 3, 5)),
]


@pytest.mark.parametrize(("layer", "bn", "shape"), CONVS)
def test_fold_pairs_match_eval_and_torch_fusion(layer, bn, shape):
    model = _randomize(nn.Sequential(layer, bn, nn.ReLU())).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    out = bt.fold_batchnorm(model)
    assert model.training and not out.training  # the given model is untouched
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())
    expected = model.eval()(x)
    torch.testing.assert_close(out(x), expected, rtol=1e-12, atol=1e-12)
    if not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        if bn.affine:
            torch.testing.assert_close(out[0].weight, fuse(layer, bn).weight, rtol=1e-12,
                                       atol=1e-12)


class Block(nn.Module):
    """A ResNet basic block: not a Sequential, so folding goes through torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), bt.BatchRenorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def test_fold_through_fx_graph():
    model = _randomize(Block()).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = bt.fold_batchnorm(model)
    assert isinstance(out, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())
    torch.testing.assert_close(out(x), model.eval()(x), rtol=1e-12, atol=1e-12)


class BNFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("model", [nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)),
                                   BNFirst(), nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)),
                                   nn.BatchNorm1d(3)])
def test_fold_bn_without_preceding_layer_raises(model):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot fold"):
        bt.fold_batchnorm(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_numpy_fold(rng):
    f64 = np.float64
    net = Sequential(Linear(4, 6, bias=False, dtype=f64, rng=1),
                     batchnorm.BatchNorm1d(6, dtype=f64), ReLU(),
                     Sequential(Linear(6, 3, dtype=f64, rng=2),
                                batchnorm.BatchRenorm1d(3, dtype=f64)),
                     Linear(3, 2, dtype=f64, rng=3))
    for m in net.modules():
        if isinstance(m, _NumpyBN):
            m.running_mean[...] = rng.normal(size=m.num_features)
            m.running_var[...] = rng.uniform(0.2, 2, m.num_features)
            m.weight.data[...] = rng.normal(size=m.num_features)
    x = rng.normal(size=(5, 4))
    folded = batchnorm.nn.fold_batchnorm(net)
    assert not folded.training and net.training
    assert not any(isinstance(m, _NumpyBN) for m in folded.modules())
    expected = net.eval()(x)
    np.testing.assert_allclose(folded(x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot fold layer 0.*follows nothing"):
        batchnorm.nn.fold_batchnorm(Sequential(batchnorm.BatchNorm1d(3), Linear(3, 2)))
    with pytest.raises(ValueError, match="cannot fold layer 1.*follows a ReLU"):
        batchnorm.nn.fold_batchnorm(Sequential(ReLU(), batchnorm.BatchNorm1d(3)))

"""Sequential, Linear, activations, CrossEntropyLoss and SGD: gradients and PyTorch parity."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.nn.layers import Linear, ReLU, Sequential, Sigmoid, Tanh, linears, mlp
from batchnorm.nn.losses import CrossEntropyLoss
from batchnorm.nn.optim import SGD


def _net_loss(net: Sequential, x: np.ndarray, y: np.ndarray) -> float:
    return CrossEntropyLoss().forward(net.forward(x), y)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_whole_network_gradients_match_finite_differences(
    activation: str, batch_norm: bool, backend: str
) -> None:
    rng = np.random.default_rng(7)
    net = mlp([6, 5, 4, 3], activation, batch_norm=batch_norm, init="xavier",
              dtype=np.float64, rng=rng, backend=backend)
    for layer in net:  # move BN's affine parameters off 1 and 0 so they matter
        if isinstance(layer, bn.BatchNorm1d):
            assert layer.weight is not None and layer.bias is not None
            layer.weight.data[:] = rng.uniform(0.5, 1.5, layer.weight.shape)
            layer.bias.data[:] = rng.uniform(-0.5, 0.5, layer.bias.shape)
    x = rng.standard_normal((8, 6))
    y = rng.integers(0, 3, 8)
    loss_fn = CrossEntropyLoss()
    net.zero_grad()
    loss_fn.forward(net.forward(x), y)
    dx = net.backward(loss_fn.backward())

    h = 1e-6

    def numeric(arr: np.ndarray) -> np.ndarray:
        grad = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = _net_loss(net, x, y)
            arr[i] = old - h
            down = _net_loss(net, x, y)
            arr[i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    params = list(net.named_parameters())
    assert len(params) == (8 if batch_norm else 6)  # BN nets: no hidden Linear bias
    for name, p in params:
        assert p.grad is not None, name
        np.testing.assert_allclose(p.grad, numeric(p.data), rtol=1e-5, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(dx, numeric(x), rtol=1e-5, atol=1e-8)


def test_backward_params_gives_the_same_parameter_gradients() -> None:
    rng = np.random.default_rng(0)
    net = mlp([10, 8, 4], "tanh", batch_norm=True, rng=rng)
    x = rng.standard_normal((6, 10)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    grads = []
    for method in ("backward", "backward_params"):
        net.zero_grad()
        loss_fn = CrossEntropyLoss()
        loss_fn.forward(net.forward(x), y)
        getattr(net, method)(loss_fn.backward())
        grads.append([p.grad.copy() for p in net.parameters()])  # type: ignore[union-attr]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_array_equal(a, b)


def test_gradients_accumulate_across_backward_calls() -> None:
    rng = np.random.default_rng(1)
    layer = Linear(4, 3, rng=rng)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    dy = rng.standard_normal((5, 3)).astype(np.float32)
    layer.forward(x)
    layer.backward(dy)
    first = layer.weight.grad.copy()  # type: ignore[union-attr]
    layer.forward(x)
    layer.backward(dy)
    assert layer.weight.grad is not None
    np.testing.assert_allclose(layer.weight.grad, 2 * first, rtol=1e-6)
    layer.zero_grad()
    assert layer.weight.grad is None
    layer.forward(x)
    layer.backward(dy)  # refills the reused grad array
    grad = layer.weight.grad
    assert grad is not None
    np.testing.assert_allclose(grad, first, rtol=1e-6)


def test_float32_by_default_and_train_eval_reach_every_child() -> None:
    net = mlp([5, 4, 4, 2], "relu", batch_norm=True, rng=0)
    assert all(p.dtype == np.float32 for p in net.parameters())
    y = net.forward(np.ones((3, 5), np.float32))
    assert y.dtype == np.float32
    net.eval()
    assert all(not m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_init_schemes_have_the_documented_spread() -> None:
    n_in, n_out = 400, 300
    for init, std in (("normal", 0.01), ("xavier", np.sqrt(2 / (n_in + n_out))),
                      ("he", np.sqrt(2 / n_in))):
        layer = Linear(n_in, n_out, init=init, rng=3)
        assert layer.weight.data.std() == pytest.approx(std, rel=0.02), init
        assert layer.bias is not None and not layer.bias.data.any()
    custom = Linear(n_in, n_out, init="normal", std=0.5, rng=3)
    assert custom.weight.data.std() == pytest.approx(0.5, rel=0.02)
    default = Linear(n_in, n_out, rng=3)
    assert np.abs(default.weight.data).max() <= 1 / np.sqrt(n_in)
    with pytest.raises(ValueError, match="unknown init"):
        Linear(2, 2, init="orthogonal")
    with pytest.raises(ValueError, match="std is only used"):
        Linear(2, 2, init="he", std=0.1)


def test_linear_rejects_wrong_input_width() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        Linear(4, 2).forward(np.zeros((3, 5), np.float32))


def test_layers_match_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 5))
    dy = rng.standard_normal((7, 4))
    ours = Linear(5, 4, dtype=np.float64, rng=rng)
    ref = torch.nn.Linear(5, 4, dtype=torch.float64)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    for act, ref_act in ((Sigmoid(), torch.nn.Sigmoid()), (Tanh(), torch.nn.Tanh()),
                         (ReLU(), torch.nn.ReLU())):
        ours.zero_grad()
        ref.zero_grad()
        net = Sequential(ours, act)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = ref_act(ref(xt))
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(net.forward(x), yt.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(net.backward(dy), xt.grad.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ours.weight.grad, ref.weight.grad.numpy(), rtol=1e-12)
        assert ours.bias is not None
        np.testing.assert_allclose(ours.bias.grad, ref.bias.grad.numpy(), rtol=1e-12)


def test_state_dict_keys_match_torch_sequential() -> None:
    torch = pytest.importorskip("torch")
    net = mlp([6, 5, 3], "relu", batch_norm=True, rng=0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.BatchNorm1d(5),
                              torch.nn.ReLU(), torch.nn.Linear(5, 3))
    assert list(net.state_dict()) == list(ref.state_dict())
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in net.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    net.eval()
    ref.eval()
    np.testing.assert_allclose(net.forward(x), ref(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_torch_and_is_stable() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for scale in (1.0, 1e4):  # 1e4: exp would overflow without the max subtraction
        logits = (rng.standard_normal((9, 5)) * scale).astype(np.float32)
        target = rng.integers(0, 5, 9)
        loss_fn = CrossEntropyLoss()
        loss = loss_fn.forward(logits, target)
        grad = loss_fn.backward()
        lt = torch.from_numpy(logits).requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(lt, torch.from_numpy(target))
        ref.backward()
        assert np.isfinite(loss)
        assert loss == pytest.approx(ref.item(), rel=1e-5)
        assert grad.dtype == np.float32
        np.testing.assert_allclose(grad, lt.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_cross_entropy_rejects_bad_targets() -> None:
    loss_fn = CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        loss_fn.forward(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="integer labels"):
        loss_fn.forward(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(RuntimeError):
        CrossEntropyLoss().backward()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
        {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-3},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    ],
)
def test_sgd_matches_torch(kwargs: dict) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(5)]
    ours = bn.Parameter(p0.copy())
    opt = SGD([ours], **kwargs)
    ref = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref_opt = torch.optim.SGD([ref], **kwargs)
    for g in grads:
        opt.zero_grad()
        ours.grad = g.copy()
        opt.step()
        ref_opt.zero_grad()
        ref.grad = torch.from_numpy(g.copy())
        ref_opt.step()
        np.testing.assert_allclose(ours.data, ref.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_sgd_state_round_trip_and_checks() -> None:
    p = bn.Parameter(np.ones(3, np.float32))
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad = np.ones(3, np.float32)
    opt.step()
    state = opt.state_dict()
    assert list(state) == ["momentum.0"]
    other = SGD([bn.Parameter(np.ones(3, np.float32))], lr=0.1, momentum=0.9)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.buffers[0], opt.buffers[0])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"momentum.0": np.ones(4, np.float32)})
    with pytest.raises(KeyError):
        other.load_state_dict({"velocity.0": np.ones(3, np.float32)})
    with pytest.raises(ValueError):
        SGD([p], lr=-1.0)


def test_mlp_layout() -> None:
    net = mlp([784, 100, 100, 10], "sigmoid", batch_norm=True, init="normal", std=0.01, rng=0)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "Sigmoid", "Linear", "BatchNorm1d", "Sigmoid",
                     "Linear"]
    assert [lin.bias is None for lin in linears(net)] == [True, True, False]
    with pytest.raises(ValueError, match="activation"):
        mlp([3, 2], "gelu")

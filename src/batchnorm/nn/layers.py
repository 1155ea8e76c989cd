"""Layers for NumPy networks: Sequential, Linear and the activations, each with backward.

Every layer keeps what its backward needs from the last forward, and backward(dy) returns
dL/dx while adding parameter gradients into ``Parameter.grad``. Outputs are fresh arrays
(holding on to one is safe); the large per-step buffers that can be reused are: the
weight-gradient scratch of :class:`Linear` (its ``.grad`` array is refilled in place after
``zero_grad``), so a training step allocates only activation-sized arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from batchnorm.nn.module import Module, Parameter

INITS = ("default", "normal", "xavier", "he")


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


class Linear(Module):
    r"""``y = x W^T + b`` with W of shape (out_features, in_features), as in PyTorch.

    Args:
        in_features, out_features: sizes of each input and output row.
        bias: learn an additive bias (leave it out before a BatchNorm, whose shift replaces it).
        init: how W is drawn. ``"default"``: PyTorch's ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
            for W and b. ``"normal"``: ``N(0, std^2)`` (std defaults to 0.01).
            ``"xavier"``: ``N(0, 2 / (fan_in + fan_out))``. ``"he"``: ``N(0, 2 / fan_in)``.
            The bias starts at zero except with ``"default"``.
        std: the standard deviation for ``init="normal"``.
        dtype: float32 by default.
        rng: a numpy Generator or seed for the initial values.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init: str = "default",
        std: float | None = None,
        dtype: Any = np.float32,
        rng: np.random.Generator | int | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        if std is not None and init != "normal":
            raise ValueError(f"std is only used with init='normal', got init={init!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.init = init
        dtype = np.dtype(dtype)
        gen = _as_rng(rng)
        shape = (self.out_features, self.in_features)
        bound = 1.0 / np.sqrt(in_features)
        if init == "default":
            w = gen.uniform(-bound, bound, shape)
        else:
            scale = {
                "normal": 0.01 if std is None else std,
                "xavier": np.sqrt(2.0 / (in_features + out_features)),
                "he": np.sqrt(2.0 / in_features),
            }[init]
            w = gen.standard_normal(shape) * scale
        self.weight = Parameter(w.astype(dtype))
        self.bias: Parameter | None = None
        if bias:
            b = gen.uniform(-bound, bound, out_features) if init == "default" else np.zeros(
                out_features
            )
            self.bias = Parameter(b.astype(dtype))
        self._x: np.ndarray | None = None
        self._gw: np.ndarray | None = None  # reused home of weight.grad

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Linear expected input of shape (N, {self.in_features}), got {np.shape(x)}"
            )
        self._x = x
        y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        return y

    def _accumulate_params(self, dy: np.ndarray) -> None:
        x = self._x
        if x is None:
            raise RuntimeError("backward() called before forward()")
        w = self.weight
        if w.grad is None:
            gw = self._gw
            if gw is None or gw.shape != w.data.shape or gw.dtype != w.data.dtype:
                gw = self._gw = np.empty_like(w.data)
            np.matmul(dy.T, x, out=gw)
            w.grad = gw
        else:
            w.grad += dy.T @ x
        if self.bias is not None:
            db = dy.sum(axis=0)
            if self.bias.grad is None:
                self.bias.grad = db.astype(self.bias.data.dtype, copy=False)
            else:
                self.bias.grad += db

    def backward(self, dy: np.ndarray) -> np.ndarray:
        self._accumulate_params(dy)
        return dy @ self.weight.data

    def backward_params(self, dy: np.ndarray) -> None:
        """Like backward, for a first layer: parameter gradients only, no dL/dx."""
        self._accumulate_params(dy)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class _Activation(Module):
    """An elementwise activation whose backward needs one array forward made (``_kept``)."""

    def __init__(self) -> None:
        super().__init__()
        self._kept: np.ndarray | None = None

    def _take(self) -> np.ndarray:
        """What the last forward kept."""
        if self._kept is None:
            raise RuntimeError("backward() called before forward()")
        return self._kept


class Sigmoid(_Activation):
    """``y = 1 / (1 + exp(-x))``; backward ``dx = dy * y * (1 - y)``."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = np.negative(x)
        np.exp(y, out=y)
        y += 1
        np.reciprocal(y, out=y)
        self._kept = y
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        y = self._take()
        dx = 1 - y
        dx *= y
        dx *= dy
        return dx


class Tanh(_Activation):
    """``y = tanh(x)``; backward ``dx = dy * (1 - y^2)``."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._kept = np.tanh(x)
        return self._kept

    def backward(self, dy: np.ndarray) -> np.ndarray:
        y = self._take()
        dx = y * y
        np.subtract(1, dx, out=dx)
        dx *= dy
        return dx


class ReLU(_Activation):
    """``y = max(x, 0)``; backward passes dy where x > 0 (forward keeps that mask)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._kept = x > 0
        return np.maximum(x, 0)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dy * self._take()


ACTIVATIONS: dict[str, type[Module]] = {"sigmoid": Sigmoid, "tanh": Tanh, "relu": ReLU}


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    Children are named "0", "1", ... so state_dict keys match ``torch.nn.Sequential``.
    """

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        self.layers: list[Module] = []
        for layer in layers:
            self.append(layer)

    def append(self, layer: Module) -> Sequential:
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential takes Modules, got {type(layer).__name__}")
        setattr(self, str(len(self.layers)), layer)
        self.layers.append(layer)
        return self

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Module:
        return self.layers[index]

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def backward_params(self, dy: np.ndarray) -> None:
        """Backward without dL/dx of the input (saves the first layer's largest product)."""
        layers = self.layers
        for layer in reversed(layers[1:]):
            dy = layer.backward(dy)
        if layers:
            first = layers[0]
            if isinstance(first, (Linear, Sequential)):
                first.backward_params(dy)
            else:
                first.backward(dy)


def linears(model: Module) -> list[Linear]:
    """The Linear layers of a model, in order."""
    return [m for m in model.modules() if isinstance(m, Linear)]


def mlp(
    sizes: Iterable[int],
    activation: str = "sigmoid",
    batch_norm: bool = False,
    init: str = "default",
    std: float | None = None,
    dtype: Any = np.float32,
    rng: np.random.Generator | int | None = None,
    backend: str = "auto",
) -> Sequential:
    """An MLP ``sizes[0] -> ... -> sizes[-1]``: Linear, [BatchNorm1d], activation per hidden
    layer, and a last Linear with bias. With ``batch_norm`` the hidden Linears have no bias
    (BN's shift replaces it), as in the BN paper's Figure 1 network.
    """
    from batchnorm.nn.batchnorm import BatchNorm1d

    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {sizes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}")
    gen = _as_rng(rng)
    net = Sequential()
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        net.append(Linear(n_in, n_out, bias=not batch_norm, init=init, std=std, dtype=dtype,
                          rng=gen))
        if batch_norm:
            net.append(BatchNorm1d(n_out, dtype=dtype, backend=backend))
        net.append(ACTIVATIONS[activation]())
    net.append(Linear(sizes[-2], sizes[-1], init=init, std=std, dtype=dtype, rng=gen))
    return net

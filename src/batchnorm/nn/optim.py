"""Optimizers. :class:`SGD` has PyTorch's update rule, done in place."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from batchnorm.nn.module import Parameter


class SGD:
    r"""Stochastic gradient descent with momentum and weight decay, as ``torch.optim.SGD``.

    Per parameter p with gradient g:
    ``g += weight_decay * p``; with momentum ``buf = momentum * buf + (1 - dampening) * g``
    (``buf = g`` on the first step) and ``g = g + momentum * buf`` (nesterov) or ``g = buf``;
    then ``p -= lr * g``. Parameters whose ``grad`` is None are skipped.
    """

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
            )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and zero dampening")
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.buffers: list[np.ndarray | None] = [None] * len(self.params)
        self._scratch: list[np.ndarray | None] = [None] * len(self.params)  # lr * g, reused

    def zero_grad(self) -> None:
        """Set every gradient to None (layers may refill their old grad arrays in place)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        lr, mom, wd = self.lr, self.momentum, self.weight_decay
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if wd:
                g = g + wd * p.data
            if mom:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = np.array(g, dtype=p.data.dtype, copy=True)
                else:
                    buf *= mom
                    buf += (1 - self.dampening) * g if self.dampening else g
                g = g + mom * buf if self.nesterov else buf
            step = self._scratch[i]
            if step is None or step.shape != p.data.shape or step.dtype != p.data.dtype:
                step = self._scratch[i] = np.empty_like(p.data)
            np.multiply(g, lr, out=step, casting="unsafe")
            p.data -= step

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Momentum buffers by parameter index ("momentum.3"); absent ones are left out."""
        return {f"momentum.{i}": b.copy() for i, b in enumerate(self.buffers) if b is not None}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        buffers: list[np.ndarray | None] = [None] * len(self.params)
        for key, value in state.items():
            prefix, _, index = key.partition(".")
            if prefix != "momentum" or not index.isdigit() or int(index) >= len(self.params):
                raise KeyError(f"unexpected optimizer state key {key!r}")
            i = int(index)
            if value.shape != self.params[i].data.shape:
                raise ValueError(
                    f"optimizer state {key!r} has shape {value.shape}, "
                    f"expected {self.params[i].data.shape}"
                )
            buffers[i] = np.array(value, dtype=self.params[i].data.dtype, copy=True)
        self.buffers = buffers

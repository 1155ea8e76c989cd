"""Losses. :class:`CrossEntropyLoss` fuses a stable log-softmax with the negative log-likelihood."""

from __future__ import annotations

import numpy as np


class CrossEntropyLoss:
    r"""Mean cross-entropy of logits (N, C) against integer class labels (N,).

    .. math:: L = -\frac{1}{N} \sum_i \log \mathrm{softmax}(z_i)_{t_i}

    The log-softmax subtracts each row's maximum first, so large logits do not overflow.
    ``backward()`` returns ``dL/dz = (softmax(z) - onehot(t)) / N`` in the logits' dtype.
    Same meaning as ``torch.nn.CrossEntropyLoss()`` with its defaults.
    """

    def __init__(self) -> None:
        self._probs: np.ndarray | None = None
        self._target: np.ndarray | None = None

    def __call__(self, logits: np.ndarray, target: np.ndarray) -> float:
        return self.forward(logits, target)

    def forward(self, logits: np.ndarray, target: np.ndarray) -> float:
        logits = np.asarray(logits)
        target = np.asarray(target)
        if logits.ndim != 2:
            raise ValueError(f"logits must have shape (N, C), got {logits.shape}")
        if target.shape != (logits.shape[0],) or target.dtype.kind not in "iu":
            raise ValueError(
                f"target must be integer labels of shape ({logits.shape[0]},), "
                f"got {target.dtype} array of shape {target.shape}"
            )
        n, c = logits.shape
        if n and (target.min() < 0 or target.max() >= c):
            raise ValueError(
                f"target labels must lie in [0, {c}), got [{target.min()}, {target.max()}]"
            )
        z = logits - logits.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        sums = z.sum(axis=1, keepdims=True)
        z /= sums
        self._probs = z
        self._target = target
        rows = np.arange(n)
        # log softmax(z)_t = z_t - max - log(sum exp(z - max)), evaluated in float64
        picked = logits[rows, target].astype(np.float64) - logits.max(axis=1)
        loss = np.log(sums[:, 0].astype(np.float64)) - picked
        return float(loss.mean()) if n else float("nan")

    def backward(self, grad: float = 1.0) -> np.ndarray:
        """dL/dlogits for the last forward (times ``grad``)."""
        if self._probs is None or self._target is None:
            raise RuntimeError("backward() called before forward()")
        dz = self._probs
        n = dz.shape[0]
        dz[np.arange(n), self._target] -= 1
        dz *= grad / max(n, 1)
        self._probs = None
        return dz

"""The one copy of Batch Normalization's math.

Everything here is plain arithmetic (``+ - * /`` and ``** -0.5``), so the same functions run
on NumPy arrays (:mod:`batchnorm.functional`), on torch tensors on any device
(:mod:`batchnorm.torch`) and on scalars inside compiled kernels (the Numba kernels wrap them
with ``numba.njit``). Kernels that must write a formula out for speed (the Triton kernels)
name the function here beside it, and a test pins the two equal.

Per channel, over the ``m`` values that share it (docs/derivation.md):

- statistics: ``mean``, ``m2 = sum((x - mean)**2)``, biased ``var = m2 / m``;
- forward: ``y = (x - mean) * rstd * w + b`` with ``rstd = 1 / sqrt(var + eps)``;
- backward: ``dx = w * rstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))``;
- running statistics: ``new = (1 - momentum) * old + momentum * batch``, with the unbiased
  variance ``m2 / (m - 1)`` averaged in (PyTorch's convention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T", bound=Any)

__all__ = [
    "ModuleCall",
    "chan_merge",
    "chan_merge_step",
    "eval_affine",
    "grad_coefficients",
    "inverse_std",
    "merge_all",
    "module_call",
    "module_call_of",
    "renorm_correction",
    "running_stats",
]


# --- statistics -----------------------------------------------------------------------------
def chan_merge_step(n_a: Any, mean_a: Any, m2_a: Any, n_b: Any, mean_b: Any, m2_b: Any) -> Any:
    """Chan, Golub and LeVeque (1979): merge two (count, mean, m2) summaries, ``n_a + n_b > 0``.

    ``mean = mean_a + d * n_b / n`` and ``m2 = m2_a + m2_b + d**2 * n_a * n_b / n`` with
    ``d = mean_b - mean_a``: exact, and stable where ``E[x^2] - E[x]^2`` is not.
    """
    n = n_a + n_b
    delta = mean_b - mean_a
    f = n_b / n
    return n, mean_a + delta * f, m2_a + m2_b + delta * delta * (n_a * f)


def chan_merge(a: tuple[float, T, T], b: tuple[float, T, T]) -> tuple[float, T, T]:
    """Merge two ``(count, mean, m2)`` summaries; either count may be zero."""
    if b[0] == 0:
        return a
    if a[0] == 0:
        return b
    n, mean, m2 = chan_merge_step(*a, *b)
    return n, mean, m2


def merge_all(counts: Sequence[float], means: Sequence[T], m2s: Sequence[T]) -> tuple[float, T, T]:
    """Merge P per-process (or per-block) summaries in a balanced tree.

    Pairs, then pairs of pairs: the rounding error grows with ``log2(P)``, not ``P``.
    Summaries with count 0 (an empty slice) are skipped; when every count is zero the first
    (zero) mean and m2 come back with count 0.
    """
    if not (len(counts) == len(means) == len(m2s)) or not counts:
        raise ValueError(
            f"merge_all needs one (count, mean, m2) per process, got {len(counts)} counts, "
            f"{len(means)} means and {len(m2s)} m2s"
        )
    parts = [(float(n), mean, m2) for n, mean, m2 in zip(counts, means, m2s, strict=True)]
    if any(n < 0 for n, _, _ in parts):
        raise ValueError(f"counts must be non-negative, got {list(counts)}")
    while len(parts) > 1:
        merged = [chan_merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0]


# --- forward and backward coefficients --------------------------------------------------------
def inverse_std(var: Any, eps: float) -> Any:
    """rstd = 1 / sqrt(var + eps), computed so: as PyTorch's CPU kernel and our Triton kernel
    do (``(var + eps) ** -0.5`` can differ by an ulp, and NumPy's pow is slower than sqrt)."""
    return 1.0 / (var + eps) ** 0.5


def grad_coefficients(weight: Any, rstd: Any, sum_dy: Any, sum_dy_xmu: Any, count: Any) -> Any:
    """(a, b, c) of ``dx = a*dy + b*(x - mean) + c`` for batch statistics over ``count`` values.

    From ``dx = w*rstd/m * (m*dy - sum(dy) - x_hat*sum(dy*x_hat))`` (docs/derivation.md).
    """
    a = weight * rstd
    return a, -a * rstd * rstd * sum_dy_xmu / count, -a * sum_dy / count


# --- running statistics and PyTorch's module semantics ----------------------------------------
def running_stats(
    running_mean: Any, running_var: Any, mean: Any, m2: Any, count: Any, momentum: float
) -> tuple[Any, Any]:
    """The running (mean, var) after a batch of ``count`` values with ``mean`` and ``m2``.

    ``new = (1 - momentum) * old + momentum * batch`` (PyTorch's convention; Keras and Flax
    call ``1 - momentum`` momentum); the variance averaged in is the unbiased
    ``m2 / (count - 1)``, as PyTorch stores it.
    """
    keep = 1.0 - momentum
    new_mean = keep * running_mean + momentum * mean
    new_var = keep * running_var + (momentum / (count - 1)) * m2
    return new_mean, new_var


@dataclass(frozen=True)
class ModuleCall:
    """What a BatchNorm module passes to its functional call (PyTorch's ``_BatchNorm.forward``)."""

    count_batch: bool  # add this batch to num_batches_tracked
    momentum: float  # the running average's factor for this batch
    batch_stats: bool  # normalize with the batch's statistics
    pass_buffers: bool  # hand the running buffers to the call (to update or to use)


def module_call(
    training: bool,
    track_running_stats: bool,
    has_running: bool,
    momentum: float | None,
    batches_before: Callable[[], int],
) -> ModuleCall:
    """PyTorch's module semantics, written once for the NumPy and the torch modules.

    ``momentum=None`` is the cumulative average: the factor is ``1 / (batches + 1)``;
    ``batches_before`` (num_batches_tracked before this batch) is read only then, since on
    CUDA reading it costs a device sync. Eval uses batch statistics when there are no running
    buffers; buffers are passed when they are updated (training and tracked) or used (eval).
    """
    count = training and track_running_stats and has_running
    factor = 0.0 if momentum is None else float(momentum)
    if count and momentum is None:
        factor = 1.0 / (batches_before() + 1)
    return ModuleCall(
        count_batch=count,
        momentum=factor,
        batch_stats=training or not has_running,
        pass_buffers=not training or track_running_stats,
    )


def module_call_of(module: Any) -> ModuleCall:
    """:func:`module_call` for a BN module, NumPy's or torch's (same attribute names)."""
    tracked = module.num_batches_tracked
    return module_call(
        module.training,
        module.track_running_stats,
        module.running_mean is not None and tracked is not None,
        module.momentum,
        lambda: int(tracked),
    )


# --- the BN family: Batch Renorm's correction, eval BN as one affine map ----------------------
def _clip(value: Any, low: float, high: float) -> Any:
    if hasattr(value, "clamp"):  # torch tensor
        return value.clamp(low, high)
    import numpy as np

    return np.clip(value, low, high)


def renorm_correction(
    mean: Any, var: Any, running_mean: Any, running_var: Any, eps: float, rmax: float, dmax: float
) -> tuple[Any, Any]:
    """Batch Renormalization's ``(r, d)`` (Ioffe 2017, Algorithm 1), constants in the backward.

    ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mean - running_mean) / sigma,
    -dmax, dmax)`` with ``sigma_B = sqrt(var + eps)`` (biased batch variance) and ``sigma =
    sqrt(running_var + eps)`` from before this batch; the output is
    ``w * ((x - mean) / sigma_B * r + d) + b``. ``rmax=1, dmax=0`` gives ``r=1, d=0``: BN.
    """
    inv_sigma = inverse_std(running_var, eps)
    r = _clip(inv_sigma / inverse_std(var, eps), 1.0 / rmax, rmax)
    d = _clip((mean - running_mean) * inv_sigma, -dmax, dmax)
    return r, d


def eval_affine(
    weight: Any, bias: Any, running_mean: Any, running_var: Any, eps: float
) -> tuple[Any, Any]:
    """Eval-mode BN as ``y = x * scale + shift`` per channel (frozen BN, folding).

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.
    """
    scale = weight * inverse_std(running_var, eps)
    return scale, bias - running_mean * scale

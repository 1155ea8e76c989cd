"""``batch_norm`` for torch tensors: PyTorch's semantics, our kernels.

:func:`batch_norm` asks :func:`batchnorm.torch.routing.route` once and calls straight down:
``"cpu"`` to :mod:`batchnorm.functional` (our NumPy/Numba kernels on zero-copy NumPy views,
with ``torch.get_num_threads()`` threads), ``"triton"`` to :mod:`batchnorm.kernels.triton`
(on strided views of the tensors), ``"torch"`` to ``torch.nn.functional.batch_norm``.
:class:`BatchNormFunction` is the autograd glue between them.

A non-finite training batch behaves as in PyTorch: NaN/inf propagate into the output and the
running statistics (our NumPy functional raises instead, before touching them; here the batch
is then handed to PyTorch's kernel so that a drop-in changes nothing but speed).

Double backward (``create_graph=True``) recomputes the gradient with PyTorch's differentiable
ops from the saved input and statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batchnorm import functional, kernels
from batchnorm.layout import Layout, tensor_channels_last, tensor_view
from batchnorm.torch.glue import BNFunction, Inputs, Needs, StatsArgs
from batchnorm.torch.routing import route

__all__ = ["BatchNormFunction", "batch_norm"]


def _use_torch_threads(backend: str) -> None:
    """Run the numba kernels with PyTorch's thread count (never oversubscribe the cores); the
    count is left so for the calling thread (restoring it cost 7 us a call)."""
    if backend == "numba":
        kernels.set_threads(torch.get_num_threads())


def _view(t: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
    """``t`` as (outer, C, inner); routed to Triton, x is dense and so are y and dx."""
    t3 = tensor_view(t, channels_last)
    assert t3 is not None
    return t3  # type: ignore[no-any-return]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    """The NumPy array sharing ``t``'s memory (written through for the running buffers)."""
    if t is None:
        return None
    return (t.detach() if t.requires_grad else t).numpy()


def _layout(x: torch.Tensor) -> Layout:
    """How the kernels see a routed (dense) x: its shape and whether it is channels-last."""
    return Layout(tuple(x.shape), 1, bool(tensor_channels_last(x)))


def _forward(
    kind: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: StatsArgs,
    backend: str,
) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kind, y, mean, rstd)``: the per-channel statistics y was normalized with."""
    if kind == "cpu":
        # routing admitted only what the functional API's checks would pass: skip them
        _use_torch_threads(backend)
        layout = _layout(x)
        x_np = x.detach().numpy()
        try:
            y3, mean_np, rstd_np, _ = functional.forward_3d(
                layout.to3d(x_np, x_np.dtype), _np(weight), _np(bias), _np(stats.running_mean),
                _np(stats.running_var), stats.training, stats.momentum, stats.eps, backend,
            )  # fmt: skip
        except functional.NonFiniteBatchError:
            kind = "native"  # PyTorch's semantics: let NaN/inf through
        else:
            if stats.training:  # the buffers were written through NumPy: tell autograd
                buffers = (stats.running_mean, stats.running_var)
                changed = [t for t in buffers if t is not None and not t.is_inference()]
                if changed:
                    torch.autograd.graph.increment_version(changed)
            y = torch.from_numpy(layout.from3d(y3))
            return kind, y, torch.from_numpy(mean_np), torch.from_numpy(rstd_np)
    if kind == "triton":
        from batchnorm.kernels import triton as tk

        y = torch.empty_like(x)  # x's strides: both dense layouts are kept
        cl = tensor_channels_last(x)
        _, mean, rstd = tk.forward(_view(x, cl), weight, bias, *stats.args(), out=_view(y, cl))
        return kind, y, mean, rstd
    with torch.no_grad():
        y, mean, rstd = torch.native_batch_norm(x, weight, bias, *stats.args())
    return "native", y, mean, rstd


def _cpu_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    training: bool,
    backend: str,
    needs: tuple[bool, bool, bool],
) -> tuple[Any, Any, Any]:
    layout = _layout(x)
    x_np = x.detach().numpy()
    dtype = x_np.dtype
    dx3, dw_np, db_np = functional.backward_3d(
        layout.to3d(dy.detach().numpy(), dtype), layout.to3d(x_np, dtype), mean.numpy(),
        rstd.numpy(), _np(weight), needs[2], training, x_np.size // x_np.shape[1], backend,
        need_input=needs[0],
    )  # fmt: skip
    dx = None if dx3 is None else torch.from_numpy(layout.from3d(dx3))
    # routed here, weight and bias have x's dtype: cast the float64 sums in NumPy (right after
    # a pass over the data that took 35 us against 60 us for Tensor.to)
    dw = torch.from_numpy(dw_np.astype(dtype)) if dw_np is not None and needs[1] else None
    db = torch.from_numpy(db_np.astype(dtype)) if db_np is not None else None
    return dx, dw, db


def _backward(
    kind: str,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias_dtype: torch.dtype,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    training: bool,
    eps: float,
    backend: str,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    if kind == "cpu":
        _use_torch_threads(backend)
        return _cpu_backward(dy, x, weight, mean, rstd, training, backend, needs)  # type: ignore[no-any-return]
    if kind == "triton":
        from batchnorm.kernels import triton as tk

        cl = tensor_channels_last(x)
        dy3 = tensor_view(dy, cl)
        if dy3 is None:  # dy's elements don't fit three strides: copy it into x's layout
            dy3 = _view(torch.empty_like(x, dtype=dy.dtype).copy_(dy), cl)
        dx = torch.empty_like(x) if needs[0] else None
        _, dw, db = tk.backward(
            dy3, _view(x, cl), weight, mean, rstd, training, need_input=needs[0],
            need_params=needs[1] or needs[2], out=None if dx is None else _view(dx, cl),
        )  # fmt: skip
        return dx, dw.to(weight.dtype) if weight is not None else None, db.to(bias_dtype)
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, None, None, mean, rstd, True, eps, list(needs)
    )  # "native" is the training fallback only
    return dx, dw, db


class BatchNormFunction(BNFunction):
    """Autograd glue: forward and backward on the routed kernels; double backward through
    PyTorch's differentiable ops. Everything backward needs goes through save_for_backward
    (saved-tensor hooks see x). Config: ``(kind, backend)``; no residual."""

    @staticmethod
    def run(ctx: Any, t: Inputs, stats: StatsArgs, kind: str, backend: str) -> torch.Tensor:
        kind, y, mean, rstd = _forward(kind, t.x, t.weight, t.bias, stats, backend)
        ctx.save_for_backward(t.x, t.weight, t.bias, mean, rstd)
        ctx.kind, ctx.training, ctx.eps, ctx.backend = kind, stats.training, stats.eps, backend
        return y

    @staticmethod
    def grads(ctx: Any, dy: torch.Tensor, needs: Needs) -> tuple[Any, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        wanted = (needs.x, needs.weight, needs.bias)
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            dx, dw, db = _differentiable_grads(
                dy, x, weight, bias, mean, rstd, ctx.training, ctx.eps, wanted
            )
        else:
            bias_dtype = x.dtype if bias is None else bias.dtype
            dx, dw, db = _backward(
                ctx.kind, dy, x, weight, bias_dtype, mean, rstd, ctx.training, ctx.eps,
                ctx.backend, wanted,
            )  # fmt: skip
        return dx, None, dw, db


def _differentiable_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    training: bool,
    eps: float,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    inputs = [t for t, need in zip((x, weight, bias), needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        if training:
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        else:  # the statistics forward used are constants
            shape = [1, -1] + [1] * (x.dim() - 2)
            scale = rstd.to(x.dtype).view(shape)
            y = (x - mean.to(x.dtype).view(shape)) * scale
            if weight is not None:
                y = y * weight.view(shape)
            if bias is not None:
                y = y + bias.view(shape)
        got = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(
        next(got) if need and t is not None else None
        for t, need in zip((x, weight, bias), needs, strict=True)
    )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Same arguments and meaning as ``torch.nn.functional.batch_norm``.

    ``backend`` picks the CPU backend of :mod:`batchnorm.kernels` ("auto", "numpy", "numba").
    """
    momentum = 0.0 if momentum is None else float(momentum)
    kind = route(input, weight, bias, running_mean, running_var, training)
    if kind == "torch":
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training:
        F._verify_batch_size(input.size())  # type: ignore[attr-defined]
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if kind == "cpu":
        backend = kernels.resolve(backend)
    stats = StatsArgs(running_mean, running_var, training, momentum, eps)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    ):
        return BatchNormFunction.apply(input, None, weight, bias, stats, kind, backend)  # type: ignore[no-any-return]
    return _forward(kind, input, weight, bias, stats, backend)[1]

"""``batch_norm`` for torch tensors: PyTorch's semantics, our kernels.

Dispatch (:func:`route`):

- CPU float32/float64 input of at least ``MIN_NUMEL`` (32768) elements, contiguous or
  channels-last, with parameters and buffers of the same dtype: our kernels through
  :func:`batchnorm.functional.batch_norm_forward` / ``batch_norm_backward`` on zero-copy NumPy
  views (backend "auto": numba when installed);
- CUDA float32/float16/bfloat16 input, contiguous or channels-last, when Triton is installed:
  the Triton kernels of :mod:`batchnorm.torch.triton_kernels`;
- anything else: PyTorch's own ``torch.nn.functional.batch_norm``.

A non-finite training batch behaves as in PyTorch: NaN/inf propagate into the output and the
running statistics (our NumPy functional raises instead; here the batch is handed to PyTorch's
kernel so that a drop-in module changes nothing but speed).

Under ``torch.compile`` and ``torch.export`` (``torch.compiler.is_compiling()``) the call
traces as PyTorch's own op, so a converted model compiles and exports as the native one.

Double backward (``create_graph=True``) is supported: the backward then recomputes the
gradient with PyTorch's differentiable ops from the saved input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import has_torch_function_variadic

from batchnorm import functional

__all__ = ["batch_norm", "route"]

CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to run the Triton path on CPU tensors under TRITON_INTERPRET=1.
TRITON_ON_CPU = False
# CPU inputs with fewer elements go to PyTorch's kernel: below this size the Python around our
# kernels (validation, NumPy views, the autograd Function) costs more than the pass itself.
MIN_NUMEL = 1 << 15

_triton_ok: bool | None = None


def triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_ok = False
        else:
            _triton_ok = True
    return _triton_ok


def _kernels() -> Any:
    from batchnorm.torch import triton_kernels

    return triton_kernels


def _dense_layout(x: torch.Tensor) -> bool:
    """Contiguous, or channels-last (the channel axis densest and the rest contiguous)."""
    return x.is_contiguous() or x.movedim(1, -1).is_contiguous()


def route(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
) -> str:
    """Which implementation takes these tensors: ``"cpu"``, ``"triton"`` or ``"torch"``."""
    others = (weight, bias, running_mean, running_var)
    if x.is_cpu and not TRITON_ON_CPU:  # the common case first, in few tensor calls
        dtype = x.dtype
        if (
            dtype not in CPU_DTYPES
            or x.numel() < max(MIN_NUMEL, 1)
            or x.dim() < 2
            or x.layout != torch.strided
            or not _dense_layout(x)
        ):
            return "torch"
        channels = x.shape[1]
        for t in others:
            if t is not None and (
                t.dtype != dtype or not t.is_cpu or t.shape != (channels,) or t.stride() != (1,)
            ):
                return "torch"
        return "cpu"
    if x.dim() < 2 or x.numel() == 0 or x.layout != torch.strided or not _dense_layout(x):
        return "torch"
    channels = x.shape[1]
    given = [t for t in others if t is not None]
    for t in given:
        if t.device != x.device or t.shape != (channels,) or t.stride() != (1,):
            return "torch"
    if x.device.type == "cpu" and not (TRITON_ON_CPU and x.dtype in GPU_DTYPES):
        if x.dtype in CPU_DTYPES and all(t.dtype == x.dtype for t in given):
            return "cpu" if x.numel() >= MIN_NUMEL else "torch"
        return "torch"
    if (x.device.type == "cuda" or TRITON_ON_CPU) and x.dtype in GPU_DTYPES:
        if all(t.dtype in (x.dtype, torch.float32) for t in given) and triton_available():
            if x.numel() < 2**31:
                return "triton"
    return "torch"


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _bump(*tensors: torch.Tensor | None) -> None:
    """Tell autograd that the running buffers changed (they were written through NumPy)."""
    changed = [t for t in tensors if t is not None and not t.is_inference()]
    if changed:
        torch.autograd.graph.increment_version(changed)


def _forward(
    kind: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, Any]:
    """``(y, state)``: state is what :func:`_backward` needs (kind-specific)."""
    if kind == "cpu":
        try:
            y_np, cache = functional.batch_norm_forward(
                _np(x), _np(weight), _np(bias), _np(running_mean), _np(running_var),
                training=training, momentum=momentum, eps=eps, axis=1, backend=backend,
            )  # fmt: skip
        except functional.NonFiniteBatchError:
            kind = "native"  # PyTorch's semantics: let NaN/inf through
        else:
            if training:
                _bump(running_mean, running_var)
            return torch.from_numpy(y_np), ("cpu", cache)
    if kind == "triton":
        y, mean, rstd = _kernels().forward(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
        return y, ("triton", mean, rstd)
    with torch.no_grad():
        y, save_mean, save_invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
    return y, ("native", save_mean, save_invstd)


def _backward(
    state: Any,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias_dtype: torch.dtype,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    kind = state[0]
    if kind == "cpu":
        cache = state[1]
        dx_np, dw_np, db_np = functional.batch_norm_backward(dy.detach().numpy(), cache)
        # routed here, weight and bias have x's dtype: cast the float64 sums in NumPy; right
        # after a pass over the data (cold caches) that took 35 us against 60 us for Tensor.to
        dtype = cache.x3.dtype
        dx = torch.from_numpy(dx_np) if needs[0] else None
        dw = torch.from_numpy(dw_np.astype(dtype)) if dw_np is not None and needs[1] else None
        db = torch.from_numpy(db_np.astype(dtype)) if db_np is not None and needs[2] else None
        return dx, dw, db
    if kind == "triton":
        _, mean, rstd = state
        dx, dw, db = _kernels().backward(
            dy, x, weight, mean, rstd, training, need_input=needs[0],
            need_params=needs[1] or needs[2],
        )  # fmt: skip
        return dx, dw.to(weight.dtype) if weight is not None else None, db.to(bias_dtype)
    _, save_mean, save_invstd = state
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
        list(needs),
    )  # fmt: skip
    return dx, dw, db


class BatchNormFunction(torch.autograd.Function):
    """Autograd glue: forward and backward on our kernels; double backward through PyTorch."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        kind: str,
        backend: str,
    ) -> torch.Tensor:
        y, state = _forward(
            kind, x, weight, bias, running_mean, running_var, training, momentum, eps, backend
        )
        # eval normalizes with the running buffers as they are now: keep that copy
        stats = (running_mean, running_var)
        if not training and running_mean is not None and running_var is not None:
            stats = (running_mean.detach().clone(), running_var.detach().clone())
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = stats
        ctx.state = state
        ctx.training = training
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        running_mean, running_var = ctx.stats
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            grads = _differentiable_grads(
                dy, x, weight, bias, running_mean, running_var, ctx.training, ctx.eps, needs
            )
        else:
            bias_dtype = x.dtype if bias is None else bias.dtype
            grads = _backward(
                ctx.state, dy, x, weight, bias_dtype, running_mean, running_var, ctx.training,
                ctx.eps, needs,
            )  # fmt: skip
        dx, dw, db = (g if need else None for g, need in zip(grads, needs, strict=True))
        return dx, dw, db, None, None, None, None, None, None, None


def _differentiable_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    inputs = [t for t, need in zip((x, weight, bias), needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        if training:
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        else:
            y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
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
    if torch.compiler.is_compiling():  # torch.compile / torch.export trace PyTorch's op
        kind = "torch"
    elif has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        kind = "torch"  # a tensor subclass or mode overrides batch_norm: let it
    else:
        kind = route(input, weight, bias, running_mean, running_var)
    if kind == "torch":
        return F.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if training:
        F._verify_batch_size(input.size())  # type: ignore[attr-defined]
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    )
    if grads:
        return BatchNormFunction.apply(
            input, weight, bias, running_mean, running_var, training, momentum, eps, kind,
            backend,
        )  # type: ignore[no-any-return]  # fmt: skip
    y, _ = _forward(
        kind, input, weight, bias, running_mean, running_var, training, momentum, eps, backend
    )
    return y

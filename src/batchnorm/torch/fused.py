"""Fused batch norm + ReLU (+ residual) for PyTorch, and the ``torch.fx`` pass that uses it.

``BatchNormReLU2d(...)(x, residual=None) = relu(bn(x) + residual)`` with BN's constructor,
buffers and semantics (it subclasses ``torch.nn.BatchNorm2d``). On CUDA it runs the Triton
kernels of :mod:`batchnorm.torch.fused_triton`; on CPU float32/float64 our kernels
(:mod:`batchnorm.kernels.numpy`, ``batchnorm.kernels.numba.relu``). Either way the
normalization, the residual add and the ReLU are one pass, and the backward takes ReLU's mask
from the output (with a residual) or recomputes it from x (without), so each direction makes
one pass less than BN followed by ``torch.relu`` and no pre-activation is kept for the
backward. Elsewhere (other dtypes or layouts, small CPU inputs) it is PyTorch's
``relu(batch_norm(x) + residual)``.

``fuse_bn_relu(model)`` rewrites BN -> ReLU and BN -> add -> ReLU in a model's ``torch.fx``
graph (a ResNet basic block's ``relu(bn2(conv2(.)) + identity)``).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import kernels
from batchnorm.layout import tensor_channels_last, view
from batchnorm.math import grad_coefficients, inverse_std
from batchnorm.torch import modules as ours
from batchnorm.torch import routing
from batchnorm.torch.glue import BNFunction, Inputs, Needs, StatsArgs, too_few_values
from batchnorm.torch.modules import batch_norm_arguments

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "bn_relu", "fuse_bn_relu"]

CPU_DTYPES = (torch.float32, torch.float64)
TRITON_ON_CPU = False  # tests: the Triton path for CPU tensors, under TRITON_INTERPRET=1
# the BN classes the fx pass fuses: PyTorch's and our drop-ins (not SyncBN, renorm, ghost)
_FUSABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, ours.BatchNorm1d, ours.BatchNorm2d,
            ours.BatchNorm3d)


def _relu_kernels(backend: str, dtype: np.dtype) -> Any:
    """The module with normalize_relu / relu_grad_sums / relu_grad_input for this backend."""
    name = kernels.resolve(backend)
    if name == "numba" and dtype in kernels.get("numba").DTYPES:
        from batchnorm.kernels.numba import relu

        return relu
    return kernels.get("numpy")


def _vec(t: torch.Tensor | None, channels: int, fill: float) -> np.ndarray:
    if t is None:
        return np.full(channels, fill)
    return t.detach().to(torch.float64).numpy()


class _BNReLUFunction(BNFunction):
    """Config: ``(backend,)``."""

    @staticmethod
    def run(ctx: Any, t: Inputs, stats: StatsArgs, backend: str) -> torch.Tensor:
        x, residual, weight, bias = t
        training = stats.training
        xa = x.detach().numpy()
        layout = view(xa, 1)
        x3 = layout.to3d(xa, xa.dtype)
        channels = x3.shape[1]
        count = x3.shape[0] * x3.shape[2]
        impl = _relu_kernels(backend, xa.dtype)
        w, shift = _vec(weight, channels, 1.0), _vec(bias, channels, 0.0)
        res3 = None if residual is None else layout.to3d(residual.detach().numpy(), xa.dtype)
        y3 = None
        if training:
            if count <= 1:
                raise too_few_values(list(x.shape))
            done = impl.fused_forward_relu(x3, w, shift, stats.eps, res3)
            if done is not None:
                y3, mean, m2 = done
            else:
                mean, m2 = kernels.get(backend, xa.dtype).channel_stats(x3)
            var = m2 / count
            stats.update_running(torch.from_numpy(mean), torch.from_numpy(m2), count,
                                 torch.float64)
        else:
            assert stats.running_mean is not None and stats.running_var is not None
            mean = _vec(stats.running_mean, channels, 0)
            var = _vec(stats.running_var, channels, 1)
        rstd = inverse_std(var, stats.eps)
        if y3 is None:
            y3 = impl.normalize_relu(x3, mean, w * rstd, shift, res3)
        y = torch.from_numpy(layout.from3d(y3))
        # ReLU's mask comes from y with a residual, else from x: no pre-activation is kept
        ctx.save_for_backward(x, y if residual is not None else None)
        ctx.stats = (layout, mean, rstd, w, shift, count, training, backend)
        ctx.flags = (residual is not None, weight is not None, bias is not None)
        return y

    @staticmethod
    @once_differentiable
    def grads(ctx: Any, dy: torch.Tensor, needs: Needs) -> tuple[Any, ...]:
        x, y = ctx.saved_tensors
        layout, mean, rstd, w, shift, count, training, backend = ctx.stats
        has_res, has_w, has_b = ctx.flags
        xa = x.detach().numpy()
        x3 = layout.to3d(xa, xa.dtype)
        y3 = None if y is None else layout.to3d(y.detach().numpy(), xa.dtype)
        dy3 = layout.to3d(dy.detach().numpy(), xa.dtype)
        impl = _relu_kernels(backend, xa.dtype)
        want_dz = has_res and needs.residual
        done = None
        if training:
            done = impl.fused_backward_relu(dy3, x3, mean, rstd, w, shift, y3, count, want_dz)
        if done is not None:
            dx3, dz3, sum_dz, sum_dz_xmu = done
        else:
            scale = w * rstd
            sum_dz, sum_dz_xmu = impl.relu_grad_sums(dy3, x3, mean, scale, shift, y3)
            if training:
                coefficients = grad_coefficients(w, rstd, sum_dz, sum_dz_xmu, count)
            else:  # running statistics are constants
                coefficients = (scale, np.zeros_like(w), np.zeros_like(w))
            dx3, dz3 = impl.relu_grad_input(dy3, x3, mean, scale, shift, y3, coefficients,
                                            want_dz)
        dx = torch.from_numpy(layout.from3d(dx3))
        dres = torch.from_numpy(layout.from3d(dz3)) if dz3 is not None else None
        dweight = torch.from_numpy(sum_dz_xmu * rstd).to(x.dtype) if has_w else None
        dbias = torch.from_numpy(sum_dz).to(x.dtype) if has_b else None
        return dx, dres, dweight, dbias


def _ours(x: torch.Tensor, residual: torch.Tensor | None, training: bool,
          *params: torch.Tensor | None) -> bool:  # fmt: skip
    """CPU float32/float64 tensors of one dtype, dense (contiguous or channels-last), from
    the drop-in's measured crossover on (:func:`batchnorm.torch.routing.min_numel`)."""
    if x.device.type != "cpu" or x.dtype not in CPU_DTYPES or x.dim() < 2:
        return False
    channels_last = tensor_channels_last(x)
    if channels_last is None:
        return False
    layout = routing.layout_of(x, channels_last)
    crossover = routing.min_numel(layout, torch.get_num_threads(), training)
    if x.numel() < max(1, crossover):
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        return False
    if torch.compiler.is_compiling():
        return False
    return all(p is None or (p.dtype == x.dtype and p.device == x.device) for p in params)


def _triton(x: torch.Tensor, residual: torch.Tensor | None,
            *params: torch.Tensor | None) -> bool:
    """CUDA (or, in tests, CPU) tensors the Triton kernels take: float32/16/bf16, dense,
    a residual of x's shape, dtype and strides, parameters on x's device."""
    if not (x.is_cuda or TRITON_ON_CPU) or x.dim() < 2 or torch.compiler.is_compiling():
        return False
    try:
        from batchnorm.torch import fused_triton
    except ImportError:
        return False
    if x.dtype not in fused_triton.DTYPES or fused_triton.view3d(x) is None:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride() != x.stride()):
        return False
    return all(p is None or p.device == x.device for p in params)


def bn_relu(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu(batch_norm(x, ...) + residual)``, with ``torch.nn.functional.batch_norm``'s
    arguments; our fused Triton (CUDA) or CPU kernels where they apply, PyTorch's ops
    elsewhere."""
    stats = StatsArgs(running_mean, running_var, training, momentum, eps)
    if _triton(x, residual, weight, bias, running_mean, running_var):
        from batchnorm.torch.fused_triton import TritonBNReLU

        return TritonBNReLU.apply(x, residual, weight, bias, stats)
    if _ours(x, residual, training, weight, bias, running_mean, running_var):
        return _BNReLUFunction.apply(x, residual, weight, bias, stats, kernels.resolve(backend))
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(z if residual is None else z + residual)


class _BatchNormReLU(_BatchNorm):
    """BN followed by ReLU, with an optional residual added before the ReLU."""

    backend: str = "auto"  # CPU kernels: "auto", "numpy" or "numba"

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, batch_stats, factor = batch_norm_arguments(self)
        return bn_relu(input, residual, running_mean, running_var, self.weight, self.bias,
                       batch_stats, factor, self.eps, self.backend)


class BatchNormReLU1d(_BatchNormReLU, nn.BatchNorm1d):
    """``relu(BatchNorm1d(x) + residual)`` in one pass each way on CPU."""


class BatchNormReLU2d(_BatchNormReLU, nn.BatchNorm2d):
    """``relu(BatchNorm2d(x) + residual)`` in one pass each way on CPU."""


class BatchNormReLU3d(_BatchNormReLU, nn.BatchNorm3d):
    """``relu(BatchNorm3d(x) + residual)`` in one pass each way on CPU."""


def _fused_copy(bn: _BatchNorm) -> _BatchNormReLU:
    """A BatchNormReLU sharing ``bn``'s parameters and buffers."""
    for base, cls in ((nn.BatchNorm1d, BatchNormReLU1d), (nn.BatchNorm2d, BatchNormReLU2d),
                      (nn.BatchNorm3d, BatchNormReLU3d)):
        if isinstance(bn, base):
            new = cls.__new__(cls)
            new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v)
                                 for k, v in bn.__dict__.items()})
            return new
    raise TypeError(f"cannot fuse {type(bn).__name__}")


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, F.relu) and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu"


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add) and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def fuse_bn_relu(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` whose BN -> ReLU and BN -> add -> ReLU run as one BatchNormReLU.

    Only plain ``nn.BatchNorm1d/2d/3d`` (and ours) whose output feeds nothing else are fused;
    the copy keeps the mode and shares nothing with ``model``. Raises ValueError when
    ``torch.fx`` cannot trace the model.
    """
    work = copy.deepcopy(model)
    try:
        graph = _Tracer().trace(work)
    except Exception as exc:
        raise ValueError(f"cannot fuse BN+ReLU in {type(model).__name__}: torch.fx cannot "
                         f"trace it ({exc})") from exc
    gm = fx.GraphModule(work, graph, type(model).__name__)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[str(node.target)]) not in _FUSABLE:
            continue
        if len(node.users) != 1:
            continue
        (user,) = node.users
        residual = None
        if _is_add(user) and len(user.users) == 1 and len(user.args) == 2:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(other, fx.Node) or other is node:
                continue
            residual, (relu,) = other, user.users
        else:
            relu = user
        if not _is_relu(relu, modules):
            continue
        target = str(node.target)
        parent, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(parent), attr, _fused_copy(modules[target]))  # type: ignore
        with gm.graph.inserting_before(relu):
            fused = gm.graph.call_module(target, (node.args[0], residual))
        relu.replace_all_uses_with(fused)
        gm.graph.erase_node(relu)
        if residual is not None:
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm

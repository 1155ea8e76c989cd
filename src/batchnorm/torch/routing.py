"""The drop-in's one routing table: which implementation takes a ``batch_norm`` call.

:func:`route` decides once per call, from the tensors alone:

=====================================================  ==========================================
the call                                               goes to
=====================================================  ==========================================
traced or compiled (``torch.jit.trace`` / script,      ``"torch"``: PyTorch's own op, so the
ONNX export, ``torch.compile``, ``torch.export``, an   graph records ``batch_norm`` and replays
fx ``Proxy``), or a tensor subclass / mode that        right on new inputs
overrides ``batch_norm``
CPU, float32/float64, dense (contiguous or             ``"cpu"``: our kernels through
channels-last), parameters of x's dtype, training,     :mod:`batchnorm.functional`
at least :func:`min_numel` elements
CUDA (or CPU with ``TRITON_ON_CPU``), float32/16,      ``"triton"``: :mod:`batchnorm.kernels.triton`
bfloat16, dense, under 2**31 elements, Triton present
anything else                                          ``"torch"``
=====================================================  ==========================================
"""

from __future__ import annotations

import torch
from torch.overrides import has_torch_function_variadic

from batchnorm.layout import tensor_channels_last

__all__ = ["CPU_MIN_NUMEL", "LAYOUTS", "layout_of", "min_numel", "route", "traced",
           "triton_available"]

CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to run the Triton path on CPU tensors under TRITON_INTERPRET=1.
TRITON_ON_CPU = False
# Below the crossover PyTorch's CPU kernel is faster: the Python around ours (validation, NumPy
# views, the autograd Function, about 0.1 ms a training step) costs more than the pass saves.
# Elements of x, by (layout, threads), for a float32 training step (forward, then the
# gradients handed back by torch.autograd.grad), measured by benchmarks/crossover.py (2**11 to
# 2**22 elements, (N, 64, H, W) and (N, 256), default environment, numba on the omp layer),
# twice: benchmarks/results/crossover.json and crossover-repeat.json. Where ours did not win
# in both runs the table says 2**22, the largest size measured (ties there: channels-last
# 0.97-1.04x, 2-D 0.94-1.04x). More threads use the largest entry.
CPU_MIN_NUMEL: dict[tuple[str, int], int] = {
    ("contiguous", 1): 262_144,  # 1.16-1.28x there, 0.71-0.73x at 2**17
    ("channels_last", 1): 4_194_304,
    ("2d", 1): 4_194_304,
    ("contiguous", 2): 524_288,  # 1.06-1.14x there, 0.86-0.91x at 2**18
    ("channels_last", 2): 4_194_304,
    ("2d", 2): 4_194_304,
}
LAYOUTS = tuple(dict.fromkeys(name for name, _ in CPU_MIN_NUMEL))  # the table's layouts
_MOST_THREADS = {name: max(t for n, t in CPU_MIN_NUMEL if n == name) for name in LAYOUTS}
# Eval forwards (batch_norm with training=False) stay with PyTorch at every size: at the
# drop-in level its eval kernel was as fast as ours or faster on every bench case
# (bench-dropin.json as of commit ff8c12b: torch/ours 0.62-0.98), the pass being one read and
# one write that both do at memory speed, and ours paying the Python around it.
# Tests set this to take every CPU size, training or not (None: the rules above).
MIN_NUMEL: int | None = None

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


_threads = torch.get_num_threads


def layout_of(x: torch.Tensor, channels_last: bool) -> str:
    """The routing table's layout of a dense ``x``: "2d" for (N, C), else "channels_last" or
    "contiguous"."""
    if x.dim() == 2:
        return "2d"
    return "channels_last" if channels_last else "contiguous"


def min_numel(layout: str, threads: int, training: bool = True) -> int:
    """The CPU crossover for ``layout`` (one of :data:`LAYOUTS`): from this many elements on
    our kernels are faster."""
    if layout not in _MOST_THREADS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if MIN_NUMEL is not None:
        return MIN_NUMEL
    if not training:
        return 2**63
    return CPU_MIN_NUMEL[(layout, min(threads, _MOST_THREADS[layout]))]


def traced(*tensors: torch.Tensor | None) -> bool:
    """Whether a tracer, compiler or tensor override is watching: then only PyTorch's own op
    is visible to it (our kernels run through NumPy, which no tracer sees). An fx ``Proxy``
    counts as an override (it defines ``__torch_function__``)."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or has_torch_function_variadic(*tensors)
    )


def route(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = True,
) -> str:
    """Which implementation takes these tensors (a training call unless ``training`` is
    False): ``"cpu"``, ``"triton"`` or ``"torch"``."""
    given = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    if traced(x, *given) or x.dim() < 2 or x.layout != torch.strided:
        return "torch"
    if not training and (running_mean is None or running_var is None):
        return "torch"  # PyTorch's own error (eval needs running statistics)
    if x.is_cpu and not TRITON_ON_CPU:  # the common case, in few tensor calls (each ~1 us)
        return _cpu(x, given, training)
    channels_last = tensor_channels_last(x)
    if channels_last is None or x.numel() == 0:
        return "torch"
    channels = x.shape[1]
    for t in given:
        if t.device != x.device or t.shape != (channels,) or t.stride() != (1,):
            return "torch"
    if x.is_cpu and x.dtype not in GPU_DTYPES:  # TRITON_ON_CPU, a dtype Triton does not take
        return _cpu(x, given, training)
    if (not x.is_cpu and x.device.type != "cuda") or x.dtype not in GPU_DTYPES:
        return "torch"
    if any(t.dtype not in (x.dtype, torch.float32) for t in given) or x.numel() >= 2**31:
        return "torch"
    return "triton" if triton_available() else "torch"


def _cpu(x: torch.Tensor, given: list[torch.Tensor], training: bool) -> str:
    dtype = x.dtype
    if dtype not in CPU_DTYPES:
        return "torch"
    channels_last = tensor_channels_last(x)
    if channels_last is None:
        return "torch"
    if x.numel() < max(1, min_numel(layout_of(x, channels_last), _threads(), training)):
        return "torch"
    vector = (x.shape[1],)
    for t in given:
        if t.dtype != dtype or t.shape != vector or t.stride() != (1,) or not t.is_cpu:
            return "torch"
    return "cpu"

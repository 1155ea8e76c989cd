"""The drop-in level: a module's forward and backward, ours against ``torch.nn``'s.

* ours: ``batchnorm.torch.convert_model(nn.BatchNormNd(C))`` with the chosen CPU backend;
* torch: ``torch.nn.BatchNormNd(C)``;
* memcpy: ``Tensor.copy_`` of x, the memory-bandwidth floor.

A training forward under ``no_grad``, a training forward then ``torch.autograd.grad`` of the
output with respect to input, weight and bias, and an eval forward. Channels-last cases use
``channels_last`` tensors for both. The case's ``route`` says which path our module took
(``batchnorm.torch.route``).
"""

from __future__ import annotations

from typing import Any

from batchnorm.app.bench.timing import Case, Contender


def check(case: Case) -> None:
    if len(case.shape) > 5:
        raise ValueError(f"bad case {case.spec!r}: torch's BatchNorm*d take 2 to 5 dimensions")


def contenders(case: Case, dtype_name: str, backend: str) -> tuple[list[Contender], str]:
    """Our module, PyTorch's and a copy of the same bytes; and the route our module takes."""
    import torch
    from torch import nn

    import batchnorm.torch as bt

    check(case)
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    shape = case.shape
    native_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if case.channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        dy = dy.movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_()
    native = native_cls[len(shape)](shape[1], dtype=dtype)
    mine: Any = bt.convert_model(native_cls[len(shape)](shape[1], dtype=dtype))
    mine.backend = backend
    out = []
    for name, m in ((backend, mine), ("torch", native)):
        params = [x, m.weight, m.bias]

        def forward(m: Any = m) -> Any:
            m.train()
            with torch.no_grad():
                return m(x)

        def forward_backward(m: Any = m, params: Any = params) -> Any:
            m.train()
            return torch.autograd.grad(m(x), params, dy)

        def evaluate(m: Any = m) -> Any:
            m.eval()
            with torch.no_grad():
                return m(x)

        out.append(Contender(
            name, {"forward": forward, "forward_backward": forward_backward, "eval": evaluate}
        ))
    src, dst = x.detach(), torch.empty_like(x)
    out.append(Contender("memcpy", {"forward": lambda: dst.copy_(src)}))
    return out, bt.route(x)

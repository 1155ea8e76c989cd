"""The Triton BN+ReLU kernels against PyTorch, run by Triton's interpreter in a fresh process
(TRITON_INTERPRET=1 must be set before triton is first imported): float32, float16 and
bfloat16; NCHW and channels-last; with and without a residual; training and eval."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


def triton_case() -> None:
    """Runs inside the fresh process; raises AssertionError on a mismatch."""
    import torch
    from torch import nn

    import batchnorm.torch as bt
    from batchnorm.torch import fused

    fused.TRITON_ON_CPU = True
    from batchnorm.kernels.triton import relu

    relu.BLOCK = 16  # several steps per channel and partial blocks on small inputs
    torch.manual_seed(0)
    for shape, channels_last in (((5, 3, 4, 7), False), ((5, 3, 4, 7), True), ((13, 6), False),
                                 ((3, 4, 11), False)):
        for name, tol in TOL.items():
            dtype = getattr(torch, name)
            for residual in (False, True):
                for training in (True, False):
                    c = shape[1]
                    ours = bt.BatchNormReLU1d(c) if len(shape) < 4 else bt.BatchNormReLU2d(c)
                    ref = nn.BatchNorm1d(c) if len(shape) < 4 else nn.BatchNorm2d(c)
                    with torch.no_grad():
                        for m in (ours, ref):
                            m.weight.copy_(torch.linspace(-1, 2, c))
                            m.bias.copy_(torch.linspace(0.5, -0.5, c))
                            m.running_mean.copy_(torch.linspace(-0.3, 0.3, c))
                    ours.train(training), ref.train(training)
                    x = torch.randn(shape) * 2 + 0.5
                    r = torch.randn(shape) if residual else None
                    dy = torch.randn(shape)
                    if channels_last:
                        x, dy = (t.to(memory_format=torch.channels_last) for t in (x, dy))
                        r = r.to(memory_format=torch.channels_last) if r is not None else None
                    got, want = [], []
                    for m, out in ((ours, got), (ref, want)):
                        # the reference gets the same (rounded) values in float32
                        cast = dtype if m is ours else torch.float32
                        xi = x.to(dtype).to(cast).clone().requires_grad_()
                        ri = None if r is None else r.to(dtype).to(cast).clone().requires_grad_()
                        if m is ours:
                            y = m(xi, ri)
                            assert type(y.grad_fn).__name__ == "TritonBNReLUBackward", y.grad_fn
                        else:
                            y = torch.relu(m(xi) + (0 if ri is None else ri))
                        y.backward(dy.to(dtype).to(y.dtype))
                        out += [t.detach().float().clone() for t in (y, xi.grad, m.weight.grad,
                                                                     m.bias.grad, m.running_var)]
                        if ri is not None:
                            out.append(ri.grad.float().clone())
                    for a, b in zip(got, want, strict=True):
                        err = float((a - b).abs().max() / max(1.0, float(b.abs().max())))
                        assert err < tol, (shape, channels_last, name, residual, training, err)
    print("ok")


@pytest.mark.skipif(os.environ.get("BATCHNORM_SKIP_TRITON") == "1", reason="asked to skip")
def test_triton_bn_relu_in_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(TESTS)}
    res = subprocess.run(
        [sys.executable, "-c", "import test_family_fused_triton as t; t.triton_case()"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr

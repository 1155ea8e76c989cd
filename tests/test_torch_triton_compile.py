"""Compile every Triton kernel launch for a real GPU target, without a GPU.

The interpreter tests (test_torch_triton.py) check what the kernels compute; they cannot
check that the kernels compile (types, loop-carried values, layouts, specialization of
integer arguments equal to 1). Here the launchers run with their kernels replaced by recorders,
on empty tensors of the benchmark shapes, and each recorded launch is compiled by Triton's
real compiler down to a cubin for sm_90 (ptxas ships with triton; no driver or device is
involved). ``python tests/test_torch_triton_compile.py`` prints each variant's registers.
Register spills, or more than MAX_REGISTERS a thread (low occupancy), fail: they would make the
memory-bound passes slow.

The compilation runs in a child process, since this process may hold interpreted kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

# one shape per tiling: NCHW with large and small H*W, channels-last, (N, C), odd 3-D
GPU_SHAPES = [(64, 256, 56, 56), (128, 2048, 7, 7), (256, 1024), (8, 3, 37)]
DTYPES = ("float32", "bfloat16")  # float16 compiles as bfloat16 does (load, convert, store)
TARGETS = [90]  # sm_90 (H100); add 80 for A100 when changing the kernels
SMS = {90: 132, 80: 108}
MAX_REGISTERS = 128


def _record(tk: Any) -> list[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """Run the launchers over the benchmark shapes; return every (kernel, args, kwargs)."""
    import torch

    from batchnorm.kernels.triton import jit, tiling
    from batchnorm.layout import tensor_view

    calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    class Recorder:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> None:
                calls.append((self.fn, args, kwargs))

            return launch

    names = [n for n in dir(jit) if n.endswith("_kernel")]
    originals = {n: getattr(jit, n) for n in names}
    try:
        for n in names:
            setattr(jit, n, Recorder(originals[n]))
        for shape in GPU_SHAPES:
            for channels_last in (False, True):
                for dtype in (getattr(torch, d) for d in DTYPES):
                    x = torch.empty(shape, dtype=dtype)
                    if channels_last:
                        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
                    c = shape[1]
                    w = torch.empty(c)
                    rm, rv = torch.empty(c), torch.empty(c, dtype=dtype)
                    mean, rstd = torch.empty(c), torch.empty(c)
                    programs = SMS[90] * tiling.PROGRAMS_PER_SM
                    x3 = tensor_view(x)
                    tk.forward(x3, w, w, rm, rv, True, 0.1, 1e-5, programs=programs)
                    tk.forward(x3, None, None, None, None, True, 0.1, 1e-5, programs=programs)
                    tk.forward(x3, w, None, rm, rv, False, 0.1, 1e-5, programs=programs)
                    dy3 = tensor_view(torch.empty_like(x))
                    tk.backward(dy3, x3, w, mean, rstd, True, programs=programs)
                    tk.backward(dy3, x3, None, mean, rstd, False, need_params=False,
                                programs=programs)  # fmt: skip
    finally:
        for n, fn in originals.items():
            setattr(jit, n, fn)
    return calls


def _signature(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Triton's signature and constexprs for these arguments, as its launcher specializes."""
    import torch

    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr or isinstance(value, bool):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + types[value.dtype]
        elif isinstance(value, int):
            if value == 1:  # Triton specializes integer arguments equal to 1
                signature[param.name] = "constexpr"
                constexprs[param.name] = 1
            else:
                signature[param.name] = "i32"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: unexpected argument {param.name}={value!r}")
    return signature, constexprs, options


def main() -> int:
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from batchnorm.kernels import triton as tk

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(bin_dir, "cuobjdump")
    seen: set[str] = set()
    failures = []
    for fn, args, kwargs in _record(tk):
        signature, constexprs, options = _signature(fn, args, dict(kwargs))
        for arch in TARGETS:
            key = f"{fn.__name__} {arch} {sorted(signature.items())} {sorted(constexprs.items())}"
            key += f" {sorted(options.items())}"
            if key in seen:
                continue
            seen.add(key)
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            try:
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            except Exception as exc:  # noqa: BLE001 - report every failing variant
                failures.append(f"{key}: {type(exc).__name__}: {exc}")
                continue
            with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
                fh.write(kernel.asm["cubin"])
                fh.flush()
                usage = subprocess.run(
                    [cuobjdump, "--dump-resource-usage", fh.name],
                    capture_output=True, text=True, check=False,
                ).stdout  # fmt: skip
            regs = re.search(r"REG:(\d+)", usage)
            local = re.search(r"LOCAL:(\d+)", usage)
            if regs is None or local is None:  # never pass because the format changed
                failures.append(f"{key}: no REG/LOCAL in cuobjdump's output: {usage[-300:]!r}")
                continue
            if int(local.group(1)) > 0:
                failures.append(f"{key}: register spills ({local.group(0)}, {regs[0]})")
            if int(regs.group(1)) > MAX_REGISTERS:
                failures.append(f"{key}: {regs.group(0)} > {MAX_REGISTERS} registers a thread")
            print(f"{fn.__name__:<20} sm_{arch} {regs[0]:<8} {constexprs}")
    print(f"{len(seen)} kernel variants compiled")
    for f in failures:
        print("FAIL", f)
    return 1 if failures or not seen else 0


def test_kernels_compile_for_gpu_targets() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    if res.returncode != 0 and "No module named 'triton.backends.nvidia" in res.stderr:
        pytest.skip("this triton build has no NVIDIA backend")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(main())

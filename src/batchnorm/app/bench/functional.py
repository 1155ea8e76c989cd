"""The functional level: one call of each library's batch-norm function, as a user calls it.

* ours: ``batchnorm.functional.batch_norm_forward`` then ``batch_norm_backward`` (NumPy
  arrays in and out), once per installed backend;
* torch: ``torch.nn.functional.batch_norm`` then ``torch.autograd.grad`` with respect to
  input, weight and bias (the same memory, channels-last inputs as ``channels_last``
  tensors);
* jax (when installed): one ``jax.jit`` function for the forward (with the running-statistics
  update) and one for the forward and its ``jax.vjp``, each waited for
  (``block_until_ready``);
* memcpy: ``np.copyto`` of x, the memory-bandwidth floor.
"""

from __future__ import annotations

from typing import Any

from batchnorm.app.bench.timing import Case, Contender, median, time_once

EPS = 1e-5
MOMENTUM = 0.1


def case_data(case: Case, dtype: str, seed: int = 0) -> dict[str, Any]:
    """x and dy as stored (channels-last when asked), weight, bias and running stats."""
    import numpy as np

    rng = np.random.default_rng(seed)
    stored = case.shape
    if case.channels_last:
        stored = (case.shape[0], *case.shape[2:], case.shape[1])
    channels = case.shape[1]
    x = rng.standard_normal(stored, dtype=np.float32).astype(dtype, copy=False)
    x *= 2.0
    x += 0.5
    dy = rng.standard_normal(stored, dtype=np.float32).astype(dtype, copy=False)
    return {
        "x": x,
        "dy": dy,
        "w": (1.0 + 0.1 * rng.standard_normal(channels)).astype(dtype),
        "b": (0.1 * rng.standard_normal(channels)).astype(dtype),
        "rm": np.zeros(channels, dtype),
        "rv": np.ones(channels, dtype),
    }


def axis_of(case: Case) -> int:
    return -1 if case.channels_last else 1


def ours(name: str, data: dict[str, Any], case: Case) -> Contender:
    from batchnorm import functional as F

    x, dy, w, b, rm, rv = (data[k] for k in ("x", "dy", "w", "b", "rm", "rv"))
    axis = axis_of(case)

    def forward() -> Any:
        return F.batch_norm_forward(x, w, b, rm, rv, training=True, axis=axis, backend=name)

    def forward_backward() -> Any:
        _, cache = F.batch_norm_forward(x, w, b, rm, rv, training=True, axis=axis, backend=name)
        return F.batch_norm_backward(dy, cache)

    def evaluate() -> Any:
        return F.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis, backend=name)

    return Contender(
        name, {"forward": forward, "forward_backward": forward_backward, "eval": evaluate}
    )


def torch(data: dict[str, Any], case: Case) -> Contender:
    import torch
    import torch.nn.functional as tF

    # x and dy are stored as ours sees them; channels-last arrays become NCHW views with
    # channels_last strides, which PyTorch's CPU kernel handles natively
    nd = len(case.shape)
    perm = (0, nd - 1, *range(1, nd - 1)) if case.channels_last else tuple(range(nd))
    x = torch.from_numpy(data["x"]).permute(perm)
    dy = torch.from_numpy(data["dy"]).permute(perm)
    w, b, rm, rv = (torch.from_numpy(data[k]).clone() for k in ("w", "b", "rm", "rv"))
    xg, wg, bg = (t.detach().requires_grad_(True) for t in (x, w, b))

    def forward() -> Any:
        with torch.no_grad():
            return tF.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)

    def forward_backward() -> Any:
        y = tF.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)
        return torch.autograd.grad(y, (xg, wg, bg), dy)

    def evaluate() -> Any:
        with torch.no_grad():
            return tF.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)

    return Contender(
        "torch", {"forward": forward, "forward_backward": forward_backward, "eval": evaluate}
    )


def jax(data: dict[str, Any], case: Case) -> Contender:
    import jax
    import jax.numpy as jnp

    axis = axis_of(case) % data["x"].ndim
    reduce = tuple(d for d in range(data["x"].ndim) if d != axis)
    shape = [1] * data["x"].ndim
    shape[axis] = -1
    count = data["x"].size // data["x"].shape[axis]
    x, dy, w, b, rm, rv = (jnp.asarray(data[k]) for k in ("x", "dy", "w", "b", "rm", "rv"))

    def train(x: Any, w: Any, b: Any, rm: Any, rv: Any) -> Any:
        mean = x.mean(axis=reduce)
        var = x.var(axis=reduce)
        y = (x - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + EPS)
        y = y * w.reshape(shape) + b.reshape(shape)
        new_rm = (1 - MOMENTUM) * rm + MOMENTUM * mean
        new_rv = (1 - MOMENTUM) * rv + MOMENTUM * var * (count / max(count - 1, 1))
        return y, (new_rm, new_rv)

    def grads(x: Any, w: Any, b: Any, rm: Any, rv: Any, dy: Any) -> Any:
        (y, stats), vjp = jax.vjp(lambda x, w, b: train(x, w, b, rm, rv), x, w, b)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, stats)
        return vjp((dy, zeros)), stats

    def infer(x: Any, w: Any, b: Any, rm: Any, rv: Any) -> Any:
        inv = jax.lax.rsqrt(rv + EPS)
        return (x - rm.reshape(shape)) * (w * inv).reshape(shape) + b.reshape(shape)

    train_jit, grads_jit, infer_jit = jax.jit(train), jax.jit(grads), jax.jit(infer)
    return Contender("jax", {
        "forward": lambda: jax.block_until_ready(train_jit(x, w, b, rm, rv)),
        "forward_backward": lambda: jax.block_until_ready(grads_jit(x, w, b, rm, rv, dy)),
        "eval": lambda: jax.block_until_ready(infer_jit(x, w, b, rm, rv)),
    })


def memcpy(data: dict[str, Any]) -> Contender:
    import numpy as np

    x = data["x"]
    dst = np.empty_like(x)
    return Contender("memcpy", {"forward": lambda: np.copyto(dst, x)})


def contenders(case: Case, dtype: str, backends: list[str], others: list[str]
               ) -> list[Contender]:
    """Ours (one per backend), then ``others`` ("torch", "jax"), then memcpy."""
    data = case_data(case, dtype)
    out = [ours(name, data, case) for name in backends]
    makers = {"torch": torch, "jax": jax}
    out += [makers[name](data, case) for name in others]
    return [*out, memcpy(data)]


def reference_times(case: Case, dtype: str, repeats: int) -> dict[str, Any]:
    """The seed's pure-Python class on a 2-D case (lists in, lists out)."""
    from batchnorm.reference import BatchNorm

    data = case_data(case, dtype)
    rows = data["x"].reshape(case.shape[0], -1).tolist()
    grads = data["dy"].reshape(case.shape[0], -1).tolist()
    ref = BatchNorm(len(rows[0]))
    fwd: list[float] = []
    both: list[float] = []
    for _ in range(repeats):
        fwd.append(time_once(lambda: ref.forward(rows)))
        both.append(time_once(lambda: (ref.forward(rows), ref.backward(grads))))
    return {
        "case": case.name,
        "repeats": repeats,
        "forward_ms": 1e3 * median(fwd),
        "forward_backward_ms": 1e3 * median(both),
    }

"""Recycled output memory (batchnorm.kernels.buffers): reuse only what nothing refers to."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from batchnorm.kernels import buffers

BIG = (256, 1024)  # 1 MiB of float32: above MIN_BYTES


def test_small_arrays_are_plain() -> None:
    x = np.ones((8, 4), np.float32)
    out = buffers.empty_like(x)
    assert out.base is None and out.shape == x.shape and out.dtype == x.dtype


def test_a_dropped_output_is_reused_and_a_held_one_is_not() -> None:
    x = np.ones(BIG, np.float32)
    first = buffers.empty_like(x)
    assert first.flags.c_contiguous and first.shape == BIG and first.dtype == np.float32
    assert first.base is not None
    memory = id(first.base)  # an id: a reference would keep the buffer in use
    second = buffers.empty_like(x)
    assert id(second.base) != memory  # first is still held
    del first, second
    again = buffers.empty_like(x)
    assert id(again.base) == memory


@pytest.mark.parametrize("holder", ["view", "torch", "list", "dtype"])
def test_anything_that_refers_to_an_output_keeps_its_memory(holder: str) -> None:
    x = np.ones(BIG, np.float32)
    out = buffers.empty_like(x)
    out.fill(7.0)
    memory = id(out.base)
    if holder == "view":
        kept: object = out.reshape(-1)[5:]
    elif holder == "torch":
        torch = pytest.importorskip("torch")
        kept = torch.from_numpy(out)
    elif holder == "list":
        kept = [out]
    else:
        kept = out.view(np.int32)
    del out
    others = [buffers.empty_like(x) for _ in range(3)]
    assert all(id(o.base) != memory for o in others)
    for o in others:
        o.fill(-1.0)
    values = np.asarray(kept if holder != "list" else kept[0])  # type: ignore[index]
    assert (values.view(np.float32) == 7.0).all()


def test_dtype_and_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.ones(BIG, np.float32)
    out = buffers.empty_like(x, np.float64)
    assert out.dtype == np.float64 and out.shape == BIG
    monkeypatch.setattr(buffers, "_pool", {})
    monkeypatch.setattr(buffers, "_kept", [0])
    monkeypatch.setattr(buffers, "LIMIT", 2 * x.nbytes)
    held = [buffers.empty_like(x) for _ in range(3)]
    assert [h.base is None for h in held] == [False, False, True]  # plain past the limit
    assert buffers.kept_bytes() == 2 * x.nbytes
    del held
    other = buffers.empty_like(np.ones(2 * x.size, np.float32))  # frees the two kept ones
    assert other.base is not None and buffers.kept_bytes() == 2 * x.nbytes


def test_release_drops_only_free_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers, "_pool", {})
    monkeypatch.setattr(buffers, "_kept", [0])
    x = np.ones(BIG, np.float32)
    held = buffers.empty_like(x)
    dropped = buffers.empty_like(x)
    del dropped
    assert buffers.kept_bytes() == 2 * x.nbytes
    assert buffers.release() == x.nbytes  # the held one stays
    held.fill(3.0)
    assert (held == 3.0).all() and buffers.kept_bytes() == x.nbytes


def test_threads_never_share_a_buffer() -> None:
    x = np.ones(BIG, np.float32)
    bad: list[int] = []

    def work(k: int) -> None:
        for _ in range(200):
            out = buffers.empty_like(x)
            out.fill(k)
            if not (out == k).all():  # another thread wrote into the same memory
                bad.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_a_training_loop_takes_no_page_faults_for_its_outputs() -> None:
    """With glibc forced to map and unmap every large block (a fixed mmap threshold), each
    output would fault all of its pages in; recycled outputs fault none."""
    script = textwrap.dedent(
        """
        import resource, numpy as np
        from batchnorm import functional
        x = np.random.default_rng(0).standard_normal((256, 1024), dtype=np.float32)
        dy = x[::-1].copy()
        def step():
            y, cache = functional.batch_norm_forward(x, training=True)
            functional.batch_norm_backward(dy, cache)
        for _ in range(5):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            step()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
        """
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}

    def faults(recycle: bool) -> float:
        code = script if recycle else "from batchnorm.kernels import buffers\n" \
            "buffers.MIN_BYTES = 1 << 62\n" + script  # fmt: skip
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        return float(run.stdout.split()[-1])

    assert faults(recycle=False) > 200  # y and dx: 2 MiB, 512 pages a step
    assert faults(recycle=True) < 20

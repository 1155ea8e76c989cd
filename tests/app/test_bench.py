"""`batchnorm bench` on tiny cases: the JSON it writes, its levels and its options.

Speed is never asserted here; only the structure of the results and what the bench
promises about how it measures.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from batchnorm.app.bench import command as bench
from batchnorm.app.bench import timing
from batchnorm.app.cli import main


def test_parse_case() -> None:
    assert bench.parse_case("32x64x56x56/cl") == bench.Case((32, 64, 56, 56), True)
    assert bench.parse_case("60,100") == bench.Case((60, 100), False)
    assert bench.parse_case("60x100/cl").channels_last is False  # 2-D is channels-last already
    assert bench.parse_case(bench.parse_case("4x3x5x5/cl").spec) == bench.Case((4, 3, 5, 5), True)
    with pytest.raises(ValueError, match="bad case"):
        bench.parse_case("32xfoo")
    with pytest.raises(ValueError, match="at least N and C"):
        bench.parse_case("32")


def test_ratio_stats_are_per_round() -> None:
    # per-round ratios 1, 2, 3, 4, 5: median 3, quartiles 2 and 4 (NumPy's interpolation)
    assert timing.ratio_stats([1, 4, 9, 16, 25], [1, 2, 3, 4, 5]) == [3.0, 2.0, 4.0]
    # the ratio of medians would be 9/3 = 3 as well, but not for skewed rounds:
    mid, lo, hi = timing.ratio_stats([10, 1, 1], [1, 1, 10])
    assert (mid, lo, hi) == (1.0, pytest.approx(0.55), 5.5)


def test_bench_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    for name in bench.MALLOC_KEEP:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "bench.json"
    args = ["bench", "12x3", "4x3x5x5/cl", "--repeats", "2", "--budget", "0.01"]
    args += ["--threads", "1", "--backends", "numpy", "--no-jax", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "12x3" in printed and "seed reference" in printed
    assert "each library in a new process of its own per case" in printed
    assert "OMP_WAIT_POLICY" not in os.environ  # nothing imposed on anyone

    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["dtype"] == "float32" and meta["threads"] == 1 and meta["level"] == "functional"
    assert meta["omp_wait_policy"].startswith("unset") and len(meta["load_average"]) == 2
    assert "F.batch_norm + torch.autograd.grad" in meta["api"]
    assert meta["contenders"][0] == "numpy" and meta["contenders"][-1] == "memcpy"
    assert meta["reference"]["case"] == "12x3"
    assert meta["reference"]["forward_ms"] > 0
    assert set(meta["first_call_s"]) >= {"numpy", "memcpy"}

    cases = {c["name"]: c for c in data["cases"]}
    assert set(cases) == {"12x3", "4x3x5x5 cl"}
    cl = cases["4x3x5x5 cl"]
    assert cl["channels_last"] is True and cl["axis"] == -1 and cl["shape"] == [4, 3, 5, 5]
    assert cl["bytes"] == 4 * 3 * 5 * 5 * 4
    for case in cases.values():
        assert case["repeats"] >= 2
        assert case["memcpy_ms"] > 0
        assert set(case["min_times_ms"]) == set(meta["contenders"])
        for name, times in case["times_ms"].items():
            assert set(times) == set(bench.OPS), name
            assert all(t > 0 for t in times.values())
        assert set(case["ratios"]["numpy_over_memcpy"]) == set(bench.OPS)
        for key, by_op in case["ratios"].items():
            for op, mid in by_op.items():
                lo, hi = case["ratio_spread"][key][op]
                assert lo <= mid <= hi
        if "torch" in case["times_ms"]:
            assert set(case["ratios"]["torch_over_numpy"]) == set(bench.OPS)
        assert set(case["page_faults"]) == set(case["times_ms"])
        assert all(f >= 0 for ops in case["page_faults"].values() for f in ops.values())
    assert meta["malloc"] == "glibc's default"


def test_each_library_runs_alone_in_its_process() -> None:
    """At the functional level our process never loads PyTorch (nor PyTorch's ours)."""
    import subprocess
    import sys

    spec = {"level": "functional", "case": "6x2", "dtype": "float32", "threads": 1,
            "repeats": 1, "budget": 0, "rounds": 1}
    probe = ("import json, sys; from batchnorm.app.bench import process; "
             "process.measure(json.loads(sys.argv[1])); "
             "print(sorted(m for m in ('torch', 'numba', 'jax') if m in sys.modules))")
    for mine, theirs, absent in ((["numpy"], [], "torch"), ([], ["torch"], "jax")):
        arg = json.dumps({**spec, "backends": mine, "others": theirs})
        if theirs == ["torch"]:
            pytest.importorskip("torch")
        out = subprocess.run([sys.executable, "-c", probe, arg], capture_output=True,
                             text=True, check=True).stdout
        assert absent not in out, out


def test_bench_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "8x3", "--repeats", "0", "--no-torch", "--backends", "numpy"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main(["bench", "8x3", "--backends", "nonesuch"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main(["bench", "8x3", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    return parser.parse_args(list(argv))


def test_one_set_of_options_for_every_level() -> None:
    assert bench_args().level == "functional"
    assert bench_args("--torch").level == "dropin"
    assert bench_args("--sync").level == "sync"
    # the same thread default whatever the level
    defaults = {bench.settings(bench_args(*a))["threads"] for a in ((), ("--torch",), ("--sync",))}
    assert defaults == {os.cpu_count() or 1}


def test_omp_wait_policy_is_an_option_for_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    opts = bench.settings(bench_args("--omp-wait-policy", "PASSIVE", "--backends", "numpy"))
    assert opts["env"]["OMP_WAIT_POLICY"] == "PASSIVE" and opts["omp_wait_policy"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ  # only the timed processes get it
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own setting is kept
    assert bench.settings(bench_args("--backends", "numpy"))["omp_wait_policy"] == "ACTIVE"


def test_dropin_level(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    assert main(["bench", "--level", "dropin", "40x1000", "4x8x8x8/cl", "--repeats", "1",
                 "--budget", "0", "--backends", "numpy", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "40x1000" in text and "4x8x8x8 cl" in text and "fwd+bwd" in text
    data = json.loads(out.read_text())
    assert "convert_model" in data["meta"]["api"]
    results = data["cases"]
    assert [r["repeats"] for r in results] == [1, 1]
    assert set(results[0]["min_times_ms"]) == {"numpy", "torch", "memcpy"}
    assert all(r["route"] for r in results)


def test_jax_is_skipped_with_a_line_when_absent(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "installed", lambda name: name != "jax")
    assert main(["bench", "6x2", "--repeats", "1", "--budget", "0", "--threads", "1",
                 "--backends", "numpy", "--no-torch"]) == 0
    assert "jax is not installed: JAX skipped" in capsys.readouterr().out


def test_jax_contender_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    out = tmp_path / "bench.json"
    assert main(["bench", "6x4", "2x3x4x4/cl", "--repeats", "2", "--budget", "0",
                 "--threads", "1", "--backends", "numpy", "--no-torch",
                 "--json", str(out)]) == 0
    for case in json.loads(out.read_text())["cases"]:
        assert set(case["ratios"]["jax_over_numpy"]) == set(bench.OPS)
        assert len(case["times_ms"]["jax"]) == 3


def test_jax_function_matches_ours() -> None:
    """The JAX contender computes batch norm: its outputs equal ours (float64)."""
    pytest.importorskip("jax")
    import jax
    import numpy as np

    from batchnorm import functional as F
    from batchnorm.app.bench import functional as level

    jax.config.update("jax_enable_x64", True)
    case = bench.parse_case("5x3x4/cl")
    data = level.case_data(case, "float64")
    y_jax, _ = level.jax(data, case).ops["forward"]()
    y, _ = F.batch_norm_forward(data["x"], data["w"], data["b"], training=True, axis=-1)
    np.testing.assert_allclose(np.asarray(y_jax), y, rtol=1e-10, atol=1e-12)


def test_malloc_keep_is_an_option_for_all(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in bench.MALLOC_KEEP:
        monkeypatch.delenv(name, raising=False)
    assert bench.settings(bench_args("--backends", "numpy"))["malloc"] == "glibc's default"
    opts = bench.settings(bench_args("--malloc", "keep", "--backends", "numpy"))
    assert all(opts["env"][n] == str(1 << 30) for n in bench.MALLOC_KEEP)
    assert opts["malloc"].startswith("MALLOC_MMAP_THRESHOLD_=")
    assert not any(n in os.environ for n in bench.MALLOC_KEEP)  # only the timed processes


def test_page_faults_are_counted_per_call() -> None:
    """A call that writes fresh pages counts them; one that reuses memory counts none."""
    import mmap

    size = 64 * mmap.PAGESIZE

    def fresh() -> None:
        with mmap.mmap(-1, size) as m:  # new anonymous pages, faulted in by the writes
            for i in range(0, size, mmap.PAGESIZE):
                m[i] = 1

    kept = bytearray(size)

    def reuse() -> None:
        for i in range(0, size, mmap.PAGESIZE):
            kept[i] = 1

    cs = [timing.Contender("fresh", {"forward": fresh}),
          timing.Contender("reuse", {"forward": reuse})]  # fmt: skip
    timing.alternate(cs, 3)
    assert min(cs[0].faults["forward"]) >= 64
    assert max(cs[1].faults["forward"]) < 8


def test_the_sync_level_launches_its_processes_with_the_bench_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchnorm.app.bench import sync

    for name in (*bench.MALLOC_KEEP, "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "unset")  # restored after the test: run() writes os.environ
        monkeypatch.delenv(name)
    seen: dict[str, str | None] = {}

    def fake_measure(*args: object, **kwargs: object) -> list[dict[str, object]]:
        seen.update({n: os.environ.get(n) for n in (*bench.MALLOC_KEEP, "OMP_WAIT_POLICY")})
        return []

    monkeypatch.setattr(sync, "measure", fake_measure)
    monkeypatch.setattr(sync, "_table", lambda rows, title: title)
    args = bench_args("--sync", "--malloc", "keep", "--omp-wait-policy", "PASSIVE",
                      "--backends", "numpy")
    assert bench.run(args) == 0
    assert seen == {**{n: str(1 << 30) for n in bench.MALLOC_KEEP}, "OMP_WAIT_POLICY": "PASSIVE"}
    assert "malloc: MALLOC_MMAP_THRESHOLD_=" in capsys.readouterr().out

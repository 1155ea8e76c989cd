"""`batchnorm bench` on tiny cases: the JSON it writes and the flags that dispatch elsewhere.

Speed is never asserted here; only the structure of the results.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from batchnorm import bench
from batchnorm.cli import main


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench.run` sets OMP_WAIT_POLICY when unset; undo that after each test."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))


def test_parse_case() -> None:
    assert bench.parse_case("32x64x56x56/cl") == bench.Case((32, 64, 56, 56), True)
    assert bench.parse_case("60,100") == bench.Case((60, 100), False)
    assert bench.parse_case("60x100/cl").channels_last is False  # 2-D is channels-last already
    with pytest.raises(ValueError, match="bad case"):
        bench.parse_case("32xfoo")
    with pytest.raises(ValueError, match="at least N and C"):
        bench.parse_case("32")


def test_bench_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "12x3", "4x3x5x5/cl", "--repeats", "2", "--budget", "0.01"]
    args += ["--threads", "1", "--backends", "numpy", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "12x3" in printed and "seed reference" in printed

    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["dtype"] == "float32" and meta["threads"] == 1
    assert meta["omp_wait_policy"] and len(meta["load_average"]) == 2
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
        if "torch" in case["times_ms"]:
            assert set(case["ratios"]["torch_over_numpy"]) == set(bench.OPS)


def test_bench_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "8x3", "--repeats", "0", "--no-torch", "--backends", "numpy"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main(["bench", "8x3", "--backends", "nonesuch"]) == 2
    assert "unknown backend" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "module"),
    [("--torch", "batchnorm.torch.bench"), ("--sync", "batchnorm.distributed.bench")],
)
def test_dispatch_flags(flag: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    fake = types.ModuleType(module)
    fake.run = lambda args: seen.append(args) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module, fake)
    assert main(["bench", flag]) == 7
    assert len(seen) == 1

    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ImportError, match=flag):
        bench.run(bench_args(flag))


def bench_args(*argv: str) -> object:
    import argparse

    parser = argparse.ArgumentParser()
    bench.configure(parser)
    return parser.parse_args(list(argv))

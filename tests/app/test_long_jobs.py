"""Long jobs: a real Ctrl-C at any moment, --resume to the same numbers, and the output
folder's rules (checked before training, never overwritten silently, damaged checkpoints
named, no temporary files left)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchnorm.app import cli
from batchnorm.app.experiments import command

pytest.importorskip("mlxtend")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

FIG1 = ["experiment", "fig1", "--steps", "600", "--set", "eval_every=50",
        "--checkpoint-every", "0"]  # checkpoints only on Ctrl-C and at the end


pytestmark = pytest.mark.usefixtures("numpy_backend")


def experiment(out: Path) -> dict[str, Any]:
    saved: dict[str, Any] = json.loads((out / "results.json").read_text())
    return saved


def without_clock(value: Any) -> Any:
    """The results with wall-clock fields dropped and NaN made comparable."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BATCHNORM_BACKEND": "numpy"}
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "batchnorm.app", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env)


def run_interrupted(args: list[str], out: Path, delays: list[float]) -> tuple[list[int], float]:
    """Start the run, press Ctrl-C (a real SIGINT) after each delay, resuming each time,
    until one finishes; the exit codes in order, and the seconds the last process ran
    after it said where it writes."""
    codes: list[int] = []
    log = out.parent / f"{out.name}.log"
    cmd = [*args, "--out", str(out)]
    for delay in [*delays, None]:
        proc = start(cmd, log)
        deadline = time.monotonic() + 60
        while b"writing to" not in log.read_bytes() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        began = time.monotonic()
        if delay is not None:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
        codes.append(proc.wait(timeout=120))
        assert codes[-1] in (0, 130), log.read_text()
        if codes[-1] == 0:
            break
        assert "continue with" in log.read_text()
        cmd = ["experiment", "--resume", str(out)]
    assert not list(out.glob("*.tmp"))
    return codes, time.monotonic() - began


@pytest.mark.slow
def test_ctrl_c_at_random_moments_then_resume_gives_the_same_results(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    codes, seconds = run_interrupted(FIG1, whole, [])
    assert codes == [0]
    expected = without_clock(experiment(whole))
    rng = random.Random(1)
    for k in range(3):  # three runs, each stopped at one or two random moments
        for attempt in range(5):  # a moment past the end interrupts nothing: draw sooner
            out = tmp_path / f"part{k}-{attempt}"
            scale = 0.8 * seconds / 2**attempt
            delays = [rng.uniform(0.0, scale), rng.uniform(0.0, scale / 3)][: 1 + k % 2]
            codes, _ = run_interrupted(FIG1, out, delays)
            assert without_clock(experiment(out)) == expected, (k, delays, codes)
            if 130 in codes:
                break
        else:
            pytest.fail(f"run {k} was never interrupted")


def test_out_naming_a_file_or_unwritable_place_fails_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    started = time.perf_counter()
    assert cli.main([*FIG1, "--out", str(a_file)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert cli.main([*FIG1, "--out", str(a_file / "below")]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main([*FIG1, "--out", str(locked)]) == 2
        assert "cannot write" in capsys.readouterr().err
    assert time.perf_counter() - started < 20  # no training happened
    assert a_file.read_text() == "x"


def interrupted_run(out: Path) -> Path:
    """A fig1 run stopped at step 20 through the command's own machinery."""
    from batchnorm.app.experiments import fig1

    config = command.make_config(fig1, {"steps": 60, "eval_every": 20})

    def press_ctrl_c(done: int, total: int, text: str) -> None:
        if done >= 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        command.execute(fig1, config, out, progress=press_ctrl_c)
    path = command.checkpoint_path(out, "fig1")
    assert path.is_file()
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "altered", "random", "foreign"])
def test_damaged_checkpoint_gets_one_clear_error(damage: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    path = interrupted_run(tmp_path / "run")
    blob = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "altered":  # one byte of the stored arrays changed
        i = len(blob) // 3
        path.write_bytes(blob[:i] + bytes([blob[i] ^ 0x5A]) + blob[i + 1 :])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(blob)))
    else:  # a valid .npz that is not ours
        with path.open("wb") as fh:
            np.savez(fh, a=np.ones(3))
    capsys.readouterr()
    assert cli.main(["experiment", "--resume", str(path.parent)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and "cannot be resumed" in err, err


def test_checkpoint_never_overwritten_silently(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    path = interrupted_run(out)
    before = path.read_bytes()
    small = ["experiment", "fig1", "--steps", "10", "--out", str(out)]
    assert cli.main(small) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint" in err and "--resume" in err and "--overwrite" in err
    assert path.read_bytes() == before
    assert cli.main(["demo", "--out", str(out)]) == 2
    assert path.read_bytes() == before
    assert cli.main([*small, "--overwrite"]) == 0
    assert experiment(out)["experiments"]["fig1"]["config"]["steps"] == 10


def test_options_that_conflict_with_the_resumed_run_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    interrupted_run(out)
    for extra in (["--steps", "500"], ["--seed", "3"], ["--set", "batch_size=30"],
                  ["--out", str(tmp_path / "elsewhere")], ["--overwrite"]):
        assert cli.main(["experiment", "--resume", str(out), *extra]) == 2, extra
        assert "--" in capsys.readouterr().err
    # the run's own values are no conflict
    assert cli.main(["experiment", "--resume", str(out), "--steps", "60", "--seed", "0"]) == 0
    saved = experiment(out)["experiments"]["fig1"]
    assert saved["completed"] and saved["steps"][-1] == 60


def test_stale_temporaries_are_removed_and_none_left(tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = interrupted_run(out)
    stale = [out / f"{path.name}abc123.tmp", out / "results.json.tmp"]  # as kill -9 leaves
    for p in stale:
        p.write_bytes(b"partial")
    assert cli.main(["experiment", "--resume", str(out)]) == 0
    assert not list(out.glob("*.tmp"))


def test_zero_steps_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["experiment", "fig1", "--steps", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert cli.main(["demo", "--depth-steps", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--depth-steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_demo_resume_finishes_both_parts_with_the_same_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import contextlib

    tiny = ["demo", "--steps", "30", "--depth-steps", "3", "--depths", "2,3"]
    whole = tmp_path / "whole"
    assert cli.main([*tiny, "--out", str(whole)]) == 0

    @contextlib.contextmanager
    def press_ctrl_c_in_depth() -> Any:
        def progress(done: int, total: int, text: str) -> None:
            if text.startswith("depth") and done > 0:
                raise KeyboardInterrupt  # the depth sweep has finished some nets

        yield progress

    part = tmp_path / "part"
    monkeypatch.setattr(command, "rich_progress", press_ctrl_c_in_depth)
    assert cli.main([*tiny, "--out", str(part)]) == 130
    assert f"batchnorm demo --resume {part}" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("BATCHNORM_BACKEND", "numpy")
    assert cli.main(["demo", "--resume", str(part), "--depth-steps", "4"]) == 2
    assert cli.main(["demo", "--resume", str(part)]) == 0
    assert without_clock(experiment(part)) == without_clock(experiment(whole))

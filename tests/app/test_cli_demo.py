"""`batchnorm demo` and `batchnorm experiment` on tiny budgets, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchnorm.app import cli
from batchnorm.app.experiments import command, common, fig1


@pytest.fixture(autouse=True)
def _numpy_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # the commands run on any backend; numpy spares each test process the JIT
    monkeypatch.setenv("BATCHNORM_BACKEND", "numpy")
    pytest.importorskip("matplotlib")
    pytest.importorskip("rich")
    pytest.importorskip("mlxtend")


def test_demo_writes_results_figures_and_report(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = cli.main(["demo", "--steps", "20", "--depth-steps", "3", "--depths", "2,3",
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fig1 test accuracy at step 20" in printed and "demo total time" in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["experiments"]) == {"fig1", "depth"}
    assert saved["experiments"]["fig1"]["steps"][-1] == 20
    assert len(saved["experiments"]["depth"]["cases"]) == 2 * 3 * 2
    for name in ("fig1.png", "depth_gradients.png", "depth_accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "Claim." in html and "Measured here." in html


def test_experiment_command_and_resume(tmp_path: Path) -> None:
    small = ["--steps", "24", "--seed", "3", "--lr", "0.3"]
    whole = tmp_path / "whole"
    assert cli.main(["experiment", "fig1", *small, "--out", str(whole)]) == 0
    expected = json.loads((whole / "results.json").read_text())["experiments"]["fig1"]
    assert expected["config"]["steps"] == 24 and expected["config"]["lr"] == 0.3

    # an interrupted run of the same configuration, then `--resume DIR`
    part = tmp_path / "part"
    config = command.make_config(fig1, {"steps": 24, "seed": 3, "lr": 0.3})
    config.eval_every = 12  # interrupt at the first evaluation after step 0
    expected_cfg = dict(expected["config"])
    expected_cfg["eval_every"] = 12

    def interrupt(done: int, total: int, text: str) -> None:
        if done >= 12:
            raise KeyboardInterrupt

    ckpt = common.Checkpoint(command.checkpoint_path(part, "fig1"))
    with pytest.raises(KeyboardInterrupt):
        fig1.run(config, progress=interrupt, checkpoint=ckpt)
    assert cli.main(["experiment", "--resume", str(part)]) == 0
    resumed = json.loads((part / "results.json").read_text())["experiments"]["fig1"]
    reference = fig1.run(config).to_dict()
    for key in ("steps", "accuracy", "train_loss", "percentiles"):
        assert resumed[key] == json.loads(json.dumps(reference[key])), key
    assert resumed["config"] == expected_cfg and resumed["completed"]


def test_bad_mnist_dir_is_a_clean_error(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 4)
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"")
    code = cli.main(["experiment", "fig1", "--steps", "2", "--mnist-dir", str(tmp_path),
                     "--out", str(tmp_path / "o")])
    assert code == 2
    assert "magic number 0x00000801, expected 0x00000803" in capsys.readouterr().err


def test_full_mnist_from_idx_files(tmp_path: Path) -> None:
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": (90, 28, 28), "train-labels-idx1-ubyte": (90,),
             "t10k-images-idx3-ubyte": (30, 28, 28), "t10k-labels-idx1-ubyte": (30,)}
    for stem, shape in files.items():
        values = rng.integers(0, 10 if len(shape) == 1 else 256, shape).astype(np.uint8)
        header = struct.pack(">I", 0x0800 | len(shape)) + struct.pack(f">{len(shape)}I", *shape)
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(header + values.tobytes())
    out = tmp_path / "out"
    assert cli.main(["experiment", "fig1", "--steps", "3", "--mnist-dir", str(tmp_path),
                     "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())["experiments"]["fig1"]
    assert saved["dataset"] == "MNIST (IDX): 90 train / 30 test digits"
    assert saved["config"]["mnist_dir"] == str(tmp_path)


def test_resume_without_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    assert cli.main(["experiment", "--resume", str(tmp_path)]) == 2
    assert cli.main(["experiment"]) == 2

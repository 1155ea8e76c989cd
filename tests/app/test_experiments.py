"""Experiments on tiny budgets: results structure, files written, resume equality."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import EXPERIMENTS, batch_size, command, common, depth, fig1, get

pytestmark = pytest.mark.usefixtures("numpy_backend")


class Interrupt:
    """A progress callback that presses Ctrl-C once, at the first call with done >= at."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.fired = False

    def __call__(self, done: int, total: int, text: str) -> None:
        if not self.fired and done >= self.at:
            self.fired = True
            raise KeyboardInterrupt


def _same(a: Any, b: Any) -> None:
    """Equal results, NaN == NaN, ignoring the wall-clock fields."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("seconds",):
                _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b


def test_registry_modules_follow_the_protocol() -> None:
    for name in EXPERIMENTS:
        module = get(name)
        assert module.NAME == name
        for attr in ("Config", "Results", "run", "summary", "figures"):
            assert hasattr(module, attr), (name, attr)
        assert dataclasses.is_dataclass(module.Config)
    with pytest.raises(ValueError, match="unknown experiment"):
        get("nope")


def test_fig1_tiny_run_structure(small: data_mod.Dataset) -> None:
    cfg = fig1.Config(steps=30, eval_every=10, batch_size=20)
    res = fig1.run(cfg, data=small)
    assert res.completed and res.steps == [0, 10, 20, 30]
    for n in fig1.NETS:
        assert len(res.accuracy[n]) == 4 and all(0 <= a <= 1 for a in res.accuracy[n])
        assert np.asarray(res.percentiles[n]).shape == (4, 3, 100)
        p = res.unit_percentiles(n)
        assert (p[:, 0] <= p[:, 1]).all() and (p[:, 1] <= p[:, 2]).all()
    # BN learns from the first steps; without BN, N(0, 0.01^2) weights stall at chance
    assert res.accuracy["bn"][-1] > res.accuracy["plain"][-1]
    assert res.accuracy_at("plain", 25) == res.accuracy["plain"][2]
    rows = dict(fig1.summary(res))
    assert "fig1 test accuracy at step 30" in rows
    json.dumps(res.to_dict())  # JSON-ready


def test_fig1_resume_gives_the_same_numbers(small: data_mod.Dataset, tmp_path: Path) -> None:
    cfg = fig1.Config(steps=40, eval_every=10, batch_size=30, checkpoint_every=15,
                      momentum=0.5)
    whole = fig1.run(cfg, data=small)
    ckpt = common.Checkpoint(tmp_path / "ck.npz", every=cfg.checkpoint_every)
    with pytest.raises(KeyboardInterrupt):
        fig1.run(cfg, data=small, progress=Interrupt(20), checkpoint=ckpt)
    _, meta = common.load_checkpoint(ckpt.path)
    assert meta["step"] == 20 and not meta["results"]["completed"]
    resumed = fig1.run(cfg, data=small,
                       checkpoint=common.Checkpoint(ckpt.path, every=15, resume=True))
    _same(whole.to_dict(), resumed.to_dict())
    assert resumed.completed


def test_depth_tiny_run_and_resume(small: data_mod.Dataset, tmp_path: Path) -> None:
    cfg = depth.Config(depths=(2, 4), activations=("sigmoid", "relu"), steps=8, width=16,
                       grad_batch=50)
    whole = depth.run(cfg, data=small)
    assert len(whole.cases) == 8
    case = whole.find("relu", 4, True)
    assert case is not None and len(case["grad_norms"]) == 4 and case["depth"] == 4
    assert all(0 <= c["accuracy"] <= 1 for c in whole.cases)
    # first_failure: the smallest depth whose accuracy is below the threshold, from the cases
    thr = cfg.train_threshold
    for act in cfg.activations:
        for bn in (False, True):
            accs = {d: whole.find(act, d, bn)["accuracy"] for d in cfg.depths}  # type: ignore[index]
            below = [d for d in sorted(accs) if not accs[d] >= thr]
            assert whole.first_failure(act, bn) == (below[0] if below else None)
    ckpt = common.Checkpoint(tmp_path / "ck.npz", every=1)
    with pytest.raises(KeyboardInterrupt):  # press Ctrl-C when the 4th net starts
        depth.run(cfg, data=small, progress=Interrupt(2 + 2 + 4), checkpoint=ckpt)
    _, meta = common.load_checkpoint(ckpt.path)
    assert len(meta["results"]["cases"]) == 3
    resumed = depth.run(cfg, data=small, checkpoint=common.Checkpoint(ckpt.path, resume=True))
    _same(whole.to_dict(), resumed.to_dict())


def test_first_failure_is_the_smallest_depth_below_the_threshold() -> None:
    def case(depth: int, bn: bool, acc: float) -> dict[str, Any]:
        return {"activation": "relu", "depth": depth, "bn": bn, "accuracy": acc}

    res = depth.Results(config={"depths": [8, 2, 4], "train_threshold": 0.5}, dataset="t",
                        cases=[case(2, False, 0.9), case(4, False, 0.3), case(8, False, 0.95),
                               case(2, True, 0.9), case(4, True, 0.5), case(8, True, 0.6)])
    assert res.first_failure("relu", False) == 4  # not 8: depth 4 fails although 8 trains
    assert res.first_failure("relu", True) is None  # 0.5 reaches the threshold
    res.cases[3]["accuracy"] = float("nan")  # a diverged net never counts as trained
    assert res.first_failure("relu", True) == 2
    assert res.first_failure("tanh", False) is None  # nothing ran


def test_depth_gradient_norms_vanish_for_deep_plain_sigmoid(small: data_mod.Dataset) -> None:
    cfg = depth.Config(depths=(12,), activations=("sigmoid",), steps=0, grad_batch=100)
    res = depth.run(cfg, data=small)
    plain = res.find("sigmoid", 12, False)["grad_norms"]  # type: ignore[index]
    with_bn = res.find("sigmoid", 12, True)["grad_norms"]  # type: ignore[index]
    assert plain[0] / plain[-1] < 1e-3  # vanishing toward the input
    assert 0.1 < with_bn[0] / with_bn[-1] < 10


def test_batch_size_tiny_run(small: data_mod.Dataset) -> None:
    cfg = batch_size.Config(batch_sizes=(2, 8), steps=4, base_batch=8)
    res = batch_size.run(cfg, data=small)
    assert len(res.cases) == 4
    bn2 = res.find(2, True)
    assert bn2 is not None and bn2["steps"] == 16 and bn2["lr"] == pytest.approx(0.5 * 2 / 8)
    assert len(batch_size.summary(res)) == 3


def test_checkpoint_file_is_atomic_and_pickle_free(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    common.save_checkpoint(path, {"a": np.arange(3)}, {"step": 5, "rng": {"s": 2**100}})
    arrays, meta = common.load_checkpoint(tmp_path / "c.npz")
    assert meta == {"step": 5, "rng": {"s": 2**100}}
    np.testing.assert_array_equal(arrays["a"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind
    with pytest.raises((ValueError, TypeError)):
        common.save_checkpoint(path, {"obj": np.array([{}], dtype=object)}, {})
    assert common.load_checkpoint(path)[1]["step"] == 5  # the old file survived the failure
    np.savez(tmp_path / "plain.npz", a=np.ones(2))
    with pytest.raises(ValueError, match="not a batchnorm checkpoint"):
        common.load_checkpoint(tmp_path / "plain.npz")


def test_sampler_state_round_trip() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    a = common.BatchSampler(x, y, 3, np.random.default_rng(0))
    for _ in range(4):
        a.next()
    meta, perm = a.state()
    b = common.BatchSampler(x, y, 3, np.random.default_rng(99))
    b.load(json.loads(json.dumps(meta)), perm)
    for _ in range(7):
        np.testing.assert_array_equal(a.next()[1], b.next()[1])


def test_outputs_written(small: data_mod.Dataset, tmp_path: Path) -> None:
    res = fig1.run(fig1.Config(steps=10, eval_every=5, batch_size=20), data=small)
    report = command.write_outputs(tmp_path, [(fig1, res)], title="t")
    assert (tmp_path / "fig1.png").read_bytes()[:4] == b"\x89PNG"
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 1 and "Ioffe" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiments"]["fig1"]["steps"] == [0, 5, 10]


def test_config_round_trip_through_json() -> None:
    cfg = depth.Config(depths=(2, 3), steps=7)
    back = command.config_from_dict(depth.Config, json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg
    made = command.make_config(fig1, {"steps": 9, "lr": None, "unknown": 1})
    assert made.steps == 9 and made.lr == fig1.Config().lr


def test_set_any_config_field_from_the_command_line() -> None:
    got = command.parse_settings(depth.Config, ["depths=2,10", "activations=relu", "lr=0.1",
                                                "init_std=0.05"])
    assert got == {"depths": (2, 10), "activations": ("relu",), "lr": 0.1, "init_std": 0.05}
    cfg = command.make_config(depth, got)
    assert cfg.depths == (2, 10) and cfg.width == depth.Config().width
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        command.parse_settings(depth.Config, ["nope=1"])
    with pytest.raises(ValueError, match="cannot read 'x'"):
        command.parse_settings(depth.Config, ["steps=x"])

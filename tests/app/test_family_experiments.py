"""The renorm and population experiments on tiny budgets: structure, the rmax/dmax schedule,
non-i.i.d. batches, resume equality, and the CLI writing their report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from batchnorm.app import data as data_mod
from batchnorm.app.experiments import common, get, population, renorm

pytestmark = pytest.mark.usefixtures("numpy_backend")


def test_registered_with_claim_and_verdict() -> None:
    for name, module in (("renorm", renorm), ("population", population)):
        assert get(name) is module and module.NAME == name
        assert "20" in module.CLAIM and callable(module.verdict)


def test_schedule_is_bn_then_relaxed_to_the_limits() -> None:
    cfg = renorm.Config(steps=1000, warmup=0.1, relax_r=0.5, relax_d=0.3)
    assert renorm.schedule(cfg, 50) == (1.0, 0.0)
    assert renorm.schedule(cfg, 100) == (1.0, 0.0)
    r, d = renorm.schedule(cfg, 300)
    assert r == pytest.approx(1 + 2 * 200 / 400) and d == pytest.approx(5.0)
    assert renorm.schedule(cfg, 1000) == (3.0, 5.0)


def test_class_sampler_draws_from_few_classes() -> None:
    y = np.repeat(np.arange(10), 20)
    s = renorm.ClassSampler(y, 12, 3, np.random.default_rng(0))
    for _ in range(5):
        idx = s.indices()
        assert len(idx) == 12 and len(set(idx)) == 12
        assert sorted(np.bincount(y[idx], minlength=10)[np.unique(y[idx])]) == [4, 4, 4]
    with pytest.raises(ValueError, match="multiple"):
        renorm.ClassSampler(y, 10, 3, np.random.default_rng(0))


def test_renorm_tiny_run_and_resume(small: data_mod.Dataset, tmp_path: Path) -> None:
    cfg = renorm.Config(steps=12, evals=3, batch=8, classes_per_batch=2, hidden=(16,))
    whole = renorm.run(cfg, data=small)
    assert len(whole.cases) == 6 and whole.completed
    case = whole.find("non-iid", "renorm")
    assert case is not None and [s for s, _ in case["curve"]] == [4, 8, 12]
    rows = dict(renorm.summary(whole))
    assert "agree" in rows["renorm verdict"]
    ckpt = common.Checkpoint(tmp_path / "ck.npz", every=1)

    def interrupt(done: int, total: int, text: str) -> None:
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        renorm.run(cfg, data=small, progress=interrupt, checkpoint=ckpt)
    resumed = renorm.run(cfg, data=small, checkpoint=common.Checkpoint(ckpt.path, resume=True))
    for a, b in zip(whole.cases, resumed.cases, strict=True):
        assert a["curve"] == b["curve"]


def test_population_tiny_run(small: data_mod.Dataset) -> None:
    cfg = population.Config(momenta=(0.5, 0.001), steps=10, evals=2, population_batches=3,
                            hidden=(16,))
    res = population.run(cfg, data=small)
    fast, slow = res.find(0.5), res.find(0.001)
    assert fast is not None and slow is not None
    # the momentum changes only the running averages: the weights, hence the exact
    # population accuracy, are the same for both nets
    assert [c[2] for c in fast["curve"]] == [c[2] for c in slow["curve"]]
    assert "exact minus EMA" in population.verdict(res)


def test_cli_writes_both_reports(small: data_mod.Dataset, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from batchnorm.app import cli

    monkeypatch.setattr(data_mod, "load", lambda *a, **k: small)
    for name, extra in (("renorm", ["--set", "hidden=8", "--set", "evals=1"]),
                        ("population", ["--set", "momenta=0.1", "--set", "evals=1",
                                        "--set", "population_batches=2", "--set", "hidden=8"])):
        out = tmp_path / name
        assert cli.main(["experiment", name, "--steps", "4", "--seed", "1", "--out", str(out),
                         *extra]) == 0
        text = (out / "report.html").read_text()
        assert "Wu &amp; Johnson" in text or "Ioffe" in text
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        saved = json.loads((out / "results.json").read_text())["experiments"][name]
        assert saved["config"]["seed"] == 1 and saved["completed"]

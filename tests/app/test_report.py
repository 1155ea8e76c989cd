"""The report for a learner: what a browser-free test can check (viewport, one column on a
phone, every figure referenced, headings in words) and `batchnorm experiment all`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from batchnorm.app import cli, report
from batchnorm.app.experiments import EXPERIMENTS, command

pytest.importorskip("matplotlib")
pytest.importorskip("rich")
pytest.importorskip("mlxtend")


pytestmark = pytest.mark.usefixtures("numpy_backend")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("BATCHNORM_BACKEND", "numpy")
    try:
        assert cli.main(["demo", "--steps", "40", "--depth-steps", "3", "--depths", "2,3",
                         "--out", str(out)]) == 0
    finally:
        mp.undo()
    return (out / "report.html").read_text()


def test_viewport_and_one_column_on_a_phone(demo_report: str) -> None:
    assert re.search(r"<meta name='viewport' content='width=device-width, initial-scale=1'>",
                     demo_report)
    narrow = re.search(r"@media \(max-width: (\d+)px\) \{(.*?)\n\}", demo_report, re.S)
    assert narrow is not None and int(narrow.group(1)) <= 700
    assert re.search(r"\.pair \{ grid-template-columns: 1fr; \}", narrow.group(2))
    assert "max-width: 100%" in demo_report and "height: auto" in demo_report  # images shrink


def test_every_figure_is_numbered_and_referenced(demo_report: str) -> None:
    figures = re.findall(r"<figure id='figure-(\d+)'>", demo_report)
    assert figures == ["1", "2", "3"]  # fig1 has one figure, depth two
    for n in figures:
        assert f"href='#figure-{n}'" in demo_report
        assert f"<figcaption>Figure {n}." in demo_report
    assert demo_report.count("data:image/png;base64,") == len(figures)


def test_report_opens_with_bn_and_questions_as_headings(demo_report: str) -> None:
    body = demo_report[demo_report.index("<body>"):]
    first_h2 = body.index("<h2")
    assert "Batch normalization (BN) standardizes" in body[:first_h2]  # said before any part
    headings = re.findall(r"<h2 id='[^']*'>(.*?)</h2>", body)
    assert len(headings) == 2
    for h in headings:
        assert h.endswith("?") and not re.search(r"\b(fig1|depth|batch-size)\b", h), h
    # the table of numbers comes after the explanation and the figures, labels in words
    for part in body.split("<h2")[1:]:
        assert part.index("<figure") < part.index("<table>")
        assert "Does this run agree?" in part
        assert not re.search(r"<th>(fig1|depth) ", part)
    assert "none" not in re.sub(r"<[^>]+>", "", body).split()  # no "fails at depth none"


def test_legends_sit_outside_the_axes() -> None:
    plt = report.plt()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="a")
    report.legend_below(ax)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.y1 <= ax.get_window_extent().y0  # wholly below the plotting area
    plt.close(fig)


def test_experiment_all_runs_every_registered_experiment_into_one_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in set(EXPERIMENTS) - {"fig1", "batch-size"}:  # two quick ones stand for all
        monkeypatch.delitem(EXPERIMENTS, name)
    out = tmp_path / "all"
    assert cli.main(["experiment", "all", "--steps", "4", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())["experiments"]
    assert set(saved) == set(EXPERIMENTS) == {"fig1", "batch-size"}
    assert all(r["completed"] for r in saved.values())
    html = (out / "report.html").read_text()
    assert html.count("<h2 id=") == 2 and "in all" in html
    assert cli.main(["experiment", "all", "--set", "lr=1", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["experiment", "--resume", str(out)]) == 0  # finished: rewrites the report
    assert cli.main(["experiment", "--resume", str(out), "--steps", "5"]) == 2


def test_in_words_drops_internal_names() -> None:
    assert command.in_words("fig1 test accuracy at step 30", "fig1") == "Test accuracy at step 30"
    assert command.in_words("batch-size time", "batch-size") == "Time"
    assert command.in_words("what stays", "fig1") == "What stays"

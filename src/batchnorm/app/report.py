"""Figures (matplotlib, Agg backend) and a self-contained HTML report, written for a learner.

The report opens with what BN does and the question each experiment asks; each section is
headed by its question, says what was done, puts the claim beside the measurement under
every figure, says whether this run agrees, and gives the numbers last. It reads on a
phone (viewport tag, one column under 700 px). Nothing here knows any experiment: the
experiment modules draw their own figures and may provide ``QUESTION``, ``CLAIM`` and
``verdict(results)``.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# legible on white (contrast >= 4.5:1 against #fff)
COLORS = {"plain": "#c0392b", "bn": "#1f5fa8"}
LABELS = {"plain": "without BN", "bn": "with BN"}


@dataclass
class Figure:
    """A matplotlib figure, its file name, and the words that go beside it."""

    name: str  # file name stem: NAME.png
    figure: Any  # matplotlib.figure.Figure
    title: str
    shows: str  # what the figure shows (measured)
    claim: str  # what the paper or the seed claims


def plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(nrows: int, ncols: int, figsize: tuple[float, float], **kwargs: Any
             ) -> tuple[Any, Any]:
    """A figure and its grid of axes (``matplotlib.pyplot.subplots``, drawn off-screen)."""
    return plt().subplots(nrows, ncols, figsize=figsize, **kwargs)  # type: ignore[no-any-return]


def tidy(*axes: Any) -> None:
    """A light grid and no top or right frame on each of ``axes``."""
    for ax in axes:
        ax.grid(True, alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)


def legend_below(ax: Any, ncol: int = 2, fontsize: float = 8) -> None:
    """The legend under the axes, outside the data area, so it never covers a curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize=fontsize,
              frameon=False)


# -- writing ----------------------------------------------------------------------------
def save_figures(figures: Sequence[Figure], out_dir: str | Path) -> dict[str, bytes]:
    """Write NAME.png for each figure into out_dir; return the PNG bytes by name."""
    pyplot = plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {}
    for f in figures:
        buf = io.BytesIO()
        f.figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # legends included
        pngs[f.name] = buf.getvalue()
        (out / f"{f.name}.png").write_bytes(pngs[f.name])
        pyplot.close(f.figure)
    return pngs


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222;
       line-height: 1.5; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin: 0.8em 0; }
.claim { background: #f4f6fb; padding: 0.6em 0.9em; border-left: 4px solid #1f5fa8; }
.shows { background: #f7f7f2; padding: 0.6em 0.9em; border-left: 4px solid #c0392b; }
.verdict { background: #f2f8f2; padding: 0.6em 0.9em; border-left: 4px solid #2e7d32; }
figure { margin: 1em 0; } figcaption { font-weight: bold; margin-bottom: 0.4em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.scroll { overflow-x: auto; }
code { background: #f2f2f2; padding: 0 0.2em; }
@media (max-width: 700px) {
  body { margin: 1em auto; padding: 0 0.6em; }
  .pair { grid-template-columns: 1fr; }
  .scroll img { max-width: none; width: 680px; }  /* legible: scroll sideways */
  table { display: block; overflow-x: auto; }
}
"""

BN_INTRO = (
    "Batch normalization (BN) standardizes every channel of a layer's input over the "
    "mini-batch: it subtracts the batch's mean and divides by the batch's standard "
    "deviation, then scales and shifts the result by two learned numbers per channel. "
    "During training it also keeps running averages of the mean and variance, which "
    "replace the batch's statistics at inference. Ioffe and Szegedy (2015) proposed it to "
    "keep the distribution of each layer's input steady while the layers below it learn."
)


@dataclass
class Section:
    """One experiment in the report: its question, what was done, the claim, the figures,
    whether this run agrees, and the numbers."""

    title: str  # a question or a claim, in words
    intro: str  # what the experiment does
    rows: list[tuple[str, str]]  # the numbers: (what, value), labels in words
    figures: list[Figure]
    claim: str = ""
    verdict: str = ""
    anchor: str = ""


def write_html(
    sections: Sequence[Section],
    pngs: dict[str, bytes],
    path: str | Path,
    title: str = "batchnorm: experiments",
    preamble: str = "",
) -> Path:
    """A single HTML file with every PNG embedded (base64): it opens anywhere, offline."""
    e = html.escape
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(title)}</h1><p>{e(BN_INTRO)}</p>"]
    if preamble:
        parts.append(f"<p>{e(preamble)}</p>")
    anchors = [s.anchor or f"part-{i + 1}" for i, s in enumerate(sections)]
    parts.append("<p>What each part asks:</p><ol>")
    parts.extend(f"<li><a href='#{a}'>{e(s.title)}</a></li>"
                 for a, s in zip(anchors, sections, strict=True))
    parts.append("</ol>")
    number = 0
    for anchor, s in zip(anchors, sections, strict=True):
        parts.append(f"<h2 id='{anchor}'>{e(s.title)}</h2><p>{e(s.intro)}</p>")
        if s.claim:
            parts.append(f"<div class='claim'><b>The claim.</b> {e(s.claim)}</div>")
        first = number + 1
        numbers = [first + k for k in range(len(s.figures))]
        if numbers:
            which = ", ".join(f"<a href='#figure-{n}'>Figure {n}</a>" for n in numbers)
            parts.append(f"<p>What we measured is in {which}.</p>")
        for n, f in zip(numbers, s.figures, strict=True):
            data = base64.b64encode(pngs[f.name]).decode("ascii")
            parts.append(
                f"<figure id='figure-{n}'><figcaption>Figure {n}. {e(f.title)}</figcaption>"
                f"<div class='scroll'><img alt='Figure {n}: {e(f.title)}' "
                f"src='data:image/png;base64,{data}'></div>"
                f"<div class='pair'><div class='claim'><b>Claim.</b> {e(f.claim)}</div>"
                f"<div class='shows'><b>Measured here.</b> {e(f.shows)}</div></div></figure>"
            )
        number += len(s.figures)
        if s.verdict:
            parts.append(f"<div class='verdict'><b>Does this run agree?</b> "
                         f"{e(s.verdict)}</div>")
        if s.rows:
            parts.append("<table><caption>The numbers</caption>")
            parts.extend(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in s.rows)
            parts.append("</table>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path

"""Figures (matplotlib, Agg backend) and a self-contained HTML report of experiment results.

Each figure comes with what it shows and what the paper (or the seed notebook) claims, so
the report reads side by side: the claim, the measurement, the picture.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLORS = {"plain": "#d62728", "bn": "#1f77b4"}
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


def tidy(ax: Any) -> None:
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# -- writing ----------------------------------------------------------------------------
def save_figures(figures: Sequence[Figure], out_dir: str | Path) -> dict[str, bytes]:
    """Write NAME.png for each figure into out_dir; return the PNG bytes by name."""
    pyplot = plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {}
    for f in figures:
        buf = io.BytesIO()
        f.figure.savefig(buf, format="png", dpi=110)
        pngs[f.name] = buf.getvalue()
        (out / f"{f.name}.png").write_bytes(pngs[f.name])
        pyplot.close(f.figure)
    return pngs


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222;
       line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin: 0.8em 0; }
.claim { background: #f4f6fb; padding: 0.6em 0.9em; border-left: 4px solid #1f77b4; }
.shows { background: #f7f7f2; padding: 0.6em 0.9em; border-left: 4px solid #d62728; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f2f2f2; padding: 0 0.2em; }
"""


@dataclass
class Section:
    """One experiment in the report."""

    title: str
    intro: str
    rows: list[tuple[str, str]]
    figures: list[Figure]


def write_html(
    sections: Sequence[Section],
    pngs: dict[str, bytes],
    path: str | Path,
    title: str = "batchnorm: experiments",
    preamble: str = "",
) -> Path:
    """A single HTML file with every PNG embedded (base64): it opens anywhere, offline."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    if preamble:
        parts.append(f"<p>{e(preamble)}</p>")
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2><p>{e(s.intro)}</p><table>")
        parts.extend(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in s.rows)
        parts.append("</table>")
        for f in s.figures:
            data = base64.b64encode(pngs[f.name]).decode("ascii")
            parts.append(
                f"<h3>{e(f.title)}</h3><div class='pair'>"
                f"<div class='claim'><b>Claim.</b> {e(f.claim)}</div>"
                f"<div class='shows'><b>Measured here.</b> {e(f.shows)}</div></div>"
                f"<img alt='{e(f.title)}' src='data:image/png;base64,{data}'>"
            )
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path

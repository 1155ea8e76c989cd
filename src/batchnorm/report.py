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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from batchnorm.experiments import batch_size, depth, fig1

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


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tidy(ax: Any) -> None:
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# -- fig1 -------------------------------------------------------------------------------
def fig1_figures(results: fig1.Results) -> list[Figure]:
    plt = _plt()
    steps = np.asarray(results.steps)
    unit = results.config["unit"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for n in ("plain", "bn"):
        ax.plot(steps, results.accuracy[n], color=COLORS[n], label=LABELS[n])
    ax.set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy")
    ax.legend(loc="lower right")
    _tidy(ax)
    lims = []
    for ax, n, tag in ((axes[1], "plain", "(b)"), (axes[2], "bn", "(c)")):
        p = results.unit_percentiles(n)
        for k, style in zip(range(3), (":", "-", "--"), strict=True):
            ax.plot(steps, p[:, k], style, color=COLORS[n],
                    label=f"{int((15, 50, 85)[k])}th percentile")
        ax.set(title=f"{tag} sigmoid input, {LABELS[n]} (unit {unit})", xlabel="training step")
        lims.append(ax.get_ylim())
        ax.legend(loc="best", fontsize=8)
        _tidy(ax)
    lo, hi = min(x[0] for x in lims), max(x[1] for x in lims)
    for ax in axes[1:]:
        ax.set_ylim(lo, hi)  # same scale, so the drift is comparable at a glance
    fig.tight_layout()
    last = int(steps[-1]) if len(steps) else 0
    acc = {n: results.accuracy[n][-1] if results.accuracy[n] else float("nan")
           for n in ("plain", "bn")}
    d = {n: results.drift(n) for n in ("plain", "bn")}
    shows = (
        f"After {last:,} steps on {results.dataset}: test accuracy {acc['plain']:.4f} without BN "
        f"and {acc['bn']:.4f} with BN. Over training the median of unit {unit}'s sigmoid input "
        f"moved over a range of {d['plain']['range'][1]:.2f} without BN and "
        f"{d['bn']['range'][1]:.2f} with BN (mean over all 100 units: "
        f"{d['plain']['all_units_median_range']:.2f} vs {d['bn']['all_units_median_range']:.2f}). "
        f"From step {d['plain']['at_10pct_step']:,} to the end, past the first transient, the "
        f"median moved by {d['plain']['all_units_late_median_drift']:.2f} without BN and "
        f"{d['bn']['all_units_late_median_drift']:.2f} with BN (mean over units). Percentiles "
        "are over the test digits at inference."
    )
    claim = (
        "Ioffe & Szegedy (2015), Fig. 1: (a) the network with BN trains faster and reaches "
        "higher test accuracy; (b, c) without BN the distribution of a sigmoid's input changes "
        "significantly over training, in mean and variance; with BN it is much more stable."
    )
    return [Figure("fig1", fig, "Figure 1: MNIST, with and without BN", shows, claim)]


# -- depth ------------------------------------------------------------------------------
def depth_figures(results: depth.Results) -> list[Figure]:
    plt = _plt()
    cfg = results.config
    acts = list(cfg["activations"])
    depths = sorted(cfg["depths"])
    shown = sorted({depths[0], depths[len(depths) // 2], depths[-1]})
    fig, axes = plt.subplots(2, len(acts), figsize=(4.6 * len(acts), 7.5), squeeze=False)
    for j, a in enumerate(acts):
        for row, bn in enumerate((False, True)):
            ax = axes[row][j]
            for k, d in enumerate(shown):
                case = results.find(a, d, bn)
                if case is None:
                    continue
                g = np.maximum(np.asarray(case["grad_norms"]), 1e-30)
                ax.semilogy(np.arange(1, len(g) + 1), g, "o-", ms=2,
                            color=plt.cm.viridis(k / max(1, len(shown) - 1)),
                            label=f"depth {d}")
            ax.set(title=f"{a}, {'with BN' if bn else 'without BN'}",
                   xlabel="layer (1 = input side)", ylabel="||dL/dW|| at init")
            ax.legend(fontsize=8)
            _tidy(ax)
    fig.tight_layout()
    shows_g = "; ".join(
        f"{a} depth {depths[-1]}: first/last-layer ratio "
        f"{_ratio(results.find(a, depths[-1], False))} without BN, "
        f"{_ratio(results.find(a, depths[-1], True))} with BN" for a in acts
    )
    exploding = [a for a in acts if _ratio_value(results.find(a, depths[-1], True)) > 10]
    if exploding:
        shows_g += (f". With BN the gradients of deep {' and '.join(exploding)} nets grow "
                    "toward the input: BN does not prevent exploding gradients at initialization "
                    "(as Yang et al. 2019, 'A Mean Field Theory of Batch Normalization', predict)")
    grad_fig = Figure(
        "depth_gradients", fig, "Gradient norm by layer at initialization",
        "Norm of each Linear's weight gradient on one batch of training digits, before any "
        f"training. {shows_g}.",
        "The seed notebook: through many layers, gradients vanish or explode (values are "
        "multiplied by W at every layer); BN keeps each layer's input distribution fixed. "
        "Ioffe & Szegedy (2015), sec. 3.3: BN makes back-propagation through a layer "
        "unaffected by the scale of its parameters.",
    )

    fig2, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"sigmoid": "o", "tanh": "s", "relu": "^"}
    for a in acts:
        for bn in (False, True):
            cases = [results.find(a, d, bn) for d in depths]
            xs = [d for d, c in zip(depths, cases, strict=True) if c is not None]
            cs = [c for c in cases if c is not None]
            color = COLORS["bn" if bn else "plain"]
            ls = "-" if bn else "--"
            lab = f"{a}, {'BN' if bn else 'no BN'}"
            ax1.plot(xs, [c["accuracy"] for c in cs], ls, marker=styles.get(a, "o"),
                     color=color, label=lab)
            ax2.semilogy(xs, [max(_ratio_value(c), 1e-30) for c in cs], ls,
                         marker=styles.get(a, "o"), color=color, label=lab)
    ax1.axhline(cfg["train_threshold"], color="gray", lw=0.8, ls=":")
    ax1.set(title=f"test accuracy after {cfg['steps']:,} steps", xlabel="depth (Linear layers)",
            ylabel="accuracy")
    ax2.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax2.set(title="first-layer / last-layer gradient norm at init", xlabel="depth",
            ylabel="ratio")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7, ncol=2)
        _tidy(ax)
    fig2.tight_layout()
    fails = "; ".join(
        f"{a}: without BN first fails at depth {results.first_failure(a, False) or 'none'}, "
        f"with BN at {results.first_failure(a, True) or 'none'}" for a in acts
    )
    acc_fig = Figure(
        "depth_accuracy", fig2, "Accuracy and gradient ratio against depth",
        f"Test accuracy after a fixed budget of {cfg['steps']:,} steps (batch "
        f"{cfg['batch_size']}, lr {cfg['lr']}, momentum {cfg['momentum']}); a net 'trains' "
        f"when it reaches {cfg['train_threshold']} (dotted line). {fails}.",
        "The seed notebook: deeper plain networks train worse or not at all, because the "
        "distribution of each layer's input drifts; BN lets deep networks train.",
    )
    return [grad_fig, acc_fig]


def _ratio_value(case: dict[str, Any] | None) -> float:
    if case is None:
        return float("nan")
    g = case["grad_norms"]
    return float(g[0] / g[-1]) if g[-1] else float("inf")


def _ratio(case: dict[str, Any] | None) -> str:
    return f"{_ratio_value(case):.2g}"


# -- batch size -------------------------------------------------------------------------
def batch_size_figures(results: batch_size.Results) -> list[Figure]:
    plt = _plt()
    sizes = list(results.config["batch_sizes"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for bn, n in ((False, "plain"), (True, "bn")):
        cases = [results.find(b, bn) for b in sizes]
        xs = [b for b, c in zip(sizes, cases, strict=True) if c is not None]
        ax.plot(xs, [c["accuracy"] for c in cases if c is not None], "o-", color=COLORS[n],
                label=LABELS[n])
    ax.set_xscale("log", base=2)
    ax.set(title="test accuracy (population statistics) vs batch size", xlabel="batch size",
           ylabel="accuracy")
    ax.legend()
    _tidy(ax)
    fig.tight_layout()
    parts = []
    for b in sizes:
        p, q = results.find(b, False), results.find(b, True)
        if p is not None and q is not None:
            parts.append(f"batch {b}: {p['accuracy']:.3f} / {q['accuracy']:.3f}")
    shows = ("Same number of training examples for every batch size, learning rate "
             f"{results.config['lr']} x batch / {results.config['base_batch']}. Test accuracy "
             "without / with BN: " + "; ".join(parts) + ".")
    claim = ("BN's statistics are estimated per batch: with very small batches they are noisy "
             "and unlike the population statistics used at inference, so BN degrades "
             "(Ioffe 2017, Batch Renormalization; Wu & He 2018, Group Normalization).")
    return [Figure("batch_size", fig, "Batch size", shows, claim)]


# -- writing ----------------------------------------------------------------------------
def save_figures(figures: Sequence[Figure], out_dir: str | Path) -> dict[str, bytes]:
    """Write NAME.png for each figure into out_dir; return the PNG bytes by name."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {}
    for f in figures:
        buf = io.BytesIO()
        f.figure.savefig(buf, format="png", dpi=110)
        pngs[f.name] = buf.getvalue()
        (out / f"{f.name}.png").write_bytes(pngs[f.name])
        plt.close(f.figure)
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
